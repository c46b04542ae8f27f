"""Faulty clients, failing ranks and failing storage (issue 6), under a real mpiexec where ranks are involved."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from fdcr_mpi.defenses import available, create
from fdcr_mpi.defenses.base import ProxyData, RoundInputs
from fdcr_mpi.defenses.quarantine import defend_with_quarantine
from fdcr_mpi.models import FlatModel
from fdcr_mpi.runtime import sentinel
from fdcr_mpi.runtime.sentinel import FAILURE_FILE, PREVIOUS_FAILURE_FILE, note_failure
from fdcr_mpi.store import load_latest_checkpoint
from tests.test_mpi import (
    FDCR,
    MPIEXEC,
    env,
    final_sha,
    launch,
    requires_mpi,
    typed_fdcr,
    wait_for_text,
)

TINY = ["data.dataset=digits", "rounds=4", "train.local_epochs=1", "fisher.max_samples=32"]


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
    assert not (tmp_path / FAILURE_FILE).exists() and not sentinels(tmp_path)  # a normal end is silent
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
    pids = {}
    proc = subprocess.Popen([str(MPIEXEC), "-n", "3", str(FDCR), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env(), start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                with h5py.File(out / "run.h5", "r") as f:
                    if f["rounds/round"].shape[0] >= 2:
                        break
            except (OSError, KeyError, RuntimeError):  # read while being written
                pass
            time.sleep(0.1)
        if how == "killed":
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
    # The sentinel names the rank that ended first, its clients and pid, in the run directory and
    # on stderr (hydra forwards rank 0's stderr until the sentinel, which holds it, has exited).
    pid = pids.get(2, int(banner.group(3)))
    failure = wait_for_text(out / FAILURE_FILE, 10)
    line = f"rank 2 (clients 5-9, pid {pid} on host "
    assert line in failure and "ended unexpectedly (it was the first rank to end)" in failure, failure
    assert f"Resume with: {typed_fdcr()} resume {out}" in failure and len(failure.splitlines()) == 1
    assert failure.strip() in stderr, stderr[-2000:]
    assert not sentinels(out)
    checkpoint = load_latest_checkpoint(out, _hash_of(out))
    assert checkpoint is not None and checkpoint.round >= 1
    resumed = launch(["run", *long, "--quiet", "--out", str(out)], 2)
    assert final_sha(resumed) == reference
    # The next attempt shows the failure once and moves it aside; its normal end leaves none.
    assert resumed.stderr.count("previous attempt: " + line) == 1, resumed.stderr
    assert not (out / FAILURE_FILE).exists() and (out / PREVIOUS_FAILURE_FILE).read_text() == failure
    assert not sentinels(out)


def sentinels(out: Path) -> list[int]:
    """Pids of live sentinel processes watching the run in ``out``."""
    found = []
    for p in Path("/proc").iterdir():
        try:
            cmd = (p / "cmdline").read_bytes()
        except OSError:
            continue
        if b"fdcr_mpi.runtime.sentinel" in cmd and str(out).encode() + b"\0" in cmd:
            found.append(int(p.name))
    return found


# The watcher as rank 0 starts it, but on plain processes; "proc": as on Linux < 5.3 (no pidfd_open).
SENTINEL = ("import os, sys\n"
            "if sys.argv[1] == 'proc':\n    del os.pidfd_open\n"
            "from fdcr_mpi.runtime.sentinel import main\nsys.exit(main(sys.argv[2:]))")


@pytest.mark.parametrize("mode", ["pidfd", "proc"])
@pytest.mark.parametrize("scenario", ["killed", "raised", "done"])
def test_the_sentinel_names_the_first_rank_to_end_and_is_silent_after_done(tmp_path: Path, mode: str,
                                                                          scenario: str) -> None:
    ranks = [subprocess.Popen(["sleep", "120"]) for _ in range(3)]  # ranks 0-2; rank 3 "elsewhere"
    labels = ["server", "clients 0-4", "clients 5-9"]
    spec = {"out": str(tmp_path), "host": "here", "elsewhere": [3], "rounds_done": 0, "rounds": 5,
            "ranks": {str(r): [p.pid, labels[r]] for r, p in enumerate(ranks)}}
    watcher = subprocess.Popen([sys.executable, "-c", SENTINEL, mode, str(tmp_path), json.dumps(spec)],
                               stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    try:
        time.sleep(2)  # watching
        watcher.stdin.write("recorded 1\n" + ("done\n" if scenario == "done" else ""))
        watcher.stdin.flush()
        if scenario == "raised":  # rank 1 raised: it leaves a note, then MPI kills the others first
            note_failure(tmp_path, 1, RuntimeError("boom"))
            ranks[0].kill()
        ranks[1 if scenario == "raised" else 2].kill()
        time.sleep(0.5)
        for p in ranks:  # the launcher's clean-up
            p.kill()
        _, stderr = watcher.communicate(timeout=30)
    finally:
        watcher.kill()
        for p in ranks:
            p.kill()
            p.wait()
    assert watcher.returncode == 0
    if scenario == "done":
        assert stderr == "" and not (tmp_path / FAILURE_FILE).exists()
        return
    failure = (tmp_path / FAILURE_FILE).read_text()
    assert stderr == failure and failure.endswith("; the job was stopped. Resume with: "
                                                  f"fdcr-mpi resume {tmp_path}\n"), failure
    if scenario == "killed":
        assert failure.startswith(f"fdcr-mpi: rank 2 (clients 5-9, pid {ranks[2].pid} on host here) ended "
                                  "unexpectedly (it was the first rank to end) during round 2/5; rank 3 on "
                                  "another host was not watched;"), failure
    else:
        assert failure.startswith(f"fdcr-mpi: rank 1 (clients 0-4, pid {ranks[1].pid} on host here) failed "
                                  "during round 2/5: RuntimeError: boom;"), failure
        assert not list(tmp_path.glob(".failed-rank-*"))


# A rank as the driver makes it: joins the node's watcher; on "close", its lifeline ends while
# the process lives on, as a killed process's files close before it has ended.
RANK = ("import json, os, sys, time\n"
        "from fdcr_mpi.runtime.sentinel import join\n"
        "watch = join(json.loads(sys.argv[1]), 0)\n"
        "print('joined' if watch.lifeline is not None else 'alone', flush=True)\n"
        "sys.stdin.readline()\n"
        "os.close(watch.lifeline)\n"
        "time.sleep(120)\n")


def test_a_rank_is_named_when_its_lifeline_ends_before_it_has_ended(tmp_path: Path) -> None:
    """Rank 2's files close (its lifeline ends) but its pid lives on, as in a slow exit under
    load; meanwhile the launcher kills rank 0, whose pipe closes: rank 2 is named, not rank 0."""
    leader = subprocess.Popen(["sleep", "120"])
    identities = [f"here:{leader.pid}"]  # the lifeline address is the leader's; the ranks' pids follow
    listener = sentinel.listen([*identities, "here:0", "here:0"], 0)
    assert listener is not None
    ranks = [subprocess.Popen([sys.executable, "-c", RANK, json.dumps([*identities, "here:0", "here:0"])],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env())
             for _ in range(2)]
    procs = [leader, *ranks]
    labels = ["server", "clients 0-4", "clients 5-9"]
    spec = {"out": str(tmp_path), "host": "here", "elsewhere": [], "rounds_done": 1, "rounds": 5,
            "ranks": {str(r): [p.pid, labels[r]] for r, p in enumerate(procs)}, "listener": listener.fileno()}
    watcher = subprocess.Popen([sys.executable, "-c", SENTINEL, "pidfd", str(tmp_path), json.dumps(spec)],
                               stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
                               pass_fds=(listener.fileno(),))
    listener.close()
    try:
        assert [r.stdout.readline().strip() for r in ranks] == ["joined", "joined"]
        time.sleep(1)  # accepted
        ranks[1].stdin.write("close\n")
        ranks[1].stdin.flush()
        time.sleep(0.5)
        leader.kill()
        _, stderr = watcher.communicate(timeout=30)  # closes rank 0's pipe first: it ended
    finally:
        watcher.kill()
        for p in procs:
            p.kill()
            p.wait()
    failure = (tmp_path / FAILURE_FILE).read_text()
    assert stderr == failure
    assert failure.startswith(f"fdcr-mpi: rank 2 (clients 5-9, pid {ranks[1].pid} on host here) ended "
                              "unexpectedly (it was the first rank to end) during round 2/5;"), failure


def test_a_lifeline_nobody_listens_to_leaves_the_rank_watched_by_its_pid() -> None:
    """No listener (the leader's watcher failed to start): ``join`` connects nothing and raises nothing."""
    identities = [f"here:{os.getpid()}", "here:1"]
    watch = sentinel.join(identities, 0)
    assert watch.lifeline is None and not watch.active
    listener = sentinel.listen(identities, 0)
    assert listener is not None
    try:
        joined = sentinel.join(identities, 0)
        assert joined.lifeline is not None
        joined.done()  # an orderly end leaves it to the process's end (MPI still finalises)
        os.fstat(joined.lifeline)
        assert not os.get_inheritable(joined.lifeline)
        os.close(joined.lifeline)
    finally:
        listener.close()


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


@requires_mpi
def test_a_rank_killed_on_another_node_is_named_by_its_nodes_watcher(tmp_path: Path) -> None:
    """Two nodes, simulated by naming them (FDCR_NODE_NAME) in an MPMD launch: ranks 0-1 on
    node-a, ranks 2-3 on node-b. Rank 3 is SIGKILLed: node-b's watcher records it, rank 0's
    watcher names it (not a rank of its own node that MPI killed afterwards)."""
    out = tmp_path / "run"
    args = ["run", *TINY, "rounds=40", "train.batch_clients=1", "--out", str(out)]  # every client rank hosts clients
    command = [str(MPIEXEC), "-n", "2", "-env", "FDCR_NODE_NAME", "node-a", str(FDCR), *args, ":",
               "-n", "2", "-env", "FDCR_NODE_NAME", "node-b", str(FDCR), *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
                            start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            try:
                with h5py.File(out / "run.h5", "r") as f:
                    if f["rounds/round"].shape[0] >= 2:
                        break
            except (OSError, KeyError, RuntimeError):  # read while being written
                pass
            time.sleep(0.1)
        victim = None
        for p in Path("/proc").iterdir():
            try:
                text, cmd = (p / "environ").read_bytes(), (p / "cmdline").read_bytes()
            except OSError:
                continue
            if b"PMI_RANK=3\0" in text and b"fdcr-mpi" in cmd and str(out).encode() in cmd:
                victim = int(p.name)
        assert victim is not None, "rank 3 not found"
        assert len(sentinels(out)) == 2  # one watcher per node
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert re.search(r"2:\[4-6\] \(node-b:\d+\) 3:\[7-9\] \(node-b:\d+\)", stdout), stdout
    failure = wait_for_text(out / FAILURE_FILE, 15)
    assert f"rank 3 (clients 7-9, pid {victim} on host node-b) ended unexpectedly" in failure, failure
    assert "not watched" not in failure and len(failure.splitlines()) == 1
    deadline = time.time() + 15
    while sentinels(out) and time.time() < deadline:
        time.sleep(0.1)
    assert not sentinels(out) and not list(out.glob(".sentinel-*"))
