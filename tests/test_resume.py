"""Exact resume: SIGKILL at random moments, SIGTERM under mpiexec, refusals (wrong config, live run)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import h5py
import pytest

from tests.test_mpi import FDCR, MPIEXEC, env, final_sha, launch, requires_mpi, typed_fdcr

TINY = ["data.dataset=digits", "rounds=8", "train.local_epochs=1", "fisher.max_samples=32"]


def start(args: list[str], n: int | None) -> subprocess.Popen:
    command = [str(FDCR), *args] if n is None else [str(MPIEXEC), "-n", str(n), str(FDCR), *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
                            start_new_session=True)


def rounds_in(path: Path) -> list[int]:
    try:
        with h5py.File(path, "r") as f:
            return f["rounds/round"][:].tolist() if "rounds/round" in f else []
    except (OSError, KeyError, RuntimeError):  # a file being written can be read half-written
        return []


def status_of(path: Path) -> str | None:
    try:
        with h5py.File(path, "r") as f:
            return str(f.attrs["status"])
    except (OSError, KeyError, RuntimeError):  # a file being written can be read half-written
        return None


@requires_mpi
@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_gives_the_same_model(tmp_path: Path) -> None:
    args = ["run", *TINY, "rounds=30", "--quiet"]
    reference = final_sha(launch([*args, "--out", str(tmp_path / "reference")], None))
    out = tmp_path / "killed"
    rng = random.Random(1234)
    launchers = [None, 2, 3, None, 4, 2, None, 3, 2, None, 3, 4]  # resume under changing rank counts
    progress, targets = [], []
    for n in launchers:
        before = len(rounds_in(out / "run.h5"))
        proc = start([*args, "--out", str(out)], n)
        # Let 0-2 more rounds finish, then kill anywhere inside the next one: during setup,
        # local training, the gather, the defense or the row and checkpoint writes.
        target, deadline = before + rng.randint(0, 2), time.time() + 120
        while len(rounds_in(out / "run.h5")) < target and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.8))
        assert proc.poll() is None, "the run finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL  # killed outright, not finished or failed
        rows = rounds_in(out / "run.h5")
        assert rows == list(range(len(rows))), f"rows after a kill: {rows}"
        progress.append(len(rows))
        targets.append(target)
    # every attempt resumed where the last one stopped (no row lost) and reached the rounds it was
    # given before the kill, and the kills left work to do
    assert progress == sorted(progress) and progress[-1] < 30
    assert all(done >= target for done, target in zip(progress, targets)), (progress, targets)
    result = launch([*args, "--out", str(out)], 3)
    assert final_sha(result) == reference
    assert rounds_in(out / "run.h5") == list(range(30))
    with h5py.File(out / "run.h5") as f:
        assert f.attrs["status"] == "complete" and f.attrs["final_sha256"] == reference


@requires_mpi
def test_sigterm_under_mpiexec_leaves_a_resumable_checkpoint(tmp_path: Path) -> None:
    args = ["run", *TINY, "--quiet"]
    reference = final_sha(launch([*args, "--out", str(tmp_path / "reference")], None))
    out = tmp_path / "run"
    proc = start([*args, "--out", str(out)], 3)
    deadline = time.time() + 120
    while len(rounds_in(out / "run.h5")) < 2 and time.time() < deadline:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGTERM)  # mpiexec forwards it to every rank
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr
    assert f"resume with: {typed_fdcr()} resume {out}" in stderr
    assert status_of(out / "run.h5") == "preempted"
    done = rounds_in(out / "run.h5")
    assert 2 <= len(done) < 8 and done == list(range(len(done)))
    assert list((out / "checkpoints").glob("round_*.h5"))
    resumed = subprocess.run([str(FDCR), "resume", str(out), "--quiet"], capture_output=True, text=True,
                             timeout=300, env=env())
    assert final_sha(resumed) == reference


def test_a_finished_run_is_not_redone(tmp_path: Path) -> None:
    args = ["run", *TINY, "rounds=2", "--out", str(tmp_path)]
    first = final_sha(launch(args, None))
    again = launch(args, None)
    assert final_sha(again) == first and "already complete" in again.stdout


def test_a_run_directory_of_another_config_is_refused(tmp_path: Path) -> None:
    final_sha(launch(["run", *TINY, "rounds=2", "--out", str(tmp_path)], None))
    before = (tmp_path / "run.h5").read_bytes()
    other = launch(["run", *TINY, "rounds=2", "seed=7", "--out", str(tmp_path)], None)
    assert other.returncode == 2 and "another config" in other.stderr and "Traceback" not in other.stderr
    assert (tmp_path / "run.h5").read_bytes() == before


def test_a_run_directory_in_use_is_refused(tmp_path: Path) -> None:
    proc = start(["run", *TINY, "rounds=50", "--out", str(tmp_path)], None)
    try:
        deadline = time.time() + 120
        while not rounds_in(tmp_path / "run.h5") and time.time() < deadline:
            time.sleep(0.2)
        second = launch(["run", *TINY, "rounds=50", "--out", str(tmp_path)], None, timeout=120)
        assert second.returncode == 2 and "in use by a live run" in second.stderr
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    args = ["run", *TINY, "--quiet", "--out", str(tmp_path / "run")]
    reference = final_sha(launch(args, None))
    run_dir = tmp_path / "run"
    with h5py.File(run_dir / "run.h5", "a") as f:  # pretend the job died after round 5
        f.attrs["status"] = "running"
    checkpoints = sorted((run_dir / "checkpoints").glob("round_*.h5"))
    newest = checkpoints[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated mid-write
    result = launch(args, None)
    assert final_sha(result) == reference
    assert "corrupt" in result.stderr.lower() or "skipp" in result.stderr.lower(), result.stderr


def test_inspect_and_saved_weights(tmp_path: Path) -> None:
    digest = final_sha(launch(["run", *TINY, "rounds=3", "runtime.save_weights_every=1", "--quiet",
                               "--out", str(tmp_path)], None))
    shown = subprocess.run([str(FDCR), "inspect", str(tmp_path)], capture_output=True, text=True, timeout=120, env=env())
    assert shown.returncode == 0 and digest in shown.stdout and "complete" in shown.stdout
    with h5py.File(tmp_path / "run.h5") as f:
        weights = f["global/weights"][:]
        assert weights.shape == (3, 92_626) and f["global/round"][:].tolist() == [0, 1, 2]
        import hashlib

        assert hashlib.sha256(weights[-1].astype("<f4").tobytes()).hexdigest() == digest
