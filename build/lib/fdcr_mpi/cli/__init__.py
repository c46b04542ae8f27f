"""The command line: ``main`` (run, resume, inspect, list) and ``sweep`` (sweep, report, plot)."""

from fdcr_mpi.cli.main import entry, env_rank, main

__all__ = ["entry", "env_rank", "main"]
