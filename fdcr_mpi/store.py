"""The HDF5 run file (DIR/run.h5): config, ground truth, one row per round, optional weights.

Layout (see docs/RUNFILE.md)::

    run.h5  attrs: format, format_version, config (YAML), config_hash, version, status,
                   created, updated, num_clients, num_params, [final_sha256, ...]
      /clients/sizes (K,) int64, malicious (K,) bool,
               partition_indices (N,) int64, partition_offsets (K+1,) int64
      /rounds/<name>  (n,) or (n, K) extendable, one row per round; always a ``round`` column
      /global/weights (n, D) float32 and /global/round (n,) int64, when saved

Rows are flushed and fsynced after every round, so a preempted job leaves a readable file.
Checkpoints and the run lock live in ``fdcr_mpi.checkpoint`` and are re-exported here.
Only rank 0 calls this module.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np

from fdcr_mpi.checkpoint import (
    Checkpoint,
    CheckpointWarning,
    RunLock,
    checkpoint_path,
    fsync_path,
    list_checkpoints,
    load_latest_checkpoint,
    open_h5,
    reason,
    write_checkpoint,
)
from fdcr_mpi.errors import UserError

__all__ = [
    "RUN_FILE",
    "STATUSES",
    "Checkpoint",
    "CheckpointWarning",
    "RunFile",
    "RunLock",
    "checkpoint_path",
    "format_summary",
    "list_checkpoints",
    "load_latest_checkpoint",
    "read_rounds",
    "read_summary",
    "write_checkpoint",
]

RUN_FILE = "run.h5"
FORMAT = "fdcr_mpi.run"
FORMAT_VERSION = 1
STATUSES = ("running", "complete", "failed", "preempted")
FINAL_WINDOW = 5

# Column dtypes, in promotion order.
_BOOL, _INT, _FLOAT = np.dtype(bool), np.dtype(np.int64), np.dtype(np.float64)
_RANK = {_BOOL: 0, _INT: 1, _FLOAT: 2}


def _fill(dtype: np.dtype) -> Any:
    """The value that stands for "no value this round": False, -1 or NaN."""
    return {"b": False, "i": -1, "u": 0, "f": np.nan}.get(np.dtype(dtype).kind, 0)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _column_value(name: str, value: Any) -> np.ndarray:
    """``value`` as an array of one of the three column dtypes (bool, int64, float64)."""
    arr = np.asarray(value)
    kind = arr.dtype.kind
    if kind == "b":
        return arr.astype(_BOOL, copy=False)
    if kind in "iu":
        return arr.astype(_INT)
    if kind == "f":
        return arr.astype(_FLOAT)
    raise ValueError(f"round column {name!r} must be a number, bool or numeric array, got {arr.dtype}")


def _chunk_rows(row_shape: tuple[int, ...], itemsize: int) -> int:
    """Rows per chunk: about 16 KiB, between 1 and 256 rows."""
    row_bytes = itemsize * int(np.prod(row_shape, dtype=np.int64)) or 1
    return max(1, min(256, 16384 // row_bytes))


def _extendable(group: h5py.Group, name: str, rows: int, row_shape: tuple[int, ...], dtype: np.dtype) -> h5py.Dataset:
    """A new (rows, *row_shape) dataset, unlimited along axis 0, pre-filled with the dtype's fill."""
    return group.create_dataset(
        name,
        shape=(rows, *row_shape),
        maxshape=(None, *row_shape),
        dtype=dtype,
        chunks=(_chunk_rows(row_shape, dtype.itemsize), *row_shape),
        fillvalue=_fill(dtype),
    )


class RunFile:
    """An open run file (append mode). Create with ``RunFile.create``, reopen with ``RunFile.open``."""

    def __init__(self, path: Path, file: h5py.File) -> None:
        self.path = path
        self.file = file

    # ------------------------------------------------------------------ create / open

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        config_yaml: str,
        config_hash: str,
        version: str,
        num_clients: int,
        sizes: np.ndarray,
        malicious: np.ndarray,
        partition: list[np.ndarray],
        num_params: int,
        overwrite: bool = False,
    ) -> RunFile:
        """Write a new run file (temporary name, fsync, rename) and open it for appending.

        An existing file is a UserError unless ``overwrite``.
        """
        path = Path(path)
        if path.exists() and not overwrite:
            raise UserError(
                f"{path.name} already exists in {path.parent}; resume that run, or use a new --out "
                "directory (or --restart to overwrite it)"
            )
        clients = _clients_arrays(num_clients, sizes, malicious, partition)
        attrs = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": config_yaml,
            "config_hash": config_hash,
            "version": version,
            "status": "running",
            "created": _now(),
            "updated": _now(),
            "num_clients": int(num_clients),
            "num_params": int(num_params),
        }
        tmp: Path | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            tmp = Path(name)
            _write_new(tmp, attrs, clients)
            os.replace(tmp, path)
            tmp = None
            fsync_path(path.parent)
        except OSError as exc:
            raise UserError(f"could not create {path}: {reason(exc)}") from exc
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        return cls.open(path, config_hash)

    @classmethod
    def open(cls, path: str | os.PathLike[str], config_hash: str | None = None) -> RunFile:
        """Open an existing run file for appending; UserError if unreadable or of another config."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"there is no run file {path}")
        try:
            file = open_h5(path, "r+")
        except OSError as exc:
            raise UserError(f"could not open {path}: it is unreadable or corrupt ({reason(exc)})") from exc
        try:
            stored = _stored_hash(path, file)
            if config_hash is not None and stored != config_hash:
                raise UserError(
                    f"{path.name} in {path.parent} belongs to another config (hash {stored}); "
                    "use a new --out directory or the same config"
                )
            run = cls(path, file)
            run._repair()
        except BaseException:
            file.close()
            raise
        return run

    # ------------------------------------------------------------------ rounds

    @property
    def config_hash(self) -> str:
        return str(self.file.attrs["config_hash"])

    def _rounds(self) -> h5py.Group:
        return self.file.require_group("rounds")

    def rounds_done(self) -> int:
        """Number of rows in /rounds."""
        lengths = [ds.shape[0] for ds in self._rounds().values()]
        return min(lengths) if lengths else 0

    def last_round(self) -> int | None:
        """The ``round`` value of the last row, or None when there is none."""
        n = self.rounds_done()
        return int(self._rounds()["round"][n - 1]) if n and "round" in self._rounds() else None

    def append_round(self, row: Mapping[str, Any]) -> None:
        """Append one row: scalars go to (n,) columns, (K,) vectors to (n, K) columns.

        A new key gets a column back-filled with NaN / -1 / False; a key missing from this
        row gets that fill. An int column that receives a float (or a bool column an int) is
        widened. Without a ``round`` key the row gets the previous round + 1 (0 at first).
        The row is flushed and fsynced before returning.
        """
        values = {str(k): _column_value(str(k), v) for k, v in row.items()}
        if "round" not in values:
            last = self.last_round()
            values["round"] = np.asarray(0 if last is None else last + 1, dtype=_INT)
        self._check_row(values)
        group, n = self._rounds(), self.rounds_done()
        try:
            for name, value in values.items():
                self._prepare_column(group, name, value, n)
            for name, ds in group.items():
                ds.resize(n + 1, axis=0)
                # explicit fill: a chunk cut by truncate_rounds may still hold the old row
                ds[n] = values[name].astype(ds.dtype, copy=False) if name in values else _fill(ds.dtype)
            self.file.attrs["updated"] = _now()
            self.flush()
        except OSError as exc:
            raise UserError(f"could not write round to {self.path}: {reason(exc)}") from exc

    def set_last(self, name: str, value: float) -> None:
        """Overwrite column ``name`` of the newest row (e.g. a duration known only after the append)."""
        try:
            self._rounds()[name][self.rounds_done() - 1] = value
            self.flush()
        except OSError as exc:
            raise UserError(f"could not write round to {self.path}: {reason(exc)}") from exc

    def _check_row(self, values: dict[str, np.ndarray]) -> None:
        """ValueError before anything is written: bad names, shapes that differ from the column."""
        group = self._rounds()
        for name, value in values.items():
            if not name or "/" in name or name == ".":
                raise ValueError(f"invalid round column name {name!r}")
            if name in group and group[name].shape[1:] != value.shape:
                raise ValueError(
                    f"round column {name!r} has rows of shape {group[name].shape[1:]}, got {value.shape}"
                )
        if values["round"].shape != () or values["round"].dtype != _INT:
            raise ValueError(f"the round column must be an integer scalar, got {values['round']!r}")

    @staticmethod
    def _prepare_column(group: h5py.Group, name: str, value: np.ndarray, rows: int) -> None:
        """Create the column (back-filled) or widen its dtype so that ``value`` fits."""
        if name not in group:
            _extendable(group, name, rows, value.shape, value.dtype)
            return
        old = group[name]
        if _RANK.get(old.dtype, 2) >= _RANK[value.dtype]:
            return
        data = old[:rows].astype(value.dtype)
        del group[name]
        _extendable(group, name, rows, value.shape, value.dtype)[:rows] = data

    def truncate_rounds(self, n: int) -> None:
        """Keep the first ``n`` rows of every /rounds column (and /global rows up to that round)."""
        if n < 0:
            raise ValueError(f"cannot truncate to {n} rows")
        for ds in self._rounds().values():
            if ds.shape[0] > n:
                ds.resize(n, axis=0)
        self._truncate_global(self.last_round())
        self.flush()

    def truncate_after(self, round_: int) -> None:
        """Drop every row whose ``round`` is greater than ``round_`` (resume from that checkpoint)."""
        group = self._rounds()
        if "round" not in group:
            return
        rounds = group["round"][: self.rounds_done()]
        later = np.flatnonzero(rounds > round_)
        self.truncate_rounds(int(later[0]) if later.size else len(rounds))

    # ------------------------------------------------------------------ global weights

    def save_global_weights(self, round: int, weights: np.ndarray) -> None:
        """Append the global model of ``round`` to /global/weights (float32) and /global/round."""
        w = np.asarray(weights, dtype=np.float32).reshape(-1)
        group = self.file.require_group("global")
        if "weights" not in group:
            group.create_dataset("weights", shape=(0, w.size), maxshape=(None, w.size), dtype=np.float32,
                                 chunks=(1, max(w.size, 1)))
            _extendable(group, "round", 0, (), _INT)
        ws, rs = group["weights"], group["round"]
        if ws.shape[1] != w.size:
            raise ValueError(f"global weights have {ws.shape[1]} parameters, got {w.size}")
        n = min(ws.shape[0], rs.shape[0])
        try:
            ws.resize(n + 1, axis=0)
            rs.resize(n + 1, axis=0)
            ws[n] = w
            rs[n] = int(round)
            self.flush()
        except OSError as exc:
            raise UserError(f"could not write global weights to {self.path}: {reason(exc)}") from exc

    def _truncate_global(self, last: int | None) -> None:
        """Drop /global rows of rounds after ``last`` (all of them when None)."""
        if "global" not in self.file or "round" not in self.file["global"]:
            return
        group = self.file["global"]
        rounds = group["round"][()]
        later = np.flatnonzero(rounds > last) if last is not None else np.arange(rounds.size)
        keep = int(later[0]) if later.size else rounds.size
        for ds in group.values():
            if ds.shape[0] > keep:
                ds.resize(keep, axis=0)

    # ------------------------------------------------------------------ attributes, lifecycle

    def set_status(self, status: str) -> None:
        """Set the ``status`` attribute (running, complete, failed, preempted) and flush."""
        if status not in STATUSES:
            raise ValueError(f"unknown run status {status!r}; choose one of {', '.join(STATUSES)}")
        self.set_attr("status", status)

    def set_attr(self, name: str, value: Any) -> None:
        """Set a root attribute (e.g. ``final_sha256``) and flush."""
        try:
            self.file.attrs[name] = value
            self.file.attrs["updated"] = _now()
            self.flush()
        except OSError as exc:
            raise UserError(f"could not write to {self.path}: {reason(exc)}") from exc

    def partition(self) -> list[np.ndarray]:
        """The per-client sample indices stored at creation."""
        return _split_partition(self.file["clients"])

    def flush(self) -> None:
        """Flush HDF5's buffers and fsync the file, so a killed job leaves every written round."""
        self.file.flush()
        handle = self.file.id.get_vfd_handle()
        if isinstance(handle, int) and handle >= 0:
            os.fsync(handle)

    def close(self) -> None:
        """Flush and close (idempotent)."""
        if self.file.id.valid:
            try:
                self.flush()
            finally:
                self.file.close()

    def _repair(self) -> None:
        """Cut columns to a common length (a job killed inside ``append_round`` leaves them uneven)."""
        group = self._rounds()
        n = self.rounds_done()
        uneven = [ds for ds in group.values() if ds.shape[0] != n]
        for ds in uneven:
            ds.resize(n, axis=0)
        if uneven:
            warnings.warn(f"{self.path}: cut a partly written round (kept {n} rounds)", RuntimeWarning, stacklevel=3)
        if "global" in self.file:
            glob = self.file["global"]
            m = min((ds.shape[0] for ds in glob.values()), default=0)
            for ds in glob.values():
                ds.resize(m, axis=0)
        self.flush()

    def __enter__(self) -> RunFile:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# ----------------------------------------------------------------------------- creation helpers


def _clients_arrays(
    num_clients: int, sizes: np.ndarray, malicious: np.ndarray, partition: list[np.ndarray]
) -> dict[str, np.ndarray]:
    """The /clients datasets, checked against ``num_clients``."""
    sizes_a = np.asarray(sizes, dtype=np.int64).reshape(-1)
    mal = np.asarray(malicious, dtype=bool).reshape(-1)
    parts = [np.asarray(p, dtype=np.int64).reshape(-1) for p in partition]
    for what, count in (("sizes", sizes_a.size), ("malicious", mal.size), ("partition", len(parts))):
        if count != num_clients:
            raise ValueError(f"{what} has {count} entries for {num_clients} clients")
    offsets = np.zeros(num_clients + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([p.size for p in parts])
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return {"sizes": sizes_a, "malicious": mal, "partition_indices": flat, "partition_offsets": offsets}


def _write_new(tmp: Path, attrs: dict[str, Any], clients: dict[str, np.ndarray]) -> None:
    """Write a fresh run file at ``tmp`` and fsync it."""
    with open_h5(tmp, "w") as f:
        f.attrs.update(attrs)
        group = f.create_group("clients")
        for name, arr in clients.items():
            group.create_dataset(name, data=arr)
        f.create_group("rounds")
    fsync_path(tmp)


def _split_partition(clients: h5py.Group) -> list[np.ndarray]:
    flat = clients["partition_indices"][()]
    offsets = clients["partition_offsets"][()]
    return [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def _stored_hash(path: Path, file: h5py.File) -> str:
    if "config_hash" not in file.attrs:
        raise UserError(f"{path} is not an fdcr_mpi run file (it has no config_hash attribute)")
    return str(file.attrs["config_hash"])


# ----------------------------------------------------------------------------- reading


def _open_read(path: str | os.PathLike[str]) -> h5py.File:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"there is no run file {path}")
    try:
        return open_h5(path, "r")
    except OSError as exc:
        raise UserError(f"could not read {path}: it is unreadable or corrupt ({reason(exc)})") from exc


def _rounds_of(file: h5py.File) -> dict[str, np.ndarray]:
    if "rounds" not in file:
        return {}
    columns = {name: ds[()] for name, ds in file["rounds"].items() if isinstance(ds, h5py.Dataset)}
    n = min((c.shape[0] for c in columns.values()), default=0)
    return {name: c[:n] for name, c in columns.items()}


def read_rounds(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Every /rounds column as an array with one row per round (works on a live run too)."""
    with _open_read(path) as f:
        return _rounds_of(f)


def _mean(values: np.ndarray | None) -> float | None:
    """nan-mean of a numeric column, None when it is absent or holds no finite value."""
    if values is None or values.size == 0:
        return None
    data = np.asarray(values, dtype=np.float64)
    finite = data[np.isfinite(data)]
    return float(finite.mean()) if finite.size else None


def _attr(file: h5py.File, name: str) -> Any:
    value = file.attrs.get(name)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_summary(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What ``fdcr-mpi inspect`` shows: status, config, rounds done, final A/R/V and the paper's
    R_paper/V_paper, detection rates."""
    with _open_read(path) as f:
        rounds = _rounds_of(f)
        malicious = f["clients/malicious"][()] if "clients/malicious" in f else None
        summary = {name: _attr(f, name) for name in ("config", "config_hash", "version", "status", "created",
                                                     "updated", "num_clients", "num_params", "final_sha256")}
    n = min((c.shape[0] for c in rounds.values()), default=0)
    summary.update(
        path=str(path),
        rounds_done=n,
        last_round=int(rounds["round"][-1]) if n and "round" in rounds else None,
        num_malicious=int(np.sum(malicious)) if malicious is not None else None,
    )
    from fdcr_mpi.metrics import paper_columns  # torch: only when summarising

    columns = {**rounds, **paper_columns(rounds)}  # R_paper, V_paper (derived in older run files)
    for name in ("A", "R", "V", "R_paper", "V_paper"):
        column = columns.get(name)
        summary[f"final_{name}"] = _mean(column[-FINAL_WINDOW:]) if column is not None else None
    summary["tpr_mean"] = _mean(rounds.get("tpr"))
    summary["fpr_mean"] = _mean(rounds.get("fpr"))
    return summary


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def format_summary(summary: Mapping[str, Any], *, with_config: bool = False) -> str:
    """A few aligned lines for humans (the config text only when ``with_config``)."""
    lines = [
        ("run file", summary.get("path")),
        ("status", summary.get("status")),
        ("version", summary.get("version")),
        ("created", summary.get("created")),
        ("config hash", summary.get("config_hash")),
        ("clients", f"{summary.get('num_clients')} ({summary.get('num_malicious')} malicious)"),
        ("rounds done", f"{summary.get('rounds_done')} (last round {summary.get('last_round')})"),
        (f"final (last {FINAL_WINDOW})", "  ".join(f"{k} {_fmt(summary.get(f'final_{k}'))}" for k in "ARV")
         + "  (R: triggered images of the other classes)"),
        ("paper's metric", f"R_paper {_fmt(summary.get('final_R_paper'))}  V_paper {_fmt(summary.get('final_V_paper'))}"
         "  (R_paper: every triggered image, as the paper's tables)"),
        ("detection", f"TPR {_fmt(summary.get('tpr_mean'))}  FPR {_fmt(summary.get('fpr_mean'))} (mean over rounds)"),
    ]
    if summary.get("final_sha256"):
        lines.append(("final sha256", summary["final_sha256"]))
    width = max(len(k) for k, _ in lines)
    text = "\n".join(f"{k:<{width}}  {v}" for k, v in lines)
    if with_config and summary.get("config"):
        text += "\n\nconfig:\n" + str(summary["config"]).rstrip()
    return text
