"""Shared pieces of the benchmarks: figures, timing, machine load, bounded subprocesses."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MPIEXEC = Path(os.environ.get("MPIEXEC") or BIN / "mpiexec")  # $MPIEXEC: another launcher
LAUNCHER_VARS = ("PMI_", "PMIX_", "OMPI_", "SLURM_", "HYDRA_", "MPI_")


@dataclass
class Figure:
    """One reported number, with its target (``op`` and ``bound``) and the conditions it was taken in."""

    key: str
    label: str
    value: float | None
    unit: str
    op: str | None = None  # ">=" or "<=", None when the issue sets no target
    bound: float | None = None
    threads: str = ""
    load: float | None = None  # 1-minute load average when measured
    notes: str = ""
    passed: bool | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.passed = meets(self.value, self.op, self.bound)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def meets(value: float | None, op: str | None, bound: float | None) -> bool | None:
    """Whether ``value op bound`` holds; None when there is no target or no value."""
    if value is None or op is None or bound is None:
        return None
    return value >= bound if op == ">=" else value <= bound


def load1() -> float:
    """The 1-minute load average of this machine."""
    return round(os.getloadavg()[0], 2)


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """(median, samples) of ``repeats`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    samples = [timed(fn) for _ in range(repeats)]
    return median(samples), samples


def clean_env(threads: int) -> dict[str, str]:
    """This environment without launcher variables, with OpenMP/MKL limited to ``threads``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_VARS)}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


@dataclass
class Outcome:
    """A finished (or timed-out) subprocess."""

    command: list[str]
    returncode: int | None
    seconds: float
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def why(self) -> str:
        """One line on why it failed."""
        if self.returncode is None:
            return f"timed out after {self.seconds:.0f} s"
        tail = (self.stderr.strip() or self.stdout.strip()).splitlines()[-3:]
        return f"exit code {self.returncode}: {' | '.join(tail)}"


def run_bounded(command: list[str], timeout: float, threads: int) -> Outcome:
    """Run ``command`` in the repository root with a wall-clock limit; never raises on failure."""
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO, env=clean_env(threads), capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return Outcome(command, None, time.perf_counter() - start, _text(exc.stdout), _text(exc.stderr))
    return Outcome(command, done.returncode, time.perf_counter() - start, done.stdout, done.stderr)


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def shared_data_root() -> Path | None:
    """The root holding FashionMNIST/raw ($FDCR_SHARED_DATA or ../shared/data), or None."""
    root = Path(os.environ.get("FDCR_SHARED_DATA", REPO.parent / "shared" / "data"))
    return root if (root / "FashionMNIST" / "raw").is_dir() else None


def has_mpiexec() -> bool:
    return MPIEXEC.exists()


def say(message: str) -> None:
    """Progress on stderr (results go to files)."""
    print(f"[bench {time.strftime('%H:%M:%S')} load {load1():.2f}] {message}", file=sys.stderr, flush=True)
