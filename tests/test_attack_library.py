"""The attack library beyond BadNets/DBA (issue 16): each rule against an independent computation,
the colluding stage on the server's rows, the config sections, and a run under mpiexec -n 3."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import norm

from fdcr_mpi import attacks
from fdcr_mpi.attacks.collusion import collude
from fdcr_mpi.attacks.label_flip import LabelFlip
from fdcr_mpi.client.train import ClientData
from fdcr_mpi.config import aggregation_path, config_hash, load_config
from fdcr_mpi.data.datasets import SPECS
from fdcr_mpi.errors import UserError
from fdcr_mpi.seeding import COLLUDE, derive_seed
from tests.test_mpi import final_sha, in_process_sha, launch, requires_mpi

K, P, BUFFERS = 10, 40, 3
ATTACKERS = np.array([False] * 7 + [True] * 3)


def attack_of(kind: str, *overrides: str) -> attacks.Attack:
    return attacks.create(load_config(None, [f"attack.kind={kind}", *overrides]))


def round_rows(seed: int = 0) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """(K, P + BUFFERS) client weights, w_t and the trainable mask (the last entries are buffers)."""
    rng = np.random.default_rng(seed)
    w_t = rng.normal(size=P + BUFFERS).astype(np.float32)
    weights = (w_t + 0.1 * rng.normal(size=(K, P + BUFFERS)) + 0.05).astype(np.float32)
    trainable = torch.ones(P + BUFFERS, dtype=torch.bool)
    trainable[P:] = False
    return weights, torch.from_numpy(w_t), trainable


def crafted(kind: str, *overrides: str, healthy: np.ndarray | None = None,
            seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(weights before, after the colluding stage, w_t) for attack ``kind`` in round 3."""
    weights, w_t, trainable = round_rows(seed)
    before = weights.copy()
    collude(attack_of(kind, *overrides), weights, w_t, trainable, ATTACKERS,
            np.ones(K, bool) if healthy is None else healthy, seed=5, round_=3)
    return before, weights, w_t.numpy()


def known_updates(before: np.ndarray, w_t: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return (before[rows] - w_t)[:, :P].astype(np.float64)


def check_only_attackers_trainable_changed(before: np.ndarray, after: np.ndarray) -> None:
    np.testing.assert_array_equal(after[~ATTACKERS], before[~ATTACKERS])  # the benign rows untouched
    np.testing.assert_array_equal(after[:, P:], before[:, P:])  # buffers stay the honest ones
    assert not np.array_equal(after[ATTACKERS, :P], before[ATTACKERS, :P])


# ----------------------------------------------------------------------------- LIE


def test_lie_sends_mean_minus_z_max_std_of_the_benign_updates() -> None:
    before, after, w_t = crafted("lie")
    check_only_attackers_trainable_changed(before, after)
    benign = known_updates(before, w_t, ~ATTACKERS)
    s = math.floor(K / 2 + 1) - 3
    z = norm.ppf((K - s) / K)  # Baruch et al.: 10 clients, 3 attackers -> Phi^-1(0.7)
    assert z == pytest.approx(0.5244, abs=1e-4)
    expected = benign.mean(axis=0) - z * benign.std(axis=0)
    for row in np.flatnonzero(ATTACKERS):
        np.testing.assert_allclose(after[row, :P] - w_t[:P], expected, rtol=1e-5, atol=1e-6)


def test_lie_with_the_attackers_own_knowledge_and_a_fixed_z() -> None:
    before, after, w_t = crafted("lie", "attack.knowledge=attackers", "lie.z=1.5")
    own = known_updates(before, w_t, ATTACKERS)
    expected = own.mean(axis=0) - 1.5 * own.std(axis=0)
    np.testing.assert_allclose(after[ATTACKERS, :P] - w_t[:P], np.tile(expected, (3, 1)), rtol=1e-5, atol=1e-6)


def test_a_row_flagged_unhealthy_is_neither_known_nor_crafted() -> None:
    healthy = np.ones(K, bool)
    healthy[[0, 9]] = False  # a benign and an attacker row the clients flagged
    before, after, w_t = crafted("lie", healthy=healthy)
    np.testing.assert_array_equal(after[9], before[9])
    benign = known_updates(before, w_t, np.flatnonzero(~ATTACKERS & healthy))
    n, f = 8, 2
    z = norm.ppf((n - (math.floor(n / 2 + 1) - f)) / n)
    np.testing.assert_allclose(after[7, :P] - w_t[:P], benign.mean(0) - z * benign.std(0), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- Min-Max / Min-Sum


def boundary(fits, hi: float = 20.0) -> float:
    """The largest gamma in [0, hi] with fits(gamma), by plain bisection (fits holds on an interval from 0)."""
    lo = 0.0
    assert fits(lo)
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


@pytest.mark.parametrize("perturbation", ["unit_vec", "std", "sign"])
@pytest.mark.parametrize("kind", ["min_max", "min_sum"])
def test_min_max_and_min_sum_scale_to_the_edge_of_the_benign_spread(kind: str, perturbation: str) -> None:
    before, after, w_t = crafted(kind, f"{kind}.perturbation={perturbation}")
    check_only_attackers_trainable_changed(before, after)
    b = known_updates(before, w_t, ~ATTACKERS)
    mu = b.mean(axis=0)
    p = {"unit_vec": mu / np.linalg.norm(mu), "std": b.std(axis=0), "sign": np.sign(mu)}[perturbation]
    pair = ((b[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    if kind == "min_max":  # Shejwalkar & Houmansadr eq. 7
        def fits(g: float) -> bool:
            return np.sqrt(((mu - g * p - b) ** 2).sum(1)).max() <= np.sqrt(pair.max())
    else:  # eq. 8
        def fits(g: float) -> bool:
            return ((mu - g * p - b) ** 2).sum() <= pair.sum(1).max()
    gamma = boundary(fits)
    assert 0 < gamma < 20
    sent = after[ATTACKERS, :P].astype(np.float64) - w_t[:P]
    np.testing.assert_allclose(sent, np.tile(mu - gamma * p, (3, 1)), atol=5e-5 * max(1.0, np.abs(p).max()))
    assert not fits(gamma + 1e-3)  # not short of the edge


# ----------------------------------------------------------------------------- IPM, Gaussian


def test_ipm_sends_minus_epsilon_times_the_benign_mean() -> None:
    before, after, w_t = crafted("ipm", "ipm.epsilon=0.5")
    check_only_attackers_trainable_changed(before, after)
    expected = -0.5 * known_updates(before, w_t, ~ATTACKERS).mean(axis=0)
    np.testing.assert_allclose(after[ATTACKERS, :P] - w_t[:P], np.tile(expected, (3, 1)), rtol=1e-5, atol=1e-7)


def test_gaussian_draws_from_the_round_generator_of_the_run_seed() -> None:
    before, after, w_t = crafted("gaussian", "gaussian.sigma=2.0", "gaussian.mean=0.5")
    check_only_attackers_trainable_changed(before, after)
    expected = np.random.default_rng(derive_seed(5, COLLUDE, 3)).normal(0.5, 2.0, size=(3, P)).astype(np.float32)
    np.testing.assert_allclose(after[ATTACKERS, :P] - w_t[:P], expected, rtol=1e-5, atol=1e-5)
    _, again, _ = crafted("gaussian", "gaussian.sigma=2.0", "gaussian.mean=0.5")
    np.testing.assert_array_equal(again, after)
    assert attack_of("gaussian").options.sigma == pytest.approx(math.sqrt(200))  # Fang et al.'s variance 200


# ----------------------------------------------------------------------------- client-side attacks


def test_sign_flip_and_scaling_change_the_attackers_own_update() -> None:
    w_t = torch.linspace(-1, 1, 12)
    w_k = w_t + torch.arange(12, dtype=torch.float32) / 100
    flipped = w_k.clone()
    attack_of("sign_flip", "sign_flip.scale=2.0").update(flipped, w_t)
    torch.testing.assert_close(flipped - w_t, -2.0 * (w_k - w_t))
    scaled = w_k.clone()
    attack_of("scaling", "data.num_clients=20").update(scaled, w_t)  # gamma = n / eta = 20 participants
    torch.testing.assert_close(scaled - w_t, 20.0 * (w_k - w_t), rtol=1e-5, atol=1e-6)
    both = w_k.clone()
    attack_of("scaling", "scaling.gamma=3", "attack.scale=2").update(both, w_t)
    torch.testing.assert_close(both - w_t, 6.0 * (w_k - w_t), rtol=1e-5, atol=1e-6)


def test_label_flip_relabels_every_sample_and_stamps_no_trigger() -> None:
    y = torch.tensor([0, 1, 2, 9, 5])
    data = ClientData(x=torch.zeros(5, 1, 32, 32), y=y, poisoned=torch.zeros(5, dtype=torch.bool))
    out = LabelFlip(load_config(None, ["attack.kind=label_flip"])).poison(data, SPECS["fmnist"], 9, ATTACKERS)
    assert out.y.tolist() == [9, 8, 7, 0, 4] and out.true_y.tolist() == y.tolist()
    assert out.trigger is None and not out.poisoned.any()


def test_pgd_projects_the_sent_update_onto_the_ball_after_the_attack() -> None:
    w_t = torch.zeros(50)
    w_k = torch.linspace(0.01, 0.5, 50)
    far, near = w_k.clone(), (w_k * 1e-3).clone()
    attack_of("sign_flip", "attack.pgd_radius=0.25").send(far, w_t)
    attack_of("sign_flip", "attack.pgd_radius=0.25").send(near, w_t)
    torch.testing.assert_close(far, -w_k * (0.25 / float(w_k.norm())))  # flipped, then projected
    torch.testing.assert_close(near, -w_k * 1e-3)  # inside the ball: only flipped
    assert config_hash(load_config(None, ["attack.pgd_radius=0.25"])) != config_hash(load_config(None))


# ----------------------------------------------------------------------------- adaptive Fisher against FDCR


def discrepancies(updates: np.ndarray, fisher: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """FDCR's V_k (Eqs. 6-9b, mse), written out plainly."""
    lo, hi = fisher.min(axis=1, keepdims=True), fisher.max(axis=1, keepdims=True)
    importance = np.where(hi > lo, (fisher - lo) / np.where(hi > lo, hi - lo, 1), 0.0)
    weighted = updates * importance
    return ((alpha @ weighted - weighted) ** 2).mean(axis=1)


@pytest.mark.parametrize("knowledge", ["omniscient", "attackers"])
def test_the_adaptive_fisher_hides_the_attackers_discrepancy(knowledge: str) -> None:
    rng = np.random.default_rng(3)
    d = 300
    benign = rng.normal(0.0, 0.01, size=d)
    updates = benign + rng.normal(0.0, 0.004, size=(K, d))
    updates[ATTACKERS] += rng.normal(0.0, 0.03, size=d)  # the backdoor direction, shared by the attackers
    fisher = rng.gamma(1.0, 1.0, size=(K, d)) * (np.abs(benign) > 0.005)
    fisher[ATTACKERS] = rng.gamma(1.0, 1.0, size=(3, d))
    sizes = rng.integers(100, 300, size=K).astype(np.float64)
    alpha = sizes / sizes.sum()
    w_t = torch.zeros(d)
    weights = updates.astype(np.float32)
    forged = fisher.astype(np.float32)
    collude(attack_of("badnets", "attack.fisher=adaptive", f"attack.knowledge={knowledge}"), weights, w_t, None,
            ATTACKERS, np.ones(K, bool), seed=0, round_=0, fisher=forged, sizes=sizes)
    np.testing.assert_array_equal(weights, updates.astype(np.float32))  # the updates are not touched
    np.testing.assert_array_equal(forged[~ATTACKERS], fisher[~ATTACKERS].astype(np.float32))
    honest = discrepancies(updates, fisher, alpha)
    after = discrepancies(updates, forged.astype(np.float64), alpha)
    assert honest[ATTACKERS].min() > np.median(honest[~ATTACKERS])  # honest Fisher: the attackers stand out
    assert after[ATTACKERS].max() < honest[ATTACKERS].min()
    if knowledge == "omniscient":  # hidden among the benign clients, and no single entry lowers V further
        assert after[ATTACKERS].max() < np.median(after[~ATTACKERS])
        k = 7
        for v in rng.choice(d, size=20, replace=False):
            for delta in (-0.3, 0.3):
                tried = forged.astype(np.float64).copy()
                tried[k, v] = np.clip(tried[k, v] + delta, 0.0, 1.0)
                assert discrepancies(updates, tried, alpha)[k] >= after[k] - 1e-12


def test_the_adaptive_fisher_needs_the_rows_on_the_server() -> None:
    many = ["data.num_clients=200", "defense.name=fdcr"]
    assert aggregation_path(load_config(None, [*many, "attack.fisher=adaptive"])) == "gather"
    with pytest.raises(UserError, match="adaptive"):
        load_config(None, [*many, "attack.fisher=adaptive", "defense.path=reduce"])


# ----------------------------------------------------------------------------- config


def test_attack_options_are_config_sections_hashed_only_when_used() -> None:
    base = load_config(None)
    with pytest.warns(UserWarning, match="lie.z set, but the attack is badnets: ignored"):
        unused = load_config(None, ["lie.z=2.0"])
    assert config_hash(unused) == config_hash(base)
    assert config_hash(load_config(None, ["attack.kind=lie", "lie.z=2.0"])) != \
        config_hash(load_config(None, ["attack.kind=lie"]))
    with pytest.raises(UserError, match="min_max.perturbation"):
        load_config(None, ["attack.kind=min_max", "min_max.perturbation=cube"])


def test_colluding_attacks_take_the_gather_path() -> None:
    many = ["data.num_clients=200", "defense.name=fedavg"]
    assert aggregation_path(load_config(None, many)) == "reduce"
    assert aggregation_path(load_config(None, [*many, "attack.kind=lie"])) == "gather"
    with pytest.raises(UserError, match="reduce path never gathers"):
        load_config(None, [*many, "attack.kind=min_max", "defense.path=reduce"])


# ----------------------------------------------------------------------------- end to end

SMALL = ["data.dataset=digits", "rounds=2", "train.local_epochs=1", "fisher.max_samples=32",
         "defense.name=multi_krum"]
CASES = {kind: [f"attack.kind={kind}"] for kind in sorted(set(attacks.available()) - {"badnets", "dba", "none", "a3fl"})}
# a3fl (its trigger search is slow at its defaults) is launched with small options in tests/test_attack_a3fl.py
CASES["fisher_adaptive"] = ["attack.fisher=adaptive", "defense.name=fdcr"]
CASES["pgd"] = ["attack.pgd_radius=0.05"]


@pytest.fixture
def clean_sha(tmp_path: Path, capsys: pytest.CaptureFixture) -> str:
    return in_process_sha(["run", *SMALL, "attack.kind=none", "--quiet", "--out", str(tmp_path / "clean")], capsys)


@requires_mpi
@pytest.mark.slow
@pytest.mark.parametrize("kind", CASES)
def test_attack_runs_two_rounds_under_mpiexec_as_in_one_process(tmp_path: Path, kind: str, clean_sha: str,
                                                                capsys: pytest.CaptureFixture) -> None:
    args = ["run", *SMALL, *CASES[kind], "--quiet"]
    spread = final_sha(launch([*args, "--out", str(tmp_path / "mpi")], 3, timeout=300))
    alone = in_process_sha([*args, "--out", str(tmp_path / "one")], capsys)
    assert spread == alone, f"{kind}: one process and mpiexec -n 3 differ"
    assert alone != clean_sha, f"{kind} changed nothing"
