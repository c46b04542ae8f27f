"""Everything the run directory holds, and the one module that touches it (only rank 0 writes).

- ``schema``: the run file's name, format version, statuses, attribute names, column dtypes and
  fills (docs/RUNFILE.md);
- ``writer``: ``RunFile``, the run file being written (rows, global weights, status);
- ``reader``: reading run files for ``inspect``, ``report``, ``sweep``, ``plot`` and pandas;
- ``checkpoint``: crash-safe checkpoints; ``lock``: the run-directory lock;
- ``disk``: atomic writes, room on the disk, one-sentence reasons for OS and HDF5 errors.
"""

from fdcr_mpi.store.checkpoint import (
    Checkpoint,
    CheckpointWarning,
    checkpoint_path,
    list_checkpoints,
    load_latest_checkpoint,
    write_checkpoint,
)
from fdcr_mpi.store.lock import RunLock
from fdcr_mpi.store.reader import (
    RunFileWarning,
    format_summary,
    read_rounds,
    read_summary,
    reading,
    stored_config,
    stored_status,
)
from fdcr_mpi.store.schema import EXTENSIONS, NUMERICS, NUMERICS_CHANGES, RUN_FILE, STATUSES
from fdcr_mpi.store.writer import RunFile

__all__ = [
    "EXTENSIONS",
    "NUMERICS",
    "NUMERICS_CHANGES",
    "RUN_FILE",
    "STATUSES",
    "Checkpoint",
    "CheckpointWarning",
    "RunFile",
    "RunFileWarning",
    "RunLock",
    "checkpoint_path",
    "format_summary",
    "list_checkpoints",
    "load_latest_checkpoint",
    "read_rounds",
    "read_summary",
    "reading",
    "stored_config",
    "stored_status",
    "write_checkpoint",
]
