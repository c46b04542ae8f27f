"""Run files as pandas DataFrames: ``fdcr_mpi.load_run`` and ``fdcr_mpi.load_sweep``.

pandas is an optional extra (``pip install 'fdcr_mpi[analysis]'``, which ``make install``
includes); nothing else in the package needs it.

- ``load_run(dir)``: one row per round, indexed by ``round`` counted from 1 as the console and
  the plots count it (run.h5 stores it from 0). A per-client column ``removed`` of K clients
  becomes ``removed[0]`` ... ``removed[K-1]``. ``frame.attrs`` holds the run's flattened config,
  status, run file and attacker ids.
- ``load_sweep(dir)``: one row per run below ``dir`` (a sweep's out root or any folder of run
  directories): the run directory, status and rounds done, the config keys that differ between
  the runs (the sweep's axes, seed included), and each run's final A, R, V, R_paper, V_paper (mean
  of its last ``eval.final_rounds`` rounds) and mean TPR / FPR over its rounds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fdcr_mpi.analysis.report import (
    METRICS,
    SEED_KEY,
    RunRecord,
    find_run_files,
    load_record,
    read_records,
    varying_keys,
)
from fdcr_mpi.errors import UserError

if TYPE_CHECKING:
    import pandas as pd


def _pandas() -> Any:
    try:
        import pandas
    except ImportError:
        raise UserError("load_run and load_sweep need pandas: pip install 'fdcr_mpi[analysis]'") from None
    return pandas


def round_columns(rounds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The /rounds columns as 1-D columns: a (rounds, K) column becomes K columns ``name[k]``."""
    columns: dict[str, np.ndarray] = {}
    for name, values in rounds.items():
        if name == "round":
            continue
        if values.ndim == 1:
            columns[name] = values
        else:
            flat = values.reshape(values.shape[0], -1)
            columns.update({f"{name}[{k}]": flat[:, k] for k in range(flat.shape[1])})
    return columns


def load_run(run_dir: str | Path) -> pd.DataFrame:
    """One row per round of the run in ``run_dir`` (or of that run.h5), indexed by round from 1."""
    pandas = _pandas()
    paths = find_run_files([Path(run_dir)])
    if len(paths) != 1:
        raise UserError(f"{run_dir} holds {len(paths)} runs; load_run reads one (load_sweep reads many)")
    record = load_record(paths[0])
    rounds = record.rounds.get("round", np.zeros(0, np.int64))
    frame = pandas.DataFrame(round_columns(record.rounds),
                             index=pandas.Index(np.asarray(rounds, np.int64) + 1, name="round"))
    frame.attrs.update(config=dict(record.config), status=record.status, path=str(record.path),
                       attackers=np.flatnonzero(record.malicious).tolist())
    return frame


def summary_row(record: RunRecord, axes: Sequence[str], root: Path) -> dict[str, Any]:
    """One run's row of ``load_sweep``: where it is, how far it got, its axes and its figures."""
    run = record.path.parent
    rows = len(record.rounds.get("round", ()))
    row: dict[str, Any] = {"run": str(run.relative_to(root)) if run.is_relative_to(root) else str(run),
                           "status": "complete" if record.complete else record.status, "rounds_done": rows}
    row.update({key: record.config.get(key) for key in axes})
    row.update({metric: record.final.get(metric, math.nan) for metric in METRICS})
    for rate in ("tpr", "fpr"):
        values = np.asarray(record.rounds.get(rate, np.zeros(0)), np.float64)
        row[rate] = float(np.nanmean(values)) if np.isfinite(values).any() else math.nan
    return row


def sweep_axes(records: Sequence[RunRecord]) -> list[str]:
    """The config keys that differ between the runs, seed last when it differs."""
    seeds = {repr(r.config.get(SEED_KEY)) for r in records}
    return [*varying_keys(records), *([SEED_KEY] if len(seeds) > 1 else [])]


def load_sweep(root: str | Path) -> pd.DataFrame:
    """One row per run found below ``root`` (finished or not), with its axes and final figures."""
    pandas = _pandas()
    root = Path(root)
    records = read_records([root])
    axes = sweep_axes(records)
    base = root.resolve() if root.is_dir() else root.resolve().parent
    frame = pandas.DataFrame([summary_row(r, axes, base) for r in records])
    frame.attrs["axes"] = axes
    return frame
