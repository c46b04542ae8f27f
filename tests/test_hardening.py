"""Faulty clients, failing ranks and failing storage (issue 6), under a real mpiexec where ranks are involved."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from fdcr_mpi.checkpoint import load_latest_checkpoint
from fdcr_mpi.defenses import available, create
from fdcr_mpi.defenses.base import ProxyData, RoundInputs
from fdcr_mpi.models import FlatModel
from fdcr_mpi.quarantine import defend_with_quarantine
from tests.test_mpi import FDCR, MPIEXEC, env, final_sha, launch, requires_mpi

TINY = ["data.dataset=digits", "rounds=4", "train.local_epochs=1", "runtime.threads=1", "fisher.max_samples=32"]


def tiny_proxy() -> ProxyData:
    gen = torch.Generator().manual_seed(0)
    make = lambda: FlatModel(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 10)))  # noqa: E731
    return ProxyData(x=torch.randn(16, 3, 2, 2, generator=gen), y=torch.randint(0, 10, (16,), generator=gen),
                     make_model=make)


def inputs_with(fault: str, k: int = 8, d: int = 130) -> RoundInputs:
    gen = torch.Generator().manual_seed(1)
    w_t = torch.randn(d, generator=gen) * 0.1
    w = w_t + 0.01 * torch.randn(k, d, generator=gen)
    w[-2:] += 0.05  # two odd clients, so that detection has something to find
    fisher = torch.rand(k, d, generator=gen)
    sizes = torch.full((k,), 50.0, dtype=torch.float64)
    if fault == "nan":
        w[3, 5] = float("nan")
    elif fault == "inf":
        fisher[3, 7] = float("inf")
    elif fault == "empty":
        sizes[3] = 0
    return RoundInputs(global_weights=w_t, client_weights=w, sizes=sizes, fisher=fisher, lr=0.01,
                       round=0, total_rounds=3, proxy=tiny_proxy())


@pytest.mark.parametrize("fault", ["nan", "inf", "empty"])
@pytest.mark.parametrize("name", sorted(available()))
def test_every_defense_survives_a_faulty_client(name: str, fault: str) -> None:
    defense = create(name)
    result, quarantined = defend_with_quarantine(defense, inputs_with(fault))
    assert quarantined.tolist() == [i == 3 for i in range(8)]
    assert result.alpha_hat[3] == 0 and not result.removed[3]
    assert torch.isfinite(result.weights).all()
    # The same as running the defense on the healthy rows alone.
    clean = inputs_with("none")
    keep = torch.tensor([i for i in range(8) if i != 3])
    alone = create(name).aggregate(RoundInputs(
        global_weights=clean.global_weights, client_weights=clean.client_weights[keep], sizes=clean.sizes[keep],
        fisher=clean.fisher[keep], lr=0.01, round=0, total_rounds=3, proxy=tiny_proxy()))
    if fault != "inf":  # "inf" corrupts the Fisher only; the weights rows are the clean ones
        torch.testing.assert_close(result.weights, alone.weights)


def test_all_clients_faulty_keeps_the_global_model() -> None:
    inputs = inputs_with("none")
    inputs.client_weights[:] = float("nan")
    result, quarantined = defend_with_quarantine(create("fdcr"), inputs)
    assert quarantined.all() and torch.equal(result.weights, inputs.global_weights)


@requires_mpi
@pytest.mark.parametrize("kind", ["nan", "inf", "short"])
def test_a_faulty_client_is_quarantined_and_the_run_goes_on(tmp_path: Path, kind: str) -> None:
    args = ["run", *TINY, f"runtime.fault.kind={kind}", "runtime.fault.rank=2", "runtime.fault.client=7",
            "runtime.fault.round=1", "--quiet", "--out", str(tmp_path)]
    final_sha(launch(args, 3))
    with h5py.File(tmp_path / "run.h5") as f:
        quarantined, alpha_hat = f["rounds/quarantined"][:], f["rounds/alpha_hat"][:]
        assert f.attrs["status"] == "complete"
        assert np.flatnonzero(quarantined.any(axis=1)).tolist() == [1]
        assert np.flatnonzero(quarantined[1]).tolist() == [7] and alpha_hat[1, 7] == 0
        assert np.all(np.isfinite(f["rounds/A"][:]))


@requires_mpi
@pytest.mark.parametrize("how", ["killed", "exits"])
def test_a_dying_client_rank_ends_the_job_quickly_and_the_checkpoint_stays_valid(tmp_path: Path, how: str) -> None:
    long = [*TINY, "rounds=20"]  # long enough that the run cannot finish before the kill lands
    reference = final_sha(launch(["run", *long, "--quiet", "--out", str(tmp_path / "reference")], None))
    out = tmp_path / "run"
    args = ["run", *long, "--out", str(out)]
    if how == "exits":
        args += ["runtime.fault.kind=exit", "runtime.fault.rank=2", "runtime.fault.round=2"]
    proc = subprocess.Popen([str(MPIEXEC), "-n", "3", str(FDCR), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env(), start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                with h5py.File(out / "run.h5", "r") as f:
                    if f["rounds/round"].shape[0] >= 2:
                        break
            except (OSError, KeyError):
                pass
            time.sleep(0.1)
        if how == "killed":
            pids = {}
            for p in Path("/proc").iterdir():  # the client rank 2: a python child with PMI_RANK=2
                try:
                    text = (p / "environ").read_bytes()
                    cmd = (p / "cmdline").read_bytes()
                except OSError:
                    continue
                if b"PMI_RANK=2\0" in text and b"fdcr-mpi" in cmd and str(out).encode() in cmd:
                    pids[2] = int(p.name)
            assert 2 in pids, "client rank 2 not found"
            os.kill(pids[2], signal.SIGKILL)
        died = time.time()
        stdout, stderr = proc.communicate(timeout=90)
        assert time.time() - died < 60
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    report = stdout + stderr
    # The banner maps each rank to its clients and pid; mpiexec reports a bad termination by pid.
    # (MPICH names the first process it saw end, which after its own clean-up is not always the
    # rank that died first: a SIGKILLed rank cannot name itself.)
    banner = re.search(r"clients by rank: 0:server \(\S+:(\d+)\) 1:\[0-4\] \(\S+:(\d+)\) "
                       r"2:\[5-9\] \(\S+:(\d+)\)", stdout)
    assert banner, stdout
    reported = re.search(r"PID (\d+) RUNNING AT", report)
    assert "BAD TERMINATION" in report and reported, report[-2000:]
    assert reported.group(1) in banner.groups()
    checkpoint = load_latest_checkpoint(out, _hash_of(out))
    assert checkpoint is not None and checkpoint.round >= 1
    resumed = launch(["run", *long, "--quiet", "--out", str(out)], 2)
    assert final_sha(resumed) == reference


def _hash_of(out: Path) -> str:
    with h5py.File(out / "run.h5", "r") as f:
        return str(f.attrs["config_hash"])


@pytest.fixture
def small_disk(tmp_path: Path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1100k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_keeps_the_previous_checkpoint_and_loses_nothing(tmp_path: Path, small_disk: Path) -> None:
    args = ["run", *TINY, "rounds=6", "runtime.keep_checkpoints=10", "--quiet"]
    reference = final_sha(launch([*args, "--out", str(tmp_path / "reference")], None))
    out = small_disk / "run"
    full = launch([*args, "--out", str(out)], None)
    assert full.returncode == 2, full.stdout + full.stderr
    assert "No space left on device" in full.stderr and "Traceback" not in full.stderr
    assert len(full.stderr.strip().splitlines()) == 1
    checkpoint = load_latest_checkpoint(out, _hash_of(out))
    assert checkpoint is not None
    with h5py.File(out / "run.h5", "r") as f:
        rows = f["rounds/round"][:].tolist()
    assert rows == list(range(len(rows))) and len(rows) >= checkpoint.round + 1
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)  # the user frees space (here: moves the run) and resumes
    assert final_sha(launch([*args, "--out", str(moved)], None)) == reference


def test_an_unwritable_output_directory_is_one_sentence(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = launch(["run", *TINY, "--out", str(blocker / "run")], None)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
