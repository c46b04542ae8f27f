"""FDCR server step (docs/SPEC.md section 2) against an independent hand computation, and
the clustering of Eq. 10.

The reference ``hand_fdcr`` below is plain float64 numpy loops written from the
specification; it calls nothing from fdcr_mpi. FINCH's first partition is likewise
recomputed by hand: in 1-D it is the connected components of the first-neighbour graph.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fdcr_mpi.defenses import RoundInputs, aggregate, create
from fdcr_mpi.defenses.clustering import cluster_labels, largest_mean_cluster
from fdcr_mpi.defenses.fdcr import importance, rescale_factor
from fdcr_mpi.errors import UserError

LR = 0.01
ATTACKERS = [3, 4]


# --------------------------------------------------------------------------- hand reference


def hand_finch_level0(values: list[float]) -> list[int]:
    """FINCH's first partition in 1-D: components of the graph i -> nearest other point."""
    k = len(values)
    parent = list(range(k))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i in range(k):
        best, best_d = -1, math.inf
        for j in range(k):
            if j != i and abs(values[i] - values[j]) < best_d:
                best, best_d = j, abs(values[i] - values[j])
        if best >= 0:
            parent[find(i)] = find(best)
    return [find(i) for i in range(k)]


def hand_fdcr(
    w_t: np.ndarray,
    w: np.ndarray,
    fisher: np.ndarray,
    sizes: np.ndarray,
    lr: float,
    discrepancy: str = "mse",
    use_importance: bool = True,
    fcdc: bool = True,
    fpra: bool = True,
    trainable: list[bool] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Eqs. 6-12 in float64 loops; returns (w_next, alpha_hat, removed, V)."""
    w_t = w_t.astype(np.float64)
    w = w.astype(np.float64)
    fisher = fisher.astype(np.float64)
    num_k, dim = w.shape
    total = float(sum(sizes))
    alpha = [float(sizes[k]) / total for k in range(num_k)]
    if trainable is None:
        trainable = [True] * dim

    imp = [[0.0] * dim for _ in range(num_k)]  # Eq. 6
    for k in range(num_k):
        lo, hi = min(fisher[k]), max(fisher[k])
        for v in range(dim):
            imp[k][v] = (fisher[k][v] - lo) / (hi - lo) if hi > lo else 0.0

    gt = [[0.0] * dim for _ in range(num_k)]  # Eqs. 7, 8
    for k in range(num_k):
        for v in range(dim):
            g = (w[k][v] - w_t[v]) / lr
            gt[k][v] = g * (imp[k][v] if use_importance else 1.0)

    gbar = [sum(alpha[k] * gt[k][v] for k in range(num_k)) for v in range(dim)]  # Eq. 9a

    disc = []  # Eq. 9b
    for k in range(num_k):
        sq = sum((gbar[v] - gt[k][v]) ** 2 for v in range(dim))
        disc.append(sq / dim if discrepancy == "mse" else math.sqrt(sq))

    removed = [False] * num_k
    if fcdc:  # Eq. 10
        labels = hand_finch_level0(disc)
        groups = sorted(set(labels))
        if len(groups) > 1:
            means = {g: np.mean([disc[k] for k in range(num_k) if labels[k] == g]) for g in groups}
            worst = max(groups, key=lambda g: means[g])
            removed = [labels[k] == worst for k in range(num_k)]
    benign_total = sum(alpha[k] for k in range(num_k) if not removed[k])  # Eq. 11
    alpha_hat = [0.0 if removed[k] else alpha[k] / benign_total for k in range(num_k)]

    w_next = [0.0] * dim  # Eq. 12 and the new global model
    for v in range(dim):
        for k in range(num_k):
            if fpra and trainable[v]:
                s = 2.0 / (1.0 + math.exp(-imp[k][v]))
                what = w_t[v] + s * (w[k][v] - w_t[v])
            else:
                what = w[k][v]
            w_next[v] += alpha_hat[k] * what
    return np.array(w_next), np.array(alpha_hat), np.array(removed), np.array(disc)


# --------------------------------------------------------------------------- inputs


def make_round(seed: int = 0, dim: int = 6, buffers: int = 0):
    """K=5, D=6: three benign clients with similar small steps and Fisher profiles, and two
    attackers (ids 3, 4) with large steps in another direction and a shifted Fisher profile."""
    rng = np.random.default_rng(seed)
    w_t = rng.normal(size=dim).astype(np.float32)
    benign_dir, evil_dir = rng.normal(size=dim), rng.normal(size=dim)
    benign_profile = np.linspace(0.2, 2.0, dim)  # Fisher profiles: the attackers stress
    evil_profile = np.linspace(2.0, 0.2, dim)  # other entries than the benign clients
    deltas, fishers = [], []
    for k in range(5):
        if k in ATTACKERS:
            deltas.append(0.08 * evil_dir + 0.004 * rng.normal(size=dim))
            fishers.append(evil_profile * (1 + 0.1 * rng.uniform(size=dim)))
        else:
            deltas.append(0.01 * benign_dir + 0.002 * rng.normal(size=dim))
            fishers.append(benign_profile * (1 + 0.1 * rng.uniform(size=dim)))
    w = (w_t[None, :] + np.array(deltas)).astype(np.float32)
    fisher = np.array(fishers).astype(np.float32)
    trainable = None
    if buffers:
        # the last entries are buffers; their Fisher is left nonzero on purpose (a real one
        # is 0, which makes s_k = 1 there anyway) so that ignoring the mask would show
        trainable = [True] * (dim - buffers) + [False] * buffers
    sizes = np.array([100.0, 220.0, 150.0, 130.0, 90.0])
    return w_t, w, fisher, sizes, trainable


def check_against_hand(res, hand, expect_removed):
    w_next, alpha_hat, removed, disc = hand
    np.testing.assert_array_equal(removed, expect_removed)  # the construction does separate
    np.testing.assert_array_equal(res.removed, expect_removed)
    np.testing.assert_allclose(res.diagnostics["discrepancy"], disc, rtol=1e-5)
    np.testing.assert_allclose(res.alpha_hat, alpha_hat, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(res.weights, w_next, rtol=0, atol=1e-6)


REMOVED = np.array([False, False, False, True, True])
NOBODY = np.zeros(5, dtype=bool)


@pytest.mark.parametrize(
    "options, expect_removed",
    [
        ({}, REMOVED),
        ({"discrepancy": "l2"}, REMOVED),
        ({"use_importance": False}, REMOVED),
        ({"fcdc": False}, NOBODY),
        ({"fpra": False}, REMOVED),
        ({"discrepancy": "l2", "fpra": False, "use_importance": False}, REMOVED),
    ],
    ids=["default", "l2", "no_importance", "no_fcdc", "no_fpra", "l2_raw_no_fpra"],
)
def test_fdcr_matches_hand_computation(options, expect_removed):
    w_t, w, fisher, sizes, _ = make_round()
    res = aggregate("fdcr", w_t, w, fisher, sizes, lr=LR, **options)
    hand = hand_fdcr(w_t, w, fisher, sizes, LR, **options)
    check_against_hand(res, hand, expect_removed)
    assert res.weights.dtype == np.float32 and res.weights.shape == (6,)


@pytest.mark.parametrize("zero_buffer_fisher", [False, True])
def test_fdcr_trainable_mask_keeps_buffers_plain_average(zero_buffer_fisher):
    w_t, w, fisher, sizes, trainable = make_round(seed=1, buffers=2)
    if zero_buffer_fisher:
        fisher[:, 4:] = 0.0  # as the clients send it: buffers have no gradient
    res = aggregate("fdcr", w_t, w, fisher, sizes, lr=LR, trainable=np.array(trainable))
    hand = hand_fdcr(w_t, w, fisher, sizes, LR, trainable=trainable)
    check_against_hand(res, hand, REMOVED)
    # buffers: exactly sum alpha_hat_k w_k; trainable entries: rescaled, hence different
    plain = (res.alpha_hat[:, None] * w.astype(np.float64)).sum(0)
    np.testing.assert_allclose(res.weights[4:], plain[4:], atol=1e-6)
    assert np.abs(res.weights[:4] - plain[:4]).max() > 1e-4


def test_fdcr_ablation_choices_differ_from_default():
    """The ablations really change what they claim to change."""
    w_t, w, fisher, sizes, _ = make_round()
    base = aggregate("fdcr", w_t, w, fisher, sizes, lr=LR)
    raw = aggregate("fdcr", w_t, w, fisher, sizes, lr=LR, use_importance=False)
    # use_importance changes detection only: same decision here, same FPRA, same model
    assert not np.allclose(base.diagnostics["discrepancy"], raw.diagnostics["discrepancy"])
    np.testing.assert_array_equal(base.weights, raw.weights)
    no_fpra = aggregate("fdcr", w_t, w, fisher, sizes, lr=LR, fpra=False)
    fedavg_benign = (no_fpra.alpha_hat[:, None] * w.astype(np.float64)).sum(0)
    np.testing.assert_allclose(no_fpra.weights, fedavg_benign, atol=1e-6)
    assert np.abs(base.weights - no_fpra.weights).max() > 1e-4


def test_fdcr_diagnostics_and_invariants():
    w_t, w, fisher, sizes, _ = make_round()
    res = aggregate("fdcr", w_t, w, fisher, sizes, lr=LR)
    d = res.diagnostics
    assert d["discrepancy"].dtype == np.float64 and d["discrepancy"].shape == (5,)
    assert d["cluster"].shape == (5,) and d["num_clusters"] == 2
    assert len(set(d["cluster"][REMOVED])) == 1 and not set(d["cluster"][REMOVED]) & set(d["cluster"][~REMOVED])
    imp = fisher.astype(np.float64)
    imp = (imp - imp.min(1, keepdims=True)) / (imp.max(1, keepdims=True) - imp.min(1, keepdims=True))
    np.testing.assert_allclose(d["importance_sum"], imp.sum(1), rtol=1e-6)
    assert res.alpha_hat.dtype == np.float64
    assert res.alpha_hat[res.removed].sum() == 0.0
    assert res.alpha_hat[~res.removed].sum() == pytest.approx(1.0, abs=1e-12)
    alpha = sizes / sizes.sum()
    np.testing.assert_allclose(res.alpha_hat[~res.removed], alpha[~res.removed] / alpha[~res.removed].sum())


def test_fdcr_is_deterministic_and_torch_inputs_match():
    w_t, w, fisher, sizes, _ = make_round(seed=3)
    a = aggregate("fdcr", w_t, w, fisher, sizes, lr=LR)
    b = aggregate("fdcr", w_t, w, fisher, sizes, lr=LR)
    c = aggregate("fdcr", torch.from_numpy(w_t), torch.from_numpy(w), torch.from_numpy(fisher),
                  torch.from_numpy(sizes), lr=LR)
    assert isinstance(c.weights, torch.Tensor)
    np.testing.assert_array_equal(a.weights, b.weights)
    np.testing.assert_array_equal(a.weights, c.weights.numpy())
    np.testing.assert_array_equal(a.diagnostics["discrepancy"], c.diagnostics["discrepancy"])


def test_fdcr_through_round_inputs():
    w_t, w, fisher, sizes, _ = make_round()
    defense = create("fdcr")
    assert defense.needs_fisher
    res = defense.aggregate(RoundInputs(
        global_weights=torch.from_numpy(w_t), client_weights=torch.from_numpy(w),
        sizes=torch.from_numpy(sizes), fisher=torch.from_numpy(fisher), lr=LR))
    hand = hand_fdcr(w_t, w, fisher, sizes, LR)
    check_against_hand(res, hand, REMOVED)


def test_fdcr_needs_fisher():
    w_t, w, _, sizes, _ = make_round()
    with pytest.raises(UserError, match="needs the clients' Fisher vectors"):
        aggregate("fdcr", w_t, w, None, sizes, lr=LR)
    with pytest.raises(UserError, match="needs the clients' Fisher vectors"):
        aggregate("fdcr", w_t, w, None, sizes, lr=LR, use_importance=False)
    # detection on raw updates without rescale needs no Fisher at all
    res = aggregate("fdcr", w_t, w, None, sizes, lr=LR, use_importance=False, fpra=False)
    np.testing.assert_array_equal(res.removed, REMOVED)
    assert np.isnan(res.diagnostics["importance_sum"]).all()


def test_fdcr_options_validated():
    with pytest.raises(UserError, match="fdcr.discrepancy"):
        create("fdcr", discrepancy="cosine")
    with pytest.raises(UserError, match="fdcr.partition_level"):
        create("fdcr", partition_level=-1)
    with pytest.raises(UserError, match="fdcr.dbscan_eps"):
        create("fdcr", dbscan_eps=0.0)
    with pytest.raises(UserError, match="unknown config key 'fdcr.leak_ground_truth'"):
        create("fdcr", leak_ground_truth=True)
    opt = create("fdcr").options
    assert (opt.discrepancy, opt.clustering, opt.partition_level, opt.use_importance, opt.fcdc, opt.fpra) == (
        "mse", "finch", 0, True, True, True)


def test_fdcr_single_cluster_removes_nobody():
    """Two clients: FINCH links them into one cluster, so nobody is removed (alpha_hat = alpha)."""
    w_t, w, fisher, sizes, _ = make_round()
    res = aggregate("fdcr", w_t, w[[0, 3]], fisher[[0, 3]], sizes[[0, 3]], lr=LR)
    assert not res.removed.any() and res.diagnostics["num_clusters"] == 1
    np.testing.assert_allclose(res.alpha_hat, sizes[[0, 3]] / sizes[[0, 3]].sum())


def test_fdcr_released_variant_is_the_released_server_step():
    """variant=released: Eq. 9b is l2 (whatever ``discrepancy`` says); with a single cluster
    nobody is removed and FPRA is skipped, so the round is FedAvg of the client models."""
    w_t, w, fisher, sizes, _ = make_round()
    res = aggregate("fdcr", w_t, w, fisher, sizes, lr=LR, variant="released", discrepancy="mse")
    check_against_hand(res, hand_fdcr(w_t, w, fisher, sizes, LR, discrepancy="l2"), REMOVED)
    two = [0, 3]  # FINCH links two points into one cluster
    released = aggregate("fdcr", w_t, w[two], fisher[two], sizes[two], lr=LR, variant="released")
    paper = aggregate("fdcr", w_t, w[two], fisher[two], sizes[two], lr=LR)
    hand_plain = hand_fdcr(w_t, w[two], fisher[two], sizes[two], LR, discrepancy="l2", fpra=False)
    hand_rescaled = hand_fdcr(w_t, w[two], fisher[two], sizes[two], LR)
    assert not released.removed.any() and released.diagnostics["num_clusters"] == 1
    np.testing.assert_allclose(released.weights, hand_plain[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(paper.weights, hand_rescaled[0], rtol=0, atol=1e-6)
    assert np.abs(released.weights - paper.weights).max() > 1e-4  # the paper's variant rescales


@pytest.mark.parametrize("method", ["kmeans", "dbscan"])
def test_fdcr_alternative_clusterings(method):
    w_t, w, fisher, sizes, _ = make_round()
    res = aggregate("fdcr", w_t, w, fisher, sizes, lr=LR, clustering=method)
    np.testing.assert_array_equal(res.removed, REMOVED)


# --------------------------------------------------------------------------- Eq. 6 and Eq. 12


def test_importance_of_constant_fisher_is_zero():
    f = torch.tensor([[3.0, 3.0, 3.0], [0.0, 0.0, 0.0], [0.0, 2.0, 1.0]])
    imp = importance(f)
    assert torch.equal(imp[0], torch.zeros(3)) and torch.equal(imp[1], torch.zeros(3))
    assert torch.allclose(imp[2], torch.tensor([0.0, 1.0, 0.5]))
    assert torch.equal(importance(torch.full((4,), 7.5)), torch.zeros(4))


def test_rescale_factor_range():
    s = rescale_factor(torch.linspace(0, 1, 101))
    assert float(s[0]) == 1.0
    assert float(s[-1]) == pytest.approx(2 * math.e / (1 + math.e), abs=1e-6)
    assert float(s[-1]) == pytest.approx(1.4621, abs=1e-4)
    assert bool((s[1:] > s[:-1]).all())


# --------------------------------------------------------------------------- Eq. 10


TWO_GROUPS = np.array([0.10, 0.12, 0.11, 5.0, 5.2])


def test_finch_separates_two_groups():
    labels = cluster_labels(TWO_GROUPS, "finch")
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(largest_mean_cluster(TWO_GROUPS, labels), [0, 0, 0, 1, 1])


def test_finch_uses_euclidean_distance(monkeypatch):
    # with the library default (cosine) every positive 1-D point is the same direction
    import finch  # clustering imports FINCH when it clusters (not at import: it costs a second)

    c, _, _ = finch.FINCH(data=TWO_GROUPS.reshape(-1, 1), distance="cosine", verbose=False)
    assert len(set(c[:, 0])) == 1
    seen = {}
    real = finch.FINCH

    def spy(**kwargs):
        seen.update(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(finch, "FINCH", spy)
    assert len(set(cluster_labels(TWO_GROUPS, "finch"))) == 2
    assert seen["distance"] == "euclidean" and seen["data"].shape == (5, 1)


def test_finch_partition_level_is_clamped():
    values = np.array([0.1, 0.12, 0.11, 5.0, 5.1, 9.0, 9.1, 20.0, 0.13, 5.2])
    level0 = cluster_labels(values, "finch", partition_level=0)
    assert len(set(level0)) == 3  # {low}, {5.x}, {9.x, 20}
    coarse = cluster_labels(values, "finch", partition_level=50)
    assert len(set(coarse)) <= len(set(level0))


def test_finch_hand_first_partition_agrees():
    rng = np.random.default_rng(7)
    for _ in range(20):
        values = np.concatenate([rng.uniform(0, 1, 7), rng.uniform(3, 6, 3)])
        hand = hand_finch_level0(list(values))
        ours = cluster_labels(values, "finch")
        # same partition: equal labels exactly where hand labels are equal
        assert (np.equal.outer(ours, ours) == np.equal.outer(hand, hand)).all()


@pytest.mark.parametrize("method", ["finch", "kmeans", "dbscan"])
def test_clustering_rejects_nan(method):
    with pytest.raises(ValueError, match="non-finite"):
        cluster_labels(np.array([0.1, np.nan, 0.3]), method)
    with pytest.raises(ValueError, match="non-finite"):
        cluster_labels(np.array([0.1, np.inf, 0.3]), method)


@pytest.mark.parametrize("method", ["finch", "kmeans", "dbscan"])
def test_single_cluster_flags_nobody(method):
    for values in (np.array([1.0, 1.0, 1.0, 1.0]), np.array([2.5])):
        labels = cluster_labels(values, method)
        assert len(set(labels)) == 1
        assert not largest_mean_cluster(values, labels).any()
    assert not largest_mean_cluster(np.array([1.0, 1.0001, 1.0002]), cluster_labels(np.array([1.0, 1.0001, 1.0002]))).any()


@pytest.mark.parametrize("method", ["kmeans", "dbscan"])
def test_alternatives_flag_the_high_group(method):
    values = np.array([0.10, 0.12, 0.11, 0.13, 5.0, 5.2, 5.1])
    labels = cluster_labels(values, method)
    np.testing.assert_array_equal(largest_mean_cluster(values, labels), [0, 0, 0, 0, 1, 1, 1])
    # invariant to the scale of V (DBSCAN's eps is relative to max V)
    np.testing.assert_array_equal(cluster_labels(values * 1e-6, method), labels)


def test_dbscan_noise_points_are_singletons():
    values = np.array([0.10, 0.11, 0.12, 0.5, 1.0])
    labels = cluster_labels(values, "dbscan", dbscan_eps=0.1, dbscan_min_samples=2)
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 2])
    np.testing.assert_array_equal(largest_mean_cluster(values, labels), [0, 0, 0, 0, 1])


def test_kmeans_is_deterministic():
    rng = np.random.default_rng(0)
    values = rng.uniform(size=10)
    first = cluster_labels(values, "kmeans")
    for _ in range(3):
        np.testing.assert_array_equal(cluster_labels(values, "kmeans"), first)
