"""``fdcr-mpi``: run | resume | inspect | list | config | compare | sweep | report | plot.
``python -m fdcr_mpi`` is the same program.

Every user error ends in one sentence on stderr (printed by rank 0 only) and exit code 2;
a run stopped by SIGTERM/SIGUSR1 exits 75 after leaving a resumable checkpoint. Warnings are
one line each (``fdcr-mpi: warning: ...``); output into a closed pipe (``| head``) ends the
command quietly with exit code 141, as SIGPIPE would.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from fdcr_mpi import __version__
from fdcr_mpi.errors import Preempted, UserError

if TYPE_CHECKING:
    from fdcr_mpi.config import BaseConfig

NUMERICS_HELP = ("continue a run on a machine whose numerics differ from its first rounds' (device, GPU, torch, "
                 "CPU vector instructions, client threads); the run file records it")
RANK_ENV_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")
BROKEN_PIPE_EXIT = 141  # 128 + SIGPIPE: what `cmd | head` gives a program that SIGPIPE ends


def env_rank() -> int:
    """This process's rank as the launcher told it, without initialising MPI (0 when not launched)."""
    for name in RANK_ENV_VARS:
        value = os.environ.get(name)
        if value and value.isdigit():
            return int(value)
    return 0


class Parser(argparse.ArgumentParser):
    """argparse with one-sentence errors (no usage block): 'fdcr-mpi: error: ... (see --help)'."""

    def error(self, message: str) -> None:  # type: ignore[override]
        if env_rank() == 0:
            sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="fdcr-mpi", description="Backdoor attacks and defenses in federated learning, on MPI (FDCR).")
    p.add_argument("--version", action="version", version=f"fdcr-mpi {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run (or resume) an experiment")
    run.add_argument("items", nargs="*", metavar="CONFIG|key=value",
                     help="an optional YAML config file, then dotted overrides (data.beta=0.3)")
    run.add_argument("--out", type=Path, help="run directory (default: runs/<config hash>)")
    run.add_argument("--data-root", help="dataset root (else data.root, $FDCR_DATA, ./data)")
    run.add_argument("--restart", action="store_true", help="discard an existing run in --out and start over")
    run.add_argument("--transport", choices=("auto", "local", "mpi"), default="auto")
    run.add_argument("--quiet", action="store_true", help="print only the final sha256")
    run.add_argument("--sweep", type=Path, help="run one run of this sweep file (with --index)")
    run.add_argument("--index", type=int, help="the run's index in the sweep (e.g. $SLURM_ARRAY_TASK_ID)")
    run.add_argument("--allow-numerics-change", action="store_true", help=NUMERICS_HELP)
    run.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                     help="a module or .py file with your own defenses or attacks (docs/PLUGINS.md); repeatable")

    resume = sub.add_parser("resume", help="resume the run in DIR from its last checkpoint")
    resume.add_argument("dir", type=Path)
    resume.add_argument("--data-root")
    resume.add_argument("--transport", choices=("auto", "local", "mpi"), default="auto")
    resume.add_argument("--quiet", action="store_true")
    resume.add_argument("--allow-numerics-change", action="store_true", help=NUMERICS_HELP)
    resume.add_argument("--rounds", type=int, metavar="N",
                        help="extend the run to N rounds (more than it planned); it ends as a fresh run of N rounds")

    inspect = sub.add_parser("inspect", help="summarise the run in DIR")
    inspect.add_argument("dir", type=Path)

    lst = sub.add_parser("list", help="list defenses, attacks, datasets or models")
    lst.add_argument("what", choices=("defenses", "attacks", "datasets", "models"))
    lst.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                     help="also list what this module or .py file registers; repeatable")

    from fdcr_mpi.cli import sweep, workbench

    workbench.register(sub)
    sweep.register(sub)
    return p


def split_items(items: list[str]) -> tuple[str | None, list[str]]:
    """(config file, overrides): the first item is the file unless it is an override."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def cmd_run(args: argparse.Namespace) -> int:
    from fdcr_mpi.config import config_hash, load_config
    from fdcr_mpi.runtime.driver import execute

    path, overrides = split_items(args.items)
    if args.sweep is not None or args.index is not None:
        from fdcr_mpi.cli.sweep import sweep_run

        if args.sweep is None or args.index is None:
            raise UserError("--sweep and --index go together: fdcr-mpi run --sweep FILE --index I")
        if path is not None:
            raise UserError(f"fdcr-mpi run --sweep takes no config file ({path}): the sweep file names its base "
                            "config; only key=value overrides may follow")
        path, sweep_overrides, sweep_out = sweep_run(args.sweep, args.index)
        overrides = [*sweep_overrides, *overrides]
        args.out = args.out or sweep_out
    if args.data_root:
        overrides = [*overrides, f"data.root={args.data_root}"]
    if args.plugin:  # imported before the config is checked, and kept in it for resume
        from fdcr_mpi.plugins import import_plugins

        import_plugins(args.plugin)
    config = load_config(path, overrides, warn_unused=args.sweep is None)
    if args.plugin:
        config.plugins = [*config.plugins, *(p for p in args.plugin if p not in config.plugins)]
    out = args.out or Path("runs") / config_hash(config)
    return execute(config, out, restart=args.restart, transport_kind=args.transport, quiet=args.quiet,
                   allow_numerics_change=args.allow_numerics_change)


def cmd_resume(args: argparse.Namespace) -> int:
    from fdcr_mpi.runtime.driver import RUN_FILE, execute

    def stored_config() -> BaseConfig:  # read by rank 0 alone, which shares it with the other ranks
        path = args.dir / RUN_FILE
        if not path.is_file():
            raise UserError(f"{args.dir} holds no run to resume (no {RUN_FILE})")
        config = stored_run_config(path)
        if args.rounds is not None:
            from fdcr_mpi.runtime.extension import extended_config
            from fdcr_mpi.store import read_summary

            config = extended_config(config, args.rounds, read_summary(path)["rounds_done"], str(args.dir))
        if args.data_root:
            config.data.root = args.data_root
        return config

    return execute(stored_config, args.dir, transport_kind=args.transport, quiet=args.quiet,
                   allow_numerics_change=args.allow_numerics_change, extend=args.rounds is not None)


def stored_run_config(path: Path) -> BaseConfig:
    """The config a run file holds, checked against the hash stored beside it."""
    from fdcr_mpi.config import config_hash, from_yaml
    from fdcr_mpi.store import read_summary

    summary = read_summary(path)
    try:
        config = from_yaml(summary["config"])
    except UserError as exc:
        raise UserError(f"the config stored in {path} is not valid ({exc}); the file is damaged or was "
                        "written by another version of fdcr-mpi") from None
    if config_hash(config) != summary["config_hash"]:
        raise UserError(f"the config stored in {path} does not match the hash stored with it; the file is "
                        "damaged or was written by another version of fdcr-mpi")
    return config


def cmd_inspect(args: argparse.Namespace) -> int:
    from fdcr_mpi.runtime.driver import RUN_FILE
    from fdcr_mpi.store import format_summary, read_summary

    path = args.dir / RUN_FILE
    if not path.is_file():
        raise UserError(f"{args.dir} holds no run file ({RUN_FILE})")
    print(format_summary(read_summary(path)))
    from fdcr_mpi.runtime.sentinel import read_failure

    if (failure := read_failure(args.dir)) is not None:
        print(f"\nlast failure: {failure.removeprefix('fdcr-mpi: ')}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from fdcr_mpi.plugins import import_plugins

    import_plugins(args.plugin)
    if args.what in ("defenses", "attacks"):
        from fdcr_mpi import attacks, defenses

        registry = defenses.available() if args.what == "defenses" else attacks.available()
        if args.what == "defenses":
            from fdcr_mpi.reference import paper_methods

            print("(* the paper's Table 4)")
            marked = set(paper_methods())
            for name, cls in registry.items():
                print(f"{'*' if name in marked else ' '} {name:18s} {cls.summary}")
        else:
            for name, cls in registry.items():
                print(f"{name:16s} {cls.summary}")
    elif args.what == "datasets":
        from fdcr_mpi.data.datasets import SPECS

        for name in SPECS:
            print(name)
    else:
        from fdcr_mpi.models import MODELS

        for name in MODELS:
            print(name)
    return 0


COMMANDS = {"run": cmd_run, "resume": cmd_resume, "inspect": cmd_inspect, "list": cmd_list}


def dispatch(args: argparse.Namespace) -> int:
    if args.command in COMMANDS:
        return COMMANDS[args.command](args)
    return args.handler(args)  # commands registered by fdcr_mpi.cli.sweep


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message=".*pynndescent.*")
    p = parser()
    args, extra = p.parse_known_args(argv)
    if extra and (args.command != "run" or any(item.startswith("-") for item in extra)):
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.items = [*args.items, *extra]  # overrides may follow the options
    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_warning
            code = dispatch(args)
        sys.stdout.flush()  # here, so that a closed pipe is caught below and not at exit
        return code
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)  # what is still buffered goes nowhere, silently
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return BROKEN_PIPE_EXIT
    except UserError as exc:
        if env_rank() == 0:
            print(f"fdcr-mpi: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except Preempted as exc:
        if env_rank() == 0:
            print(f"fdcr-mpi: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: object = None, line: str | None = None) -> None:
    """Warnings as one line on stderr (rank 0 only), without the source line Python adds."""
    if env_rank() == 0:
        text = str(message).strip().splitlines()
        sys.stderr.write(f"fdcr-mpi: warning: {text[0] if text else category.__name__}\n")


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
