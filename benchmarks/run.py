"""``python -m benchmarks.run [--quick] [--out DIR]``: every benchmark of issue #7, then the results files.

Sections: ``local`` (training throughput vs a bare PyTorch loop, Fisher cost vs 10-epoch
training), ``comm`` (MpiTransport vs bare mpi4py under mpiexec -n 3), ``rounds`` (whole runs:
per-phase seconds, overhead, speed-up of mpiexec -n 3, peak memory per rank) and ``paper``
(the paper's Fashion-MNIST round in one process). ``--quick`` uses small sizes (under two
minutes on an idle two-core machine) to check the harness; the full mode gives the figures.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from benchmarks.common import REPO, Figure, has_mpiexec, load1, say, shared_data_root
from benchmarks.local import LocalSizes
from benchmarks.scale import ScaleRun, ScaleSizes
from fdcr_mpi.runtime.allocator import tune_malloc

SECTIONS = ("local", "comm", "rounds", "paper", "scale")


@dataclass(frozen=True)
class Plan:
    """The sizes of one benchmark mode."""

    mode: str
    local: LocalSizes
    comm_repeats: int
    comm_timeout: float
    round_epochs: int
    round_rounds: int
    round_timeout: float
    round_launches: tuple[str, ...]
    paper_epochs: int
    paper_train_samples: int | None
    paper_threads: tuple[int, ...]
    paper_timeout: float
    paper_mpi: bool
    scale: ScaleSizes


QUICK = Plan("quick", LocalSizes(samples=1024, throughput_epochs=1, repeats=9, fisher_repeats=1, threads=(1,)),
             comm_repeats=30, comm_timeout=120, round_epochs=2, round_rounds=2, round_timeout=180,
             round_launches=("one_t1", "mpi3_t1"), paper_epochs=1, paper_train_samples=5400,
             paper_threads=(1,), paper_timeout=300, paper_mpi=True,
             scale=ScaleSizes(train_samples=3000, rounds=2, timeout=300,
                              runs=(ScaleRun(10, None, "auto"), ScaleRun(100, None, "auto"))))
FULL = Plan("full", LocalSizes(samples=5400, throughput_epochs=1, repeats=9, fisher_repeats=3, threads=(1, 2)),
            comm_repeats=200, comm_timeout=300, round_epochs=10, round_rounds=3, round_timeout=900,
            round_launches=("one_t1", "mpi3_t1", "one_t2"), paper_epochs=10, paper_train_samples=None,
            paper_threads=(1, 2), paper_timeout=1800, paper_mpi=True,
            scale=ScaleSizes(train_samples=20000, rounds=3, timeout=900,
                             runs=(ScaleRun(10, None, "auto"), ScaleRun(100, None, "auto"), ScaleRun(100, None, "gather"),
                                   ScaleRun(1000, 100, "auto"),
                                   ScaleRun(10000, 100, "auto", ("data.train_samples=null", "data.min_client_size=4",
                                                                  "train.batch_size=4")))))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, to check the harness (< 2 min)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="results folder")
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to run")
    p.add_argument("--paper-epochs", type=int, choices=range(1, 11), metavar="1..10",
                   help="local epochs of the measured paper round (fewer than 10 are extrapolated "
                   "to 10 and reported as such)")
    p.add_argument("--threads", type=int, nargs="+", metavar="N",
                   help="thread counts of the in-process and paper-round benchmarks (default: 1 2 in "
                   "full mode, 1 in quick mode; on a busy machine 2 threads measure the contention)")
    return p.parse_args(argv)


def round_sizes(plan: Plan, root: Path | None):
    """The compute-bound setting of the speed-up runs: a Fashion-MNIST subset, else synthetic data."""
    from benchmarks.rounds import RoundSizes

    if root is not None and plan.mode == "full":
        data, label = ("data.dataset=fmnist", f"data.root={root}", "data.train_samples=6000"), "fmnist 6000"
    else:
        data, label = ("data.dataset=synthetic",), "synthetic 1800"
    return RoundSizes(data, label, plan.round_epochs, plan.round_rounds, plan.round_timeout,
                      launches=plan.round_launches)


def sections(plan: Plan, args: argparse.Namespace, root: Path | None,
             scratch: Path) -> dict[str, Callable[[], tuple[list[Figure], dict]]]:
    """Each section as a call returning (figures, details); imported lazily."""
    from benchmarks.comm import run_comm
    from benchmarks.local import run_local
    from benchmarks.rounds import paper_round, speedup_runs
    from benchmarks.scale import run_scale

    epochs = args.paper_epochs or plan.paper_epochs
    return {
        "local": lambda: run_local(plan.local, root),
        "comm": lambda: run_comm(plan.comm_repeats, plan.comm_timeout, scratch),
        "rounds": lambda: speedup_runs(round_sizes(plan, root), scratch),
        "paper": lambda: paper_round(root, epochs, plan.paper_train_samples, plan.paper_threads, scratch,
                                     plan.paper_timeout, plan.paper_mpi),
        "scale": lambda: run_scale(plan.scale, root, scratch),
    }


def machine_meta(plan: Plan, root: Path | None) -> dict:
    import torch

    from benchmarks.rounds import cpu_count

    mpi = None
    if has_mpiexec():
        try:
            from mpi4py import MPI

            mpi = MPI.Get_library_version().splitlines()[0].strip()
        except ImportError:
            mpi = None
    return {"mode": plan.mode, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(),
            "python": platform.python_version(), "torch": torch.__version__, "cpus": cpu_count(),
            "torch_threads_default": torch.get_num_threads(), "mpi": mpi,
            "data_root": str(root) if root else None, "load_start": [round(x, 2) for x in _loadavg()]}


def _loadavg() -> tuple[float, float, float]:
    import os

    return os.getloadavg()


def notes(plan: Plan, root: Path | None, errors: dict[str, str]) -> list[str]:
    items = [
        "Load is the higher 1-minute load average at the start and end of each measurement (2 cores: "
        "above ~1.5 other jobs compete for the cores and absolute times inflate).",
        "Every timing is taken after a warm-up; repeated timings report the median. Ratios (ours/bare, "
        "speed-ups, Fisher fraction) are taken within one run, with the cases interleaved where cheap.",
        "Overhead = (round - busiest rank's train - its Fisher) / round; the run file keeps the busiest "
        "rank's train and Fisher sums separately, so under MPI the two maxima may come from different ranks.",
        "Speed-up runs use runtime.threads and OMP_NUM_THREADS as listed; rank 0 (server) hosts no client "
        "and sleeps while the two client ranks train.",
        "glibc's mmap/trim thresholds are raised (runtime.malloc: tuned, the runs' default) in every process, "
        "the in-process bare loops included, so ours and bare are compared under the same allocator.",
    ]
    if root is None:
        items.append("Fashion-MNIST files not found: the paper round was skipped and the local benchmarks "
                     "used random tensors.")
    if plan.mode == "quick":
        items.append("QUICK mode: small sizes to check the harness; the figures are indicative only.")
    items += [f"Section {name} failed: {why}" for name, why in errors.items()]
    return items


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.threads:
        plan = replace(plan, local=replace(plan.local, threads=tuple(args.threads)), paper_threads=tuple(args.threads))
    root = shared_data_root()
    meta = machine_meta(plan, root)
    # as every run does by default (runtime.malloc: tuned); the bare loops share this process
    meta["malloc_tuned"] = tune_malloc()
    meta["threads"] = {"local": list(plan.local.threads), "runs": list(plan.round_launches),
                       "paper": list(plan.paper_threads)}
    started = time.perf_counter()
    figures: list[Figure] = []
    details: dict = {}
    errors: dict[str, str] = {}
    say(f"{plan.mode} mode, sections {', '.join(args.only)}, load {load1()}")
    with tempfile.TemporaryDirectory(prefix="fdcr-bench-") as scratch:
        for name, call in sections(plan, args, root, Path(scratch)).items():
            if name not in args.only:
                continue
            try:
                found, details[name] = call()
                figures += found
            except Exception as exc:  # noqa: BLE001 - one broken section must not lose the others
                errors[name] = f"{type(exc).__name__}: {exc}"
                details[name] = {"error": traceback.format_exc()}
                say(f"section {name} failed: {errors[name]}")
    from benchmarks.report import not_measured, write_results

    figures += not_measured()
    meta.update(finished=time.strftime("%Y-%m-%d %H:%M:%S"), seconds=time.perf_counter() - started,
                load_end=[round(x, 2) for x in _loadavg()], notes=notes(plan, root, errors))
    json_path, md_path = write_results(args.out, meta, figures, details)
    say(f"wrote {json_path} and {md_path} in {meta['seconds']:.0f} s")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
