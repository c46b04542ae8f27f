"""Crash-safe checkpoints (DIR/checkpoints/round_NNNN.h5).

A checkpoint is written to a temporary file in the same directory, checksummed (sha256 over
every dataset in a fixed order, stored as the ``checksum`` attribute), fsynced and renamed, so
that the final name only ever holds a complete file. Loading walks the checkpoints newest
first and skips (with a warning) any that is truncated or whose checksum does not match.

Only rank 0 calls this module.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from fdcr_mpi.errors import UserError
from fdcr_mpi.store.disk import (
    H5_ERRORS,
    create_temp,
    ensure_space,
    fsync_path,
    open_h5,
    reason,
    remove_quietly,
)

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FORMAT = 1
_NAME = re.compile(r"^round_(\d+)\.h5$")
_TMP_PREFIX = ".round_"
_TMP_SUFFIX = ".h5.tmp"
_GROUPS = ("rng", "defense", "extra")
# What h5py/HDF5 raise on a damaged file; anything of these while reading means "corrupt".
class CheckpointWarning(UserWarning):
    """A checkpoint was skipped because it is truncated or corrupt."""


# ----------------------------------------------------------------------------- file helpers


def _as_array(name: str, value: object) -> np.ndarray:
    """``value`` as a plain numeric/bool array, or ValueError naming ``name``."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"checkpoint entry {name!r} has unsupported dtype {arr.dtype}")
    return arr


def payload_digest(round_: int, config_hash: str, arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over round, config hash and every array (path, dtype, shape, bytes) sorted by path."""
    h = hashlib.sha256(f"fdcr_mpi-checkpoint/{CHECKPOINT_FORMAT}\n{int(round_)}\n{config_hash}\n".encode())
    for path in sorted(arrays):
        arr = np.ascontiguousarray(arrays[path])
        h.update(f"{path}\n{arr.dtype.str}\n{arr.shape}\n".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def _flatten(
    weights: np.ndarray,
    rng_state: Mapping[str, np.ndarray],
    defense_state: Mapping[str, np.ndarray],
    extra: Mapping[str, np.ndarray] | None,
) -> dict[str, np.ndarray]:
    """Every array to store, keyed by its HDF5 path."""
    w = np.asarray(weights)
    if w.ndim != 1 or w.dtype.kind != "f":
        raise ValueError(f"checkpoint weights must be a 1-D float array, got {w.dtype} {w.shape}")
    out = {"weights": w}
    for group, entries in zip(_GROUPS, (rng_state, defense_state, extra or {})):
        for name, value in entries.items():
            if not name or name.startswith("/") or name.endswith("/"):
                raise ValueError(f"invalid checkpoint entry name {name!r} in {group}")
            out[f"{group}/{name}"] = _as_array(f"{group}/{name}", value)
    return out


# ----------------------------------------------------------------------------- writing


def checkpoint_dir(run_dir: str | os.PathLike[str]) -> Path:
    """DIR/checkpoints."""
    return Path(run_dir) / CHECKPOINT_DIR


def checkpoint_path(run_dir: str | os.PathLike[str], round_: int) -> Path:
    """DIR/checkpoints/round_NNNN.h5."""
    return checkpoint_dir(run_dir) / f"round_{int(round_):04d}.h5"


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """(round, path) of every checkpoint under its final name, oldest first (temp files ignored).

    A ``checkpoints`` that is not a folder, or cannot be listed, is a UserError: taking it for
    "no checkpoint" would start the run over and cut its rows.
    """
    folder = checkpoint_dir(run_dir)
    try:
        if not folder.exists():
            return []
        if not folder.is_dir():
            raise UserError(f"{folder} is not a folder; move it away so that checkpoints can be written there")
        found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    except OSError as exc:
        raise UserError(f"could not list the checkpoints in {folder}: {reason(exc)}") from None
    return sorted(found)


def _write_file(tmp: Path, round_: int, config_hash: str, arrays: dict[str, np.ndarray]) -> None:
    """Write all arrays and attributes to ``tmp`` (contiguous datasets, no filters), then fsync."""
    with open_h5(tmp, "w") as f:
        f.attrs["format"] = CHECKPOINT_FORMAT
        f.attrs["round"] = int(round_)
        f.attrs["config_hash"] = config_hash
        f.attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        for group in _GROUPS:
            f.require_group(group)
        for path, arr in arrays.items():
            f.create_dataset(path, data=arr)
        f.attrs["checksum_algorithm"] = "sha256"
        f.attrs["checksum"] = payload_digest(round_, config_hash, arrays)
        f.flush()
    fsync_path(tmp)


def _prune(run_dir: Path, newest: int, keep: int) -> None:
    """Drop checkpoints after ``newest`` (an abandoned future), all but the last ``keep``, stale temps."""
    ckpts = list_checkpoints(run_dir)
    later = [p for r, p in ckpts if r > newest]
    kept = [p for r, p in ckpts if r <= newest]
    for p in later + kept[: max(len(kept) - keep, 0)]:
        remove_quietly(p)
    folder = checkpoint_dir(run_dir)
    for p in folder.glob(f"{_TMP_PREFIX}*{_TMP_SUFFIX}"):
        remove_quietly(p)  # RunLock makes us the only writer: any temp file left is stale


def write_checkpoint(
    run_dir: str | os.PathLike[str],
    *,
    round: int,
    config_hash: str,
    weights: np.ndarray,
    rng_state: Mapping[str, np.ndarray],
    defense_state: Mapping[str, np.ndarray],
    extra: Mapping[str, np.ndarray] | None = None,
    keep: int = 3,
) -> Path:
    """Atomically write DIR/checkpoints/round_NNNN.h5 and keep only the newest ``keep``.

    On an OS error (disk full, unwritable directory) the temporary file is removed, earlier
    checkpoints are left as they were and a UserError names the reason.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    arrays = _flatten(weights, rng_state, defense_state, extra)
    final = checkpoint_path(run_dir, round)
    tmp: Path | None = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        ensure_space(Path(run_dir), sum(a.nbytes for a in arrays.values()) + 4096 * len(arrays) + (64 << 10))
        tmp = create_temp(final.parent, f"{_TMP_PREFIX}{int(round):04d}.", _TMP_SUFFIX)
        _write_file(tmp, round, config_hash, arrays)
        os.replace(tmp, final)
        tmp = None
        fsync_path(final.parent)
    except (OSError, RuntimeError) as exc:  # HDF5 reports a failed write as RuntimeError
        raise UserError(f"could not write checkpoint {final}: {reason(exc)}") from exc
    finally:
        if tmp is not None:
            remove_quietly(tmp)
    _prune(Path(run_dir), int(round), keep)
    return final


# ----------------------------------------------------------------------------- loading


@dataclass
class Checkpoint:
    """A verified checkpoint, as written by ``write_checkpoint``."""

    round: int
    weights: np.ndarray
    rng_state: dict[str, np.ndarray] = field(default_factory=dict)
    defense_state: dict[str, np.ndarray] = field(default_factory=dict)
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    path: Path | None = None
    config_hash: str = ""


class _Corrupt(Exception):
    """A checkpoint file that cannot be trusted (the message says why)."""


def _read_group(group: h5py.Group) -> dict[str, np.ndarray]:
    """Every dataset below ``group``, keyed by its path relative to the group."""
    out: dict[str, np.ndarray] = {}

    def visit(name: str, obj: object) -> None:
        if isinstance(obj, h5py.Dataset):
            out[name] = np.asarray(obj[()])

    group.visititems(visit)
    return out


def _read_checkpoint(path: Path) -> Checkpoint:
    """Read and verify one checkpoint; ``_Corrupt`` if it is truncated or fails its checksum."""
    try:
        with open_h5(path, "r") as f:
            round_ = int(f.attrs["round"])
            config_hash = str(f.attrs["config_hash"])
            stored = str(f.attrs["checksum"])
            weights = np.asarray(f["weights"][()])
            parts = {g: _read_group(f[g]) if g in f else {} for g in _GROUPS}
    except H5_ERRORS as exc:
        raise _Corrupt(f"unreadable ({reason(exc)})") from exc
    arrays = {"weights": weights}
    arrays.update({f"{g}/{k}": v for g, d in parts.items() for k, v in d.items()})
    if payload_digest(round_, config_hash, arrays) != stored:
        raise _Corrupt("checksum mismatch")
    return Checkpoint(round_, weights, parts["rng"], parts["defense"], parts["extra"], path, config_hash)


def load_latest_checkpoint(run_dir: str | os.PathLike[str], config_hash: str,
                           earlier: Collection[str] = ()) -> Checkpoint | None:
    """The newest intact checkpoint of DIR, or None if there is none at all.

    Corrupt or truncated ones are skipped with a ``CheckpointWarning`` naming them. A
    checkpoint of another config (not ``config_hash`` nor one of the ``earlier`` hashes of a run
    since extended to more rounds) is a UserError, as is a directory whose checkpoints are all corrupt.
    """
    found = list_checkpoints(run_dir)
    if not found:
        return None
    for _, path in reversed(found):
        try:
            ckpt = _read_checkpoint(path)
        except _Corrupt as exc:
            warnings.warn(f"skipping checkpoint {path}: {exc}", CheckpointWarning, stacklevel=2)
            continue
        if ckpt.config_hash != config_hash and ckpt.config_hash not in earlier:
            raise UserError(
                f"checkpoint {path} belongs to another config (hash {ckpt.config_hash}); "
                "use a new --out directory or the same config"
            )
        return ckpt
    raise UserError(
        f"all {len(found)} checkpoints in {checkpoint_dir(run_dir)} are corrupt or truncated; "
        "delete that folder to start the run over"
    )


# ----------------------------------------------------------------------------- lock
