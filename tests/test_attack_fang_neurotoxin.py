"""The ``fang`` (Fang et al., USENIX Security 2020) and ``neurotoxin`` (Zhang et al., ICML 2022) attacks:
each rule against an independent numpy computation, their effect on the rule they attack, and
their config sections."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fdcr_mpi.attacks.badnets import BadNets
from fdcr_mpi.attacks.base import RoundUpdates
from fdcr_mpi.attacks.fang import Fang
from fdcr_mpi.attacks.neurotoxin import Neurotoxin
from fdcr_mpi.client.train import ClientData
from fdcr_mpi.config import aggregation_path, load_config
from fdcr_mpi.data.datasets import SPECS
from fdcr_mpi.defenses.krum_single import krum_select
from fdcr_mpi.errors import UserError
from fdcr_mpi.seeding import COLLUDE, derive_seed
from tests.test_attack_library import (
    ATTACKERS,
    P,
    attack_of,
    check_only_attackers_trainable_changed,
    crafted,
    known_updates,
)


def sent(after: np.ndarray, w_t: np.ndarray) -> np.ndarray:
    """The attackers' sent updates on the trainable entries, (3, P) float64."""
    return after[ATTACKERS, :P].astype(np.float64) - w_t[:P]


def round_of(updates: np.ndarray, attackers: np.ndarray, seed: int = 0) -> RoundUpdates:
    """A round whose known rows are the benign ones (full knowledge)."""
    attackers = np.asarray(attackers, bool)
    return RoundUpdates(torch.from_numpy(updates.astype(np.float32)), attackers, ~attackers,
                        np.random.default_rng(seed))


# ----------------------------------------------------------------------------- plain numpy rules


def numpy_krum(rows: np.ndarray, f: int) -> int:
    """Krum: the row with the smallest sum of squared distances to its n - f - 2 nearest others."""
    n = len(rows)
    d = ((rows[:, None, :] - rows[None, :, :]) ** 2).sum(-1)
    scores = [np.sort(np.delete(d[i], i))[:max(n - f - 2, 1)].sum() for i in range(n)]
    return int(np.argmin(scores))


def numpy_trimmed_mean(rows: np.ndarray, b: int) -> np.ndarray:
    sorted_rows = np.sort(rows, axis=0)
    return sorted_rows[b:len(rows) - b].mean(axis=0)


def numpy_fang_trim(benign: np.ndarray, u: np.ndarray, b: float) -> np.ndarray:
    """The paper's full-knowledge trimmed-mean rule, coordinate by coordinate, on updates."""
    s = np.sign(benign.mean(axis=0))
    out = np.zeros_like(u)
    for j in range(benign.shape[1]):
        w_max, w_min = benign[:, j].max(), benign[:, j].min()
        if s[j] == -1:
            lo, hi = (w_max, b * w_max) if w_max > 0 else (w_max, w_max / b)
        else:
            lo, hi = (w_min, w_min / b) if w_min > 0 else (w_min, b * w_min)
        out[:, j] = lo + u[:, j] * (hi - lo)
    return out


def numpy_fang_krum(benign: np.ndarray, n: int, c: int, threshold: float = 1e-5) -> tuple[float, bool]:
    """(lambda, selected): the paper's bound, then halving until Krum picks a crafted row."""
    r, d = benign.shape
    dist = np.sqrt(((benign[:, None, :] - benign[None, :, :]) ** 2).sum(-1))
    closest = min(np.sort(np.delete(dist[i], i))[:n - c - 2].sum() for i in range(r))
    lam = closest / ((n - 2 * c - 1) * np.sqrt(d)) + np.linalg.norm(benign, axis=1).max() / np.sqrt(d)
    s = np.sign(benign.mean(axis=0))
    while True:
        crafted_row = (-lam * s).astype(np.float32).astype(np.float64)
        if numpy_krum(np.vstack([benign, np.tile(crafted_row, (c, 1))]), c) >= r:
            return lam, True
        if lam < threshold:
            return lam, False
        lam /= 2


# ----------------------------------------------------------------------------- fang: trimmed mean / median


@pytest.mark.parametrize("b", [2.0, 3.5])
def test_fang_trimmed_mean_draws_beyond_the_benign_extremes_from_the_round_generator(b: float) -> None:
    before, after, w_t = crafted("fang", f"fang.b={b}")
    check_only_attackers_trainable_changed(before, after)
    benign = known_updates(before, w_t, ~ATTACKERS)
    u = np.random.default_rng(derive_seed(5, COLLUDE, 3)).uniform(size=(3, P))
    np.testing.assert_allclose(sent(after, w_t), numpy_fang_trim(benign, u, b), rtol=1e-5, atol=1e-6)
    _, again, _ = crafted("fang", f"fang.b={b}")
    np.testing.assert_array_equal(again, after)  # the same rows on every call: the seeded round generator


def test_fang_trimmed_mean_covers_the_four_cases_of_the_paper() -> None:
    # columns: s=-1 with w_max>0, s=-1 with w_max<=0, s=+1 with w_min>0, s=+1 with w_min<=0, s=0 (as +1)
    benign = np.array([[0.5, -0.2, 0.3, 0.6, 0.5],
                       [-0.9, -0.4, 0.1, -0.1, -0.5],
                       [-0.3, -0.8, 0.5, 0.2, 0.25],
                       [-0.1, -0.6, 0.2, 0.4, -0.25]])
    updates = np.vstack([benign, np.full((2, 5), 7.0)])  # the attackers' honest rows play no part
    attackers = np.array([False] * 4 + [True] * 2)
    out = Fang(load_config(None, ["attack.kind=fang"])).collude(round_of(updates, attackers, seed=11)).numpy()
    u = np.random.default_rng(11).uniform(size=(2, 5))
    np.testing.assert_allclose(out, numpy_fang_trim(benign, u, 2.0), rtol=1e-6, atol=1e-7)
    assert np.all(out[:, 0] >= 0.5) and np.all(out[:, 0] <= 1.0)  # [w_max, 2 w_max]
    assert np.all(out[:, 1] >= -0.2) and np.all(out[:, 1] <= -0.1)  # [w_max, w_max / 2]
    assert np.all(out[:, 2] <= 0.1) and np.all(out[:, 2] >= 0.05)  # [w_min / 2, w_min]
    assert np.all(out[:, 3] <= -0.1) and np.all(out[:, 3] >= -0.2)  # [2 w_min, w_min]
    assert np.all(out[:, 4] <= -0.5) and np.all(out[:, 4] >= -1.0)  # a zero mean: pushed down, [2 w_min, w_min]


def test_fang_moves_the_trimmed_mean_and_median_against_the_benign_direction() -> None:
    before, after, w_t = crafted("fang")
    honest = (before[:, :P] - w_t[:P]).astype(np.float64)
    attacked = (after[:, :P] - w_t[:P]).astype(np.float64)
    s = np.sign(honest[~ATTACKERS].mean(axis=0))
    for rule in (lambda x: numpy_trimmed_mean(x, 1), lambda x: np.median(x, axis=0)):
        moved = s * (rule(attacked) - rule(honest))  # honest: the attackers send their own updates
        assert np.all(moved <= 1e-7)  # never along the benign direction
        assert (moved < 0).mean() > 0.9 and moved.sum() < 0
    tm_honest, tm_attacked = numpy_trimmed_mean(honest, 1), numpy_trimmed_mean(attacked, 1)
    assert s @ tm_attacked < 0.5 * (s @ tm_honest)  # the aggregate's progress along s at least halved


# ----------------------------------------------------------------------------- fang: Krum


def test_fang_krum_follows_the_paper_bound_and_halving_and_makes_krum_pick_an_attacker() -> None:
    before, after, w_t = crafted("fang", "fang.target=krum", seed=1)  # seed 0: honest Krum keeps an attacker
    check_only_attackers_trainable_changed(before, after)
    benign = known_updates(before, w_t, ~ATTACKERS)
    honest = (before[:, :P] - w_t[:P]).astype(np.float64)
    assert not ATTACKERS[numpy_krum(honest, 3)]  # without the attack Krum keeps a benign row
    lam, selected = numpy_fang_krum(benign, 10, 3)
    assert selected and lam > 1e-5
    s = np.sign(benign.mean(axis=0))
    np.testing.assert_allclose(sent(after, w_t), np.tile(-lam * s, (3, 1)), rtol=1e-5, atol=1e-6)
    attacked = torch.from_numpy((after[:, :P] - w_t[:P]).astype(np.float32))
    chosen, _, _ = krum_select(attacked, 3)
    assert ATTACKERS[chosen]  # the defense's own Krum on every row now keeps an attacker's
    assert ATTACKERS[numpy_krum(attacked.numpy().astype(np.float64), 3)]


def test_fang_krum_sends_the_last_lambda_tried_when_krum_never_picks_it() -> None:
    row = np.linspace(-1.0, 1.0, 12) + 0.05
    benign = np.tile(row, (7, 1))
    benign[np.arange(6), np.arange(6)] += 0.01 * np.array([1, -1, 1, -1, 1, -1])
    updates = np.vstack([benign, np.zeros((3, 12))])  # Krum keeps the last benign row, the centre, never -lambda s
    attackers = np.array([False] * 7 + [True] * 3)
    attack = Fang(load_config(None, ["attack.kind=fang", "fang.target=krum", "fang.lambda_threshold=0.001"]))
    out = attack.collude(round_of(updates, attackers)).numpy()
    lam, selected = numpy_fang_krum(updates[:7].astype(np.float32).astype(np.float64), 10, 3, threshold=0.001)
    assert not selected and not attack.selected
    assert 0.0005 <= lam < 0.001 and attack.lam == pytest.approx(lam, rel=1e-9)
    np.testing.assert_allclose(out, np.tile(-lam * np.sign(row), (3, 1)), rtol=1e-6)


# ----------------------------------------------------------------------------- neurotoxin


@pytest.mark.parametrize(("knowledge", "fraction", "count"),
                         [("omniscient", "0.1", 4), ("omniscient", "0.01", 1), ("attackers", "0.25", 10)])
def test_neurotoxin_zeroes_the_top_coordinates_of_the_known_mean_and_keeps_the_rest(
        knowledge: str, fraction: str, count: int) -> None:
    before, after, w_t = crafted("neurotoxin", f"neurotoxin.top_fraction={fraction}",
                                 f"attack.knowledge={knowledge}")
    check_only_attackers_trainable_changed(before, after)
    known = known_updates(before, w_t, ~ATTACKERS if knowledge == "omniscient" else ATTACKERS)
    magnitude = np.abs(known.mean(axis=0))
    top = np.argsort(-magnitude, kind="stable")[:count]
    assert magnitude[top].min() > np.delete(magnitude, top).max()  # no tie at the edge in this case
    honest = known_updates(before, w_t, ATTACKERS)
    out = sent(after, w_t)
    np.testing.assert_array_equal(out[:, top], 0.0)
    rest = np.setdiff1d(np.arange(P), top)
    np.testing.assert_allclose(out[:, rest], honest[:, rest], rtol=0, atol=1e-6)
    assert np.all(honest[:, top] != 0)  # the zeros are the mask's, not the honest values


def test_neurotoxin_masks_by_the_benign_mean_not_by_the_attackers_update_and_breaks_ties_low() -> None:
    benign = np.array([[0.0, 1.0, 0.2, 0.0, -1.0, 0.1],
                       [0.0, 1.0, -0.2, 0.0, -1.0, 0.1]])
    own = np.array([[5.0, 0.3, 0.4, 6.0, 0.5, 0.6]])
    attack = Neurotoxin(load_config(None, ["attack.kind=neurotoxin", "neurotoxin.top_fraction=0.2"]))
    out = attack.collude(round_of(np.vstack([benign, own]), np.array([False, False, True]))).numpy()
    # ceil(0.2 * 6) = 2 coordinates: |mean| 1.0 at 1 and 4 (a tie, both kept); the attacker's own
    # large entries (0 and 3) stay
    np.testing.assert_allclose(out, [[5.0, 0.0, 0.4, 6.0, 0.0, 0.6]], rtol=1e-7)
    attack = Neurotoxin(load_config(None, ["attack.kind=neurotoxin", "neurotoxin.top_fraction=0.1"]))
    out = attack.collude(round_of(np.vstack([benign, own]), np.array([False, False, True]))).numpy()
    np.testing.assert_allclose(out, [[5.0, 0.0, 0.4, 6.0, 0.5, 0.6]], rtol=1e-7)  # the tie: the lower index


def test_neurotoxin_poisons_its_data_as_badnets() -> None:
    data = ClientData(x=torch.zeros(20, 3, 32, 32), y=torch.arange(20) % 10, poisoned=torch.zeros(20, dtype=torch.bool))
    ours = attack_of("neurotoxin", "attack.target_label=3").poison(data, SPECS["cifar10"], 8, ATTACKERS)
    theirs = BadNets(load_config(None, ["attack.target_label=3"])).poison(data, SPECS["cifar10"], 8, ATTACKERS)
    assert isinstance(attack_of("neurotoxin"), BadNets)
    torch.testing.assert_close(ours.y, theirs.y)
    torch.testing.assert_close(ours.poisoned, theirs.poisoned)
    assert ours.poisoned.any() and (ours.y[ours.poisoned] == 3).all()


# ----------------------------------------------------------------------------- config


def test_fang_and_neurotoxin_config_sections() -> None:
    fang = attack_of("fang").options
    assert (fang.target, fang.b, fang.lambda_threshold) == ("trimmed_mean", 2.0, 1e-5)  # the paper's b, threshold
    assert attack_of("fang", "fang.b=2.5").options.b == 2.5
    assert attack_of("neurotoxin").options.top_fraction == 0.01
    for bad in ("fang.b=1.0", "fang.b=-2", "fang.target=bulyan", "fang.lambda_threshold=0", "fang.lamda=1"):
        with pytest.raises(UserError, match="fang"):
            load_config(None, ["attack.kind=fang", bad])
    for bad in ("neurotoxin.top_fraction=1.0", "neurotoxin.top_fraction=-0.1"):
        with pytest.raises(UserError, match="neurotoxin.top_fraction"):
            load_config(None, ["attack.kind=neurotoxin", bad])
    many = ["data.num_clients=200", "defense.name=fedavg"]
    for kind in ("fang", "neurotoxin"):  # colluding: the rows must meet on the server
        assert aggregation_path(load_config(None, [*many, f"attack.kind={kind}"])) == "gather"
        with pytest.raises(UserError, match="reduce path never gathers"):
            load_config(None, [*many, f"attack.kind={kind}", "defense.path=reduce"])
