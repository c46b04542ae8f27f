"""Scale: partial participation, the reduce path (exact integer reductions), batched-client placement."""

from __future__ import annotations

import re
import subprocess

import h5py
import numpy as np
import pytest
import torch

from fdcr_mpi.config import aggregation_path, load_config
from fdcr_mpi.defenses import RoundInputs, create
from fdcr_mpi.errors import UserError
from fdcr_mpi.runtime.participation import RoundPlan, select_clients
from fdcr_mpi.runtime.reduce_ops import (
    ReducedAcrossRanks,
    fixed_point_exponent,
    fixed_terms,
    from_fixed,
)
from fdcr_mpi.runtime.transport import LocalTransport, client_blocks
from tests.test_fdcr import make_round
from tests.test_mpi import FDCR, TINY, final_sha, launch, requires_mpi

# --- the exact reduction ---------------------------------------------------------------


def local_reduction(w_t, w, fisher, sizes, trainable=None, lr=0.01) -> ReducedAcrossRanks:
    alpha = sizes / sizes.sum()
    return ReducedAcrossRanks(
        transport=LocalTransport(), ids=np.arange(len(sizes)), weights=torch.as_tensor(w),
        fisher=None if fisher is None else torch.as_tensor(fisher), alpha=alpha, alpha_all=alpha,
        rows_per_rank=[len(sizes)], global_weights=torch.as_tensor(w_t),
        trainable=None if trainable is None else torch.as_tensor(trainable), lr=lr, round=0, total_rounds=1)


def test_weighted_sum_is_accurate_to_float32() -> None:
    rng = np.random.default_rng(0)
    rows = torch.from_numpy(rng.normal(size=(7, 1000)).astype(np.float32) * np.logspace(-6, 2, 1000, dtype=np.float32))
    coef = rng.uniform(0.01, 1, size=7)
    got = local_reduction(np.zeros(1000, np.float32), rows, None, np.ones(7)).weighted_sum(coef, rows, to_all=True)
    exact = (rows.double() * torch.from_numpy(coef)[:, None]).sum(0)
    # one float32 rounding per term (7 of them) and of the result, and a fixed-point resolution
    # of about 2^-53 of the largest term
    terms = (rows.double().abs() * torch.from_numpy(coef)[:, None]).sum(0)
    bound = (terms * 8 + exact.abs()) * 2.0 ** -24 + exact.abs().max() * 2.0 ** -50
    assert bool(((got.double() - exact).abs() <= bound).all())
    gathered = sum(rows[k] * float(np.float32(coef[k])) for k in range(7))  # the gather path's float32 sum
    assert (got.double() - exact).abs().mean() <= (gathered.double() - exact).abs().mean()


def test_integer_totals_do_not_depend_on_how_the_rows_are_split() -> None:
    """The property behind bit-identical reductions: any split of the terms among ranks sums to
    the same int64 total (float partial sums would not)."""
    rng = np.random.default_rng(1)
    terms = torch.from_numpy(rng.normal(size=(9, 500)) * 10.0 ** rng.integers(-4, 4, size=(9, 1)))
    e = fixed_point_exponent(float(terms.abs().max()), 9)
    fixed = list(fixed_terms(terms.float(), np.ones(9), e))
    totals = []
    for split in ([9], [4, 5], [1, 1, 7], [3, 3, 3], [0, 2, 0, 7]):
        parts, start = [], 0
        for n in split:
            parts.append(sum((fixed[i] for i in range(start, start + n)), torch.zeros(500, dtype=torch.int64)))
            start += n
        totals.append(from_fixed(sum(reversed(parts)), e))
    assert all(torch.equal(t, totals[0]) for t in totals)
    floats = [sum((terms[i].float() for i in order), torch.zeros(500)) for order in (range(9), reversed(range(9)))]
    assert not torch.equal(floats[0], floats[1])  # why the integers are needed


def test_fixed_point_exponent_never_overflows() -> None:
    for max_abs in (1e-30, 1e-3, 1.0, 3.7e5, 1e30):
        for n in (1, 2, 3, 1000, 4096):
            e = fixed_point_exponent(max_abs, n)
            assert n * np.ldexp(max_abs, e) < 2.0 ** 62
            assert n * np.ldexp(max_abs, e) >= 2.0 ** 49  # and keeps the resolution
    assert fixed_point_exponent(0.0, 5) == 0


@pytest.mark.parametrize("options", [{}, {"fpra": False}, {"use_importance": False}, {"discrepancy": "l2"},
                                     {"variant": "released"}])
def test_fdcr_reduce_path_matches_the_gather_path(options: dict) -> None:
    w_t, w, fisher, sizes, _ = make_round(3, dim=40, buffers=0)
    trainable = np.array([True] * 36 + [False] * 4)
    gathered = create("fdcr", **options).aggregate(RoundInputs(
        global_weights=torch.from_numpy(w_t), client_weights=torch.from_numpy(w), fisher=torch.from_numpy(fisher),
        sizes=torch.from_numpy(sizes), trainable=torch.from_numpy(trainable), lr=0.01))
    reduced = create("fdcr", **options).aggregate_ops(local_reduction(w_t, w, fisher, sizes, trainable))
    np.testing.assert_array_equal(reduced.removed, gathered.removed)
    assert reduced.removed[3:].all() and not reduced.removed[:3].any()
    np.testing.assert_allclose(reduced.alpha_hat, gathered.alpha_hat, rtol=1e-12)
    np.testing.assert_allclose(reduced.diagnostics["discrepancy"], gathered.diagnostics["discrepancy"], rtol=1e-4)
    torch.testing.assert_close(reduced.weights, gathered.weights, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("variant", ["paper", "released"])
def test_fdcr_reduce_path_with_a_single_cluster_matches_the_gather_path(variant: str) -> None:
    """The released variant skips FPRA when the clustering finds one cluster: every rank learns it."""
    w_t, w, fisher, sizes, _ = make_round(3, dim=40)
    two = [0, 3]
    gathered = create("fdcr", variant=variant).aggregate(RoundInputs(
        global_weights=torch.from_numpy(w_t), client_weights=torch.from_numpy(w[two]),
        fisher=torch.from_numpy(fisher[two]), sizes=torch.from_numpy(sizes[two]), lr=0.01))
    reduced = create("fdcr", variant=variant).aggregate_ops(local_reduction(w_t, w[two], fisher[two], sizes[two]))
    assert gathered.diagnostics["num_clusters"] == 1 and not reduced.removed.any()
    torch.testing.assert_close(reduced.weights, gathered.weights, rtol=1e-6, atol=1e-7)
    fedavg = torch.from_numpy((sizes[two] / sizes[two].sum()) @ w[two].astype(np.float64)).float()
    assert torch.allclose(reduced.weights, fedavg, atol=1e-6) == (variant == "released")


def test_fedavg_reduce_path_matches_the_gather_path() -> None:
    w_t, w, _, sizes, _ = make_round(4, dim=30)
    gathered = create("fedavg").aggregate(RoundInputs(global_weights=torch.from_numpy(w_t),
                                                      client_weights=torch.from_numpy(w), sizes=torch.from_numpy(sizes)))
    reduced = create("fedavg").aggregate_ops(local_reduction(w_t, w, None, sizes))
    torch.testing.assert_close(reduced.weights, gathered.weights, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(reduced.alpha_hat, sizes / sizes.sum())


# --- participation and placement ---------------------------------------------------------


def test_participants_are_seeded_by_round_only() -> None:
    a, b = select_clients(0, 1000, 100, 5), select_clients(0, 1000, 100, 5)
    assert np.array_equal(a, b) and a.size == 100 and np.all(np.diff(a) > 0)
    assert not np.array_equal(a, select_clients(0, 1000, 100, 6))
    assert not np.array_equal(a, select_clients(1, 1000, 100, 5))
    assert np.array_equal(select_clients(0, 10, None, 3), np.arange(10))
    blocks = client_blocks(1000, 4)
    plan = RoundPlan.make(0, 1000, 100, 5, blocks)
    assert sum(plan.rows_per_rank) == 100 and plan.rows_per_rank[0] == 0
    assert plan.rows_per_rank[1] == int(np.isin(a, blocks[1]).sum())
    full = plan.spread(np.arange(100.0), 1000, np.nan)
    assert np.isnan(full).sum() == 900 and full[a[7]] == 7.0


@pytest.mark.parametrize("ranks", [2, 3, 4, 7])
def test_batched_groups_never_span_ranks(ranks: int) -> None:
    blocks = client_blocks(23, ranks, group=4)
    assert sorted(k for b in blocks for k in b) == list(range(23)) and blocks[0] == []
    for b in blocks[1:]:
        assert b == sorted(b) and all(b[i + 1] == b[i] + 1 for i in range(len(b) - 1))
        if b:
            assert b[0] % 4 == 0  # every block starts a group
    assert client_blocks(23, ranks, group=1) == client_blocks(23, ranks)


def test_reduce_path_is_chosen_for_many_clients_and_on_request() -> None:
    assert aggregation_path(load_config(None, ["data.num_clients=10"])) == "gather"
    assert aggregation_path(load_config(None, ["data.num_clients=100"])) == "reduce"
    assert aggregation_path(load_config(None, ["data.num_clients=1000", "clients_per_round=50"])) == "gather"
    assert aggregation_path(load_config(None, ["data.num_clients=100", "defense.name=multi_krum"])) == "gather"
    assert aggregation_path(load_config(None, ["defense.path=reduce", "defense.name=fedavg"])) == "reduce"


@pytest.mark.parametrize("overrides, words", [
    (["clients_per_round=11"], "more than the 10 clients"),
    (["clients_per_round=5", "defense.name=foolsgold"], "history per client"),
    (["defense.path=reduce", "defense.name=multi_krum"], "fedavg and fdcr only"),
    (["train.batch_clients=2", "model.name=resnet18"], "without BatchNorm"),
    (["clients_per_round=0"], "clients_per_round"),
])
def test_scale_settings_are_checked(overrides: list[str], words: str) -> None:
    with pytest.raises(UserError, match=words):
        load_config(None, overrides)


# --- under mpiexec -----------------------------------------------------------------------


@requires_mpi
@pytest.mark.parametrize("defense", ["fdcr", "fedavg"])
def test_reduce_path_and_partial_participation_are_bitwise_identical_however_launched(tmp_path, defense) -> None:
    args = ["run", *TINY, f"defense.name={defense}", "defense.path=reduce", "clients_per_round=7", "--quiet"]
    single = final_sha(launch([*args, "--out", str(tmp_path / "one")], None))
    for n in (2, 3, 4):
        assert final_sha(launch([*args, "--out", str(tmp_path / f"n{n}")], n)) == single, f"-n {n} differs"
    gather = final_sha(launch(["run", *TINY, f"defense.name={defense}", "defense.path=gather", "clients_per_round=7",
                               "--quiet", "--out", str(tmp_path / "gather")], 3))
    with h5py.File(tmp_path / "one" / "run.h5") as f, h5py.File(tmp_path / "gather" / "run.h5") as g:
        selected = f["rounds/selected"][:]
        assert selected.shape == (3, 10) and (selected.sum(axis=1) == 7).all()
        assert not np.array_equal(selected[0], selected[1])  # a fresh draw every round
        assert np.array_equal(selected, g["rounds/selected"][:])
        assert (f["rounds/alpha_hat"][:][~selected] == 0).all()
        np.testing.assert_allclose(f["rounds/alpha_hat"][:], g["rounds/alpha_hat"][:], rtol=1e-12)
        np.testing.assert_array_equal(f["rounds/removed"][:], g["rounds/removed"][:])
        np.testing.assert_allclose(f["rounds/A"][:], g["rounds/A"][:], atol=1.0)  # float rounding only
    assert gather != single  # the paths round differently; each is reproducible


@requires_mpi
def test_reduce_path_quarantines_a_faulty_client(tmp_path) -> None:
    args = ["run", *TINY, "defense.path=reduce", "runtime.fault.kind=nan", "runtime.fault.rank=2",
            "runtime.fault.client=7", "runtime.fault.round=1", "--quiet", "--out", str(tmp_path)]
    final_sha(launch(args, 3))
    with h5py.File(tmp_path / "run.h5") as f:
        quarantined, alpha_hat = f["rounds/quarantined"][:], f["rounds/alpha_hat"][:]
        assert np.flatnonzero(quarantined.any(axis=1)).tolist() == [1]
        assert np.flatnonzero(quarantined[1]).tolist() == [7] and alpha_hat[1, 7] == 0
        assert np.isnan(f["rounds/discrepancy"][1, 7]) and np.all(np.isfinite(f["rounds/A"][:]))


@requires_mpi
def test_many_clients_under_mpi(tmp_path) -> None:
    """K = 120 clients, 100 per round, on the synthetic data: the reduce path by default."""
    args = ["run", "data.dataset=synthetic", "data.beta=iid", "data.num_clients=120", "clients_per_round=100", "rounds=2",
            "train.local_epochs=1", "train.batch_size=8", "fisher.max_samples=16",  # 15 samples each
            "--out", str(tmp_path)]
    result = launch(args, 3)
    final_sha(result)
    assert "100 clients per round, reduce path" in result.stdout
    assert re.search(r"clients by rank: 0:server \(\S+\) 1:\[0-59\] \(\S+\) 2:\[60-119\]", result.stdout)
    with h5py.File(tmp_path / "run.h5") as f:
        assert f["rounds/alpha_hat"].shape == (2, 120) and (f["rounds/selected"][:].sum(axis=1) == 100).all()


def test_bad_scale_setting_is_one_sentence_from_the_cli(tmp_path) -> None:
    result = subprocess.run([str(FDCR), "run", "clients_per_round=20", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "clients_per_round" in result.stderr


@requires_mpi
def test_batched_clients_give_the_same_model_however_launched(tmp_path) -> None:
    """train.batch_clients=5: groups [0-4] and [5-9] never span ranks, so the model is the same
    in one process and under 2, 3 or 4 ranks; the first round matches sequential training."""
    args = ["run", *TINY, "train.batch_clients=5", "--quiet"]
    single = final_sha(launch([*args, "--out", str(tmp_path / "one")], None))
    for n in (2, 3, 4):
        assert final_sha(launch([*args, "--out", str(tmp_path / f"n{n}")], n)) == single, f"-n {n} differs"
    final_sha(launch(["run", *TINY, "--quiet", "--out", str(tmp_path / "sequential")], 3))
    with h5py.File(tmp_path / "one" / "run.h5") as f, h5py.File(tmp_path / "sequential" / "run.h5") as g:
        np.testing.assert_allclose(f["rounds/train_loss"][0], g["rounds/train_loss"][0], rtol=1e-4)
        np.testing.assert_array_equal(f["rounds/removed"][0], g["rounds/removed"][0])
