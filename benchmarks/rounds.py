"""Whole runs of ``fdcr-mpi run`` in bounded subprocesses: per-phase seconds, overhead, speed-up
of ``mpiexec -n 3`` over one process, peak memory per rank, and the paper's Fashion-MNIST round.

Each run goes through ``benchmarks.rank_entry`` so that every rank reports its peak memory.
Phase seconds come from the run file (``seconds_*`` columns); the first round is a warm-up and
is left out when there are more.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from benchmarks.common import MPIEXEC, Figure, has_mpiexec, load1, median, run_bounded, say
from benchmarks.rank_entry import read_peaks
from fdcr_mpi.runtime.round import PHASES
from fdcr_mpi.store import read_rounds

FMNIST_TRAIN = 54_000  # Fashion-MNIST's 60,000 training images less the 10% validation split
PAPER_ROUND_SECONDS = 139.0  # the reference time of one Fashion-MNIST round (issue #7)
OVERHEAD_TARGET = 0.10  # issue #7: overhead at most 10% of a round in the paper's setting
SPEEDUP_TARGET = 1.7  # issue #7: mpiexec -n 3 (1 thread per rank) over one process (1 thread)


@dataclass(frozen=True)
class Launch:
    """How a run is started: one process (``ranks`` None) or ``mpiexec -n ranks``."""

    key: str
    label: str
    ranks: int | None
    threads: int


LAUNCHES = (
    Launch("one_t1", "1 process, 1 thread", None, 1),
    Launch("mpi3_t1", "mpiexec -n 3, 1 thread/rank", 3, 1),
    Launch("one_t2", "1 process, 2 threads", None, 2),
)


@dataclass(frozen=True)
class RoundSizes:
    """The compute-bound setting of the speed-up runs."""

    data: tuple[str, ...]  # overrides choosing the data
    data_label: str
    local_epochs: int
    rounds: int
    timeout: float
    defenses: tuple[str, ...] = ("fedavg", "fdcr")
    launches: tuple[str, ...] = tuple(launch.key for launch in LAUNCHES)


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cli_run(items: list[str], launch: Launch, folder: Path, timeout: float) -> dict:
    """One ``fdcr-mpi run`` under ``launch``; its phase medians, overhead and per-rank peak memory."""
    rss, out = folder / "rss", folder / "run"
    program = [sys.executable, "-m", "benchmarks.rank_entry", str(rss), "run", *items,
               f"runtime.threads={launch.threads}", "--out", str(out), "--restart", "--quiet",
               "--transport", "local" if launch.ranks is None else "mpi"]
    command = program if launch.ranks is None else [str(MPIEXEC), "-n", str(launch.ranks), *program]
    load = load1()
    outcome = run_bounded(command, timeout, launch.threads)
    result: dict = {"launch": launch.key, "label": launch.label, "threads": launch.threads, "load": load,
                    "load_end": load1(), "wall_seconds": outcome.seconds, "items": items, "ok": outcome.ok}
    if not outcome.ok:
        result["error"] = outcome.why()
        say(f"  {launch.label}: FAILED ({result['error']})")
        return result
    result.update(phase_summary(out / "run.h5"))
    result["peak_rss_mib"] = read_peaks(rss)
    say(f"  {launch.label}: {result['phases']['round']:.2f} s/round")
    return result


def run_load(run: dict) -> float:
    """The higher of the 1-minute loads at the start and at the end of a run."""
    return max(run["load"], run.get("load_end", run["load"]))


def phase_summary(path: Path) -> dict:
    """Median seconds per phase over the measured rounds, overhead fraction, total client samples."""
    rounds = read_rounds(path)
    n = len(rounds["seconds_round"])
    keep = slice(1, None) if n > 1 else slice(None)
    columns = {p: np.asarray(rounds[f"seconds_{p}"], dtype=np.float64)[keep] for p in PHASES
               if f"seconds_{p}" in rounds}
    compute = columns["train"] + columns["fisher"]
    with h5py.File(path, "r") as f:
        samples = int(f["clients/sizes"][()].sum())
    return {"rounds_measured": int(columns["round"].size),
            "phases": {p: median(values.tolist()) for p, values in columns.items()},
            "overhead_fraction": median(((columns["round"] - compute) / columns["round"]).tolist()),
            "overhead_fraction_train_only": median(((columns["round"] - columns["train"]) / columns["round"]).tolist()),
            "client_samples": samples}


def speedup_runs(sizes: RoundSizes, scratch: Path) -> tuple[list[Figure], dict]:
    """Every defense of ``sizes`` under every launch; speed-up, overhead and memory figures."""
    launches = [launch for launch in LAUNCHES
                if launch.key in sizes.launches and (launch.ranks is None or has_mpiexec())]
    figures: list[Figure] = []
    details: dict = {"data": sizes.data_label, "local_epochs": sizes.local_epochs, "rounds": sizes.rounds,
                     "runs": {}}
    if not has_mpiexec():
        details["note"] = f"no mpiexec at {MPIEXEC}: the MPI launch was skipped"
    for defense in sizes.defenses:
        say(f"runs: {defense} on {sizes.data_label}, {sizes.local_epochs} local epochs, {sizes.rounds} rounds")
        items = [*sizes.data, f"defense.name={defense}", f"rounds={sizes.rounds}",
                 f"train.local_epochs={sizes.local_epochs}", "attack.kind=badnets"]
        runs = {launch.key: cli_run(items, launch, scratch / f"{defense}_{launch.key}", sizes.timeout)
                for launch in launches}
        details["runs"][defense] = runs
        figures += run_figures(defense, runs, sizes)
    return figures, details


def run_figures(defense: str, runs: dict[str, dict], sizes: RoundSizes) -> list[Figure]:
    """Overhead and memory per launch, and the speed-ups over one process with one thread."""
    figures: list[Figure] = []
    setting = f"{sizes.data_label}, {sizes.local_epochs} local epochs"
    for key, run in runs.items():
        if not run["ok"]:
            figures.append(Figure(f"round_seconds_{defense}_{key}", f"{defense}: round, {run['label']}", None, "s",
                                  threads=str(run["threads"]), load=run_load(run), notes=f"run failed: {run['error']}"))
            continue
        reps = f"median of {run['rounds_measured']} rounds after a warm-up round"
        figures.append(Figure(f"round_seconds_{defense}_{key}", f"{defense}: round, {run['label']}",
                              run["phases"]["round"], "s", threads=str(run["threads"]), load=run_load(run),
                              notes=f"{setting}; {reps}"))
        figures.append(Figure(f"overhead_{defense}_{key}", f"{defense}: overhead, {run['label']}",
                              run["overhead_fraction"], "of round", threads=str(run["threads"]), load=run_load(run),
                              notes="(round - busiest rank's train - its Fisher) / round; "
                                    f"without subtracting Fisher: {run['overhead_fraction_train_only']:.3f}"))
        peaks = run["peak_rss_mib"]
        figures.append(Figure(f"peak_rss_{defense}_{key}", f"{defense}: peak memory per rank, {run['label']}",
                              max(peaks.values()) if peaks else None, "MiB (max rank)", threads=str(run["threads"]),
                              load=run_load(run), notes=", ".join(f"rank {r}: {m:.0f}" for r, m in peaks.items())))
    base = runs.get("one_t1")
    speedups = (("mpi3_t1", "mpiexec -n 3 (2 client ranks) over 1 process",
                 "1 thread per process in both (ideal 2.0 on two cores)", SPEEDUP_TARGET),
                ("one_t2", "1 process with 2 threads over 1 thread", "no target set", None))
    for key, label, note, target in speedups:
        other = runs.get(key)
        if other is None:
            continue
        value = None
        if base and base["ok"] and other["ok"]:
            value = base["phases"]["round"] / other["phases"]["round"]
        figures.append(Figure(f"speedup_{defense}_{key}", f"{defense}: speed-up, {label}", value, "x",
                              ">=" if target else None, target, threads=str(other["threads"]), load=run_load(other),
                              notes=f"{setting}; round time ratio; {note}"))
    return figures


PAPER_LABEL = "Paper Fashion-MNIST round (fdcr, 10 clients, 10 epochs), 1 process"


def paper_round(root: Path | None, epochs: int, train_samples: int | None, threads: tuple[int, ...],
                scratch: Path, timeout: float, mpi: bool = False) -> tuple[list[Figure], dict]:
    """The paper's Fashion-MNIST round (10 clients, fdcr) in one process per thread count, and
    under ``mpiexec -n 3`` with one thread per rank when ``mpi``; extrapolated to 10 epochs on
    all data when measured on less. Round seconds and overhead per launch."""
    if root is None:
        note = "Fashion-MNIST files not found: the paper round was not measured"
        return [Figure("paper_round_seconds", PAPER_LABEL, None, "s", "<=", PAPER_ROUND_SECONDS, notes=note)], \
            {"skipped": note}
    items = ["configs/paper/fmnist.yaml", "rounds=1", f"data.root={root}", f"train.local_epochs={epochs}"]
    if train_samples is not None:
        items.append(f"data.train_samples={train_samples}")
    launches = [Launch(f"paper_t{t}", f"1 process, {t} thread{'s' if t > 1 else ''}", None, t) for t in threads]
    if mpi and has_mpiexec():
        launches.append(Launch("paper_mpi3_t1", "mpiexec -n 3, 1 thread/rank", 3, 1))
    figures, details = [], {"epochs_measured": epochs, "train_samples": train_samples, "runs": {}}
    for launch in launches:
        say(f"paper round: fmnist, fdcr, {epochs} local epoch(s), {train_samples or 'all'} training samples, "
            f"{launch.label}")
        run = cli_run(items, launch, scratch / launch.key, timeout)
        found, details["runs"][launch.key] = paper_figures(run, launch, epochs, train_samples)
        figures += found
    return figures, details


def paper_figures(run: dict, launch: Launch, epochs: int, train_samples: int | None) -> tuple[list[Figure], dict]:
    """The round-time and overhead figures of one paper run, and its details (with the estimate
    if extrapolated). Only one-process rounds are held to the reference 139 s."""
    t, key = run["threads"], launch.key.removeprefix("paper_")
    details = {"run": run}
    label = f"{PAPER_LABEL.removesuffix(', 1 process')}, {launch.label}"
    op, bound = ("<=", PAPER_ROUND_SECONDS) if launch.ranks is None else (None, None)
    if not run["ok"]:
        return [Figure(f"paper_round_seconds_{key}", label, None, "s", op, bound, threads=str(t),
                       load=run_load(run), notes=f"run failed: {run['error']}")], details
    data_scale = 1.0 if train_samples is None else FMNIST_TRAIN / run["client_samples"]
    estimate, how = extrapolate(run["phases"], epochs, data_scale)
    details.update(estimate=estimate, how=how)
    reference = f"reference {PAPER_ROUND_SECONDS:.0f} s (one process); " if op else ""
    overhead = (estimate["round"] - estimate["train"] - estimate["fisher"]) / estimate["round"]
    with_fisher = (estimate["round"] - estimate["train"]) / estimate["round"]
    return [
        Figure(f"paper_round_seconds_{key}", label, estimate["round"], "s", op, bound, threads=str(t),
               load=run_load(run), notes=f"{reference}{how}; one round, no warm-up round"),
        Figure(f"paper_overhead_{key}", f"Paper round overhead, {launch.label}", overhead, "of round", "<=",
               OVERHEAD_TARGET, threads=str(t), load=run_load(run),
               notes=f"(round - busiest rank's train - its Fisher) / round; counting the Fisher as overhead: "
                     f"{with_fisher:.3f}; phases (s): "
                     + ", ".join(f"{p} {v:.2f}" for p, v in estimate.items() if v >= 0.005)),
    ], details


def extrapolate(phases: dict[str, float], epochs: int, data_scale: float) -> tuple[dict[str, float], str]:
    """Phase seconds scaled to 10 local epochs on ``data_scale`` times the data measured on.

    Training scales with epochs x samples, the Fisher with samples; the other phases are kept.
    """
    if epochs == 10 and data_scale == 1.0:
        return dict(phases), "measured (a full round, not extrapolated)"
    train_scale = data_scale * 10 / max(epochs, 1)
    train, fisher = phases["train"] * train_scale, phases["fisher"] * data_scale
    estimate = dict(phases, train=train, fisher=fisher)
    added = train + fisher - phases["train"] - phases["fisher"]
    estimate["round"] = phases["round"] + added
    if "clients" in phases:  # one process: rank 0 trains every client
        estimate["clients"] = phases["clients"] + added
    how = (f"EXTRAPOLATED from {epochs} local epoch(s) on 1/{data_scale:.0f} of the data "
           f"(train x{train_scale:.0f}, Fisher x{data_scale:.0f}, other phases as measured)")
    return estimate, how
