"""Defenses with state or randomness across rounds, run over several rounds with a client
quarantined after round 0 (``fdcr_mpi.defenses.quarantine``), against independent computations: the
per-client history stays with its client, the server momentum carries on, and the random draws
come from the run's seed and the round only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fdcr_mpi import seeding
from fdcr_mpi.defenses import aggregate, create
from fdcr_mpi.defenses.quarantine import defend_with_quarantine
from tests.test_baselines import make_inputs, real_updates, reference_foolsgold, weighted_mean
from tests.test_marsfl import (
    fresh_model,
    mars_bulyan,
    mars_foolsgold,
    mars_multi_krum,
    mars_trimmed_mean,
    start_of,
)

K, DIM, LR = 7, 48, 0.01
QUARANTINED = {1: [2], 2: [2, 5], 3: []}  # round -> clients whose rows are NaN that round


def rounds_of_updates(seed: int = 0, rounds: int = 4) -> list[np.ndarray]:
    """Updates per round: four similar clients, three near-copies (sybils) in another direction."""
    rng = np.random.default_rng(seed)
    base, sybil = rng.normal(size=DIM), rng.normal(size=DIM)
    out = []
    for _ in range(rounds):
        u = base + 0.6 * rng.normal(size=(K, DIM))
        u[4:] = sybil + 0.05 * rng.normal(size=(3, DIM))
        out.append(0.1 * u)
    return out


def round_inputs(t: int, w_t: np.ndarray, updates: np.ndarray, sizes: np.ndarray, **kw):
    inputs = make_inputs(updates, w_t, sizes=sizes, round=t, total_rounds=10, lr=LR, **kw)
    for k in QUARANTINED.get(t, []):
        inputs.client_weights[k, ::5] = float("nan")
    return inputs


def healthy(t: int) -> np.ndarray:
    keep = np.ones(K, dtype=bool)
    keep[QUARANTINED.get(t, [])] = False
    return keep


def check_result(result, quarantined: np.ndarray, t: int) -> None:
    np.testing.assert_array_equal(quarantined, ~healthy(t))
    assert (result.alpha_hat[~healthy(t)] == 0).all() and np.isfinite(result.weights.numpy()).all()


# ----------------------------------------------------------------- FoolsGold


@pytest.mark.parametrize("variant", ["original", "marsfl"])
def test_foolsgold_keeps_each_clients_history_through_quarantine(variant: str) -> None:
    sizes = np.arange(1.0, K + 1)
    defense = create("foolsgold", variant=variant)
    history = np.zeros((K, DIM))
    w_t = np.zeros(DIM, np.float32)
    for t, updates in enumerate(rounds_of_updates()):
        inputs = round_inputs(t, w_t, updates, sizes)
        result, quarantined = defend_with_quarantine(defense, inputs)
        check_result(result, quarantined, t)
        keep = healthy(t)
        d = real_updates(inputs)[keep]
        eps = 1e-5 if variant == "marsfl" else 0.0
        unit = d / (np.linalg.norm(d, axis=1, keepdims=True) + eps)
        history[keep] += unit  # a quarantined client's history waits for it
        if variant == "marsfl":
            wv, step = mars_foolsgold(unit, history[keep])
            expected = w_t + step
        else:
            wv = reference_foolsgold(history[keep])
            expected = w_t + weighted_mean(d, wv * sizes[keep]) if wv.sum() > 0 else w_t
        np.testing.assert_allclose(result.diagnostics["foolsgold_weight"][keep], wv, atol=1e-5)
        np.testing.assert_allclose(result.weights.numpy(), expected, rtol=1e-5, atol=1e-5)
        w_t = result.weights.numpy()
    np.testing.assert_allclose(defense.state_dict()["history"], history, atol=1e-5)


def test_foolsgold_history_follows_client_ids_not_rows() -> None:
    """The same clients in another order, and a subset, find their own histories."""
    updates = rounds_of_updates(1, rounds=2)
    a, b = create("foolsgold"), create("foolsgold")
    w0 = np.zeros(DIM, np.float32)
    aggregate(a, w0, updates[0].astype(np.float32))
    aggregate(b, w0, updates[0].astype(np.float32))
    order = np.array([6, 0, 3, 5])
    shuffled = aggregate(b, w0, updates[1][order].astype(np.float32), client_ids=order)
    plain = aggregate(a, w0, updates[1][np.sort(order)].astype(np.float32), client_ids=np.sort(order))
    back = np.argsort(order)  # rows of ``shuffled`` in ascending id order
    np.testing.assert_allclose(shuffled.diagnostics["foolsgold_weight"][back], plain.diagnostics["foolsgold_weight"])
    np.testing.assert_allclose(shuffled.weights, plain.weights, atol=1e-6)
    np.testing.assert_allclose(a.state_dict()["history"], b.state_dict()["history"], atol=1e-6)


def test_foolsgold_reads_a_checkpoint_written_before_ids_were_kept() -> None:
    old = {"history": np.ones((3, 4), np.float32)}
    fg = create("foolsgold")
    fg.load_state_dict(old)
    np.testing.assert_array_equal(fg.state_dict()["history_ids"], [0, 1, 2])


# ----------------------------------------------------------------- server momentum (marsfl)


@pytest.mark.parametrize(("name", "rule"), [
    ("multi_krum", lambda g: mars_multi_krum(g, corrupted=len(g) // 2 - (len(g) - len(g) // 2 - 1), keep=5)),
    ("trimmed_median", lambda g: mars_trimmed_mean(g, corrupted=len(g) - len(g) // 2 - 1)),
    # MarsFL's f, clamped to Bulyan's bound n >= 4f + 3 (6 healthy clients: f = 0; MarsFL would assert)
    ("bulyan", lambda g: mars_bulyan(g, corrupted=min(len(g) // 2 - (len(g) - len(g) // 2 - 1), (len(g) - 3) // 4))),
])
def test_server_momentum_carries_on_through_quarantine(name: str, rule) -> None:
    sizes = np.ones(K)
    defense = create(name, variant="marsfl")
    server, velocity = start_of(DIM, 3), np.zeros(DIM)
    w_t = np.zeros(DIM, np.float32)
    for t, updates in enumerate(rounds_of_updates(2)):
        inputs = round_inputs(t, w_t, updates, sizes, seed=3, fresh_model=fresh_model(DIM))
        result, quarantined = defend_with_quarantine(defense, inputs)
        check_result(result, quarantined, t)
        w = inputs.client_weights.double().numpy()[healthy(t)]
        grads = (inputs.global_weights.double().numpy() - w) / LR  # MarsFL's form
        velocity = 0.9 * velocity - LR * rule(grads)
        server = server + velocity
        np.testing.assert_allclose(result.weights.numpy(), server, rtol=1e-5, atol=2e-5)
        w_t = result.weights.numpy()


def test_all_clients_quarantined_leaves_the_momentum_untouched() -> None:
    defense = create("trimmed_median", variant="marsfl")
    first = round_inputs(0, np.zeros(DIM, np.float32), rounds_of_updates()[0], np.ones(K), fresh_model=fresh_model(DIM))
    defend_with_quarantine(defense, first)
    state = defense.state_dict()
    dead = round_inputs(1, np.zeros(DIM, np.float32), rounds_of_updates()[1], np.ones(K))
    dead.client_weights[:] = float("nan")
    result, quarantined = defend_with_quarantine(defense, dead)
    assert quarantined.all() and torch.equal(result.weights, dead.global_weights)
    assert all(np.array_equal(state[k], defense.state_dict()[k]) for k in state)


# ----------------------------------------------------------------- random draws: the run's seed


@pytest.mark.parametrize("variant", ["original", "marsfl"])
def test_crfl_noise_comes_from_the_runs_seed_and_round_through_quarantine(variant: str) -> None:
    sizes = np.arange(1.0, K + 1)
    defense = create("crfl", variant=variant, clip_bound=1e6, bound_bias=1e6)
    w_t = np.zeros(DIM, np.float32)
    for t, updates in enumerate(rounds_of_updates(4)):
        inputs = round_inputs(t, w_t, updates, sizes, seed=11)
        result, quarantined = defend_with_quarantine(defense, inputs)
        check_result(result, quarantined, t)
        keep = healthy(t)
        params = w_t + weighted_mean(real_updates(inputs)[keep], sizes[keep])
        bound = min(15.0, 2 * t + 10) if variant == "marsfl" else 1e6
        norm = np.linalg.norm(params)
        if norm > bound:
            params = params * bound / (norm + (1e-6 if variant == "marsfl" else 0.0))
        draw = torch.randn(DIM, generator=seeding.torch_generator(11, seeding.DEFENSE, 0, t)).double().numpy()
        np.testing.assert_allclose(result.weights.numpy(), params + 0.01 * draw, rtol=1e-5, atol=1e-5)
        w_t = result.weights.numpy()
    other_seed = round_inputs(0, np.zeros(DIM, np.float32), rounds_of_updates(4)[0], sizes, seed=12)
    same_seed = round_inputs(0, np.zeros(DIM, np.float32), rounds_of_updates(4)[0], sizes, seed=11)
    first = create("crfl", variant=variant).aggregate(same_seed).weights
    assert torch.equal(first, create("crfl", variant=variant).aggregate(same_seed).weights)
    assert not torch.equal(first, create("crfl", variant=variant).aggregate(other_seed).weights)


@pytest.mark.parametrize("variant", ["original", "marsfl"])
def test_dnc_draws_its_coordinates_from_the_runs_seed_and_round(variant: str) -> None:
    rng = np.random.default_rng(5)
    u = rng.normal(size=(K, 3000))
    scores = {}
    for seed in (0, 0, 1):
        for t in (1, 2):
            inputs = make_inputs(u, seed=seed, round=t)
            res = create("dnc", variant=variant, sub_dim=500).aggregate(inputs)
            coords = np.sort(seeding.numpy_rng(seed, seeding.DEFENSE, 0, t).choice(3000, size=500, replace=False))
            unit = real_updates(inputs) / (np.linalg.norm(real_updates(inputs), axis=1, keepdims=True)
                                           + (1e-5 if variant == "marsfl" else 0.0))
            block = unit[:, coords] - unit[:, coords].mean(axis=0)
            v = np.linalg.svd(block, full_matrices=False)[2][0]
            np.testing.assert_allclose(res.diagnostics["dnc_score"], (block @ v) ** 2, rtol=1e-4, atol=1e-9)
            scores.setdefault((seed, t), []).append(res.diagnostics["dnc_score"])
    np.testing.assert_array_equal(*scores[(0, 1)])  # the same seed and round: the same draws
    assert not np.allclose(scores[(0, 1)][0], scores[(1, 1)][0])  # a seed sweep varies them
    assert not np.allclose(scores[(0, 1)][0], scores[(0, 2)][0])  # and so does the round


def test_dnc_through_quarantine_over_rounds() -> None:
    sizes = np.arange(1.0, K + 1)
    defense = create("dnc", sub_dim=10_000, filter_fraction=0.3)  # every coordinate: no draw to replicate
    w_t = np.zeros(DIM, np.float32)
    for t, updates in enumerate(rounds_of_updates(6)):
        inputs = round_inputs(t, w_t, updates, sizes, seed=2)
        result, quarantined = defend_with_quarantine(defense, inputs)
        check_result(result, quarantined, t)
        keep = healthy(t)
        d = real_updates(inputs)[keep]
        unit = d / np.linalg.norm(d, axis=1, keepdims=True)
        block = unit - unit.mean(axis=0)
        s = (block @ np.linalg.svd(block, full_matrices=False)[2][0]) ** 2
        good = np.argsort(s, kind="stable")[: keep.sum() - int(np.floor(0.3 * keep.sum() + 1e-9))]
        np.testing.assert_allclose(result.weights.numpy(), w_t + weighted_mean(d[good], sizes[keep][good]),
                                   rtol=1e-5, atol=1e-6)
        w_t = result.weights.numpy()


# ----------------------------------------------------------------- the runtime's side


def test_the_server_hands_the_defense_the_runs_seed_and_a_fresh_model(tmp_path: Path, monkeypatch) -> None:
    from fdcr_mpi.config import load_config
    from fdcr_mpi.models import build_model
    from fdcr_mpi.runtime import round as round_module
    from fdcr_mpi.runtime.driver import execute

    captured = []
    real = round_module.defend

    def spy(defense, inputs, healthy):
        captured.append(inputs)
        return real(defense, inputs, healthy)

    monkeypatch.setattr(round_module, "defend", spy)
    config = load_config(None, ["data.dataset=digits", "rounds=1", "train.local_epochs=1", "seed=7",
                                "defense.name=fedavg", "runtime.threads=1", "fisher.max_samples=16"])
    assert execute(config, tmp_path / "run", transport_kind="local", quiet=True) == 0
    assert captured[0].seed == 7
    assert torch.equal(captured[0].fresh_model(3), build_model("simple_cnn", 3).flat)
