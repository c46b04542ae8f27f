"""The baseline defenses of docs/SPEC.md section 7, each against an independent computation."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from scipy.spatial.distance import cdist

from fdcr_mpi.defenses._baseline import evaluate_on_proxy, proxy_model, train_on_proxy
from fdcr_mpi.defenses.base import ProxyData, RoundInputs, available
from fdcr_mpi.defenses.bulyan import Bulyan
from fdcr_mpi.defenses.crfl import CRFL
from fdcr_mpi.defenses.dnc import DnC
from fdcr_mpi.defenses.finetune import Finetuning
from fdcr_mpi.defenses.fltrust import FLTrust, matching_epochs
from fdcr_mpi.defenses.foolsgold import FoolsGold
from fdcr_mpi.defenses.krum import MultiKrum
from fdcr_mpi.defenses.median import TrimmedMedian
from fdcr_mpi.defenses.mma import MMA
from fdcr_mpi.defenses.rfa import RFA
from fdcr_mpi.defenses.rlr import RobustLR
from fdcr_mpi.defenses.sageflow import Sageflow
from fdcr_mpi.errors import UserError
from fdcr_mpi.models import FlatModel
from fdcr_mpi.seeding import PROXY, torch_generator

NAMES = {"multi_krum", "trimmed_median", "bulyan", "foolsgold", "rlr", "dnc", "mma", "rfa", "crfl",
         "fltrust", "sageflow", "finetuning"}


def make_inputs(updates: np.ndarray, global_weights: np.ndarray | None = None, sizes: np.ndarray | None = None,
                **kwargs: object) -> RoundInputs:
    """RoundInputs with w_k = w_t + updates_k (float32)."""
    u = np.asarray(updates, dtype=np.float32)
    w_t = np.zeros(u.shape[1], dtype=np.float32) if global_weights is None else np.asarray(global_weights, np.float32)
    s = np.ones(u.shape[0]) if sizes is None else np.asarray(sizes, dtype=np.float64)
    return RoundInputs(global_weights=torch.from_numpy(w_t.copy()), client_weights=torch.from_numpy(w_t + u),
                       sizes=torch.from_numpy(s), **kwargs)  # type: ignore[arg-type]


def real_updates(inputs: RoundInputs) -> np.ndarray:
    """The float64 updates the defense sees (after the float32 round trip)."""
    return (inputs.client_weights - inputs.global_weights).double().numpy()


def weighted_mean(rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return (weights[:, None] * rows).sum(axis=0) / weights.sum()


def test_all_baselines_registered() -> None:
    registry = available()
    assert NAMES <= set(registry)
    assert {n for n in NAMES if registry[n].needs_proxy} == {"fltrust", "sageflow", "finetuning"}
    assert all(registry[n].summary for n in NAMES)


# ------------------------------------------------------------------ Multi-Krum


def brute_krum_scores(u: np.ndarray, f: int) -> np.ndarray:
    d2 = cdist(u, u, "sqeuclidean")
    n = len(u)
    return np.array([np.sort(np.delete(d2[i], i))[: n - f - 2].sum() for i in range(n)])


def test_multi_krum_excludes_far_updates_and_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    cluster = rng.normal(0.0, 0.1, (5, 4))
    far = np.array([[5.0, 5.0, 5.0, 5.0], [-6.0, 4.0, 0.0, 2.0]])
    u = np.vstack([cluster[:3], far[:1], cluster[3:], far[1:]])  # far ones are clients 3 and 6
    sizes = np.arange(1.0, 8.0)
    inputs = make_inputs(u, rng.normal(size=4), sizes)
    res = MultiKrum().aggregate(inputs)

    uu = real_updates(inputs)
    f = 7 // 2
    scores = brute_krum_scores(uu, f)
    selected = np.sort(np.argsort(scores)[: 7 - f])
    assert 3 not in selected and 6 not in selected
    np.testing.assert_allclose(res.diagnostics["krum_score"], scores, rtol=1e-10)
    np.testing.assert_array_equal(res.removed, ~np.isin(np.arange(7), selected))
    expected_alpha = np.where(np.isin(np.arange(7), selected), sizes, 0.0) / sizes[selected].sum()
    np.testing.assert_allclose(res.alpha_hat, expected_alpha, rtol=1e-12)
    expected = inputs.global_weights.double().numpy() + weighted_mean(uu[selected], sizes[selected])
    np.testing.assert_allclose(res.weights.numpy(), expected, atol=1e-6)

    single = MultiKrum(f=2, m=1).aggregate(inputs)  # Krum proper
    assert np.flatnonzero(~single.removed).tolist() == [int(np.argmin(brute_krum_scores(uu, 2)))]


# ------------------------------------------------------------------ Trimmed median


def test_trimmed_median_hand_results() -> None:
    cols = np.array([[1, 0, 5], [2, 0, -1], [3, 10, -2], [4, 11, 7], [100, 12, 6]], dtype=np.float64)
    res = TrimmedMedian().aggregate(make_inputs(cols, np.full(3, 0.5)))  # b = floor(0.2 * 5) = 1, keep 3
    np.testing.assert_allclose(res.weights.numpy(), 0.5 + np.array([3.0, 11.0, 6.0]), atol=1e-6)
    # kept: column 0 -> clients {1,2,3}, column 1 -> {2,3,4}, column 2 -> {0,3,4}
    np.testing.assert_allclose(res.alpha_hat, np.array([1, 1, 2, 3, 2]) / 9.0)
    assert not res.removed.any()

    even = np.array([[1, 0], [2, 0], [3, 0], [4, 1], [5, 1], [60, 9]], dtype=np.float64)
    res = TrimmedMedian().aggregate(make_inputs(even))  # n = 6: b = 1, keep 4; median of an even count
    np.testing.assert_allclose(res.weights.numpy(), [3.5, 0.25], atol=1e-6)  # ties -> lower index
    np.testing.assert_allclose(res.alpha_hat, np.array([1, 2, 2, 2, 1, 0]) / 8.0)
    np.testing.assert_array_equal(res.removed, [False] * 5 + [True])


# ------------------------------------------------------------------ Bulyan


def brute_bulyan(u: np.ndarray, f: int) -> tuple[np.ndarray, list[int]]:
    """Textbook Bulyan with explicit loops."""
    n = len(u)
    remaining, chosen = list(range(n)), []
    while len(chosen) < n - 2 * f:
        r = len(remaining)
        best, best_score = -1, math.inf
        for i in remaining:
            d = sorted(float(np.sum((u[i] - u[j]) ** 2)) for j in remaining if j != i)
            score = sum(d[: max(r - f - 2, 1)])
            if score < best_score:
                best, best_score = i, score
        chosen.append(best)
        remaining.remove(best)
    sel = u[sorted(chosen)]
    beta = n - 4 * f
    out = np.empty(u.shape[1])
    for v in range(u.shape[1]):
        col = sel[:, v]
        med = np.median(col)
        order = sorted(range(len(col)), key=lambda i: (abs(col[i] - med), i))
        out[v] = col[order[:beta]].mean()
    return out, sorted(chosen)


def test_bulyan_matches_textbook_and_drops_outliers() -> None:
    rng = np.random.default_rng(1)
    u = rng.normal(0.0, 0.2, (11, 6))
    u[2] += 8.0
    u[9] -= 6.0
    inputs = make_inputs(u)
    res = Bulyan().aggregate(inputs)  # n = 11: f = 2, theta = 7, beta = 3
    assert (res.diagnostics["f"], res.diagnostics["theta"], res.diagnostics["beta"]) == (2, 7, 3)
    expected, chosen = brute_bulyan(real_updates(inputs), 2)
    assert res.removed[2] and res.removed[9]
    np.testing.assert_array_equal(np.flatnonzero(~res.removed), chosen)
    np.testing.assert_allclose(res.weights.numpy(), expected, atol=1e-6)
    assert res.alpha_hat.sum() == pytest.approx(1.0)

    ten = Bulyan().aggregate(make_inputs(u[:10]))
    assert (ten.diagnostics["f"], ten.diagnostics["theta"], ten.diagnostics["beta"]) == (1, 8, 6)
    assert Bulyan(f=5).aggregate(make_inputs(u[:10])).diagnostics["f"] == 1  # clamped to n >= 4f + 3


# ------------------------------------------------------------------ RLR


def test_rlr_flips_sign_where_too_few_clients_agree() -> None:
    signs = np.array([[1, 1, 1, 1],
                      [1, 1, 1, -1],
                      [1, 1, 1, 1],
                      [1, -1, 1, -1],
                      [1, -1, 0, 0]], dtype=np.float64)
    # per coordinate |sum sign| = 5, 1, 4, 0 -> lr = +1, -1, +1, -1 with theta = 4
    u = signs * (np.arange(1, 6)[:, None] * 0.1)
    sizes = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    inputs = make_inputs(u, np.ones(4), sizes)
    res = RobustLR().aggregate(inputs)
    avg = weighted_mean(real_updates(inputs), sizes)
    np.testing.assert_allclose(res.weights.numpy(), 1.0 + np.array([1, -1, 1, -1]) * avg, atol=1e-6)
    assert res.diagnostics["flipped_fraction"] == 0.5
    np.testing.assert_allclose(res.alpha_hat, sizes / sizes.sum())
    plain = RobustLR(theta=0).aggregate(inputs)  # every coordinate agrees: FedAvg
    np.testing.assert_allclose(plain.weights.numpy(), 1.0 + avg, atol=1e-6)


# ------------------------------------------------------------------ RFA


def test_rfa_is_smoothed_weiszfeld_toward_the_geometric_median() -> None:
    rng = np.random.default_rng(2)
    u = np.vstack([rng.normal(0.0, 0.3, (4, 3)), [[6.0, -5.0, 4.0]]])
    sizes = np.array([3.0, 1.0, 2.0, 2.0, 2.0])
    inputs = make_inputs(u, sizes=sizes)
    uu = real_updates(inputs)
    alpha = sizes / sizes.sum()

    z = alpha @ uu  # hand iterates: three smoothed Weiszfeld steps from the weighted mean
    for _ in range(3):
        beta = alpha / np.maximum(np.linalg.norm(uu - z, axis=1), 1e-5)
        beta /= beta.sum()
        z = beta @ uu
    res = RFA(ftol=0.0).aggregate(inputs)
    assert res.diagnostics["iterations"] == 3
    np.testing.assert_allclose(res.weights.numpy(), z, atol=1e-5)
    np.testing.assert_allclose(res.alpha_hat, beta, rtol=1e-4)

    def objective(x: np.ndarray) -> float:
        return float(alpha @ np.linalg.norm(uu - x, axis=1))

    optimum = minimize(objective, alpha @ uu, method="Nelder-Mead",
                       options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000}).x
    assert objective(res.weights.numpy()) < objective(alpha @ uu)
    assert np.linalg.norm(res.weights.numpy() - optimum) < 0.2 * np.linalg.norm(alpha @ uu - optimum)
    converged = RFA(max_iter=500, ftol=0.0).aggregate(inputs)
    np.testing.assert_allclose(converged.weights.numpy(), optimum, atol=1e-3)


# ------------------------------------------------------------------ FoolsGold


def reference_foolsgold(history: np.ndarray) -> np.ndarray:
    """The FoolsGold paper's algorithm (kappa = 1), written out with loops."""
    n = len(history)
    unit = history / np.linalg.norm(history, axis=1, keepdims=True)
    cs = unit @ unit.T - np.eye(n)
    v = cs.max(axis=1)
    for i in range(n):
        for j in range(n):
            if i != j and v[i] < v[j]:
                cs[i, j] *= v[i] / v[j]
    wv = np.clip(1 - cs.max(axis=1), 0, 1)
    wv = wv / wv.max()
    wv[wv == 1] = 0.99
    out = np.zeros(n)
    for i in range(n):
        if wv[i] > 0:
            out[i] = min(max(np.log(wv[i] / (1 - wv[i])) + 0.5, 0.0), 1.0)
    return out


def test_foolsgold_zeroes_sybils_and_state_round_trips() -> None:
    rng = np.random.default_rng(3)
    honest = rng.normal(size=(3, 50))
    sybil = rng.normal(size=50)
    u0 = np.vstack([honest, sybil, sybil])
    sizes = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    inputs0 = make_inputs(u0, sizes=sizes)
    fg = FoolsGold()
    res0 = fg.aggregate(inputs0)
    uu = real_updates(inputs0)
    history = uu / np.linalg.norm(uu, axis=1, keepdims=True)
    wv = reference_foolsgold(history)
    np.testing.assert_allclose(res0.diagnostics["foolsgold_weight"], wv, atol=1e-6)
    assert wv[3] == wv[4] == 0.0 and (wv[:3] > 0).all()
    np.testing.assert_array_equal(res0.removed, [False, False, False, True, True])
    np.testing.assert_allclose(res0.alpha_hat, wv * sizes / (wv * sizes).sum(), atol=1e-9)
    np.testing.assert_allclose(res0.weights.numpy(), weighted_mean(uu, wv * sizes), atol=1e-5)

    state = fg.state_dict()
    assert set(state) == {"history", "history_ids"} and isinstance(state["history"], np.ndarray)
    np.testing.assert_array_equal(state["history_ids"], np.arange(5))
    restored = FoolsGold()
    restored.load_state_dict(state)
    inputs1 = make_inputs(rng.normal(size=(5, 50)), sizes=sizes, round=1)
    a, b = fg.aggregate(inputs1), restored.aggregate(inputs1)
    assert torch.equal(a.weights, b.weights)
    np.testing.assert_array_equal(a.alpha_hat, b.alpha_hat)
    u1 = real_updates(inputs1)
    np.testing.assert_allclose(fg.state_dict()["history"], history + u1 / np.linalg.norm(u1, axis=1, keepdims=True),
                               atol=1e-5)
    with pytest.raises(UserError):
        FoolsGold().load_state_dict({"other": np.zeros(1)})
    with pytest.raises(UserError, match="the model changed"):
        fg.aggregate(make_inputs(rng.normal(size=(5, 40))))


# ------------------------------------------------------------------ DnC


def directional_updates(rng: np.random.Generator, n: int, d: int, outlier: int) -> np.ndarray:
    base = rng.normal(size=d)
    u = base + 0.5 * rng.normal(size=(n, d))
    u[outlier] = rng.normal(size=d) * 3.0  # another direction (unit-norm scoring ignores the scale)
    return u


def test_dnc_removes_the_outlier_direction() -> None:
    rng = np.random.default_rng(4)
    u = directional_updates(rng, 10, 2000, outlier=6)
    sizes = rng.integers(1, 20, size=10).astype(np.float64)
    inputs = make_inputs(u, sizes=sizes)
    one = DnC(filter_fraction=0.1).aggregate(inputs)
    np.testing.assert_array_equal(np.flatnonzero(one.removed), [6])
    keep = ~one.removed
    np.testing.assert_allclose(one.weights.numpy(), weighted_mean(real_updates(inputs)[keep], sizes[keep]),
                               atol=1e-5)

    default = DnC().aggregate(inputs)  # c = 0.3: three removed, the outlier among them
    assert default.removed.sum() == 3 and default.removed[6]
    np.testing.assert_allclose(default.alpha_hat.sum(), 1.0)

    big = make_inputs(directional_updates(rng, 10, 30000, outlier=2), round=5)  # 10,000 of 30,000 coordinates
    r1, r2 = DnC(filter_fraction=0.1).aggregate(big), DnC(filter_fraction=0.1).aggregate(big)
    assert torch.equal(r1.weights, r2.weights) and np.flatnonzero(r1.removed).tolist() == [2]
    other_round = DnC(filter_fraction=0.1).aggregate(make_inputs(real_updates(big), round=6))
    assert not np.allclose(other_round.diagnostics["dnc_score"], r1.diagnostics["dnc_score"])


# ------------------------------------------------------------------ MMA


def test_mma_flags_an_obvious_outlier() -> None:
    rng = np.random.default_rng(5)
    u = rng.normal(0.0, 1.0, (10, 300)) * 0.1 + rng.normal(size=300)
    u[4] = -3.0 * u[4]  # opposite direction, three times the norm
    inputs = make_inputs(u, sizes=np.arange(1.0, 11.0))
    res = MMA().aggregate(inputs)
    uu = real_updates(inputs)
    feats = np.stack([cdist(uu, uu, "cityblock").sum(1), cdist(uu, uu, "euclidean").sum(1),
                      cdist(uu, uu, "cosine").sum(1)], axis=1)
    centred = feats - feats.mean(axis=0)
    scores = np.einsum("ij,jk,ik->i", centred, np.linalg.inv(np.cov(feats.T)), centred)  # Mahalanobis
    np.testing.assert_allclose(res.diagnostics["mma_score"], scores, rtol=1e-6)
    assert int(np.argmax(scores)) == 4 and res.removed[4]
    kept = np.sort(np.argsort(scores)[:3])
    np.testing.assert_array_equal(np.flatnonzero(~res.removed), kept)
    np.testing.assert_allclose(res.weights.numpy(), weighted_mean(uu[kept], np.arange(1.0, 11.0)[kept]), atol=1e-5)
    assert MMA(keep_fraction=0.9).aggregate(inputs).removed.tolist() == [i == 4 for i in range(10)]
    raw = feats / feats.max(axis=0)  # the MMA code's uncentred form, kept as an option
    raw_scores = np.einsum("ij,jk,ik->i", raw, np.linalg.inv(np.cov(raw.T)), raw)
    np.testing.assert_allclose(MMA(standardize=False).aggregate(inputs).diagnostics["mma_score"], raw_scores,
                               rtol=1e-6)


# ------------------------------------------------------------------ CRFL


def test_crfl_clips_the_norm_and_adds_noise_except_in_the_last_round() -> None:
    d, buffers = 200_000, 10
    trainable = torch.ones(d + buffers, dtype=torch.bool)
    trainable[d:] = False
    u = np.full((2, d + buffers), 1.0)
    u[1] *= 3.0
    sizes = np.array([1.0, 3.0])
    last = make_inputs(u, sizes=sizes, trainable=trainable, round=9, total_rounds=10)
    crfl_code_schedule = {"clip_bound": 15.0, "bound_slope": 0.1, "bound_bias": 2.0}
    res = CRFL(**crfl_code_schedule).aggregate(last)  # bound = min(15, 0.1 * 9 + 2) = 2.9
    avg = weighted_mean(real_updates(last), sizes)
    assert res.diagnostics["bound"] == pytest.approx(2.9) and not res.diagnostics["noised"]
    assert np.linalg.norm(res.weights.numpy()[:d]) == pytest.approx(2.9, rel=1e-5)
    np.testing.assert_allclose(res.weights.numpy()[:d], avg[:d] * 2.9 / np.linalg.norm(avg[:d]), rtol=1e-5)
    np.testing.assert_allclose(res.weights.numpy()[d:], avg[d:], rtol=1e-6)  # buffers: FedAvg

    early = make_inputs(u, sizes=sizes, trainable=trainable, round=3, total_rounds=10)
    noisy = CRFL(**crfl_code_schedule).aggregate(early)
    clipped = avg[:d] * 2.3 / np.linalg.norm(avg[:d])
    noise = noisy.weights.numpy()[:d] - clipped
    assert noisy.diagnostics["noised"]
    assert abs(noise.mean()) < 1e-4 and noise.std() == pytest.approx(0.01, rel=0.02)
    np.testing.assert_allclose(noisy.weights.numpy()[d:], avg[d:], rtol=1e-6)
    assert torch.equal(noisy.weights, CRFL(**crfl_code_schedule).aggregate(early).weights)  # seeded by (seed, round)
    assert not torch.equal(noisy.weights, CRFL(seed=1).aggregate(early).weights)

    small = make_inputs(np.full((2, 4), 0.1), round=0, total_rounds=1)
    np.testing.assert_allclose(CRFL().aggregate(small).weights.numpy(), np.full(4, 0.1), rtol=1e-6)


# ------------------------------------------------------------------ proxy defenses


def tiny_model() -> FlatModel:
    return FlatModel(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10)))


@pytest.fixture()
def proxy() -> ProxyData:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(48, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (48,), generator=gen)
    return ProxyData(x=x, y=y, make_model=tiny_model, lr=0.01, momentum=0.9, weight_decay=1e-5,
                     batch_size=16, seed=11)


def small_weights(seed: int, scale: float = 0.01) -> torch.Tensor:
    return torch.randn(3 * 32 * 32 * 10 + 10, generator=torch.Generator().manual_seed(seed)) * scale


def reference_loss_entropy(w: torch.Tensor, proxy: ProxyData) -> tuple[float, float]:
    logits = F.linear(proxy.x.flatten(1).double(), w[:-10].reshape(10, -1).double(), w[-10:].double())
    logp = F.log_softmax(logits, dim=1)
    return float(F.nll_loss(logp, proxy.y)), float(-(logp.exp() * logp).sum(1).mean())


def test_proxy_training_matches_torch_sgd(proxy: ProxyData) -> None:
    w0 = small_weights(0)
    trained, _ = train_on_proxy(proxy, w0, epochs=2, round_=3)
    linear = torch.nn.Linear(3 * 32 * 32, 10)
    with torch.no_grad():
        linear.weight.copy_(w0[:-10].reshape(10, -1))
        linear.bias.copy_(w0[-10:])
    opt = torch.optim.SGD(linear.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-5)
    gen = torch_generator(proxy.seed, PROXY, 3)
    for _ in range(2):
        order = torch.randperm(48, generator=gen)
        for start in range(0, 48, 16):
            idx = order[start:start + 16]
            opt.zero_grad()
            F.cross_entropy(linear(proxy.x[idx].flatten(1)), proxy.y[idx]).backward()
            opt.step()
    expected = torch.cat([linear.weight.detach().reshape(-1), linear.bias.detach()])
    torch.testing.assert_close(trained, expected, atol=1e-5, rtol=1e-4)
    loss, entropy = evaluate_on_proxy(proxy_model(proxy, w0), proxy)
    assert (loss, entropy) == pytest.approx(reference_loss_entropy(w0, proxy), rel=1e-5)


def test_fltrust_zero_weight_for_update_against_the_server_direction(proxy: ProxyData) -> None:
    w_t = small_weights(1)
    trained, _ = train_on_proxy(proxy, w_t, epochs=1, round_=2)
    root = (trained - w_t).double().numpy()
    ortho = np.random.default_rng(6).normal(size=root.size)
    ortho -= (ortho @ root) / (root @ root) * root
    ortho *= np.linalg.norm(root) / np.linalg.norm(ortho)
    u = np.vstack([2.0 * root, -root, root + ortho])  # cosines 1, -1, 1/sqrt(2)
    inputs = make_inputs(u, w_t.numpy(), round=2, proxy=proxy)
    res = FLTrust().aggregate(inputs)
    np.testing.assert_allclose(res.diagnostics["trust_score"], [1.0, 0.0, 1 / math.sqrt(2)], atol=1e-4)
    np.testing.assert_array_equal(res.removed, [False, True, False])
    uu = real_updates(inputs)
    rn = np.linalg.norm(root)
    ts = np.array([1.0, 0.0, 1 / math.sqrt(2)])
    expected = sum(ts[k] * rn / np.linalg.norm(uu[k]) * uu[k] for k in range(3)) / ts.sum()
    np.testing.assert_allclose(res.weights.numpy() - w_t.numpy(), expected, atol=1e-5 * np.abs(expected).max())
    np.testing.assert_allclose(res.alpha_hat, ts / ts.sum(), atol=1e-4)

    against = FLTrust().aggregate(make_inputs(-u[[0, 2]], w_t.numpy(), round=2, proxy=proxy))
    assert against.removed.all() and torch.equal(against.weights, w_t)  # all TS zero: keep w_t


def test_fltrust_server_takes_about_as_many_steps_as_the_median_client(proxy: ProxyData) -> None:
    """Default epochs: round(E * median N_k / |proxy|), here round(2 * 240 / 48) = 10."""
    proxy = dataclasses.replace(proxy, local_epochs=2)
    sizes = np.array([100.0, 240.0, 500.0])
    assert matching_epochs(proxy, sizes) == 10 and matching_epochs(proxy, np.array([5.0])) == 1
    w_t = small_weights(1)
    u = np.random.default_rng(0).normal(size=(3, w_t.numel())).astype(np.float32) * 0.01
    default = FLTrust().aggregate(make_inputs(u, w_t.numpy(), sizes=sizes, round=1, proxy=proxy))
    ten = FLTrust(epochs=10).aggregate(make_inputs(u, w_t.numpy(), sizes=sizes, round=1, proxy=proxy))
    one = FLTrust(epochs=1).aggregate(make_inputs(u, w_t.numpy(), sizes=sizes, round=1, proxy=proxy))
    assert default.diagnostics["root_norm"] == ten.diagnostics["root_norm"] > one.diagnostics["root_norm"]
    torch.testing.assert_close(default.weights, ten.weights, rtol=0, atol=0)


def test_sageflow_drops_a_high_entropy_client_and_weights_by_loss(proxy: ProxyData) -> None:
    clients = torch.stack([torch.zeros(30730), small_weights(2, 0.05), small_weights(3, 0.1)])
    w_t = small_weights(4)
    inputs = make_inputs((clients - w_t).numpy(), w_t.numpy(), proxy=proxy)
    res = Sageflow().aggregate(inputs)
    ref = [reference_loss_entropy(inputs.client_weights[k], proxy) for k in range(3)]
    losses, entropies = np.array([r[0] for r in ref]), np.array([r[1] for r in ref])
    assert entropies[0] == pytest.approx(math.log(10)) and (entropies[1:] < 2.2).all()
    np.testing.assert_allclose(res.diagnostics["proxy_entropy"], entropies, rtol=1e-5)
    np.testing.assert_allclose(res.diagnostics["proxy_loss"], losses, rtol=1e-5)
    np.testing.assert_array_equal(res.removed, [True, False, False])
    raw = np.array([0.0, losses[1] ** -5, losses[2] ** -5])
    np.testing.assert_allclose(res.alpha_hat, raw / raw.sum(), rtol=1e-4)
    expected = weighted_mean(inputs.client_weights.double().numpy(), raw)
    np.testing.assert_allclose(res.weights.numpy(), expected, atol=1e-5)


def test_finetuning_changes_the_fedavg_model_and_lowers_proxy_loss(proxy: ProxyData) -> None:
    rng = np.random.default_rng(8)
    w_t = small_weights(5)
    u = rng.normal(0.0, 0.01, (3, w_t.numel()))
    sizes = np.array([1.0, 2.0, 1.0])
    inputs = make_inputs(u, w_t.numpy(), sizes, proxy=proxy, round=4)
    res = Finetuning().aggregate(inputs)
    fedavg = torch.from_numpy(weighted_mean(inputs.client_weights.double().numpy(), sizes)).float()
    assert (res.weights - fedavg).abs().max() > 1e-3
    assert reference_loss_entropy(res.weights, proxy)[0] < reference_loss_entropy(fedavg, proxy)[0] - 0.1
    assert torch.equal(res.weights, Finetuning().aggregate(inputs).weights)  # seeded shuffling
    assert res.weights.dtype == torch.float32 and not res.removed.any()


# ------------------------------------------------------------------ common contract


ROWS_ONLY = [cls for _, cls in sorted(available().items()) if not cls.needs_proxy and not cls.needs_fisher]


@pytest.mark.parametrize("cls", ROWS_ONLY, ids=lambda cls: cls.name)
def test_result_contract_and_buffer_averaging(cls: type) -> None:
    """Every defense that needs only the rows: deterministic, the result's shapes and dtypes, alpha_hat
    a distribution that is 0 exactly where removed, buffers averaged with it, diagnostics finite."""
    rng = np.random.default_rng(9)
    k, p, buffers = 10, 400, 6
    trainable = torch.ones(p + buffers, dtype=torch.bool)
    trainable[p:] = False
    sizes = rng.integers(5, 50, size=k).astype(np.float64)
    inputs = make_inputs(rng.normal(size=(k, p + buffers)) * 0.1, rng.normal(size=p + buffers), sizes,
                         trainable=trainable, round=0, total_rounds=2)
    res = cls().aggregate(inputs)
    again = cls().aggregate(inputs)
    assert torch.equal(res.weights, again.weights)
    assert res.weights.dtype == torch.float32 and res.weights.shape == (p + buffers,)
    assert res.alpha_hat.dtype == np.float64 and res.alpha_hat.shape == (k,)
    assert res.removed.dtype == bool and res.removed.shape == (k,)
    assert res.alpha_hat.sum() == pytest.approx(1.0)
    assert (res.alpha_hat[res.removed] == 0).all() and (res.alpha_hat[~res.removed] > 0).all()
    np.testing.assert_array_equal(res.alpha_hat, again.alpha_hat)
    client_buffers = inputs.client_weights[:, p:].double().numpy()
    np.testing.assert_allclose(res.weights.numpy()[p:], res.alpha_hat @ client_buffers, atol=1e-5)
    for name, value in res.diagnostics.items():
        assert np.all(np.isfinite(np.asarray(value, dtype=np.float64))), name
        assert np.ndim(value) == 0 or np.shape(value) == (k,), name
