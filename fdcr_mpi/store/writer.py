"""Writing the HDF5 run file (DIR/run.h5): config, ground truth, one row per round, optional weights.

Layout (see docs/RUNFILE.md)::

    run.h5  attrs: format, format_version, config (YAML), config_hash, version, status,
                   created, updated, num_clients, num_params, [final_sha256, extensions, ...]
      /clients/sizes (K,) int64, malicious (K,) bool,
               partition_indices (N,) int64, partition_offsets (K+1,) int64
      /rounds/<name>  (n,) or (n, K) extendable, one row per round; always a ``round`` column
      /global/weights (n, D) float32 and /global/round (n,) int64, when saved

Rows are flushed and fsynced after every round, so a preempted job leaves a readable file.
Every write first makes sure the disk can take it (``checkpoint.ensure_space``): a full disk
or quota ends in one sentence and leaves the rounds written so far readable. Opening a run to
continue it reads every object (a damaged file is one sentence, never a crash later) and
rewrites it into a fresh file, so new rows never land in damaged structures.
Checkpoints and the run lock live in ``store/checkpoint.py`` and ``store/lock.py``.
Only rank 0 calls this module.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np

from fdcr_mpi.errors import UserError
from fdcr_mpi.store.disk import (
    H5_ERRORS,
    ensure_space,
    open_h5,
    reason,
    write_atomically,
)
from fdcr_mpi.store.reader import (
    _split_partition,
    _stored_hash,
    _text,
    reading,
    stored_config,
)
from fdcr_mpi.store.schema import (
    EXTENSIONS,
    FORMAT,
    FORMAT_VERSION,
    INT,
    METADATA_BYTES,
    NO_CACHE,
    RANK,
    READ_ROWS_BYTES,
    STATUSES,
    chunk_rows,
    column_value,
    extendable,
    fill,
    now,
)


class RunFile:
    """An open run file (append mode). Create with ``RunFile.create``, reopen with ``RunFile.open``."""

    def __init__(self, path: Path, file: h5py.File) -> None:
        self.path = path
        self.file = file
        self.broken: str | None = None  # why a write failed: HDF5 cannot go on after that
        self.planned_rounds = _planned_rounds(file)

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
            "created": now(),
            "updated": now(),
            "num_clients": int(num_clients),
            "num_params": int(num_params),
        }
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            size = sum(a.nbytes for a in clients.values()) + len(config_yaml) + METADATA_BYTES
            write_atomically(path, lambda tmp: _write_new(tmp, attrs, clients), size)
        except (OSError, RuntimeError) as exc:
            raise UserError(f"could not create {path}: {reason(exc)}") from exc
        return cls._attach(path)

    @classmethod
    def open(cls, path: str | os.PathLike[str], config_hash: str | None = None) -> RunFile:
        """Open an existing run file for appending; UserError if damaged or of another config.

        Every attribute and dataset is read first (a damaged file is one sentence here, not a
        crash in a later write); then the file is rewritten into a fresh one and opened.
        """
        path = Path(path)
        if not path.is_file():
            raise UserError(f"there is no run file {path}")
        with reading(path) as file:
            stored = _stored_hash(path, file)
            if config_hash is not None and stored != config_hash:
                raise UserError(
                    f"{path.name} in {path.parent} belongs to another config (hash {stored}); "
                    "use a new --out directory or the same config"
                )
            _verify(file)
        try:
            write_atomically(path, lambda tmp: _copy_file(path, tmp), path.stat().st_size + METADATA_BYTES)
        except H5_ERRORS as exc:
            if isinstance(exc, OSError) and exc.errno:  # the disk, not the file
                raise UserError(f"could not rewrite {path} to continue the run: {reason(exc)}") from exc
            raise UserError(f"could not read {path}: it is unreadable or corrupt ({reason(exc)})") from exc
        return cls._attach(path)

    @classmethod
    def _attach(cls, path: Path) -> RunFile:
        """Open a checked run file for appending (cutting a partly written round)."""
        try:
            file = open_h5(path, "r+", **NO_CACHE)
        except (OSError, RuntimeError) as exc:
            raise UserError(f"could not open {path}: it is unreadable or corrupt ({reason(exc)})") from exc
        run = cls(path, file)
        try:
            run._repair()
        except BaseException:
            run.close()
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
        values = {str(k): column_value(str(k), v) for k, v in row.items()}
        if "round" not in values:
            last = self.last_round()
            values["round"] = np.asarray(0 if last is None else last + 1, dtype=INT)
        self._check_row(values)
        group, n = self._rounds(), self.rounds_done()

        def write() -> None:
            if self.complete:  # rounds added to a complete run: it is not complete until they are all in
                self.file.attrs["status"] = "running"
            for name, value in values.items():
                self._prepare_column(group, name, value, n)
            # ``round`` last: a write that fails part-way leaves it a row short, and opening cuts the row
            for name in sorted(group, key=lambda name: name == "round"):
                ds = group[name]
                ds.resize(n + 1, axis=0)
                # explicit fill: a chunk cut by truncate_rounds may still hold the old row
                ds[n] = values[name].astype(ds.dtype, copy=False) if name in values else fill(ds.dtype)
            self.file.attrs["updated"] = now()

        self._write("round", self._row_bytes(group, values, n), write)

    def set_last(self, name: str, value: float) -> None:
        """Overwrite column ``name`` of the newest row (e.g. a duration known only after the append)."""
        column, row = self._rounds()[name], self.rounds_done() - 1

        def write() -> None:
            column[row] = value

        self._write("round", 0, write)

    def _write(self, what: str, nbytes: int, write: Callable[[], None]) -> None:
        """Run ``write`` (HDF5 writes of about ``nbytes`` new bytes), then flush and fsync.

        The space is allocated first (``ensure_space``, which sees quotas too), so HDF5 does not
        meet a full disk; a refusal writes nothing and leaves the file as it was. Should HDF5
        fail anyway, the file is marked broken and no further write is tried: HDF5 cannot
        continue after a failed write.
        """
        where = f"could not write {what} to {self.path}"
        if self.broken is not None:
            raise UserError(f"{where}: an earlier write failed ({self.broken})")
        try:
            ensure_space(self.path.parent, nbytes + METADATA_BYTES)
        except OSError as exc:
            raise UserError(f"{where}: {reason(exc)} (it keeps the {self.rounds_done()} rounds written so far)") from exc
        try:
            write()
            self.flush()
        except H5_ERRORS as exc:
            self.broken = reason(exc)
            raise UserError(f"{where}: {self.broken}") from exc

    def _row_bytes(self, group: h5py.Group, values: Mapping[str, np.ndarray], rows: int) -> int:
        """At most how many bytes appending row ``rows`` adds: a chunk (and a B-tree entry) for
        each new column and each column whose row starts a chunk, a copy of each widened column."""
        total = 0
        for name in {*group.keys(), *values}:
            shape = values[name].shape if name in values else group[name].shape[1:]
            row = 8 * int(np.prod(shape, dtype=np.int64))  # no column dtype is wider than 8 bytes
            old = group[name] if name in group else None
            chunk = old.chunks[0] if old is not None and old.chunks else chunk_rows(shape, 8)
            widened = old is not None and name in values and RANK.get(old.dtype, 2) < RANK[values[name].dtype]
            if old is None or widened or rows % chunk == 0:
                total += chunk * row + 4096
            if widened:
                total += 2 * rows * row
        return total

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
        if values["round"].shape != () or values["round"].dtype != INT:
            raise ValueError(f"the round column must be an integer scalar, got {values['round']!r}")

    @staticmethod
    def _prepare_column(group: h5py.Group, name: str, value: np.ndarray, rows: int) -> None:
        """Create the column (back-filled) or widen its dtype so that ``value`` fits."""
        if name not in group:
            extendable(group, name, rows, value.shape, value.dtype)
            return
        old = group[name]
        if RANK.get(old.dtype, 2) >= RANK[value.dtype]:
            return
        data = old[:rows].astype(value.dtype)
        del group[name]
        extendable(group, name, rows, value.shape, value.dtype)[:rows] = data

    def truncate_rounds(self, n: int) -> None:
        """Keep the first ``n`` rows of every /rounds column (and /global rows up to that round).

        The rows of a complete run are never cut: that is a UserError (its checkpoints are gone).
        """
        if n < 0:
            raise ValueError(f"cannot truncate to {n} rows")
        done = self.rounds_done()
        if n < done and self.complete:
            raise UserError(
                f"the run in {self.path.parent} is complete ({done} rounds) but has no checkpoint of its last "
                f"round to resume from; its rows are left as they are (fdcr-mpi inspect {self.path.parent} shows them)"
            )

        def write() -> None:
            for ds in self._rounds().values():
                if ds.shape[0] > n:
                    ds.resize(n, axis=0)
            self._truncate_global(self.last_round())

        self._write("rounds", 0, write)

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
            extendable(group, "round", 0, (), INT)
        ws, rs = group["weights"], group["round"]
        if ws.shape[1] != w.size:
            raise ValueError(f"global weights have {ws.shape[1]} parameters, got {w.size}")
        n = min(ws.shape[0], rs.shape[0])

        def write() -> None:  # the round last, as in append_round
            ws.resize(n + 1, axis=0)
            ws[n] = w
            rs.resize(n + 1, axis=0)
            rs[n] = int(round)

        self._write("global weights", w.nbytes + 8 * 256 + 4096, write)

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

        def write() -> None:
            self.file.attrs[name] = value
            self.file.attrs["updated"] = now()

        self._write(f"the attribute {name}", 0, write)

    def config_yaml(self) -> str:
        """The stored config text."""
        return _text(self.file.attrs["config"])

    def extensions(self) -> list[dict[str, Any]]:
        """The run's extensions to more rounds, oldest first (``runtime.extension``)."""
        return json.loads(_text(self.file.attrs.get(EXTENSIONS, "[]")))

    def earlier_hashes(self) -> list[str]:
        """The config hashes this run had before it was extended: its checkpoints of then stay valid."""
        return [str(e["previous_config_hash"]) for e in self.extensions()]

    def extend(self, config_yaml: str, config_hash: str, record: dict[str, Any]) -> None:
        """Take the config of more rounds (one write): the config and its hash, status running, no
        final sha256, and ``record`` appended to ``extensions`` (with the hash and sha it replaces)."""
        record = {**record, "previous_config_hash": self.config_hash,
                  "previous_final_sha256": _text(self.file.attrs.get("final_sha256", ""))}
        history = json.dumps([*self.extensions(), record], sort_keys=True)

        def write() -> None:
            self.file.attrs["config"] = config_yaml
            self.file.attrs["config_hash"] = config_hash
            self.file.attrs[EXTENSIONS] = history
            self.file.attrs["status"] = "running"
            if "final_sha256" in self.file.attrs:
                del self.file.attrs["final_sha256"]
            self.file.attrs["updated"] = now()

        self._write("the extended config", len(config_yaml) + len(history), write)
        self.planned_rounds = _planned_rounds(self.file)

    @property
    def status(self) -> str:
        return _text(self.file.attrs.get("status", "running"))

    @property
    def complete(self) -> bool:
        """Status ``complete`` and (where the stored config says) every planned round present."""
        planned = self.planned_rounds
        return self.status == "complete" and (planned is None or self.rounds_done() >= planned)

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
        """Flush and close (idempotent); after a failed write, close without another write."""
        if not self.file.id.valid:
            return
        if self.broken is not None:
            with contextlib.suppress(*H5_ERRORS):
                self.file.close()
            return
        try:
            self.flush()
        finally:
            self.file.close()

    def _repair(self) -> None:
        """Cut columns to a common length (a job killed inside ``append_round`` leaves them uneven,
        or its last ``round`` unwritten); a run that says ``complete`` with fewer rounds than
        planned says ``running`` again."""
        n = _complete_rows(self._rounds())
        uneven = [ds for ds in self._rounds().values() if ds.shape[0] != n]
        cut_short = self.status == "complete" and self.planned_rounds is not None and n < self.planned_rounds

        def write() -> None:
            for ds in uneven:
                ds.resize(n, axis=0)
            if "global" in self.file:
                glob = self.file["global"]
                m = _complete_rows(glob)
                for ds in glob.values():
                    ds.resize(m, axis=0)
            if cut_short:
                self.file.attrs["status"] = "running"

        self._write("the repaired rounds", 0, write)
        if uneven:
            warnings.warn(f"{self.path}: cut a partly written round (kept {n} rounds)", RuntimeWarning, stacklevel=3)
        if cut_short:
            warnings.warn(f"{self.path} said complete with {n} of {self.planned_rounds} rounds; it is running again",
                          RuntimeWarning, stacklevel=3)

    def __enter__(self) -> RunFile:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _complete_rows(group: h5py.Group) -> int:
    """The rows every dataset of ``group`` holds, less a last one whose ``round`` was never written."""
    n = min((ds.shape[0] for ds in group.values()), default=0)
    if n and "round" in group and group["round"][n - 1] == fill(INT):
        n -= 1
    return n


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
    """Write a fresh run file at ``tmp``."""
    with open_h5(tmp, "w") as f:
        f.attrs.update(attrs)
        group = f.create_group("clients")
        for name, arr in clients.items():
            group.create_dataset(name, data=arr)
        f.create_group("rounds")


def _copy_file(source: Path, tmp: Path) -> None:
    """Copy every attribute, group and dataset of the run file ``source`` into a fresh file at
    ``tmp``, through numpy: HDF5's own object copy can crash on a damaged header that reading
    survives."""
    with open_h5(source, "r") as src, open_h5(tmp, "w") as dst:
        _copy_group(src, dst, set())
    shutil.copymode(source, tmp)


def _copy_group(src: h5py.Group, dst: h5py.Group, seen: set[int]) -> None:
    """Copy ``src``'s attributes and members into ``dst`` (an object reached twice is copied once)."""
    for key, value in src.attrs.items():
        dst.attrs[key] = value
    for name, obj in src.items():
        address = h5py.h5o.get_info(obj.id).addr
        if address in seen:
            continue
        seen.add(address)
        if isinstance(obj, h5py.Group):
            _copy_group(obj, dst.create_group(name), seen)
        elif isinstance(obj, h5py.Dataset):
            copy = dst.create_dataset(name, shape=obj.shape, dtype=obj.dtype, maxshape=obj.maxshape,
                                      chunks=obj.chunks, fillvalue=obj.fillvalue)
            for rows in _row_slices(obj):
                copy[rows] = obj[rows]
            for key, value in obj.attrs.items():
                copy.attrs[key] = value


def _planned_rounds(file: h5py.File) -> int | None:
    """``rounds`` of the stored config (None when it has none)."""
    with contextlib.suppress(ValueError):
        rounds = stored_config(file).get("rounds")
        return rounds if isinstance(rounds, int) and not isinstance(rounds, bool) else None
    return None


def _verify(file: h5py.File) -> None:
    """Read every attribute and dataset of a run file (raising what HDF5 raises on damage) and
    check its layout: the config text, K entries per client column, the partition offsets."""
    stored_config(file)
    objects: list[tuple[str, Any]] = [("", file)]
    file.visititems(lambda name, obj: objects.append((name, obj)))
    for name, obj in objects:
        for key in obj.attrs:
            obj.attrs[key]
        if isinstance(obj, h5py.Dataset):
            if obj.dtype.kind not in "biuf" or obj.dtype.metadata:  # a damaged type reads as an odd enum
                raise ValueError(f"{name or '/'} has the type {obj.dtype}, not a number or bool")
            _read_all(obj)
            if name.startswith("rounds/") and obj.ndim == 0:
                raise ValueError(f"round column {name} has no rows")
    k = int(file.attrs["num_clients"])
    clients = file["clients"]
    offsets = clients["partition_offsets"][()]
    if clients["sizes"].shape != (k,) or clients["malicious"].shape != (k,) or offsets.shape != (k + 1,):
        raise ValueError(f"the client arrays do not hold {k} clients")
    if offsets[0] != 0 or np.any(np.diff(offsets) < 0) or offsets[-1] != clients["partition_indices"].shape[0]:
        raise ValueError("the partition offsets are damaged")


def _row_slices(ds: h5py.Dataset) -> Iterator[Any]:
    """Selections that cover ``ds`` in pieces of about READ_ROWS_BYTES (one ``()`` for a scalar)."""
    if ds.ndim == 0:
        yield ()
        return
    row = max(1, ds.dtype.itemsize * int(np.prod(ds.shape[1:], dtype=np.int64)))
    step = max(1, READ_ROWS_BYTES // row)
    for start in range(0, ds.shape[0], step):
        yield slice(start, start + step)


def _read_all(ds: h5py.Dataset) -> None:
    """Read a dataset in slices (a damaged chunk or index raises)."""
    for rows in _row_slices(ds):
        ds[rows]


# ----------------------------------------------------------------------------- reading


