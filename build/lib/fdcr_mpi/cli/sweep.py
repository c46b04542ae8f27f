"""``fdcr-mpi sweep plan|slurm|local``, ``fdcr-mpi report`` and ``fdcr-mpi plot``; ``run --sweep``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fdcr_mpi.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    """Add the sweep, report and plot subcommands to the ``fdcr-mpi`` parser."""
    _add_sweep(sub)
    _add_report(sub)
    _add_plot(sub)


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    sweep = sub.add_parser("sweep", help="plan, run or submit a sweep file (docs/SWEEPS.md)")
    actions = sweep.add_subparsers(dest="sweep_command", required=True)

    plan = actions.add_parser("plan", help="list the runs: index, state, name, run directory")
    _common(plan)
    plan.set_defaults(handler=cmd_plan)

    slurm = actions.add_parser("slurm", help="write the SLURM array script for the runs still to do")
    _common(slurm)
    slurm.add_argument("--submit", action="store_true", help="submit it with sbatch")
    slurm.add_argument("--script", type=Path, help="where to write it (default OUT/slurm/NAME.sbatch)")
    slurm.add_argument("--template", type=Path, help="the template (default: the package's fdcr_mpi/sweep/sweep.sbatch.tmpl)")
    slurm.add_argument("--data-root", help="dataset root passed to every run")
    slurm.add_argument("--ranks", type=int, help="MPI ranks per run (1 server + clients)")
    slurm.add_argument("--nodes", type=int, help="nodes per run (the ranks go round them, rank 0 on the first)")
    slurm.add_argument("--cpus-per-task", type=int, help="CPUs per rank")
    slurm.add_argument("--gpus", type=int, help="GPUs per node of a run")
    slurm.add_argument("--time", help="time limit per run, e.g. 02:00:00")
    slurm.add_argument("--throttle", type=int, help="at most this many runs at once (%%M)")
    slurm.add_argument("--partition")
    slurm.add_argument("--account")
    slurm.add_argument("--qos")
    slurm.add_argument("--mem", help="memory per node, e.g. 16G")
    slurm.add_argument("--mpi", help="srun --mpi plugin (pmi2 works with the mpich wheel)")
    slurm.add_argument("--signal-seconds", type=int, help="SIGUSR1 this long before the time limit")
    slurm.set_defaults(handler=cmd_slurm)

    local = actions.add_parser("local", help="run the sweep on this machine, N runs at a time")
    _common(local)
    local.add_argument("-j", "--jobs", type=int, default=1, help="runs at a time (default 1)")
    local.add_argument("--ranks", type=int, default=1, help="MPI ranks per run (> 1: under mpiexec)")
    local.add_argument("--data-root", help="dataset root passed to every run")
    local.set_defaults(handler=cmd_local)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="the sweep file")
    parser.add_argument("--out-root", type=Path, help="put the runs here instead of the file's out:")


def _add_report(sub: argparse._SubParsersAction) -> None:
    report = sub.add_parser("report", help="Table 4 (A, R, V over seeds) as Markdown, CSV and LaTeX")
    report.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="sweep out roots or run directories")
    report.add_argument("--out", type=Path, help="output folder (default DIR/report)")
    report.add_argument("--reference", type=Path,
                        help="a Table 4 CSV to compare with instead of the paper's (shipped with fdcr_mpi)")
    report.add_argument("--partial", action="store_true", help="also count unfinished runs")
    report.set_defaults(handler=cmd_report)


def _add_plot(sub: argparse._SubParsersAction) -> None:
    plot = sub.add_parser("plot", help="PNG figures: A, R_paper and R per round (Fig. 3), V_k and alpha_hat_k (Fig. 2)")
    plot.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="sweep out roots or run directories")
    plot.add_argument("--out", type=Path, help="output folder (default DIR/figures)")
    plot.add_argument("--partial", action="store_true", help="also draw unfinished runs")
    plot.set_defaults(handler=cmd_plot)


def cmd_plan(args: argparse.Namespace) -> int:
    from fdcr_mpi.sweep import format_plan, load_sweep, states

    sweep = load_sweep(args.file, args.out_root)
    print(format_plan(sweep, states(sweep)))
    return 0


def cmd_slurm(args: argparse.Namespace) -> int:
    from fdcr_mpi.sweep import TEMPLATE, load_sweep, slurm_options, submit, write_job

    sweep = load_sweep(args.file, args.out_root)
    options = slurm_options(sweep, ranks=args.ranks, nodes=args.nodes, cpus_per_task=args.cpus_per_task, gpus=args.gpus,
                            time=args.time, throttle=args.throttle, partition=args.partition,
                            account=args.account, qos=args.qos, mem=args.mem, mpi=args.mpi,
                            signal_seconds=args.signal_seconds)
    script, _, message = write_job(sweep, options, script=args.script, data_root=args.data_root,
                                   template=args.template or TEMPLATE, skip_queued=args.submit)
    print(message)
    if script is not None and args.submit:
        print(f"submitted job {submit(script)}")
    elif script is not None:
        print(f"submit with: sbatch {script}")
    return 0


def cmd_local(args: argparse.Namespace) -> int:
    from fdcr_mpi.sweep import load_sweep, run_local

    if args.jobs < 1 or args.ranks < 1:
        raise UserError("-j and --ranks must be at least 1")
    sweep = load_sweep(args.file, args.out_root)
    return run_local(sweep, jobs=args.jobs, ranks=args.ranks, data_root=args.data_root)


def cmd_report(args: argparse.Namespace) -> int:
    from fdcr_mpi.analysis.report import write_report

    out = args.out or args.dirs[0] / "report"
    for path in write_report(args.dirs, out, reference=args.reference, partial=args.partial):
        print(path)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from fdcr_mpi.analysis.plot import plot_dirs

    out = args.out or args.dirs[0] / "figures"
    for path in plot_dirs(args.dirs, out, partial=args.partial):
        print(path)
    return 0


def sweep_run(path: Path, index: int) -> tuple[str | None, list[str], Path]:
    """(config file, overrides, run directory) of run ``index`` of the sweep file ``path``.

    Under ``sweep slurm`` and ``sweep local`` the environment holds the out root they were
    given and the sweep's fingerprint: a sweep file edited since is refused rather than
    running the wrong run.
    """
    from fdcr_mpi.sweep import FINGERPRINT_ENV, ROOT_ENV, load_sweep

    sweep = load_sweep(path, os.environ.get(ROOT_ENV) or None)
    run = sweep.run(index)
    expected = os.environ.get(FINGERPRINT_ENV)
    if expected and expected != sweep.fingerprint():
        raise UserError(f"the sweep file {sweep.path} changed since this job was written (its runs differ); "
                        "write and submit the job again: fdcr-mpi sweep slurm FILE --submit")
    return (str(sweep.base) if sweep.base else None), list(run.overrides), run.out
