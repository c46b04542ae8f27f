"""``python -m fdcr_mpi`` is ``fdcr-mpi``."""

from fdcr_mpi.cli import entry

entry()
