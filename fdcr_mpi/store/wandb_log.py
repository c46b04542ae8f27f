"""Weights & Biases in offline mode (``runtime.wandb: true``), written by rank 0 beside run.h5.

Compute nodes are often offline, so the run is written in W&B's offline mode into
``<out>/wandb/offline-run-<time>-<id>/`` and uploaded later from a machine online with
``wandb sync <out>/wandb/offline-run-*``. Each round is logged at step ``round + 1`` with the
same names as the TensorBoard events (``store.tensorboard``): ``metrics/*``, ``detection/*``,
``seconds/*``, a histogram ``clients/<name>`` of each per-client column and, with at most
``PER_CLIENT_SCALARS`` clients, ``clients/<name>/<k>``. The resolved config is the W&B config.

The W&B run id is fixed for the run directory (its first config hash and creation time), so
every attempt of a resumed run (each its own offline directory) syncs into one W&B run; the
rounds an attempt computes again after its checkpoint are the same numbers as before (results
depend on the config alone). The ``wandb`` package is the ``wandb`` extra: asked for without
it is one sentence before any work; a failure while writing is one warning, and the run goes
on (run.h5 is the record).
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from fdcr_mpi.errors import UserError
from fdcr_mpi.store.tensorboard import PER_CLIENT_SCALARS, per_client_of, scalars_of

WANDB_DIR = "wandb"


class WandbWarning(UserWarning):
    """The run's W&B log could not be written (the run goes on without it)."""


def run_id(first_hash: str, created: str) -> str:
    """The W&B run id of a run directory: its first config hash and its creation time (digits)."""
    return f"{first_hash}-{re.sub(r'[^0-9]', '', created)[:14]}"


def wandb_row(row: dict[str, Any], histogram: Any) -> dict[str, Any]:
    """The round's row as W&B values: finite scalars by tag, per-client histograms and scalars."""
    data: dict[str, Any] = {tag: value for tag, value in scalars_of(row).items() if math.isfinite(value)}
    for name, values in per_client_of(row).items():
        finite = values[np.isfinite(values)]
        if finite.size:
            data[f"clients/{name}"] = histogram(np_histogram=np.histogram(finite))
        if values.size <= PER_CLIENT_SCALARS:
            data.update({f"clients/{name}/{k:03d}": float(values[k]) for k in np.flatnonzero(np.isfinite(values))})
    return data


def import_wandb() -> Any:
    """The ``wandb`` module; without it, one sentence (``runtime.wandb`` asked for it)."""
    try:
        import wandb
    except ImportError:
        raise UserError("runtime.wandb is true but the wandb package is not installed; "
                        "pip install 'fdcr_mpi[wandb]', or set runtime.wandb=false") from None
    return wandb


class WandbLog:
    """Rank 0's offline W&B run; every method is a no-op once writing has failed."""

    def __init__(self, out: Path, config: dict[str, Any], run_id: str, project: str) -> None:
        wandb = import_wandb()
        self.wandb: Any = wandb
        self.run: Any = None
        try:
            (out / WANDB_DIR).mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(mode="offline", dir=str(out), project=project, name=out.name, id=run_id,
                                  resume="allow", config=config,
                                  settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))
        except Exception as exc:  # noqa: BLE001 - W&B is a view of the run file: never fatal
            self._give_up(f"wandb.init failed ({exc})")

    def _give_up(self, why: str) -> None:
        warnings.warn(f"no W&B log for this run: {why}; run.h5 has every figure", WandbWarning, stacklevel=3)
        self.run = None

    def write(self, row: dict[str, Any]) -> None:
        """The round's row at step ``row['round'] + 1``."""
        if self.run is None:
            return
        try:
            self.run.log(wandb_row(row, self.wandb.Histogram), step=int(row["round"]) + 1)
        except Exception as exc:  # noqa: BLE001
            self._give_up(f"writing failed ({exc})")

    def close(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as exc:  # noqa: BLE001
                self._give_up(f"closing failed ({exc})")
            self.run = None
