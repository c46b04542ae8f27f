"""The filter defenses FLAME, SignGuard, RFLBAT and AlignIns, each against an independent computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from sklearn.cluster import HDBSCAN, KMeans, MeanShift, estimate_bandwidth
from sklearn.decomposition import PCA

from fdcr_mpi.defenses.alignins import AlignIns
from fdcr_mpi.defenses.base import available
from fdcr_mpi.defenses.flame import Flame
from fdcr_mpi.defenses.rflbat import RFLBAT
from fdcr_mpi.defenses.signguard import SignGuard
from fdcr_mpi.seeding import DEFENSE, numpy_rng, torch_generator
from tests.test_baselines import make_inputs, real_updates, weighted_mean

CLASSES = [Flame, SignGuard, RFLBAT, AlignIns]


def test_filters_registered_with_a_summary() -> None:
    registry = available()
    for name, cls in [("flame", Flame), ("signguard", SignGuard), ("rflbat", RFLBAT), ("alignins", AlignIns)]:
        assert registry[name] is cls and cls.summary and not cls.needs_proxy and not cls.needs_fisher


def clipped_mean(u: np.ndarray, keep: np.ndarray, sizes: np.ndarray, bound: float) -> np.ndarray:
    """sizes-weighted mean over ``keep`` of u_k * min(1, bound / ||u_k||)."""
    norms = np.linalg.norm(u, axis=1)
    scaled = u * np.minimum(1.0, bound / norms)[:, None]
    return weighted_mean(scaled[keep], sizes[keep])


# ------------------------------------------------------------------ FLAME


def reference_flame(models: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, float]:
    """Algorithm 1 of the FLAME paper: (admitted mask, S_t)."""
    n = len(models)
    dist = cdist(models, models, "cosine")
    labels = HDBSCAN(min_cluster_size=n // 2 + 1, min_samples=1, allow_single_cluster=True,
                     metric="precomputed", copy=True).fit(dist).labels_
    majority = np.bincount(labels[labels >= 0]).argmax()
    return labels == majority, float(np.median(np.linalg.norm(u, axis=1)))


def flame_case(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=300)
    u = base + 0.3 * rng.normal(size=(10, 300))
    u[[0, 4, 7]] = 2.0 * rng.normal(size=(3, 300))  # other directions
    u[5] *= 3.0  # same direction, larger norm: admitted, clipped
    return u, rng.normal(size=300) * 0.1, rng.integers(1, 20, size=10).astype(np.float64)


def test_flame_matches_the_paper_algorithm_and_adds_seeded_noise() -> None:
    u, w_t, sizes = flame_case(0)
    inputs = make_inputs(u, w_t, sizes, round=3)
    uu = real_updates(inputs)
    models = inputs.client_weights.double().numpy()
    admitted, s_t = reference_flame(models, uu)
    assert not admitted[[0, 4, 7]].any() and admitted[5]

    quiet = Flame(noise_lambda=0.0).aggregate(inputs)
    np.testing.assert_array_equal(quiet.removed, ~admitted)
    np.testing.assert_allclose(quiet.alpha_hat, np.where(admitted, sizes, 0) / sizes[admitted].sum(), rtol=1e-12)
    assert quiet.diagnostics["clip_bound"] == pytest.approx(s_t, rel=1e-10)
    expected = w_t.astype(np.float32) + clipped_mean(uu, admitted, sizes, s_t)
    np.testing.assert_allclose(quiet.weights.numpy(), expected, atol=1e-6)

    noisy = Flame().aggregate(inputs)  # lambda = 0.001: N(0, (0.001 S_t)^2) from the round's generator
    draws = torch.randn(300, generator=torch_generator(0, DEFENSE, 0, 3), dtype=torch.float32).double().numpy()
    np.testing.assert_allclose(noisy.weights.numpy() - quiet.weights.numpy(), 0.001 * s_t * draws, atol=1e-6)
    assert noisy.diagnostics["noise_std"] == pytest.approx(0.001 * s_t)

    by_updates = Flame(space="updates", noise_lambda=0.0).aggregate(inputs)
    admitted_u, _ = reference_flame(uu, uu)
    np.testing.assert_array_equal(by_updates.removed, ~admitted_u)


def test_flame_clipping_bounds_a_scaled_attacker() -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(size=400)
    u = base + 0.2 * rng.normal(size=(9, 400))
    u[2] = 100.0 * base  # model replacement: same direction, cosine cannot see it
    inputs = make_inputs(u)
    res = Flame(noise_lambda=0.0).aggregate(inputs)
    norms = np.linalg.norm(real_updates(inputs), axis=1)
    assert res.diagnostics["clip_factor"][2] == pytest.approx(np.median(norms) / norms[2], rel=1e-6)
    assert np.linalg.norm(res.weights.numpy()) <= np.median(norms) * (1 + 1e-5)  # a FedAvg step would be ~12x
    far = u.copy()
    far[[1, 6]] = -5.0 * base  # opposite direction: removed
    res = Flame().aggregate(make_inputs(far))
    assert res.removed[1] and res.removed[6] and res.alpha_hat[[1, 6]].sum() == 0


# ------------------------------------------------------------------ SignGuard


def signguard_case(seed: int, d: int = 3000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    u = 0.3 + rng.normal(size=(10, d))  # about 62% positive coordinates
    u[[1, 6]] *= -1.0  # sign flipping: same norms, 62% negative
    u[8] *= 10.0  # scaled
    u[3] = np.where(rng.random(d) < 0.5, 0.0, u[3]) * 1.4  # half the coordinates zero
    return u, rng.integers(1, 30, size=10).astype(np.float64)


def reference_sign_features(u: np.ndarray) -> np.ndarray:
    s = np.sign(u)
    frac = np.stack([(s > 0).mean(axis=1), (s == 0).mean(axis=1), (s < 0).mean(axis=1)], axis=1)
    return frac / (frac.max(axis=0) + 1e-8)


def test_signguard_matches_the_authors_rule() -> None:
    u, sizes = signguard_case(2)
    inputs = make_inputs(u, sizes=sizes)
    uu = real_updates(inputs)
    norms = np.linalg.norm(uu, axis=1)
    med = np.median(norms)
    by_norm = (norms >= 0.1 * med) & (norms <= 3.0 * med)
    feats = reference_sign_features(uu)
    bandwidth = estimate_bandwidth(feats, quantile=0.5, n_samples=50, random_state=0)
    labels = MeanShift(bandwidth=bandwidth, bin_seeding=True, cluster_all=False).fit(feats).labels_
    keep = by_norm & (labels == np.bincount(labels[labels >= 0]).argmax())
    np.testing.assert_array_equal(np.flatnonzero(~keep), [1, 3, 6, 8])

    res = SignGuard(coordinate_fraction=1.0).aggregate(inputs)  # every coordinate: no draw involved
    np.testing.assert_array_equal(res.removed, ~keep)
    got = np.stack([res.diagnostics[f"sign_{s}"] for s in ("positive", "zero", "negative")], axis=1)
    np.testing.assert_allclose(got, feats, rtol=1e-12)
    np.testing.assert_allclose(res.alpha_hat, np.where(keep, sizes, 0) / sizes[keep].sum(), rtol=1e-12)
    np.testing.assert_allclose(res.weights.numpy(), clipped_mean(uu, keep, sizes, med), atol=1e-6)

    default = SignGuard().aggregate(make_inputs(u, sizes=sizes, round=4))  # 10% of the coordinates
    coords = np.sort(numpy_rng(0, DEFENSE, 0, 4).choice(3000, size=300, replace=False))
    np.testing.assert_allclose(default.diagnostics["sign_positive"], reference_sign_features(uu[:, coords])[:, 0],
                               rtol=1e-12)
    np.testing.assert_array_equal(default.removed, ~keep)
    assert np.linalg.norm(default.weights.numpy()) <= med * (1 + 1e-6)


def test_signguard_norm_bounds_are_the_options() -> None:
    rng = np.random.default_rng(3)
    u = 0.3 + rng.normal(size=(8, 500))
    u[2] *= 0.05  # norm ratio 0.05 < 0.1
    res = SignGuard().aggregate(make_inputs(u))
    assert res.removed[2] and res.diagnostics["norm_ratio"][2] < 0.1
    assert not SignGuard(lower=0.01).aggregate(make_inputs(u)).removed[2]


# ------------------------------------------------------------------ RFLBAT


def rflbat_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """12 benign (heterogeneous), 5 backdoored (nearly identical), 1 far outlier."""
    rng = np.random.default_rng(seed)
    base, target = rng.normal(size=200), rng.normal(size=200)
    benign = base + rng.normal(size=(12, 200))
    backdoor = target + 0.05 * rng.normal(size=(5, 200))
    u = np.vstack([backdoor[:2], 300.0 * rng.normal(size=(1, 200)), benign[:6], backdoor[2:], benign[6:]])
    return u, rng.integers(1, 9, size=18).astype(np.float64)


BACKDOOR, OUTLIER = [0, 1, 9, 10, 11], 2


def reference_gap_k(x: np.ndarray, k_max: int, draws: int, rng: np.random.Generator) -> int:
    """Gap statistic with Euclidean dispersion on min-max scaled points (Tibshirani et al.'s rule)."""
    data = (x - x.min(0)) / (x.max(0) - x.min(0))
    k_max = min(k_max, len(np.unique(data, axis=0)) - 1)

    def w(points: np.ndarray, k: int) -> float:
        km = KMeans(n_clusters=k, n_init=10, random_state=int(rng.integers(1000))).fit(points)
        return sum(np.linalg.norm(points[i] - km.cluster_centers_[km.labels_[i]]) for i in range(len(points)))

    gap, s = [], []
    for k in range(1, k_max + 1):
        logs = np.log([w(rng.uniform(size=data.shape), k) for _ in range(draws)])
        gap.append(logs.mean() - np.log(w(data, k)))
        s.append(logs.std() * np.sqrt(1 + 1 / draws))
    return next((k for k in range(1, k_max) if gap[k - 1] >= gap[k] - s[k]), k_max)


def reference_rflbat(u: np.ndarray) -> tuple[np.ndarray, int]:
    x = PCA(n_components=2).fit_transform(u)
    ed = cdist(x, x).sum(axis=1)
    stage1 = np.flatnonzero(ed <= 10 * np.median(ed))
    k = reference_gap_k(x[stage1], 10, 5, np.random.default_rng(99))
    labels = KMeans(n_clusters=k, n_init=10, random_state=5).fit(x[stage1]).labels_
    cos = 1.0 - cdist(u, u, "cosine")
    scores = []
    for c in range(k):
        m = stage1[labels == c]
        scores.append(np.median(cos[np.ix_(m, m)].mean(axis=1)) if len(m) > 1 else 1.0)
    stage2 = stage1[labels == int(np.argmin(scores))]
    ed2 = cdist(x[stage2], x[stage2]).sum(axis=1)
    keep = np.zeros(len(u), dtype=bool)
    keep[stage2[ed2 <= 4 * np.median(ed2)]] = True
    return keep, k


def test_rflbat_matches_the_paper_algorithm() -> None:
    u, sizes = rflbat_case(4)
    inputs = make_inputs(u, sizes=sizes)
    uu = real_updates(inputs)
    keep, k = reference_rflbat(uu)
    res = RFLBAT().aggregate(inputs)
    x = PCA(n_components=2).fit_transform(uu)
    np.testing.assert_allclose(res.diagnostics["distance_sum"], cdist(x, x).sum(axis=1), rtol=1e-7)
    assert res.diagnostics["num_clusters"] == k
    assert res.diagnostics["cluster"][OUTLIER] == -1  # first outlier removal
    np.testing.assert_array_equal(res.removed, ~keep)
    assert res.removed[BACKDOOR].all() and res.removed[OUTLIER]
    np.testing.assert_allclose(res.alpha_hat, np.where(keep, sizes, 0) / sizes[keep].sum(), rtol=1e-12)
    np.testing.assert_allclose(res.weights.numpy(), weighted_mean(uu[keep], sizes[keep]), atol=1e-6)


def test_rflbat_rejects_the_backdoor_cluster_for_other_seeds() -> None:
    for seed in (5, 6):
        u, _ = rflbat_case(seed)
        res = RFLBAT().aggregate(make_inputs(u, round=seed))
        assert res.removed[BACKDOOR].all() and res.removed[OUTLIER]
        assert (~res.removed).sum() >= 3  # only benign clients survive (min-max scaling splits their cloud)


# ------------------------------------------------------------------ AlignIns


def reference_alignins(u: np.ndarray, w_t: np.ndarray, sparsity: float = 0.3) -> tuple[np.ndarray, ...]:
    tda = u @ w_t / (np.linalg.norm(u, axis=1) * np.linalg.norm(w_t))
    principal = np.sign(np.sign(u).sum(axis=0))
    top = int(sparsity * u.shape[1])
    mpsa = np.array([np.mean(np.sign(row[idx]) == principal[idx])
                     for row in u for idx in [np.argsort(-np.abs(row), kind="stable")[:top]]])

    def mz(x: np.ndarray) -> np.ndarray:
        return np.abs(x - np.median(x)) / np.std(x)

    keep = (mz(mpsa) < 1.0) & (mz(tda) < 1.0)
    return keep, tda, mpsa, float(np.median(np.linalg.norm(u[keep], axis=1)))


def alignins_case(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w_t = rng.normal(size=2000)
    u = -0.05 * w_t + 0.05 * rng.normal(size=(10, 2000))  # benign: shrink the model (weight decay) plus noise
    u[[2, 5, 9]] *= -1.0  # sign flipped
    u[7] *= 1.8  # aligned but larger: kept, clipped
    return u, w_t, rng.integers(1, 40, size=10).astype(np.float64)


def test_alignins_matches_the_authors_rule() -> None:
    u, w_t, sizes = alignins_case(6)
    inputs = make_inputs(u, w_t, sizes)
    uu = real_updates(inputs)
    keep, tda, mpsa, bound = reference_alignins(uu, inputs.global_weights.double().numpy())
    res = AlignIns().aggregate(inputs)
    np.testing.assert_allclose(res.diagnostics["tda"], tda, rtol=1e-9)
    np.testing.assert_allclose(res.diagnostics["mpsa"], mpsa, rtol=1e-12)
    np.testing.assert_array_equal(res.removed, ~keep)
    assert res.removed[[2, 5, 9]].all() and not res.removed[7]
    assert res.diagnostics["clip_bound"] == pytest.approx(bound, rel=1e-10)
    np.testing.assert_allclose(res.alpha_hat, np.where(keep, sizes, 0) / sizes[keep].sum(), rtol=1e-12)
    np.testing.assert_allclose(res.weights.numpy() - inputs.global_weights.numpy(),
                               clipped_mean(uu, keep, sizes, bound), atol=1e-6)


def test_alignins_top_k_ties_go_to_the_lower_coordinate() -> None:
    signs = np.ones((5, 10))
    signs[:, :3] = -1.0  # principal sign: -1 on coordinates 0-2, +1 elsewhere
    signs[0, :3] = 1.0  # client 0 disagrees on coordinates 0-2 only
    res = AlignIns(sparsity=0.3).aggregate(make_inputs(signs, np.ones(10)))  # |u| all equal: top-3 = 0, 1, 2
    np.testing.assert_allclose(res.diagnostics["mpsa"], [0.0, 1.0, 1.0, 1.0, 1.0])
    assert res.removed[0]


# ------------------------------------------------------------------ common contract and edge cases


def test_seed_option_and_round_vary_the_draws() -> None:
    u, sizes = signguard_case(7, d=600)
    inputs = make_inputs(u, sizes=sizes, round=2)
    flame = Flame().aggregate(inputs)
    assert not torch.equal(flame.weights, Flame(seed=1).aggregate(inputs).weights)
    assert not torch.equal(flame.weights, Flame().aggregate(make_inputs(u, sizes=sizes, round=3)).weights)
    np.testing.assert_allclose(flame.weights.numpy(), Flame(seed=1).aggregate(inputs).weights.numpy(),
                               atol=10 * flame.diagnostics["noise_std"])  # only the noise differs
    sign = SignGuard().aggregate(inputs).diagnostics["sign_positive"]
    assert not np.array_equal(sign, SignGuard(seed=1).aggregate(inputs).diagnostics["sign_positive"])
    assert not np.array_equal(sign, SignGuard().aggregate(make_inputs(u, sizes=sizes, round=3))
                              .diagnostics["sign_positive"])


EDGE_CASES = {
    "one client": np.random.default_rng(10).normal(size=(1, 50)),
    "two clients": np.random.default_rng(11).normal(size=(2, 50)),
    "identical": np.tile(np.random.default_rng(12).normal(size=50), (6, 1)),
    "zero": np.zeros((6, 50)),
}


@pytest.mark.parametrize("case", sorted(EDGE_CASES))
@pytest.mark.parametrize("cls", CLASSES)
def test_edge_cases_do_not_crash_or_give_nan(cls: type, case: str) -> None:
    u = EDGE_CASES[case]
    w_t = np.linspace(-1.0, 1.0, 50)
    inputs = make_inputs(u, w_t)
    res = cls().aggregate(inputs)
    k = len(u)
    assert torch.isfinite(res.weights).all() and res.weights.shape == (50,)
    assert res.alpha_hat.shape == (k,) and np.isfinite(res.alpha_hat).all() and (res.alpha_hat >= 0).all()
    assert (res.alpha_hat[res.removed] == 0).all()
    for name, value in res.diagnostics.items():
        assert np.all(np.isfinite(np.asarray(value, dtype=np.float64))), name
    if case in ("identical", "zero", "one client"):  # nothing to tell apart: everyone kept, the common update
        assert not res.removed.any() and res.alpha_hat.sum() == pytest.approx(1.0)
        atol = 1e-3 * np.linalg.norm(u[0]) + 1e-6 if cls is Flame else 1e-6  # FLAME's noise: 0.001 * S_t
        np.testing.assert_allclose(res.weights.numpy(), w_t + u[0], atol=atol * 5)
    elif cls is AlignIns:  # two distinct values: both MZ-scores are 1, not < 1: both removed, w_t kept
        assert res.removed.all() and res.alpha_hat.sum() == 0
        np.testing.assert_allclose(res.weights.numpy(), w_t, atol=1e-7)
    else:  # two clients: too few to tell apart (SignGuard: no bandwidth for MeanShift), both kept
        assert not res.removed.any() and res.alpha_hat.sum() == pytest.approx(1.0)
