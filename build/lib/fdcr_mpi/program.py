"""How to type this program again, for the commands that messages suggest ("resume with: ...")."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

NAME = "fdcr-mpi"


def program() -> str:
    """``fdcr-mpi`` where that name on PATH is this program; else the path it was started by
    (``.venv/bin/fdcr-mpi`` after ``make run``), or ``<python> -m fdcr_mpi``."""
    started = sys.argv[0] if sys.argv and sys.argv[0] else ""
    if Path(started).name != NAME:
        return f"{sys.executable} -m fdcr_mpi"
    found = shutil.which(NAME)
    if found is not None and os.path.realpath(found) == os.path.realpath(started):
        return NAME
    return started


def resume_command(out: Path | str) -> str:
    """The command that resumes the run in ``out``, as it can be typed in the current directory."""
    return f"{program()} resume {out}"
