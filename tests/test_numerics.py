"""Results depend on the config alone: placement, worker threads, the numerics fingerprint, and the
launch checks (a foreign MPI, ``--transport local`` under mpiexec, faults that name no rank)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import h5py
import pytest
import torch

from fdcr_mpi.cli import main
from fdcr_mpi.errors import UserError
from fdcr_mpi.runtime import numerics, placement
from tests.test_mpi import FDCR, MPIEXEC, env, final_sha, launch, requires_mpi

TINY = ["data.dataset=digits", "rounds=2", "train.local_epochs=1", "fisher.max_samples=32"]


def run_in_process(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def sha_of(out: str) -> str:
    return re.findall(r"final model sha256: ([0-9a-f]{64})", out)[-1]


# --- placement ------------------------------------------------------------------------------


def test_client_ranks_take_gpus_by_their_index_among_the_nodes_client_ranks() -> None:
    names = ["a", "a", "a", "b", "b", "a"]  # rank 0 (the server) on node a
    node_a, node_b = placement.Node.of(2, names), placement.Node.of(4, names)
    assert node_a.ranks == (0, 1, 2, 5) and node_a.client_ranks == (1, 2, 5)
    assert [node_a.client_index(r) for r in (1, 2, 5)] == [0, 1, 2]  # rank 0 takes no GPU
    assert [node_b.client_index(r) for r in (3, 4)] == [0, 1]
    assert placement.Node.of(0, ["solo"]).client_index(0) == 0  # one process: rank 0 hosts the clients


def test_threads_and_workers() -> None:
    assert placement.default_threads(16, 4) == 4 and placement.default_threads(2, 3) == 1
    assert placement.default_threads(8, 0) == 8
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert placement.workers(4, 1, cpu) == 4 and placement.workers(4, 2, cpu) == 2 and placement.workers(1, 4, cpu) == 1
    assert placement.workers(16, 1, gpu) == 1  # a GPU trains one client (or one batched group) at a time


def test_the_server_and_cpu_requests_stay_on_the_cpu() -> None:
    assert placement.select_device("auto", False, 0).type == "cpu"  # rank 0 under MPI
    assert placement.select_device("cpu", True, 3).type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_asking_for_cuda_without_a_gpu_is_one_sentence() -> None:
    assert placement.select_device("auto", True, 0).type == "cpu"
    with pytest.raises(UserError, match="runtime.device is 'cuda' but no CUDA GPU is visible"):
        placement.select_device("cuda", True, 0)


# --- the fingerprint -----------------------------------------------------------------------


def test_fingerprint_names_what_the_numbers_depend_on() -> None:
    fp = numerics.fingerprint(1, torch.device("cpu"), deterministic=True, tf32=False)
    assert fp["device"] == "cpu" and fp["client_threads"] == "1" and fp["torch"] == torch.__version__
    assert fp["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and fp["gpu"] == ""
    other = dict(fp, cpu_capability="AVX2", machine="elsewhere")
    assert numerics.differences(fp, other) == [f"cpu_capability {fp['cpu_capability']} -> AVX2"]
    assert numerics.differences(fp, dict(fp)) == []


def test_ranks_that_would_compute_differently_are_refused() -> None:
    cpu = numerics.fingerprint(1, torch.device("cpu"), deterministic=True, tf32=False)
    gpu = dict(cpu, device="cuda", gpu="NVIDIA H200")
    assert numerics.merge([cpu, gpu, gpu], [False, True, True]) == gpu  # the server computes on its CPU
    with pytest.raises(ValueError, match="rank 2 .*device cuda -> cpu"):
        numerics.merge([cpu, gpu, cpu], [False, True, True])
    with pytest.raises(ValueError, match="rank 0 .*cpu_capability"):
        numerics.merge([dict(cpu, cpu_capability="AVX2"), gpu], [False, True])


def test_worker_threads_never_change_the_result(tmp_path: Path, capsys) -> None:
    """One process trains 1, 2 (this machine's default here) or 3 clients at once: same model."""
    shas = {}
    for threads in ("1", "3", None):
        extra = [] if threads is None else [f"runtime.threads={threads}"]
        code, out, err = run_in_process(["run", *TINY, *extra, "--out", str(tmp_path / str(threads))], capsys)
        assert code == 0, err
        shas[threads] = sha_of(out)
    assert len(set(shas.values())) == 1, shas
    assert "3 at a time" in out or "at a time" in out


def test_the_run_file_records_the_numerics_and_resume_refuses_other_ones(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    code, stdout, err = run_in_process(["run", *TINY, "--out", str(out)], capsys)
    assert code == 0, err
    with h5py.File(out / "run.h5") as f:
        recorded = json.loads(f.attrs["numerics"])
        assert int(f.attrs["num_params"]) == 92_626
    assert recorded["device"] == ("cuda" if torch.cuda.is_available() else "cpu") and recorded["client_threads"] == "1"
    assert recorded["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    # the same run with 2 threads inside every client would compute other numbers: refused
    code, _, err = run_in_process(["run", *TINY, "runtime.client_threads=2", "--out", str(out)], capsys)
    assert code == 2 and "client_threads 1 -> 2" in err and "--allow-numerics-change" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    with h5py.File(out / "run.h5") as f:
        assert "numerics_changes" not in f.attrs and f.attrs["status"] == "complete"
    code, _, err = run_in_process(["run", *TINY, "runtime.client_threads=2", "--allow-numerics-change",
                                   "--out", str(out)], capsys)
    assert code == 0, err
    with h5py.File(out / "run.h5") as f:
        change = json.loads(f.attrs["numerics_changes"])[-1]
    assert change["changed"] == ["client_threads 1 -> 2"] and change["rounds_done"] == 2


def test_a_run_stored_with_another_machines_numerics_is_not_resumed(tmp_path: Path, capsys) -> None:
    """A run preempted on a node with other vector instructions (its fingerprint says so)."""
    out = tmp_path / "run"
    assert run_in_process(["run", *TINY, "rounds=1", "--out", str(out)], capsys)[0] == 0
    with h5py.File(out / "run.h5", "r+") as f:
        other = dict(json.loads(f.attrs["numerics"]), cpu_capability="NEON")
        f.attrs["numerics"] = json.dumps(other)
    code, _, err = run_in_process(["run", *TINY, "rounds=1", "--out", str(out)], capsys)
    assert code == 2 and "cpu_capability NEON ->" in err


# --- launch checks (real processes) ---------------------------------------------------------


@pytest.mark.skipif(not FDCR.exists(), reason=f"no fdcr-mpi script beside {FDCR.parent} (pip install -e .)")
def test_a_launcher_whose_mpi_is_not_mpi4pys_is_stopped(tmp_path: Path) -> None:
    """What Open MPI's mpirun (or srun with a PMI the wheel lacks) does to a job built on the
    mpich wheel: each process sees a world of one. It must stop, not run N copies."""
    for variables in ({"OMPI_COMM_WORLD_SIZE": "3", "OMPI_COMM_WORLD_RANK": "0"},
                      {"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "0"}):
        result = subprocess.run([str(FDCR), "run", *TINY, "--out", str(tmp_path / "x")], capture_output=True,
                                text=True, timeout=300, env={**env(), **variables})
        assert result.returncode == 2, result.stdout + result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "MPICH" in lines[0] and "MPI4PY_LIBMPI" in lines[0], result.stderr
        assert not (tmp_path / "x" / "run.h5").exists()


@requires_mpi
def test_transport_local_under_mpiexec_is_refused(tmp_path: Path) -> None:
    result = launch(["run", *TINY, "--transport", "local", "--out", str(tmp_path)], 3, timeout=120)
    assert result.returncode == 2 and "--transport local" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.count("fdcr-mpi: error") == 1


@requires_mpi
def test_a_fault_on_a_rank_that_hosts_no_client_is_refused(tmp_path: Path) -> None:
    result = launch(["run", *TINY, "runtime.fault.kind=raise", "runtime.fault.rank=0", "--out", str(tmp_path)], 3,
                    timeout=120)
    assert result.returncode == 2 and "runtime.fault.rank is 0" in result.stderr
    result = launch(["run", *TINY, "runtime.fault.kind=raise", "runtime.fault.rank=2", "runtime.fault.client=1",
                     "--out", str(tmp_path)], 3, timeout=120)
    assert result.returncode == 2 and "runtime.fault.client 1 is not hosted by rank 2" in result.stderr


@pytest.mark.skipif(not FDCR.exists(), reason=f"no fdcr-mpi script beside {FDCR.parent} (pip install -e .)")
@pytest.mark.parametrize(("kind", "code"), [("raise", 13), ("exit", 13)])
def test_an_injected_fault_in_one_process_is_one_sentence_and_marks_the_run_failed(
        tmp_path: Path, kind: str, code: int) -> None:
    result = subprocess.run([str(FDCR), "run", *TINY, f"runtime.fault.kind={kind}", "runtime.fault.round=1",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, env=env())
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    assert "injected" in result.stderr and "status is now failed" in result.stderr
    with h5py.File(tmp_path / "run.h5") as f:
        assert f.attrs["status"] == "failed" and f["rounds/round"][:].tolist() == [0]


@requires_mpi
def test_kill_in_one_process_resume_under_mpiexec_with_default_threads(tmp_path: Path) -> None:
    """The default launch of each (2 workers in one process here, 1 per client rank under
    mpiexec -n 3): a run SIGKILLed after its first round and resumed elsewhere ends on the same model."""
    from tests.test_resume import rounds_in, start

    args = ["run", *TINY, "rounds=6", "--quiet"]
    reference = final_sha(launch([*args, "--out", str(tmp_path / "ref")], None))
    out = tmp_path / "moved"
    proc = start([*args, "--out", str(out)], None)
    deadline = time.time() + 240
    while len(rounds_in(out / "run.h5")) < 1 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 1 <= len(rounds_in(out / "run.h5")) < 6
    resumed = subprocess.run([str(MPIEXEC), "-n", "3", str(FDCR), "resume", str(out), "--quiet"],
                             capture_output=True, text=True, timeout=300, env=env())
    assert final_sha(resumed) == reference
