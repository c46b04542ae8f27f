"""The ``variant: marsfl`` of each baseline against an independent computation of what the
authors' benchmark (MarsFL) does, written below in plain numpy from its server code
(Sever/*Sever.py, Sever/utils/utils.py); nothing here calls the defenses' helpers.

Momentum variants run several rounds, each round's w_t the previous result, against a
reference loop that keeps MarsFL's own state: its separately drawn weights and velocity,
with the step in MarsFL's form (gradients (w_t - w_k) / eta, v <- 0.9 v - eta rule(g)).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics.pairwise import cosine_similarity

from fdcr_mpi.defenses import aggregate, create
from fdcr_mpi.defenses.base import ProxyData
from fdcr_mpi.errors import UserError
from fdcr_mpi.seeding import SERVER_MODEL, derive_seed
from tests.test_baselines import make_inputs, real_updates, small_weights, tiny_model

LR = 0.01


def fresh_model(dim: int):
    """A stand-in for 'a newly initialised model drawn from a seed': N(0, 1) weights of that seed."""
    return lambda seed: torch.from_numpy(np.random.default_rng(seed).normal(size=dim).astype(np.float32))


def start_of(dim: int, seed: int) -> np.ndarray:
    return fresh_model(dim)(derive_seed(seed, SERVER_MODEL)).double().numpy()


# ----------------------------------------------------------------- MarsFL's rules, by hand


def mars_distances(grads: np.ndarray) -> dict[int, dict[int, float]]:
    """MarsFL's distance table: filled for i, then j < i, so its keys come in the order 1, 0, 2, ..."""
    table: dict[int, dict[int, float]] = {}
    for i in range(len(grads)):
        for j in range(i):
            d = float(np.linalg.norm(grads[i] - grads[j]))
            table.setdefault(i, {})[j] = d
            table.setdefault(j, {})[i] = d
    return table


def mars_multi_krum(grads: np.ndarray, corrupted: int, keep: int) -> np.ndarray:
    """multi_krum: one score per key in table order, rows then taken by position in that list."""
    table = mars_distances(grads)
    scores = [sum(sorted(table[user].values())[: len(grads) - corrupted]) for user in table]
    return grads[np.argsort(scores, kind="stable")[:keep]].mean(axis=0)


def mars_trimmed_mean(grads: np.ndarray, corrupted: int) -> np.ndarray:
    count = grads.shape[0] - corrupted - 1
    out = np.empty(grads.shape[1])
    for i, column in enumerate(grads.T):
        med = np.median(column)
        good = sorted(column - med, key=abs)[:count]
        out[i] = np.mean(good) + med
    return out


def mars_bulyan(grads: np.ndarray, corrupted: int) -> np.ndarray:
    table = mars_distances(grads)
    selection = []
    while len(selection) < len(grads) - 2 * corrupted:
        remaining = len(grads) - len(selection)
        best, best_score = -1, np.inf
        for user in table:
            score = sum(sorted(table[user].values())[: remaining - corrupted])
            if score < best_score:
                best, best_score = user, score
        selection.append(grads[best])
        table.pop(best)
        for other in table.values():
            other.pop(best)
    return mars_trimmed_mean(np.array(selection), 2 * corrupted)


def run_momentum_variant(name: str, rule, rounds: int = 4, n: int = 10, dim: int = 60, seed: int = 5):
    """Our defense over ``rounds`` rounds, each w_t its previous output, and MarsFL's loop."""
    rng = np.random.default_rng(seed)
    defense = create(name, variant="marsfl")
    w_t = rng.normal(size=dim).astype(np.float32)
    ours, theirs = [], []
    server, velocity = start_of(dim, seed), np.zeros(dim)
    for t in range(rounds):
        updates = rng.normal(size=(n, dim)) * 0.1
        updates[-3:] += 1.5  # three far clients
        inputs = make_inputs(updates, w_t, sizes=rng.integers(5, 50, n).astype(float), round=t, lr=LR,
                             seed=seed, fresh_model=fresh_model(dim))
        result = defense.aggregate(inputs)
        grads = (inputs.global_weights.double().numpy() - inputs.client_weights.double().numpy()) / LR
        velocity = 0.9 * velocity - LR * rule(grads)
        server = server + velocity
        ours.append(result.weights.double().numpy())
        theirs.append(server.copy())
        w_t = result.weights.numpy()
    return np.array(ours), np.array(theirs), defense


@pytest.mark.parametrize(("name", "rule"), [
    ("multi_krum", lambda g: mars_multi_krum(g, corrupted=1, keep=5)),
    ("trimmed_median", lambda g: mars_trimmed_mean(g, corrupted=len(g) - len(g) // 2 - 1)),
    ("bulyan", lambda g: mars_bulyan(g, corrupted=1)),
])
def test_momentum_variants_follow_marsfls_server_over_rounds(name: str, rule) -> None:
    ours, theirs, _ = run_momentum_variant(name, rule)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=2e-5)
    # the first round starts from the separately drawn model, not from w_0 + step
    assert np.abs(ours[0] - start_of(60, 5)).max() < 3.0


def test_multi_krum_marsfl_swaps_the_scores_of_clients_0_and_1() -> None:
    """Client 0 is far from everyone, client 1 close: MarsFL keeps client 0's update and drops 1's."""
    rng = np.random.default_rng(1)
    u = rng.normal(size=(7, 30)) * 0.01
    u[0] += 5.0
    u[1] = u[2:].mean(axis=0)  # the most central update
    inputs = make_inputs(u, fresh_model=fresh_model(30))
    marsfl = create("multi_krum", variant="marsfl", m=3).aggregate(inputs)
    assert not marsfl.removed[0] and marsfl.removed[1]
    original = create("multi_krum", m=3).aggregate(inputs)
    assert original.removed[0]
    np.testing.assert_allclose(marsfl.alpha_hat[~marsfl.removed], 1 / 3)  # plain mean, no sizes


def test_trimmed_median_and_bulyan_keep_five_values_per_coordinate_in_marsfl() -> None:
    inputs = make_inputs(np.random.default_rng(2).normal(size=(10, 40)), fresh_model=fresh_model(40))
    tm = create("trimmed_median", variant="marsfl").aggregate(inputs)
    assert tm.diagnostics["kept_fraction"].sum() == pytest.approx(5)  # values kept per coordinate
    assert create("trimmed_median").aggregate(inputs).diagnostics["kept_fraction"].sum() == pytest.approx(6)
    bu = create("bulyan", variant="marsfl").aggregate(inputs)
    assert (bu.diagnostics["f"], bu.diagnostics["theta"], bu.diagnostics["beta"]) == (1, 8, 5)
    assert (create("bulyan").aggregate(inputs).diagnostics["beta"]) == 6  # the original keeps 6


def test_server_momentum_state_resumes_exactly_and_needs_a_starting_model() -> None:
    rng = np.random.default_rng(3)
    first = make_inputs(rng.normal(size=(10, 20)), fresh_model=fresh_model(20), seed=7)
    a = create("multi_krum", variant="marsfl")
    a.aggregate(first)
    state = a.state_dict()
    assert set(state) == {"server_weights", "server_velocity"}
    b = create("multi_krum", variant="marsfl")
    b.load_state_dict(state)
    second = make_inputs(rng.normal(size=(10, 20)), fresh_model=None, round=1)  # not needed once started
    assert torch.equal(a.aggregate(second).weights, b.aggregate(second).weights)
    assert create("multi_krum").state_dict() == {}  # the original keeps no state
    with pytest.raises(UserError, match="separately drawn model"):
        create("bulyan", variant="marsfl").aggregate(make_inputs(rng.normal(size=(10, 20))))
    with pytest.raises(UserError, match="does not keep"):
        create("trimmed_median").load_state_dict({"history": np.zeros(2)})


def test_momentum_variants_start_from_a_model_drawn_from_the_runs_seed() -> None:
    u = np.random.default_rng(4).normal(size=(10, 20))
    runs = [aggregate("trimmed_median", np.zeros(20, np.float32), u.astype(np.float32), variant="marsfl", seed=s,
                      fresh_model=fresh_model(20)).weights for s in (0, 0, 1)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.allclose(runs[0], runs[2])


def test_momentum_applies_to_parameters_and_buffers_are_averaged() -> None:
    rng = np.random.default_rng(6)
    trainable = torch.ones(25, dtype=torch.bool)
    trainable[20:] = False
    inputs = make_inputs(rng.normal(size=(10, 25)), rng.normal(size=25), trainable=trainable,
                         fresh_model=fresh_model(25))
    res = create("trimmed_median", variant="marsfl").aggregate(inputs)
    start = fresh_model(25)(derive_seed(0, SERVER_MODEL)).double().numpy()[:20]
    step = mars_trimmed_mean(real_updates(inputs)[:, :20], corrupted=4)
    np.testing.assert_allclose(res.weights.numpy()[:20], start + step, atol=1e-5)
    buffers = inputs.client_weights[:, 20:].double().numpy()
    np.testing.assert_allclose(res.weights.numpy()[20:], res.alpha_hat @ buffers, atol=1e-5)


# ----------------------------------------------------------------- FoolsGold


def mars_foolsgold(unit: np.ndarray, summed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """fools_gold(this_delta, summed_deltas, np.arange(n)): (weights, step)."""
    n, eps = len(unit), 1e-5
    cs = cosine_similarity(summed[:, :n]) - np.eye(n)
    maxcs = np.max(cs, axis=1) + eps
    for i in range(n):
        for j in range(n):
            if i != j and maxcs[i] < maxcs[j]:
                cs[i][j] = cs[i][j] * maxcs[i] / maxcs[j]
    wv = 1 - np.max(cs, axis=1)
    wv[wv > 1], wv[wv < 0] = 1, 0
    wv = wv / np.max(wv)
    wv[wv == 1] = 0.99
    wv = np.log(wv / (1 - wv) + eps) + 0.5
    wv[(np.isinf(wv) + wv) > 1] = 1
    wv[wv < 0] = 0
    return wv, unit.T @ wv


def test_foolsgold_marsfl_over_rounds() -> None:
    rng = np.random.default_rng(8)
    fg = create("foolsgold", variant="marsfl")
    w_t, summed = rng.normal(size=80).astype(np.float32), None
    sybil = rng.normal(size=80)
    for t in range(3):
        u = rng.normal(size=(8, 80))
        u[5:] = sybil + 0.01 * rng.normal(size=(3, 80))  # three near-copies
        inputs = make_inputs(u, w_t, sizes=rng.integers(1, 9, 8).astype(float), round=t)
        res = fg.aggregate(inputs)
        d = real_updates(inputs)
        unit = d / (np.linalg.norm(d, axis=1, keepdims=True) + 1e-5)
        summed = unit if summed is None else summed + unit
        wv, step = mars_foolsgold(unit, summed)
        np.testing.assert_allclose(res.diagnostics["foolsgold_weight"], wv, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(res.weights.numpy(), w_t + step, rtol=1e-5, atol=1e-5)
        w_t = res.weights.numpy()


# ----------------------------------------------------------------- DnC, CRFL, Sageflow


def mars_dnc(d: np.ndarray, bad_rate: float) -> np.ndarray:
    """DncSever with every coordinate drawn (sub_dim >= d): the step added to w_t."""
    unit = d / (np.linalg.norm(d, axis=1, keepdims=True) + 1e-5)
    mu = unit.mean(axis=0)
    v = np.linalg.svd(unit - mu, full_matrices=False)[2][0, :]
    s = np.array([np.dot(x - mu, v) ** 2 for x in unit])
    good = s.argsort()[: len(unit) - int(1.0 * int(bad_rate * len(unit)))]
    return unit[good].mean(axis=0)


@pytest.mark.parametrize("ratio", [0.2, 0.3])
def test_dnc_marsfl_removes_int_ratio_n_and_averages_unit_updates(ratio: float) -> None:
    rng = np.random.default_rng(9)
    u = rng.normal(size=(10, 300)) + 2.0
    u[[2, 7]] = rng.normal(size=(2, 300)) * 4.0
    inputs = make_inputs(u, rng.normal(size=300), seed=3)
    res = create("dnc", variant="marsfl", filter_fraction=ratio, sub_dim=300).aggregate(inputs)
    assert res.removed.sum() == int(ratio * 10) and res.removed[[2, 7]].all()
    expected = inputs.global_weights.double().numpy() + mars_dnc(real_updates(inputs), ratio)
    np.testing.assert_allclose(res.weights.numpy(), expected, atol=1e-5)


def test_crfl_marsfl_schedule_clip_and_noise_on_every_entry() -> None:
    d, buffers = 4000, 4
    trainable = torch.ones(d + buffers, dtype=torch.bool)
    trainable[d:] = False
    u = np.full((2, d + buffers), 1.0)
    sizes = np.array([1.0, 3.0])
    for t, bound in ((0, 10.0), (2, 14.0), (7, 15.0)):
        last = make_inputs(u, sizes=sizes, trainable=trainable, round=t, total_rounds=t + 1)
        res = create("crfl", variant="marsfl").aggregate(last)  # the last round: no noise
        avg = real_updates(last).T @ (sizes / sizes.sum())
        norm = np.linalg.norm(avg[:d])
        assert res.diagnostics["bound"] == bound
        np.testing.assert_allclose(res.weights.numpy()[:d], avg[:d] * bound / (norm + 1e-6), rtol=1e-6)
        np.testing.assert_allclose(res.weights.numpy()[d:], avg[d:], rtol=1e-6)
    early = make_inputs(u, sizes=sizes, trainable=trainable, round=0, total_rounds=5, seed=4)
    noisy, plain = create("crfl", variant="marsfl").aggregate(early), create("crfl").aggregate(early)
    assert (noisy.weights.numpy()[d:] != avg[d:]).all()  # MarsFL smooths the buffers too
    np.testing.assert_allclose(plain.weights.numpy()[d:], avg[d:], rtol=1e-6)  # the original does not
    assert np.std(noisy.weights.numpy()[:d] - avg[:d] * 10.0 / (norm + 1e-6)) == pytest.approx(0.01, rel=0.1)


def test_sageflow_marsfl_is_the_plain_mean_of_the_client_models() -> None:
    gen = torch.Generator().manual_seed(7)
    proxy = ProxyData(x=torch.randn(32, 3, 32, 32, generator=gen), y=torch.randint(0, 10, (32,), generator=gen),
                      make_model=tiny_model, batch_size=16)
    clients = torch.stack([torch.zeros(30730), small_weights(2, 0.05), small_weights(3, 0.1)])
    w_t = small_weights(4)
    inputs = make_inputs((clients - w_t).numpy(), w_t.numpy(), sizes=np.array([1.0, 5.0, 2.0]), proxy=proxy)
    res = create("sageflow", variant="marsfl").aggregate(inputs)
    np.testing.assert_allclose(res.alpha_hat, 1 / 3)  # every client scored with w_t: equal weights
    assert len(set(res.diagnostics["proxy_loss"])) == 1 and not res.removed.any()
    np.testing.assert_allclose(res.weights.numpy(), inputs.client_weights.double().numpy().mean(axis=0), atol=1e-6)
