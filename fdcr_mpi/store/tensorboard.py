"""TensorBoard event files of a run, written by rank 0 beside run.h5 (``<out>/tensorboard``).

``runtime.tensorboard: true`` (the default) writes, at the step of each round counted from 1:

- ``metrics/A``, ``metrics/R``, ``metrics/R_paper``, ``metrics/V``, ``metrics/V_paper``,
  ``metrics/asr``, ``metrics/asr_incl_target``, every other scalar of the row (a defense's
  diagnostics);
- ``detection/tpr``, ``detection/fpr``, ``detection/removed`` (how many clients were removed);
- ``seconds/<phase>`` (round, train, fisher, gather, defend, evaluate, write, ...);
- each per-client column (``alpha_hat``, ``removed``, ``train_loss``, a defense's
  ``discrepancy``, ...) as a histogram ``clients/<name>``, and, with at most
  ``PER_CLIENT_SCALARS`` clients, as one scalar per client ``clients/<name>/<k>``.

The run file stays the record: TensorBoard is a view of it, so a failure to write events (no
``tensorboard`` package, a full disk) is one warning and the run goes on without them. On
resume the writer purges the steps after the checkpoint, so a round computed again appears once.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

EVENTS_DIR = "tensorboard"
PER_CLIENT_SCALARS = 64
DETECTION = ("tpr", "fpr")


class TensorBoardWarning(UserWarning):
    """The run's TensorBoard events could not be written (the run goes on without them)."""


def tag_of(name: str) -> str:
    """The TensorBoard tag of a scalar column of the run file."""
    if name.startswith("seconds_"):
        return f"seconds/{name.removeprefix('seconds_')}"
    return f"detection/{name}" if name in DETECTION else f"metrics/{name}"


def scalars_of(row: dict[str, Any]) -> dict[str, float]:
    """The row's scalars by tag (``round`` is the step, not a scalar)."""
    scalars = {}
    for name, value in row.items():
        array = np.asarray(value)
        if name != "round" and array.ndim == 0 and array.dtype.kind in "biuf":
            scalars[tag_of(name)] = float(array)
    if "removed" in row:
        scalars["detection/removed"] = float(np.sum(np.asarray(row["removed"], bool)))
    return scalars


def per_client_of(row: dict[str, Any]) -> dict[str, np.ndarray]:
    """The row's per-client columns (numbers or booleans, one entry per client) by name."""
    arrays = {name: np.asarray(value) for name, value in row.items()}
    return {name: array.astype(np.float64) for name, array in arrays.items()
            if array.ndim == 1 and array.dtype.kind in "biuf"}


class TensorBoardLog:
    """Rank 0's event writer; every method is a no-op once writing has failed."""

    def __init__(self, out: Path, first_step: int) -> None:
        """Open ``<out>/tensorboard``; steps from ``first_step`` on, written before, are purged."""
        self.writer: Any = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out / EVENTS_DIR), purge_step=first_step if first_step > 1 else None)
        except (ImportError, ModuleNotFoundError):
            self._give_up("the tensorboard package is not installed (pip install tensorboard)")
        except OSError as exc:
            self._give_up(f"cannot write {out / EVENTS_DIR}: {exc.strerror or exc}")

    def _give_up(self, why: str) -> None:
        warnings.warn(f"no TensorBoard events for this run: {why}; run.h5 has every figure",
                      TensorBoardWarning, stacklevel=3)
        self.writer = None

    def write(self, row: dict[str, Any]) -> None:
        """The round's row at step ``row['round'] + 1``."""
        if self.writer is None:
            return
        step = int(row["round"]) + 1
        try:
            for tag, value in scalars_of(row).items():
                if math.isfinite(value):
                    self.writer.add_scalar(tag, value, step)
            for name, values in per_client_of(row).items():
                finite = values[np.isfinite(values)]
                if finite.size:
                    self.writer.add_histogram(f"clients/{name}", finite, step)
                if values.size <= PER_CLIENT_SCALARS:
                    for k in np.flatnonzero(np.isfinite(values)):
                        self.writer.add_scalar(f"clients/{name}/{k:03d}", float(values[k]), step)
            self.writer.flush()
        except OSError as exc:
            self._give_up(f"writing failed ({exc.strerror or exc})")

    def close(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except OSError:
                pass
            self.writer = None
