"""``fdcr-mpi sweep local``: the runs of a sweep on this machine, several at once, with progress."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fdcr_mpi.errors import UserError
from fdcr_mpi.sweep.spec import (
    FINGERPRINT_ENV,
    ROOT_ENV,
    Run,
    Sweep,
    check_no_conflicts,
    flatten,
    pending,
    states,
)

_LAUNCHER_ENV_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "HYDI_", "HYDRA_", "MPI_", "SLURM_STEP_")


@dataclass
class Outcome:
    run: Run
    code: int
    seconds: float
    log: Path


def child_env(sweep: Sweep, threads: int) -> dict[str, str]:
    """The environment of a run started here: no launcher variables of ours, one thread count."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_ENV_PREFIXES)}
    env.update({FINGERPRINT_ENV: sweep.fingerprint(), ROOT_ENV: str(sweep.root), "OMP_NUM_THREADS": str(threads),
                "PYTHONUNBUFFERED": "1"})
    return env


def run_command(sweep: Sweep, run: Run, *, ranks: int = 1, threads: int | None = None,
                data_root: str | None = None) -> list[str]:
    """``python -m fdcr_mpi run --sweep FILE --index I``, under ``mpiexec -n ranks`` when ranks > 1."""
    command = [sys.executable, "-m", "fdcr_mpi", "run", "--sweep", str(sweep.path), "--index", str(run.index)]
    if threads is not None and "runtime.threads" not in flatten(sweep.spec.overrides):
        command.append(f"runtime.threads={threads}")
    if data_root:
        command += ["--data-root", data_root]
    if ranks > 1:
        mpiexec = Path(sys.executable).parent / "mpiexec"
        launcher = str(mpiexec) if mpiexec.exists() else shutil.which("mpiexec")
        if launcher is None:
            raise UserError("--ranks > 1 needs mpiexec (install the extra: pip install 'fdcr_mpi[mpi]')")
        command = [launcher, "-n", str(ranks), *command]
    return command


def threads_per_process(jobs: int, ranks: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, jobs * ranks))


class LocalRunner:
    """Runs the pending runs of a sweep as subprocesses, ``jobs`` at a time."""

    def __init__(self, sweep: Sweep, runs: Sequence[Run], *, jobs: int, ranks: int = 1,
                 data_root: str | None = None, poll: float = 0.2) -> None:
        self.sweep, self.todo, self.jobs, self.ranks = sweep, list(runs), jobs, ranks
        self.data_root, self.poll = data_root, poll
        self.threads = threads_per_process(jobs, ranks)
        self.logs = sweep.root / "logs"
        self.active: dict[int, tuple[Run, subprocess.Popen, float, Any]] = {}
        self.outcomes: list[Outcome] = []

    def start(self, run: Run) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{run.name}.log", "ab")  # noqa: SIM115 - closed in reap()
        command = run_command(self.sweep, run, ranks=self.ranks, threads=self.threads, data_root=self.data_root)
        log.write(f"$ {shlex.join(command)}\n".encode())
        log.flush()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=child_env(self.sweep, self.threads), start_new_session=True)
        self.active[proc.pid] = (run, proc, time.monotonic(), log)

    def reap(self) -> list[Outcome]:
        """The runs that ended since the last call."""
        ended = []
        for pid, (run, proc, started, log) in list(self.active.items()):
            code = proc.poll()
            if code is None:
                continue
            log.close()
            del self.active[pid]
            ended.append(Outcome(run, code, time.monotonic() - started, self.logs / f"{run.name}.log"))
        self.outcomes += ended
        return ended

    def step(self) -> list[Outcome]:
        """Fill the free slots, wait one poll interval, return what ended."""
        while self.todo and len(self.active) < self.jobs:
            self.start(self.todo.pop(0))
        time.sleep(self.poll)
        return self.reap()

    @property
    def busy(self) -> bool:
        return bool(self.todo or self.active)

    def stop(self, grace: float = 60.0) -> None:
        """SIGTERM every live run (each checkpoints and exits 75), then SIGKILL after ``grace``."""
        self.todo.clear()
        for _, proc, _, _ in self.active.values():
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for _, proc, _, _ in self.active.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=10)
        self.reap()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the child leads its own session (start_new_session)
    except ProcessLookupError:
        pass


def run_local(sweep: Sweep, *, jobs: int, ranks: int = 1, data_root: str | None = None,
              console: Any = None) -> int:
    """Run every unfinished run of the sweep, ``jobs`` at a time, with a progress bar.

    Returns 0 when all runs are complete, 1 when any failed (each failure listed with its
    exit code and log), 130 on Ctrl-C (the live runs are stopped at a checkpoint).
    """
    from rich.console import Console

    console = console or Console(stderr=True, soft_wrap=True)  # never break a path across lines
    run_states = states(sweep)
    check_no_conflicts(sweep, run_states)
    todo = pending(sweep, run_states)
    total, done = len(sweep.runs), len(sweep.runs) - len(todo)
    try:
        if todo:
            (sweep.root / "logs").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot write the logs into {sweep.root / 'logs'}: {exc.strerror or exc}") from None
    console.print(f"sweep {sweep.name}: {total} runs, {done} already complete, {len(todo)} to run, "
                  f"{jobs} at a time; logs in {sweep.root / 'logs'}")
    if not todo:
        return 0
    runner = LocalRunner(sweep, todo, jobs=jobs, ranks=ranks, data_root=data_root)
    try:
        _drive(runner, console, total, done)
    except KeyboardInterrupt:
        console.print("interrupted: stopping the live runs at their next checkpoint")
        runner.stop()
        return 130
    return report_outcomes(runner.outcomes, console)


def _progress(console: Any) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                    MofNCompleteColumn(), TextColumn("runs"), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), TextColumn("{task.fields[live]}"), console=console)


def _drive(runner: LocalRunner, console: Any, total: int, done: int) -> None:
    with _progress(console) as progress:
        task = progress.add_task(runner.sweep.name, total=total, completed=done, live="")
        while runner.busy:
            for outcome in runner.step():
                mark = "done" if outcome.code == 0 else f"[red]failed (exit {outcome.code})[/red]"
                progress.console.print(f"  [{outcome.run.index}] {outcome.run.name}: {mark} "
                                       f"in {outcome.seconds:.0f} s")
                progress.advance(task)
            names = ", ".join(run.name for run, *_ in runner.active.values())
            progress.update(task, live=f"running: {names}" if names else "")


def report_outcomes(outcomes: Sequence[Outcome], console: Any) -> int:
    """Print the failures (exit code, log) at the end; 0 when there are none."""
    failed = [o for o in outcomes if o.code != 0]
    if not failed:
        console.print(f"all {len(outcomes)} runs finished")
        return 0
    console.print(f"[red]{len(failed)} of {len(outcomes)} runs failed:[/red]")
    for o in sorted(failed, key=lambda o: o.run.index):
        why = "preempted, resumable" if o.code == 75 else "user error" if o.code == 2 else "error"
        console.print(f"  [{o.run.index}] {o.run.name}: exit code {o.code} ({why}); log {o.log}")
    return 1


# ----------------------------------------------------------------------------- SLURM


