"""The "simple" robust aggregators: Krum, coordinate-wise median, trimmed mean, norm clipping, weak DP,
centered clipping and bucketing, each against a plain re-implementation of its paper's rule."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from fdcr_mpi.defenses.base import Defense, available
from fdcr_mpi.defenses.bucketing import Bucketing
from fdcr_mpi.defenses.centered_clipping import CenteredClipping
from fdcr_mpi.defenses.coordinate_median import CoordinateMedian
from fdcr_mpi.defenses.krum_single import Krum
from fdcr_mpi.defenses.norm_clipping import NormClipping
from fdcr_mpi.defenses.trimmed_mean import TrimmedMean
from fdcr_mpi.defenses.weak_dp import WeakDP
from fdcr_mpi.errors import UserError
from fdcr_mpi.seeding import DEFENSE, numpy_rng, torch_generator
from tests.test_baselines import make_inputs, real_updates

CLASSES: list[type[Defense]] = [Krum, CoordinateMedian, TrimmedMean, NormClipping, WeakDP, CenteredClipping, Bucketing]


def test_registered_with_summaries() -> None:
    registry = available()
    names = {"krum": Krum, "median": CoordinateMedian, "trimmed_mean": TrimmedMean, "norm_clipping": NormClipping,
             "weak_dp": WeakDP, "centered_clipping": CenteredClipping, "bucketing": Bucketing}
    for name, cls in names.items():
        assert registry[name] is cls and cls.summary
    with pytest.raises(UserError):
        Bucketing(aggregator="mean")
    for bad in (-1.0, 0, "mean", float("inf")):
        with pytest.raises(UserError, match="M must be 'median' or a positive number"):
            NormClipping(bound=bad)
    assert WeakDP(bound=2).options.bound == 2.0 and NormClipping().options.bound == "median"


# ------------------------------------------------------------------ plain re-implementations


def ref_krum(u: np.ndarray, f: int) -> tuple[int, np.ndarray]:
    """Blanchard et al.: score(i) = sum of the n - f - 2 smallest squared distances to the others."""
    n = len(u)
    d2 = cdist(u, u, "sqeuclidean")
    scores = np.array([sum(sorted(d2[i, j] for j in range(n) if j != i)[: max(n - f - 2, 1)]) for i in range(n)])
    best = min(range(n), key=lambda i: (scores[i], i))
    return best, scores


def ref_order_statistic(u: np.ndarray, position_weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per coordinate sum_p c_p x_(p); a client's share is the weight of the sorted positions its value
    occupies, split equally among the clients holding that value; averaged over coordinates."""
    n, p = u.shape
    value, share = np.zeros(p), np.zeros(n)
    for j in range(p):
        col = u[:, j]
        srt = sorted(col)
        value[j] = sum(position_weight[q] * srt[q] for q in range(n))
        for k in range(n):
            pos = [q for q in range(n) if srt[q] == col[k]]
            share[k] += sum(position_weight[q] for q in pos) / len(pos)
    return value, share / p


def ref_median(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = len(u)
    c = np.zeros(n)
    if n % 2:
        c[n // 2] = 1.0
    else:
        c[n // 2 - 1] = c[n // 2] = 0.5
    value, share = ref_order_statistic(u, c)
    np.testing.assert_allclose(value, np.median(u, axis=0), atol=1e-12)
    return value, share


def ref_trimmed_mean(u: np.ndarray, b: int) -> tuple[np.ndarray, np.ndarray]:
    n = len(u)
    value = np.array([np.sort(u[:, j])[b:n - b].mean() for j in range(u.shape[1])])
    c = np.zeros(n)
    c[b:n - b] = 1.0 / (n - 2 * b)
    return value, ref_order_statistic(u, c)[1]


def ref_centered_clipping(x: np.ndarray, v: np.ndarray, tau: float, iterations: int) -> np.ndarray:
    """Karimireddy et al.: v <- v + (1/n) sum_i (x_i - v) min(1, tau / ||x_i - v||), L times."""
    for _ in range(iterations):
        step = np.zeros_like(v)
        for xi in x:
            z = xi - v
            norm = np.linalg.norm(z)
            step += z * (min(1.0, tau / norm) if norm > 0 else 1.0)
        v = v + step / len(x)
    return v


# ------------------------------------------------------------------ Krum


def test_krum_picks_the_paper_rule_and_never_a_far_update() -> None:
    rng = np.random.default_rng(0)
    u = rng.normal(0.0, 0.1, (9, 6))
    u[2] += 5.0  # two far updates
    u[7] = -4.0 * u[7] + 3.0
    sizes = np.arange(1.0, 10.0)
    inputs = make_inputs(u, rng.normal(size=6), sizes)
    res = Krum().aggregate(inputs)
    uu = real_updates(inputs)
    best, scores = ref_krum(uu, 3)  # default f = (9 - 3) // 2 = 3: 4 neighbours
    assert res.diagnostics["f"] == 3 and res.diagnostics["selected"] == best and best not in (2, 7)
    np.testing.assert_allclose(res.diagnostics["krum_score"], scores, rtol=1e-9)
    expected_alpha = np.eye(9)[best]
    np.testing.assert_array_equal(res.alpha_hat, expected_alpha)
    np.testing.assert_array_equal(res.removed, expected_alpha == 0)
    np.testing.assert_allclose(res.weights.numpy(), inputs.global_weights.numpy() + uu[best], atol=1e-6)

    for f in (0, 1, 5):  # a configured f changes the neighbour count: n - f - 2
        best_f, scores_f = ref_krum(uu, f)
        got = Krum(f=f).aggregate(inputs)
        np.testing.assert_allclose(got.diagnostics["krum_score"], scores_f, rtol=1e-9)
        assert got.diagnostics["selected"] == best_f
    assert Krum().aggregate(make_inputs(rng.normal(size=(10, 3)))).diagnostics["f"] == 3
    assert Krum().aggregate(make_inputs(rng.normal(size=(2, 3)))).diagnostics["f"] == 0


# ------------------------------------------------------------------ median and trimmed mean


@pytest.mark.parametrize("n", [7, 8])
def test_median_matches_numpy_and_shares_ties(n: int) -> None:
    rng = np.random.default_rng(n)
    u = rng.integers(-3, 4, size=(n, 40)).astype(np.float64)  # small integers: many ties
    inputs = make_inputs(u, rng.normal(size=40))
    res = CoordinateMedian().aggregate(inputs)
    value, share = ref_median(real_updates(inputs))
    np.testing.assert_allclose(res.weights.numpy(), inputs.global_weights.numpy() + value, atol=1e-6)
    np.testing.assert_allclose(res.alpha_hat, share, atol=1e-12)
    np.testing.assert_array_equal(res.removed, share == 0)


def test_median_bounds_far_attackers_and_crosses_chunks() -> None:
    rng = np.random.default_rng(1)
    p = 70_000  # more than one sorting chunk
    honest = rng.normal(size=(7, p))
    u = np.vstack([honest, 1000.0 + rng.normal(size=(3, p))])  # 3 of 10 far away
    res = CoordinateMedian().aggregate(make_inputs(u))
    np.testing.assert_allclose(res.weights.numpy(), np.median(u, axis=0), atol=1e-5)
    assert (res.weights.numpy() <= honest.max(axis=0) + 1e-6).all()
    np.testing.assert_array_equal(res.removed, [False] * 7 + [True] * 3)
    assert res.alpha_hat[:7].sum() == pytest.approx(1.0)


def test_trimmed_mean_matches_the_textbook_rule() -> None:
    rng = np.random.default_rng(2)
    u = rng.integers(-2, 3, size=(10, 30)).astype(np.float64)
    u[:, :10] = rng.normal(size=(10, 10))
    inputs = make_inputs(u, rng.normal(size=30))
    for beta, b in [(0.1, 1), (0.25, 2), (0.49, 4), (0.0, 0)]:
        res = TrimmedMean(beta=beta).aggregate(inputs)
        value, share = ref_trimmed_mean(real_updates(inputs), b)
        assert res.diagnostics["b"] == b
        np.testing.assert_allclose(res.weights.numpy(), inputs.global_weights.numpy() + value, atol=1e-6)
        np.testing.assert_allclose(res.alpha_hat, share, atol=1e-12)
    assert TrimmedMean().aggregate(make_inputs(u[:9])).diagnostics["b"] == 0  # floor(0.1 * 9)
    assert TrimmedMean(beta=0.4).aggregate(make_inputs(u[:2])).diagnostics["b"] == 0  # one value must remain


def test_trimmed_mean_drops_scaled_attackers() -> None:
    rng = np.random.default_rng(3)
    honest = rng.normal(size=(8, 50))
    u = np.vstack([honest[:3], 100.0 * honest[3], honest[3:], -80.0 * honest[4]])  # attackers: clients 3 and 9
    res = TrimmedMean(beta=0.2).aggregate(make_inputs(u))  # b = 2 at each end
    out = res.weights.numpy()
    assert (out <= honest.max(axis=0) + 1e-6).all() and (out >= honest.min(axis=0) - 1e-6).all()
    assert res.removed[3] and res.removed[9] and not res.removed[[0, 1, 2, 4, 5, 6, 7, 8]].any()


# ------------------------------------------------------------------ norm clipping and weak DP


def ref_clipped_mean(u: np.ndarray, alpha: np.ndarray, m: float) -> tuple[np.ndarray, np.ndarray]:
    norms = np.linalg.norm(u, axis=1)
    c = np.array([min(1.0, m / nk) if nk > 0 else 1.0 for nk in norms])
    return (alpha * c) @ u, alpha * c / (alpha * c).sum()


def test_norm_clipping_median_and_fixed_bounds() -> None:
    rng = np.random.default_rng(4)
    u = rng.normal(size=(9, 20)) * np.arange(1, 10)[:, None]  # norms grow with the index
    u[4] *= 100.0  # a boosted update
    sizes = rng.integers(5, 50, size=9).astype(np.float64)
    inputs = make_inputs(u, rng.normal(size=20), sizes)
    uu, alpha = real_updates(inputs), sizes / sizes.sum()
    median_norm = float(np.median(np.linalg.norm(uu, axis=1)))
    res = NormClipping().aggregate(inputs)
    step, alpha_hat = ref_clipped_mean(uu, alpha, median_norm)
    assert res.diagnostics["norm_bound"] == pytest.approx(median_norm, rel=1e-12)
    np.testing.assert_allclose(res.weights.numpy(), inputs.global_weights.numpy() + step, atol=1e-5)
    np.testing.assert_allclose(res.alpha_hat, alpha_hat, rtol=1e-10)
    assert not res.removed.any()
    # the boosted update contributes at most alpha_4 * M, against alpha_4 * ||u_4|| in FedAvg
    fedavg = alpha @ uu
    assert np.linalg.norm(res.weights.numpy() - inputs.global_weights.numpy() - fedavg) > 0.5 * alpha[4] * np.linalg.norm(uu[4])
    assert res.diagnostics["clip_factor"][4] * np.linalg.norm(uu[4]) == pytest.approx(median_norm, rel=1e-9)

    fixed = NormClipping(bound=3.0).aggregate(inputs)
    step, alpha_hat = ref_clipped_mean(uu, alpha, 3.0)
    np.testing.assert_allclose(fixed.weights.numpy(), inputs.global_weights.numpy() + step, atol=1e-5)
    np.testing.assert_allclose(fixed.alpha_hat, alpha_hat, rtol=1e-10)

    even = NormClipping().aggregate(make_inputs(uu[:8]))  # even count: mean of the two middle norms
    assert even.diagnostics["norm_bound"] == pytest.approx(np.median(np.linalg.norm(uu[:8], axis=1)), rel=1e-12)


def test_weak_dp_adds_seeded_gaussian_noise_to_the_clipped_mean() -> None:
    rng = np.random.default_rng(5)
    p = 200_000
    u = rng.normal(size=(5, p)) * 1e-3
    u[0] *= 50.0
    sizes = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    inputs = make_inputs(u, sizes=sizes, round=3, seed=11)
    uu, alpha = real_updates(inputs), sizes / sizes.sum()
    res = WeakDP().aggregate(inputs)
    step, alpha_hat = ref_clipped_mean(uu, alpha, float(np.median(np.linalg.norm(uu, axis=1))))
    noise = 0.025 * torch.randn(p, generator=torch_generator(11, DEFENSE, 0, 3), dtype=torch.float32).double().numpy()
    np.testing.assert_allclose(res.weights.numpy(), step + noise, atol=1e-6)
    np.testing.assert_allclose(res.alpha_hat, alpha_hat, rtol=1e-10)
    drawn = res.weights.numpy() - step
    assert abs(drawn.mean()) < 3e-4 and drawn.std() == pytest.approx(0.025, rel=0.01)

    assert torch.equal(res.weights, WeakDP().aggregate(inputs).weights)
    assert not torch.allclose(res.weights, WeakDP(seed=1).aggregate(inputs).weights)
    other_round = make_inputs(u, sizes=sizes, round=4, seed=11)
    assert not torch.allclose(res.weights, WeakDP().aggregate(other_round).weights)
    quiet = WeakDP(sigma=0.0).aggregate(inputs)
    assert torch.equal(quiet.weights, NormClipping().aggregate(inputs).weights)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cls", CLASSES)
def test_cuda_gives_the_cpu_result(cls: type[Defense]) -> None:
    rng = np.random.default_rng(6)
    u = rng.normal(size=(10, 5000)) * 0.01
    cpu = make_inputs(u, rng.normal(size=5000), np.arange(1.0, 11.0), round=2, seed=3)
    gpu = dataclasses.replace(cpu, global_weights=cpu.global_weights.cuda(), client_weights=cpu.client_weights.cuda())
    a, b = cls().aggregate(cpu), cls().aggregate(gpu)
    assert b.weights.is_cuda
    torch.testing.assert_close(b.weights.cpu(), a.weights, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(b.alpha_hat, a.alpha_hat, atol=1e-9)
    np.testing.assert_array_equal(b.removed, a.removed)


# ------------------------------------------------------------------ centered clipping


def test_centered_clipping_matches_the_iteration_and_carries_its_centre() -> None:
    rng = np.random.default_rng(7)
    u0 = rng.normal(size=(6, 12))
    u0[5] *= 30.0
    inputs0 = make_inputs(u0, rng.normal(size=12), np.arange(1.0, 7.0))
    cc = CenteredClipping(tau=1.5, iterations=3)
    assert cc.state_dict() == {}
    res0 = cc.aggregate(inputs0)
    x0 = real_updates(inputs0)
    v0 = ref_centered_clipping(x0, np.zeros(12), 1.5, 3)  # the first round starts from zero
    np.testing.assert_allclose(res0.weights.numpy() - inputs0.global_weights.numpy(), v0, atol=1e-5)
    # v_L = c_0 v_0 + (1 - c_0) sum_k alpha_hat_k x_k, with v_0 = 0 here
    c0 = res0.diagnostics["center_weight"]
    np.testing.assert_allclose((1 - c0) * res0.alpha_hat @ x0, v0, atol=1e-5)
    assert res0.alpha_hat[5] < 0.2 * res0.alpha_hat[:5].min()  # the far update is clipped hardest
    np.testing.assert_allclose(cc.state_dict()["center"], v0, atol=1e-5)  # the kept step (w_t + step - w_t rounds)

    inputs1 = make_inputs(rng.normal(size=(6, 12)), rng.normal(size=12), round=1)
    restored = CenteredClipping(tau=1.5, iterations=3)
    restored.load_state_dict(cc.state_dict())
    res1, again = cc.aggregate(inputs1), restored.aggregate(inputs1)
    assert torch.equal(res1.weights, again.weights)
    x1 = real_updates(inputs1)
    centre = cc.state_dict()["center"]
    v1 = ref_centered_clipping(x1, v0, 1.5, 3)
    np.testing.assert_allclose(res1.weights.numpy() - inputs1.global_weights.numpy(), v1, atol=1e-5)
    c0 = res1.diagnostics["center_weight"]
    np.testing.assert_allclose(c0 * v0 + (1 - c0) * res1.alpha_hat @ x1, v1, atol=1e-5)
    np.testing.assert_allclose(centre, v1, atol=1e-5)
    fresh = CenteredClipping(tau=1.5, iterations=3).aggregate(inputs1)  # without history: another result
    assert not torch.allclose(fresh.weights, res1.weights)

    with pytest.raises(UserError):
        CenteredClipping().load_state_dict({"other": np.zeros(1)})
    with pytest.raises(UserError, match="the model changed"):
        cc.aggregate(make_inputs(rng.normal(size=(6, 5))))


def test_centered_clipping_bounds_a_huge_update() -> None:
    rng = np.random.default_rng(8)
    u = rng.normal(size=(10, 100)) * 0.1
    u[9] = 1e4  # a model-replacement style update
    res = CenteredClipping().aggregate(make_inputs(u))  # tau = 100, L = 1: honest ones are not clipped
    step = res.weights.numpy()
    expected = (u[:9].sum(axis=0) + u[9] * 100.0 / np.linalg.norm(u[9])) / 10
    np.testing.assert_allclose(step, expected, atol=1e-4)
    assert np.linalg.norm(step - u[:9].mean(axis=0)) < 100.0 / 10 + 0.5  # FedAvg would move by ~1e4
    np.testing.assert_allclose(res.diagnostics["clip_factor"][:9], 1.0)


# ------------------------------------------------------------------ bucketing


def reference_buckets(n: int, s: int, seed: int, option_seed: int, round_: int) -> list[np.ndarray]:
    perm = numpy_rng(seed, DEFENSE, option_seed, round_).permutation(n)
    return [perm[t * s:(t + 1) * s] for t in range(-(-n // s))]


@pytest.mark.parametrize("aggregator", ["median", "krum", "trimmed_mean", "centered_clipping"])
def test_bucketing_is_the_robust_rule_on_random_bucket_means(aggregator: str) -> None:
    rng = np.random.default_rng(9)
    n, s = 11, 2
    u = rng.normal(size=(n, 15))
    inputs = make_inputs(u, rng.normal(size=15), rng.integers(1, 9, size=n).astype(np.float64), round=4, seed=2)
    uu = real_updates(inputs)
    buckets = reference_buckets(n, s, 2, 0, 4)
    assert [len(b) for b in buckets] == [2, 2, 2, 2, 2, 1]
    means = np.stack([uu[b].mean(axis=0) for b in buckets])
    if aggregator == "median":
        value, share = ref_median(means)
    elif aggregator == "krum":
        best, _ = ref_krum(means, (6 - 3) // 2)
        value, share = means[best], np.eye(6)[best]
    elif aggregator == "trimmed_mean":
        value, share = ref_trimmed_mean(means, 1)  # floor(0.25 * 6)
    else:
        value = ref_centered_clipping(means, np.zeros(15), 1.0, 3)
        share = None
    options = {"beta": 0.25} if aggregator == "trimmed_mean" else {"tau": 1.0} if aggregator == "centered_clipping" else {}
    res = Bucketing(aggregator=aggregator, s=s, **options).aggregate(inputs)
    np.testing.assert_allclose(res.weights.numpy() - inputs.global_weights.numpy(), value, atol=1e-5)
    for t, members in enumerate(buckets):
        assert (res.diagnostics["bucket"][members] == t).all()
    if share is not None:
        expected = np.zeros(n)
        for t, members in enumerate(buckets):
            expected[members] = share[t] / len(members)
        np.testing.assert_allclose(res.alpha_hat, expected, atol=1e-12)
        np.testing.assert_array_equal(res.removed, expected == 0)
    else:  # from a zero centre v_L = (1 - c_0) sum_k alpha_hat_k x_k: parallel to alpha_hat @ x, shorter
        direction = res.alpha_hat @ uu
        scale = float(value @ direction / (direction @ direction))
        assert 0 < scale <= 1 and not res.removed.any()
        np.testing.assert_allclose(scale * direction, value, atol=1e-5)


def test_bucketing_bounds_attackers_and_varies_with_its_seed() -> None:
    rng = np.random.default_rng(10)
    honest = rng.normal(size=(8, 40))
    u = np.vstack([honest, np.full((2, 40), 500.0)])  # 2 of 10: at most 2 of 5 buckets are contaminated
    inputs = make_inputs(u, round=1)
    res = Bucketing(aggregator="median").aggregate(inputs)
    assert np.abs(res.weights.numpy()).max() < np.abs(honest).max()
    assert res.removed[8] and res.removed[9]
    cc = Bucketing().aggregate(inputs)  # default: centered clipping, tau = 10, 3 iterations from zero
    assert np.linalg.norm(cc.weights.numpy()) <= 3 * 10.0 + 1e-4
    other = Bucketing(seed=1).aggregate(inputs)
    assert not np.array_equal(other.diagnostics["bucket"], cc.diagnostics["bucket"])
    assert np.array_equal(Bucketing().aggregate(inputs).diagnostics["bucket"], cc.diagnostics["bucket"])


def test_bucketing_centre_round_trips() -> None:
    rng = np.random.default_rng(11)
    first, second = make_inputs(rng.normal(size=(7, 9))), make_inputs(rng.normal(size=(7, 9)), round=1)
    a = Bucketing()
    a.aggregate(first)
    state = a.state_dict()
    assert set(state) == {"center"} and state["center"].dtype == np.float32
    b = Bucketing()
    b.load_state_dict(state)
    assert torch.equal(a.aggregate(second).weights, b.aggregate(second).weights)
    assert Bucketing(aggregator="median").state_dict() == {}


# ------------------------------------------------------------------ common contract and edge cases


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("kind", ["identical", "zero"])
def test_edge_cases_keep_the_common_update(cls: type[Defense], k: int, kind: str) -> None:
    rng = np.random.default_rng(13)
    row = rng.normal(size=30) if kind == "identical" else np.zeros(30)
    inputs = make_inputs(np.tile(row, (k, 1)), rng.normal(size=30), np.arange(1.0, k + 1.0))
    res = (cls(sigma=0.0) if cls is WeakDP else cls()).aggregate(inputs)
    assert torch.isfinite(res.weights).all() and np.isfinite(res.alpha_hat).all()
    assert res.alpha_hat.sum() == pytest.approx(1.0) and (res.alpha_hat[res.removed] == 0).all()
    np.testing.assert_allclose(res.weights.numpy(), inputs.client_weights[0].numpy(), atol=1e-6)
    if cls in (CoordinateMedian, TrimmedMean, CenteredClipping):  # ties are shared, not given away
        np.testing.assert_allclose(res.alpha_hat, np.full(k, 1.0 / k), atol=1e-12)
    if cls is not Krum:
        assert not res.removed.any()
    noisy = WeakDP().aggregate(inputs)
    assert torch.isfinite(noisy.weights).all()
