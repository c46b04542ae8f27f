"""``fdcr-mpi compare`` (runs side by side) and ``fdcr-mpi config`` (the resolved config, or a
defense's options)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fdcr_mpi.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    """Add the compare and config subcommands to the ``fdcr-mpi`` parser."""
    compare = sub.add_parser("compare", help="several runs' final figures side by side (and --plot their rounds)")
    compare.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="run directories or folders of runs")
    compare.add_argument("--plot", type=Path, metavar="FILE", help="also draw A and R_paper per round into this PNG")
    compare.set_defaults(handler=cmd_compare)

    config = sub.add_parser("config", help="print the resolved config of CONFIG and overrides (what run would use)")
    config.add_argument("items", nargs="*", metavar="CONFIG|key=value",
                        help="an optional YAML config file, then dotted overrides (data.beta=0.3)")
    config.add_argument("--options", metavar="DEFENSE", help="print only this defense's options and their defaults")
    config.add_argument("--hash", action="store_true", help="print only the config hash (the default run directory)")
    config.set_defaults(handler=cmd_config)


def cmd_compare(args: argparse.Namespace) -> int:
    from fdcr_mpi.analysis.compare import compare_dirs

    print(compare_dirs(args.dirs, plot=args.plot), end="")
    if args.plot is not None:
        print(f"figure: {args.plot}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from fdcr_mpi.cli.main import split_items
    from fdcr_mpi.config import config_hash, load_config, to_yaml

    if args.options is not None:
        print(defense_options(args.options), end="")
        return 0
    path, overrides = split_items(args.items)
    config = load_config(path, overrides)
    print(config_hash(config) if args.hash else to_yaml(config), end="" if not args.hash else "\n")
    return 0


def defense_options(name: str) -> str:
    """A defense's options with their defaults and descriptions, as YAML-like lines."""
    from fdcr_mpi import defenses

    registry = defenses.available()
    if name not in registry:
        raise UserError(f"no defense {name!r}; choose one of: {', '.join(registry)}")
    cls = registry[name]
    lines = [f"# {name}: {cls.summary}"]
    fields = cls.Options.model_fields
    if not fields:
        lines.append(f"# ({name} has no options)")
    for key, field in fields.items():
        note = f"  # {field.description}" if field.description else ""
        lines.append(f"{name}.{key}: {field.default!r}{note}")
    return "\n".join(lines) + "\n"
