"""Helpers of the adversarial corpus (tests/test_adversarial.py, tests/test_runfile_safety.py).

- ``must_have``: a mechanism a test needs (a tmpfs mount, dropping root's file-permission
  override) skips with a reason locally but fails when ``FDCR_CI=1``, so CI never skips it.
- ``small_disk``: a real full disk, a tmpfs of a few hundred KiB.
- ``denied``: the command prefix under which file permissions apply (root ignores them).
- ``verdict``: what a command's exit code and stderr say: a clean one-sentence error, a
  normal end, or a failure of the promise (a traceback, a crash, noise on stderr).
- ``run_worker``: many ``fdcr-mpi`` commands in one Python process (imports paid once); a
  segfault ends the worker, is recorded against the command that caused it, and the rest
  go on in a fresh worker.
- ``tally``: every hostile input and its verdict; with ``FDCR_ADVERSARIAL_TABLE=PATH`` the
  session writes them to PATH (JSON lines) for the closing table of issue 19.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

REPO = Path(__file__).resolve().parents[1]
FDCR = Path(sys.executable).parent / "fdcr-mpi"
TABLE_ENV = "FDCR_ADVERSARIAL_TABLE"
# A tiny run: the built-in digits data, one local epoch, one thread.
TINY = ["data.dataset=digits", "train.local_epochs=1", "runtime.threads=1", "fisher.max_samples=32"]


def unavailable(reason: str) -> NoReturn:
    """Skip with ``reason``; under FDCR_CI=1 fail instead (the mechanism must exist in CI)."""
    if os.environ.get("FDCR_CI") == "1":
        pytest.fail(f"{reason} (FDCR_CI=1: this test may not be skipped)")
    pytest.skip(reason)


def env() -> dict[str, str]:
    """This environment without launcher variables, one thread per process."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("PMI_", "PMIX_", "OMPI_", "SLURM_", "HYDRA_", "MPI_", "FDCR_SWEEP"))}
    clean["OMP_NUM_THREADS"] = "1"
    return clean


def fdcr(*args: str, prefix: tuple[str, ...] = (), timeout: float = 300,
         cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``fdcr-mpi ARGS`` in a subprocess (optionally under a ``prefix`` command such as ``denied()``)."""
    return subprocess.run([*prefix, str(FDCR), *args], capture_output=True, text=True, timeout=timeout,
                          env=env(), cwd=cwd)


@contextlib.contextmanager
def small_disk(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (e.g. "1500k") mounted at ``where``: a disk that really fills up."""
    where.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        unavailable("no mount command here: cannot make a small full disk")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        unavailable(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def denied() -> tuple[str, ...]:
    """The prefix that makes file permissions apply to a command: none for a normal user; for
    root, ``setpriv`` without the capabilities that override them."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        unavailable("running as root without setpriv: file permissions cannot be made to apply")
    return (setpriv, "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search")


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def verdict(code: int | None, stderr: str, escaped: str | None = None) -> str:
    """``clean error``: non-zero exit, stderr is one ``fdcr-mpi: error:`` sentence (warnings,
    ``fdcr-mpi: warning: ...``, may precede it); ``ok``: exit 0, stderr only warnings;
    ``crash``: killed by a signal; ``traceback``: anything else (an exception, a Python
    traceback, HDF5 noise, a second error line)."""
    lines = error_lines(stderr)
    noisy = escaped is not None or any(not line.startswith("fdcr-mpi: ") for line in lines)
    if code is not None and code < 0 or code in (139, 134, 137):
        return "crash"
    if noisy or code is None:
        return "traceback"
    errors = [line for line in lines if line.startswith("fdcr-mpi: error: ")]
    if code == 0 and not errors:
        return "ok"
    if code != 0 and len(errors) == 1 and lines[-1] == errors[0]:
        return "clean error"
    return "traceback"


WORKER = r"""
import contextlib, hashlib, io, json, sys
from pathlib import Path
from fdcr_mpi.cli import main


def digest(paths):
    return {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths if Path(p).is_file()}


for line in sys.stdin:
    case = json.loads(line)
    before = digest(case.get("unchanged", []))
    out, err, escaped = io.StringIO(), io.StringIO(), None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(case["argv"])
        except SystemExit as exc:
            code = exc.code
        except BaseException as exc:  # what the promise forbids: it would be a traceback
            code, escaped = None, f"{type(exc).__name__}: {exc}"
    after = digest(case.get("unchanged", []))
    print(json.dumps({"id": case["id"], "code": code, "escaped": escaped, "stdout": out.getvalue()[-2000:],
                      "stderr": err.getvalue()[-4000:], "changed": [p for p in before if after.get(p) != before[p]]}),
          flush=True)
"""


def run_worker(cases: list[dict], timeout: float = 1200, prefix: tuple[str, ...] = ()) -> list[dict]:
    """Run each case (``id``, ``argv``, optional ``unchanged`` paths) through ``fdcr_mpi.cli.main``
    in a worker process (under the command ``prefix``, e.g. ``denied()``); a case that kills the
    worker gets ``code`` = -signal and ``escaped`` = "crash"."""
    results: list[dict] = []
    todo = list(cases)
    while todo:
        proc = subprocess.run([*prefix, sys.executable, "-c", WORKER],
                              input="".join(json.dumps(c) + "\n" for c in todo),
                              capture_output=True, text=True, timeout=timeout, env=env(), cwd=REPO)
        done = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        results += done
        if proc.returncode == 0 or len(done) >= len(todo):
            break
        crashed = todo[len(done)]
        results.append({"id": crashed["id"], "code": proc.returncode, "escaped": "crash", "stdout": "",
                        "stderr": proc.stderr[-2000:], "changed": []})
        todo = todo[len(done) + 1:]
    return results


class Tally:
    """Hostile inputs and their verdicts, for the closing table (see the module docstring)."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def record(self, group: str, case: str, outcome: str, lost: bool = False) -> None:
        self.rows.append({"group": group, "case": case, "outcome": outcome, "lost": lost})

    def write(self) -> None:
        path = os.environ.get(TABLE_ENV)
        if path:
            with open(path, "a") as f:
                for row in self.rows:
                    f.write(json.dumps(row) + "\n")


@pytest.fixture(scope="session")
def tally() -> Iterator[Tally]:
    record = Tally()
    yield record
    record.write()
