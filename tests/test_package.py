"""The package: a wheel that installs without the checkout and runs, writes SLURM scripts and
reports from its own files; its version in every run file."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import pytest

import fdcr_mpi
from tests.conftest import REPO

SWEEP = """name: w
base: null
out: {out}
overrides: {{data.dataset: digits, rounds: 1, train.local_epochs: 1, fisher.max_samples: 16}}
axes: {{seed: [0, 1]}}
"""


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(cwd)})


@pytest.mark.slow
def test_the_wheel_installs_and_runs_without_the_checkout(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy: building in the checkout would leave build/ there
    shutil.copytree(REPO / "fdcr_mpi", source / "fdcr_mpi", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.cfg", "README.md"):
        shutil.copy2(REPO / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"),
                            str(source)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("fdcr_mpi-*.whl")
    assert wheel.name.startswith(f"fdcr_mpi-{fdcr_mpi.__version__}-")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fdcr_mpi/sweep/sweep.sbatch.tmpl" in names  # package data, not a file of the checkout
    assert any(n.startswith("fdcr_mpi/reference/") and n.endswith(".csv") for n in names)
    assert not any(n.startswith(("tests/", "benchmarks/", "jobs/")) for n in names)

    # A fresh venv: the wheel, plus this environment's dependencies (not the checkout's code).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    (site,) = venv.glob("lib/python*/site-packages")
    deps = [p for p in sys.path if p.endswith("site-packages")]
    (site / "dependencies.pth").write_text("\n".join(deps) + "\n")
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                                "--no-deps", "-q", str(wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr

    work = tmp_path / "work"  # outside the checkout
    work.mkdir()
    where = run([str(venv / "bin" / "python"), "-c", "import fdcr_mpi; print(fdcr_mpi.__file__)"], work)
    assert where.stdout.strip().startswith(str(site)), where.stdout + where.stderr
    fdcr = str(venv / "bin" / "fdcr-mpi")
    done = run([fdcr, "run", "data.dataset=digits", "rounds=2", "train.local_epochs=1", "fisher.max_samples=16",
                "--out", "r", "--quiet"], work)
    assert done.returncode == 0 and "final model sha256" in done.stdout, done.stderr
    with h5py.File(work / "r" / "run.h5", "r") as f:
        assert f.attrs["version"] == fdcr_mpi.__version__ and f.attrs["status"] == "complete"
    (work / "s.yaml").write_text(SWEEP.format(out=work / "sweep"))
    script = run([fdcr, "sweep", "slurm", "s.yaml"], work)
    assert script.returncode == 0, script.stderr
    assert "#SBATCH --array=0-1" in (work / "sweep" / "slurm" / "w.sbatch").read_text()
    report = run([fdcr, "report", "r", "--out", "rep"], work)
    assert report.returncode == 0 and "No reference table" not in report.stdout + report.stderr, report.stderr
    assert run([fdcr, "--version"], work).stdout.strip() == f"fdcr-mpi {fdcr_mpi.__version__}"
