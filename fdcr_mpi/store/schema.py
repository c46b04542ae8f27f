"""The run file's schema: its name, format version, statuses, attribute names, and the columns'
dtypes and fills (docs/RUNFILE.md). Every reader and writer of run.h5 takes them from here."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import h5py
import numpy as np

RUN_FILE = "run.h5"
FORMAT = "fdcr_mpi.run"
FORMAT_VERSION = 1
STATUSES = ("running", "complete", "failed", "preempted")
FINAL_WINDOW = 5
# No chunk cache: a row's data is written (or fails) inside the call that writes it, never
# later when HDF5 evicts the cache or closes a dataset, where a failure cannot be handled.
NO_CACHE = {"rdcc_nbytes": 0}
METADATA_BYTES = 64 * 1024  # what one write may add to the file beyond new chunks (headers, B-tree nodes)
READ_ROWS_BYTES = 64 << 20  # verification reads big datasets in slices of about this size


# Column dtypes, in promotion order.
BOOL, INT, FLOAT = np.dtype(bool), np.dtype(np.int64), np.dtype(np.float64)
RANK = {BOOL: 0, INT: 1, FLOAT: 2}


def fill(dtype: np.dtype) -> Any:
    """The value that stands for "no value this round": False, -1 or NaN."""
    return {"b": False, "i": -1, "u": 0, "f": np.nan}.get(np.dtype(dtype).kind, 0)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def column_value(name: str, value: Any) -> np.ndarray:
    """``value`` as an array of one of the three column dtypes (bool, int64, float64)."""
    arr = np.asarray(value)
    kind = arr.dtype.kind
    if kind == "b":
        return arr.astype(BOOL, copy=False)
    if kind in "iu":
        return arr.astype(INT)
    if kind == "f":
        return arr.astype(FLOAT)
    raise ValueError(f"round column {name!r} must be a number, bool or numeric array, got {arr.dtype}")


def chunk_rows(row_shape: tuple[int, ...], itemsize: int) -> int:
    """Rows per chunk: about 16 KiB, between 1 and 256 rows."""
    row_bytes = itemsize * int(np.prod(row_shape, dtype=np.int64)) or 1
    return max(1, min(256, 16384 // row_bytes))


def extendable(group: h5py.Group, name: str, rows: int, row_shape: tuple[int, ...], dtype: np.dtype) -> h5py.Dataset:
    """A new (rows, *row_shape) dataset, unlimited along axis 0, pre-filled with the dtype's fill."""
    return group.create_dataset(
        name,
        shape=(rows, *row_shape),
        maxshape=(None, *row_shape),
        dtype=dtype,
        chunks=(chunk_rows(row_shape, dtype.itemsize), *row_shape),
        fillvalue=fill(dtype),
    )


NUMERICS = "numerics"  # attribute: the numerics fingerprint (JSON) of the run's creation
NUMERICS_CHANGES = "numerics_changes"  # attribute: resumes allowed to continue with other numerics (JSON list)
EXTENSIONS = "extensions"  # attribute: the run's extensions to more rounds (JSON list, runtime/extension.py)
