"""Under a real mpiexec (in a subprocess with a timeout): same results however launched, clean aborts."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

pytestmark = pytest.mark.mpi

BIN = Path(sys.executable).parent
MPIEXEC = BIN / "mpiexec"
FDCR = BIN / "fdcr-mpi"
# A tiny run: the built-in digits data, 3 rounds, 1 local epoch, default threads.
TINY = ["data.dataset=digits", "rounds=3", "train.local_epochs=1", "fisher.max_samples=32"]
EVAL_COLUMNS = ("A", "asr", "asr_incl_target", "R", "V", "R_paper", "V_paper")

requires_mpi = pytest.mark.skipif(not MPIEXEC.exists(), reason=f"no mpiexec beside {sys.executable} "
                                  "(install the extra: pip install 'fdcr_mpi[mpi]')")


def env() -> dict[str, str]:
    """This environment without a launcher's variables (and no thread pinning: the results must
    not depend on the thread count)."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("PMI_", "PMIX_", "OMPI_", "SLURM_", "HYDRA_", "MPI_", "OMP_NUM_THREADS", "MKL_"))}


def typed_fdcr() -> str:
    """How messages ("resume with: ...") name the fdcr-mpi these tests start: its name where
    PATH finds this very script, else the path it was started by."""
    found = shutil.which("fdcr-mpi", path=env().get("PATH"))
    return "fdcr-mpi" if found and os.path.realpath(found) == os.path.realpath(FDCR) else str(FDCR)


def launch(args: list[str], n: int | None, timeout: float = 300, module: bool = False) -> subprocess.CompletedProcess:
    """``fdcr-mpi ARGS`` in one process (n None) or under ``mpiexec -n n``."""
    program = [sys.executable, "-m", "mpi4py", "-m", "fdcr_mpi"] if module else [str(FDCR)]
    command = program + args if n is None else [str(MPIEXEC), "-n", str(n), *program, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env())


def wait_for_text(path: Path, seconds: float) -> str:
    """The text of ``path`` once it exists (a file another process writes), or "" after ``seconds``."""
    deadline = time.time() + seconds
    while not path.exists() and time.time() < deadline:
        time.sleep(0.05)
    return path.read_text() if path.exists() else ""


def in_process_sha(args: list[str], capsys: pytest.CaptureFixture) -> str:
    """``fdcr-mpi ARGS`` run in this process (one process, no launcher): its final model's sha.
    The other side of a launch-invariance check, without a second interpreter's start-up."""
    from fdcr_mpi.cli import main

    capsys.readouterr()
    code = main([*args, "--transport", "local"])
    out = capsys.readouterr().out
    assert code == 0, out
    found = re.findall(r"final model sha256: ([0-9a-f]{64})", out)
    assert len(found) == 1, out
    return found[0]


def final_sha(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    found = re.findall(r"final model sha256: ([0-9a-f]{64})", result.stdout)
    assert len(found) == 1, result.stdout
    return found[0]


@requires_mpi
@pytest.mark.parametrize("defense", ["fdcr", "fedavg"])
def test_final_model_is_bitwise_identical_however_launched(tmp_path: Path, defense: str) -> None:
    args = ["run", *TINY, f"defense.name={defense}", "eval.batch_size=50", "--quiet"]  # several test batches
    single = final_sha(launch([*args, "--out", str(tmp_path / "one")], None))
    with h5py.File(tmp_path / "one" / "run.h5") as f:
        assert f.attrs["final_sha256"] == single and f.attrs["status"] == "complete"
        assert f["rounds/A"].shape == (3,)
        scores = {name: f[f"rounds/{name}"][()] for name in EVAL_COLUMNS}
    assert 0 < scores["A"].min()
    # -n 12: more ranks than the 10 clients; the client ranks evaluate on shares of the test
    # batches, except in the last launch, where rank 0 evaluates alone
    launches = {2: (False, []), 3: (True, []), 4: (False, []), 12: (True, []),
                3.5: (False, ["runtime.parallel_eval=false"])}
    for n, (module, extra) in launches.items():
        out = tmp_path / f"n{n}"
        sha = final_sha(launch([*args, *extra, "--out", str(out)], int(n), module=module))
        assert sha == single, f"mpiexec -n {int(n)} {extra} gave a different final model"
        with h5py.File(out / "run.h5") as f:
            assert f.attrs["final_sha256"] == single
            for name, values in scores.items():
                np.testing.assert_array_equal(f[f"rounds/{name}"][()], values, err_msg=f"{name}, -n {int(n)} {extra}")


@requires_mpi
def test_an_exception_in_a_client_rank_aborts_the_job_naming_it(tmp_path: Path) -> None:
    args = ["run", *TINY, "runtime.fault.kind=raise", "runtime.fault.rank=2", "runtime.fault.round=1",
            "--out", str(tmp_path / "run")]
    result = launch(args, 3, timeout=120)
    assert result.returncode != 0
    assert "rank 2 failed" in result.stderr and "client 5 in round 2" in result.stderr  # rows 0, 1 display as 1, 2
    failure = wait_for_text(tmp_path / "run" / "failure.txt", 15)  # the dependable record: rank 0's watcher
    assert "rank 2 (clients 5-9" in failure and "failed during round 2/3" in failure, failure
    with h5py.File(tmp_path / "run" / "run.h5") as f:  # the rounds before the failure are kept
        assert f["rounds/round"][:].tolist() == [0]


@requires_mpi
def test_a_config_error_stops_every_rank_with_one_sentence(tmp_path: Path) -> None:
    result = launch(["run", "data.dataset=digits", "fdcr.clustering=spectral", "--out", str(tmp_path)], 3,
                    timeout=120, module=True)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and "fdcr.clustering" in lines[0] and "Traceback" not in result.stderr


@requires_mpi
def test_a_data_error_found_after_mpi_start_stops_every_rank(tmp_path: Path) -> None:
    result = launch(["run", "data.dataset=fmnist", f"data.root={tmp_path / 'nothing'}", "--out",
                     str(tmp_path / "run")], 3, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Fashion-MNIST was not found" in result.stderr and "Traceback" not in result.stderr


def test_one_process_mode_needs_no_mpi(tmp_path: Path) -> None:
    code = ("import sys, builtins; real = builtins.__import__\n"
            "def guard(name, *a, **k):\n"
            "    assert not name.startswith('mpi4py'), 'mpi4py imported in one-process mode'\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = guard\n"
            "from fdcr_mpi.cli import main\n"
            f"sys.exit(main(['run', *{TINY!r}, 'rounds=1', '--quiet', '--out', {str(tmp_path)!r}]))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env())
    assert result.returncode == 0, result.stderr
    assert "final model sha256" in result.stdout


def test_only_the_transport_imports_mpi4py() -> None:
    package = Path(__file__).resolve().parents[1] / "fdcr_mpi"
    importers = {p.relative_to(package).as_posix() for p in package.rglob("*.py") if "mpi4py" in p.read_text()}
    assert importers <= {"runtime/transport.py"}, importers
