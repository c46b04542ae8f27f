"""The stateful detectors DeepSight and FLDetector, each against an independent computation,
on an obvious attack, and under the result contract (determinism, edge cases, state round trip)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import cdist
from sklearn.cluster import HDBSCAN, KMeans
from threadpoolctl import threadpool_limits
from torch import nn

from fdcr_mpi.defenses.base import ProxyData, RoundInputs, available
from fdcr_mpi.defenses.deepsight import DeepSight
from fdcr_mpi.defenses.fldetector import FLDetector
from fdcr_mpi.errors import UserError
from fdcr_mpi.models import FlatModel, FlatSGD, build_model
from fdcr_mpi.seeding import DEFENSE, numpy_rng, torch_generator
from tests.test_baselines import make_inputs, real_updates

# ------------------------------------------------------------------ DeepSight

IN_SHAPE = (3, 4, 4)
HIDDEN, CLASSES = 16, 10
W2 = slice(48 * HIDDEN + HIDDEN, 48 * HIDDEN + HIDDEN + CLASSES * HIDDEN)  # output-layer weight in the flat vector
B2 = slice(W2.stop, W2.stop + CLASSES)  # output-layer bias


def mlp_module() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(48, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))


def mlp() -> FlatModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        return FlatModel(mlp_module())


def mlp_proxy() -> ProxyData:
    gen = torch.Generator().manual_seed(5)
    return ProxyData(x=torch.randn(8, *IN_SHAPE, generator=gen), y=torch.randint(0, CLASSES, (8,), generator=gen),
                     make_model=mlp)


def backdoor_case(k: int = 8, bad: tuple[int, ...] = (6, 7), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """w_t and updates: benign = a shared direction + noise; backdoored = small noise plus a large
    push of the output layer toward class 3."""
    rng = np.random.default_rng(seed)
    w_t = mlp().flat.numpy().copy()
    d = w_t.size
    u = 0.02 * rng.normal(size=d) + 0.01 * rng.normal(size=(k, d))
    u[1] *= 4.0  # a long benign update: clipped to the median norm
    for b in bad:
        u[b] = 0.003 * rng.normal(size=d)
        u[b, W2.start + 3 * HIDDEN: W2.start + 4 * HIDDEN] += 0.2 + 0.02 * rng.normal(size=HIDDEN)
        u[b, B2.start + 3] += 0.5
    return w_t, u


def reference_net(vector: np.ndarray) -> nn.Module:
    net = mlp_module().double()
    torch.nn.utils.vector_to_parameters(torch.from_numpy(np.asarray(vector, np.float64)), net.parameters())
    return net.eval()


def reference_hdbscan(x: np.ndarray, precomputed: bool = False, size: int = 5) -> np.ndarray:
    size = min(size, len(x))
    return HDBSCAN(min_cluster_size=size, min_samples=size, allow_single_cluster=True, copy=True,
                   metric="precomputed" if precomputed else "euclidean").fit_predict(x)


def reference_same_cluster_distance(labels: np.ndarray) -> np.ndarray:
    k = len(labels)
    out = np.ones((k, k))
    for i in range(k):
        for j in range(k):
            if i == j or (labels[i] == labels[j] and labels[i] != -1):
                out[i, j] = 0.0
    return out


def reference_deepsight(inputs: RoundInputs, num_samples: int, num_seeds: int, tau: float = 1 / 3) -> dict:
    """DeepSight written out plainly: NEUPs, TEs, DDifs on the seeded uniform inputs, the three
    clusterings, the merged clustering, the tau rule and median-norm clipping."""
    u = real_updates(inputs)
    k = len(u)
    w_t = inputs.global_weights.double().numpy()
    weight, bias = u[:, W2].reshape(k, CLASSES, HIDDEN), u[:, B2]
    energy = np.abs(weight).sum(axis=2) + np.abs(bias)
    neup = energy**2 / (energy**2).sum(axis=1, keepdims=True)
    te = np.array([int(np.sum(neup[i] > max(0.01, 1 / CLASSES) * neup[i].max())) for i in range(k)])
    suspicious = te < np.median(te) / 2

    ddif = np.zeros((num_seeds, k, CLASSES))
    glob = reference_net(w_t)
    clients = [reference_net(inputs.client_weights[i].double().numpy()) for i in range(k)]
    with torch.no_grad():
        for s in range(num_seeds):
            for b, start in enumerate(range(0, num_samples, 500)):
                x = torch.rand((min(500, num_samples - start), *IN_SHAPE),
                               generator=torch_generator(inputs.seed, DEFENSE, 0, inputs.round, s, b)).double()
                p_global = torch.softmax(glob(x), dim=1)
                for i in range(k):
                    ddif[s, i] += (torch.softmax(clients[i](x), dim=1) / p_global).sum(dim=0).numpy()
    ddif /= num_samples

    d_cos = reference_same_cluster_distance(reference_hdbscan(cdist(bias, bias, "cosine"), precomputed=True))
    d_ddif = np.mean([reference_same_cluster_distance(reference_hdbscan(ddif[s])) for s in range(num_seeds)], axis=0)
    d_neup = reference_same_cluster_distance(reference_hdbscan(neup))
    final = reference_hdbscan((d_cos + d_ddif + d_neup) / 3, precomputed=True)
    accepted = np.zeros(k, dtype=bool)
    for i in range(k):
        members = np.array([i]) if final[i] == -1 else np.flatnonzero(final == final[i])
        accepted[i] = suspicious[members].sum() < tau * len(members)

    norms = np.linalg.norm(u, axis=1)
    factor = np.minimum(1.0, np.median(norms) / norms)
    sizes = inputs.sizes.numpy()
    alpha_hat = np.where(accepted, sizes, 0.0) / sizes[accepted].sum()
    return {"te": te, "suspicious": suspicious, "clusters": final, "removed": ~accepted, "alpha_hat": alpha_hat,
            "weights": w_t + (alpha_hat * factor) @ u, "factor": factor}


def test_deepsight_matches_plain_reimplementation() -> None:
    w_t, u = backdoor_case()
    sizes = np.array([3.0, 1.0, 2.0, 2.0, 1.0, 4.0, 2.0, 1.0])
    inputs = make_inputs(u, w_t, sizes, proxy=mlp_proxy(), round=3, seed=11)
    res = DeepSight(num_samples=700, num_seeds=2).aggregate(inputs)  # two blocks per seed: 500 + 200
    ref = reference_deepsight(inputs, num_samples=700, num_seeds=2)

    assert ref["suspicious"].tolist() == [False] * 6 + [True] * 2  # the case is what it claims to be
    np.testing.assert_array_equal(res.diagnostics["threshold_exceedings"], ref["te"])
    np.testing.assert_array_equal(res.diagnostics["suspicious"].astype(bool), ref["suspicious"])
    np.testing.assert_array_equal(res.diagnostics["cluster"], ref["clusters"])
    np.testing.assert_array_equal(res.removed, ref["removed"])
    assert res.removed.tolist() == [False] * 6 + [True] * 2
    np.testing.assert_allclose(res.alpha_hat, ref["alpha_hat"], rtol=1e-12)
    np.testing.assert_allclose(res.diagnostics["clip_factor"], ref["factor"], rtol=1e-6)
    assert res.diagnostics["clip_factor"][1] < 0.5  # the long benign update is clipped
    np.testing.assert_allclose(res.weights.numpy(), ref["weights"], atol=1e-6)


def test_deepsight_rejects_clients_trained_toward_one_label_on_simple_cnn() -> None:
    """SimpleCNN; three clients take SGD steps toward label 0 on random images (a backdoor's
    output-layer signature), seven are benign perturbations with a shared direction."""
    make = lambda: build_model("simple_cnn", seed=0)  # noqa: E731
    model = make()
    w_t = model.flat.clone()
    rng = np.random.default_rng(1)
    d = w_t.numel()
    shared = torch.from_numpy(rng.normal(size=d).astype(np.float32)) * 2e-3
    clients = []
    for k in range(10):
        w = w_t + shared + torch.from_numpy(rng.normal(size=d).astype(np.float32)) * 1e-3
        if k in (2, 5, 8):
            model.load(w)
            opt = FlatSGD(model, lr=0.1, momentum=0.0, weight_decay=0.0)
            gen = torch.Generator().manual_seed(k)
            for _ in range(3):
                model.zero_grad()
                F.cross_entropy(model.module(torch.rand(16, 3, 32, 32, generator=gen)),
                                torch.zeros(16, dtype=torch.long)).backward()
                opt.step()
            w = model.flat.detach().clone()
        clients.append(w)
    client_weights = torch.stack(clients)
    proxy = ProxyData(x=torch.zeros(4, 3, 32, 32), y=torch.zeros(4, dtype=torch.long), make_model=make)
    inputs = RoundInputs(global_weights=w_t, client_weights=client_weights, sizes=torch.ones(10, dtype=torch.float64),
                         proxy=proxy, round=0)
    res = DeepSight(num_samples=128, num_seeds=2).aggregate(inputs)

    te = res.diagnostics["threshold_exceedings"]
    assert te[[2, 5, 8]].max() < np.median(te) / 2 <= te[[0, 1, 3, 4, 6, 7, 9]].min()
    assert np.flatnonzero(res.removed).tolist() == [2, 5, 8]
    class0_bias = model.size - 10  # SimpleCNN's flat vector ends with the classifier's bias
    attack_shift = float((client_weights[[2, 5, 8], class0_bias] - w_t[class0_bias]).mean())
    assert abs(float(res.weights[class0_bias] - w_t[class0_bias])) < 0.05 * abs(attack_shift)
    benign = [0, 1, 3, 4, 6, 7, 9]
    clip = res.diagnostics["clip_factor"]
    expected = w_t.double() + sum(clip[k] * (client_weights[k].double() - w_t.double()) for k in benign) / 7
    torch.testing.assert_close(res.weights.double(), expected, atol=1e-6, rtol=0)


def bn_model() -> FlatModel:
    """A model with BatchNorm buffers at the end of its flat vector."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        return FlatModel(nn.Sequential(nn.Flatten(), nn.Linear(48, 8), nn.BatchNorm1d(8), nn.Linear(8, CLASSES)))


def test_deepsight_result_contract_buffers_determinism_and_edge_cases() -> None:
    model = bn_model()
    trainable, d = model.trainable.clone(), model.size
    p = int(trainable.sum())
    rng = np.random.default_rng(9)
    k = 9
    w_t = model.flat.numpy().copy()
    u = rng.normal(size=(k, d)) * 0.05
    u[:, p:] = np.abs(u[:, p:])  # running means and variances stay valid
    sizes = rng.integers(5, 50, size=k).astype(np.float64)
    proxy = ProxyData(x=torch.zeros(2, *IN_SHAPE), y=torch.zeros(2, dtype=torch.long), make_model=bn_model)
    inputs = make_inputs(u, w_t, sizes, trainable=trainable, proxy=proxy, round=1)
    res = DeepSight(num_samples=300).aggregate(inputs)
    again = DeepSight(num_samples=300).aggregate(inputs)
    assert torch.equal(res.weights, again.weights)
    assert res.weights.dtype == torch.float32 and res.weights.shape == (d,)
    assert res.alpha_hat.dtype == np.float64 and res.alpha_hat.shape == (k,)
    assert res.removed.dtype == bool and res.removed.shape == (k,)
    assert res.alpha_hat.sum() == pytest.approx(1.0)
    assert (res.alpha_hat[res.removed] == 0).all()
    client_buffers = inputs.client_weights[:, p:].double().numpy()
    np.testing.assert_allclose(res.weights.numpy()[p:], res.alpha_hat @ client_buffers, atol=1e-5)
    other_seed = DeepSight(num_samples=300, seed=1).aggregate(inputs)
    assert not np.array_equal(other_seed.diagnostics["ddif_mean"], res.diagnostics["ddif_mean"])

    w0, base = mlp().flat.numpy(), backdoor_case()[1]
    cases = {"one": base[:1], "two": base[:2], "identical": np.repeat(base[:1], 5, axis=0),
             "zero": np.zeros((5, w0.size))}
    for name, rows in cases.items():
        out = DeepSight(num_samples=200).aggregate(make_inputs(rows, w0, proxy=mlp_proxy()))
        assert torch.isfinite(out.weights).all(), name
        assert out.alpha_hat.sum() == pytest.approx(1.0) and not out.removed.any(), name
        expected = w0 + real_updates(make_inputs(rows, w0)).mean(axis=0)  # every norm is the median: no clipping
        if name != "two":
            np.testing.assert_allclose(out.weights.numpy(), expected, atol=1e-6, err_msg=name)
    with pytest.raises(ValueError, match="proxy"):
        DeepSight().aggregate(make_inputs(base[:3], w0))


# ------------------------------------------------------------------ FLDetector

P_DIM, K_CL, LR = 20, 8, 0.1


def quadratic(seed: int) -> tuple[np.ndarray, np.ndarray, np.random.Generator]:
    """A shared positive-definite Hessian and per-client optima."""
    rng = np.random.default_rng(seed)
    q = np.linalg.qr(rng.normal(size=(P_DIM, P_DIM)))[0]
    hessian = q @ np.diag(rng.uniform(0.5, 2.0, P_DIM)) @ q.T
    optima = rng.normal(size=P_DIM) + 0.3 * rng.normal(size=(K_CL, P_DIM))
    return hessian, optima, rng


def client_updates(w: np.ndarray, hessian: np.ndarray, optima: np.ndarray, rng: np.random.Generator,
                   attackers: tuple[int, ...]) -> np.ndarray:
    """Benign: one gradient step -eta H (w - c_k) plus noise; attackers: a fresh far-away vector."""
    u = -LR * (w[None] - optima) @ hessian.T + 0.002 * rng.normal(size=(K_CL, P_DIM))
    for a in attackers:
        u[a] = 0.5 * rng.normal(size=P_DIM)
    return u


def reference_lbfgs(s_list: list[np.ndarray], y_list: list[np.ndarray], v: np.ndarray) -> np.ndarray:
    """The compact L-BFGS Hessian-vector product exactly as FLDetector's released code writes it."""
    s_mat, y_mat = np.stack(s_list, axis=1), np.stack(y_list, axis=1)
    sty = s_mat.T @ y_mat
    l_mat = sty - np.triu(sty)
    sigma = (y_list[-1] @ s_list[-1]) / (s_list[-1] @ s_list[-1])
    mat = np.block([[sigma * s_mat.T @ s_mat, l_mat], [l_mat.T, -np.diag(np.diag(sty))]])
    p_mat = np.concatenate([s_mat.T @ (sigma * v), y_mat.T @ v])
    return sigma * v - np.concatenate([sigma * s_mat, y_mat], axis=1) @ np.linalg.inv(mat) @ p_mat


def reference_gap(scores: np.ndarray, rng: np.random.Generator, refs: int = 10, kmax: int = 7) -> int:
    """Gap statistic as in the released ``detection1``, drawing from ``rng`` in the documented order."""
    x = (scores - scores.min()) / (scores.max() - scores.min())
    kmax = min(kmax, len(x) - 1)

    def inertia(data: np.ndarray, k: int) -> float:
        fit = KMeans(n_clusters=k, n_init=10, random_state=int(rng.integers(2**31 - 1))).fit(data.reshape(-1, 1))
        return float(fit.inertia_)

    gaps, sds = [], []
    for k in range(1, kmax + 1):
        w = inertia(x, k)
        ref = []
        for _ in range(refs):
            data = rng.uniform(0.0, 1.0, len(x))
            ref.append(inertia(data, k))
        gaps.append(np.log(np.mean(ref)) - np.log(w))
        sds.append(np.sqrt((1 + refs) / refs) * np.std(np.log(ref)))
    for k in range(1, kmax):
        if gaps[k - 1] - gaps[k] + sds[k] >= 0:
            return k
    return kmax


def test_fldetector_matches_plain_reimplementation() -> None:
    n_window, rounds, attackers = 3, 9, (1, 6)
    hessian, optima, rng = quadratic(0)
    defense = FLDetector(window_size=n_window, gap_references=6, max_clusters=4)
    s_list, y_list, history = [], [], [[] for _ in range(K_CL)]
    prev = last_w = last_g = None
    w = np.zeros(P_DIM, np.float32)
    sizes = np.array([1.0, 2.0, 1.0, 3.0, 1.0, 2.0, 1.0, 1.0])
    detected_rounds = []
    for t in range(rounds):
        inputs = make_inputs(client_updates(w.astype(np.float64), hessian, optima, rng, attackers), w, sizes,
                             round=t, seed=5)
        res = defense.aggregate(inputs)
        u, wt = real_updates(inputs), w.astype(np.float64)

        distance = np.zeros(K_CL)
        if prev is not None and len(s_list) == n_window:
            d = np.linalg.norm(prev + reference_lbfgs(s_list, y_list, wt - last_w) - u, axis=1)
            distance = d / d.sum()
            for k in range(K_CL):
                history[k].append(distance[k])
        judged = np.array([len(h) >= n_window for h in history])
        score = np.array([np.mean(h[-n_window:]) if len(h) >= n_window else 0.0 for h in history])
        removed = np.zeros(K_CL, dtype=bool)
        if judged.sum() >= 3:
            with threadpool_limits(1):
                gen = numpy_rng(5, DEFENSE, 0, t)
                clusters = reference_gap(score, gen, refs=6, kmax=4)
                assert res.diagnostics["gap_clusters"] == clusters
                if clusters > 1:
                    labels = KMeans(n_clusters=2, n_init=10, random_state=int(gen.integers(2**31 - 1))).fit(
                        score.reshape(-1, 1)).labels_
                    bad = int(score[labels == 1].mean() > score[labels == 0].mean())
                    removed = labels == bad
                    detected_rounds.append(t)
        alpha_hat = np.where(removed, 0.0, sizes) / sizes[~removed].sum()
        aggregate = alpha_hat @ u

        np.testing.assert_allclose(res.diagnostics["prediction_distance"], distance, rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(res.diagnostics["fldetector_score"], score, rtol=1e-4, atol=1e-9)
        np.testing.assert_array_equal(res.removed, removed)
        np.testing.assert_allclose(res.alpha_hat, alpha_hat, rtol=1e-12)
        np.testing.assert_allclose(res.weights.numpy(), wt + aggregate, atol=1e-6)

        if last_w is not None:
            s_list.append(wt - last_w)
            y_list.append(aggregate - last_g)
            s_list, y_list = s_list[-n_window:], y_list[-n_window:]
        prev, last_w, last_g = u, wt, aggregate
        w = res.weights.numpy()
    assert detected_rounds == [2 * n_window, 2 * n_window + 1, 2 * n_window + 2]  # from the first scored round on


def run_rounds(defense: FLDetector, seed: int, rounds: int, attackers: tuple[int, ...],
               start: int = 0, w: np.ndarray | None = None) -> tuple[list, np.ndarray]:
    hessian, optima, rng = quadratic(seed)
    for _ in range(start):  # the same random stream as an uninterrupted run
        client_updates(np.zeros(P_DIM), hessian, optima, rng, attackers)
    w = np.zeros(P_DIM, np.float32) if w is None else w
    results = []
    for t in range(start, start + rounds):
        inputs = make_inputs(client_updates(w.astype(np.float64), hessian, optima, rng, attackers), w, round=t)
        res = defense.aggregate(inputs)
        results.append(res)
        w = res.weights.numpy()
    return results, w


def test_fldetector_removes_far_away_attackers_and_leaves_a_clean_run_alone() -> None:
    n = 4  # first scored round: 2N; the gap statistic with its defaults (B = 10, k <= 7)
    attacked, _ = run_rounds(FLDetector(window_size=n), seed=1, rounds=2 * n + 1, attackers=(0, 3, 5))
    for t, res in enumerate(attacked):
        if t < 2 * n:
            assert not res.removed.any() and res.diagnostics["scored"] == 0  # FedAvg until scores exist
        else:
            assert res.diagnostics["attack_detected"] == 1
            assert np.flatnonzero(res.removed).tolist() == [0, 3, 5]
            score = res.diagnostics["fldetector_score"]
            assert score[[0, 3, 5]].min() > 2 * np.delete(score, [0, 3, 5]).max()
    clean, _ = run_rounds(FLDetector(window_size=n), seed=1, rounds=2 * n + 1, attackers=())
    assert clean[-1].diagnostics["scored"] == K_CL
    assert not any(res.removed.any() for res in clean)


def test_fldetector_state_round_trip_and_determinism() -> None:
    n = 3
    fast = {"window_size": n, "gap_references": 4, "max_clusters": 3}
    _, w_mid = run_rounds(FLDetector(**fast), seed=2, rounds=5, attackers=(2,))
    resumed_from = FLDetector(**fast)
    run_rounds(resumed_from, seed=2, rounds=5, attackers=(2,))
    state = resumed_from.state_dict()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    assert state["prev_updates"].shape == (K_CL, P_DIM) and state["window_s"].shape == (n, P_DIM)
    restored = FLDetector(**fast)
    restored.load_state_dict({key: value.copy() for key, value in state.items()})
    for key, value in restored.state_dict().items():
        np.testing.assert_array_equal(value, state[key], err_msg=key)
    cont_a, _ = run_rounds(resumed_from, seed=2, rounds=4, attackers=(2,), start=5, w=w_mid)
    cont_b, _ = run_rounds(restored, seed=2, rounds=4, attackers=(2,), start=5, w=w_mid)
    uninterrupted, _ = run_rounds(FLDetector(**fast), seed=2, rounds=9, attackers=(2,))
    for a, b, c in zip(cont_a, cont_b, uninterrupted[5:], strict=True):
        assert torch.equal(a.weights, b.weights) and torch.equal(a.weights, c.weights)
        np.testing.assert_array_equal(a.removed, b.removed)
        np.testing.assert_array_equal(a.diagnostics["fldetector_score"], b.diagnostics["fldetector_score"])
    assert cont_a[-1].removed.tolist() == [i == 2 for i in range(K_CL)]  # detection carried across the resume
    with pytest.raises(UserError):
        FLDetector(window_size=n + 1).load_state_dict(state)
    with pytest.raises(UserError):
        FLDetector(window_size=n).load_state_dict({"history": np.zeros(3)})
    empty = FLDetector(window_size=n)
    empty.load_state_dict({})
    assert empty.state_dict() == {}


def test_fldetector_follows_client_ids_and_contract_and_edge_cases() -> None:
    # A client absent from the previous aggregation is not predicted this round.
    defense = FLDetector(window_size=1)
    rng = np.random.default_rng(3)
    w = np.zeros(6, np.float32)
    for t, ids in enumerate([[0, 1, 2, 3], [0, 1, 2, 3], [0, 2, 3], [0, 1, 2, 3]]):
        res = defense.aggregate(make_inputs(rng.normal(size=(len(ids), 6)) * 0.1, w, round=t,
                                            client_ids=np.array(ids)))
        w = res.weights.numpy()
        if t == 3:
            assert res.diagnostics["prediction_distance"][1] == 0.0  # client 1 missed round 2
            assert (np.delete(res.diagnostics["prediction_distance"], 1) > 0).all()
    assert defense.state_dict()["client_ids"].tolist() == [0, 1, 2, 3]

    # The result contract over rounds, with buffers: they are the alpha_hat mean.
    k, p, buffers = 6, 30, 4
    trainable = torch.ones(p + buffers, dtype=torch.bool)
    trainable[p:] = False
    sizes = rng.integers(5, 50, size=k).astype(np.float64)
    runs = [FLDetector(window_size=2, max_clusters=3), FLDetector(window_size=2, max_clusters=3)]
    w = rng.normal(size=p + buffers).astype(np.float32)
    for t in range(7):
        u = rng.normal(size=(k, p + buffers)) * 0.1
        u[4] *= 30.0  # one far-away client
        inputs = make_inputs(u, w, sizes, trainable=trainable, round=t)
        res, again = (run.aggregate(inputs) for run in runs)
        assert torch.equal(res.weights, again.weights)
        assert res.weights.dtype == torch.float32 and res.weights.shape == (p + buffers,)
        assert res.alpha_hat.dtype == np.float64 and res.alpha_hat.shape == (k,)
        assert res.removed.dtype == bool and res.removed.shape == (k,)
        assert res.alpha_hat.sum() == pytest.approx(1.0) and (res.alpha_hat[res.removed] == 0).all()
        np.testing.assert_allclose(res.weights.numpy()[p:], res.alpha_hat @ inputs.client_weights[:, p:].double().numpy(),
                                   atol=1e-5)
        w = res.weights.numpy()
    assert res.removed[4]

    for name, rows in {"one": rng.normal(size=(1, 8)), "two": rng.normal(size=(2, 8)),
                       "identical": np.repeat(rng.normal(size=(1, 8)), 5, axis=0), "zero": np.zeros((5, 8))}.items():
        defense, w = FLDetector(window_size=2, max_clusters=3), np.zeros(8, np.float32)
        for t in range(6):
            inputs = make_inputs(rows * 0.1, w, round=t)
            res = defense.aggregate(inputs)
            assert torch.isfinite(res.weights).all() and not res.removed.any(), name
            assert res.alpha_hat.sum() == pytest.approx(1.0), name
            assert np.isfinite(res.diagnostics["fldetector_score"]).all(), name
            np.testing.assert_allclose(res.weights.numpy(), w + real_updates(inputs).mean(axis=0), atol=1e-6)
            w = res.weights.numpy()


def test_detectors_are_registered() -> None:
    registry = available()
    assert registry["deepsight"].needs_proxy and not registry["fldetector"].needs_proxy
    assert registry["fldetector"].keeps_client_history
    assert registry["deepsight"].summary and registry["fldetector"].summary
