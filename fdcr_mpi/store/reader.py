"""Reading run files: the one reader that inspect, report, sweep and plot use (docs/RUNFILE.md).

A damaged file (unreadable objects, config text that is not YAML, impossible shapes) is one
sentence (``UserError``), never a crash; ``report``, ``plot`` and ``sweep plan`` leave such files
out with a ``RunFileWarning``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import yaml

from fdcr_mpi.errors import UserError
from fdcr_mpi.store.disk import H5_ERRORS, open_h5, reason
from fdcr_mpi.store.schema import EXTENSIONS, FINAL_WINDOW


class RunFileWarning(UserWarning):
    """A run file was left out (of a report, figure or plan) because it cannot be read."""


def _split_partition(clients: h5py.Group) -> list[np.ndarray]:
    flat = clients["partition_indices"][()]
    offsets = clients["partition_offsets"][()]
    return [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def _stored_hash(path: Path, file: h5py.File) -> str:
    if "config_hash" not in file.attrs:
        raise UserError(f"{path} is not an fdcr_mpi run file (it has no config_hash attribute)")
    return _text(file.attrs["config_hash"])


def _text(value: Any) -> str:
    """An HDF5 string attribute as str (h5py may give bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def stored_config(file: h5py.File) -> dict[str, Any]:
    """The config stored in a run file, as a mapping; ValueError if its text is damaged."""
    try:
        config = yaml.safe_load(_text(file.attrs.get("config", "")))
    except yaml.YAMLError as exc:
        raise ValueError(f"its config text is damaged: {str(exc).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise ValueError("its config text is damaged (not a mapping)")
    return config


def _check_sizes(file: h5py.File, size: int) -> None:
    """ValueError for a dataset that claims more bytes than the whole file (a damaged header):
    reading it would ask for petabytes."""

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset) and obj.size * obj.dtype.itemsize > size:
            raise ValueError(f"{name} claims a shape of {obj.shape}, more than the file holds")

    file.visititems(visit)




def _open_read(path: str | os.PathLike[str]) -> h5py.File:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"there is no run file {path}")
    try:
        return open_h5(path, "r")
    except H5_ERRORS as exc:
        raise UserError(f"could not read {path}: it is unreadable or corrupt ({reason(exc)})") from exc


@contextlib.contextmanager
def reading(path: str | os.PathLike[str]) -> Iterator[h5py.File]:
    """The run file open for reading; what HDF5 (or YAML, on its config) raises on a damaged file
    becomes one UserError."""
    file = _open_read(path)
    try:
        with file:
            _check_sizes(file, Path(path).stat().st_size)
            yield file
    except (*H5_ERRORS, yaml.YAMLError) as exc:
        raise UserError(f"could not read {path}: it is unreadable or corrupt ({reason(exc)})") from None


def _rounds_of(file: h5py.File) -> dict[str, np.ndarray]:
    if "rounds" not in file:
        return {}
    columns = {name: ds[()] for name, ds in file["rounds"].items() if isinstance(ds, h5py.Dataset)}
    n = min((c.shape[0] for c in columns.values()), default=0)
    return {name: c[:n] for name, c in columns.items()}


def stored_status(path: str | os.PathLike[str]) -> tuple[str, str | None]:
    """(status, config hash) of a run file; ``complete`` only with every planned round present
    (else ``running``: resuming it finishes it). UserError if the file is damaged."""
    with reading(path) as f:
        planned = stored_config(f).get("rounds")
        status, stored = _text(f.attrs.get("status", "running")), f.attrs.get("config_hash")
        rows = f["rounds/round"].shape[0] if "rounds/round" in f else 0
    if status == "complete" and isinstance(planned, int) and rows < planned:
        status = "running"
    return status, None if stored is None else _text(stored)


def read_rounds(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Every /rounds column as an array with one row per round (works on a live run too)."""
    with reading(path) as f:
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
    R_paper/V_paper, detection rates.

    A damaged file (unreadable objects, config text that is not YAML) is a UserError.
    """
    with reading(path) as f:
        config = stored_config(f)
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
            attackers=np.flatnonzero(malicious).tolist() if malicious is not None else None,
            setting=describe_setting(config),
            rounds_planned=config.get("rounds"),
            wall_seconds=float(np.sum(rounds["seconds_round"])) if "seconds_round" in rounds else None,
        )
        from fdcr_mpi.metrics import paper_columns  # torch: only when summarising

        columns = {**rounds, **paper_columns(rounds)}  # R_paper, V_paper (derived in older run files)
        window = min(final_rounds(config), n) or 1
        summary["final_window"] = window
        for name in ("A", "R", "V", "R_paper", "V_paper"):
            column = columns.get(name)
            summary[f"final_{name}"] = _mean(column[-window:]) if column is not None else None
        with contextlib.suppress(TypeError, ValueError):  # a damaged record is left out, not fatal here
            summary["extensions"] = json.loads(_attr(f, EXTENSIONS) or "[]")
        summary["tpr_mean"] = _mean(rounds.get("tpr"))
        summary["fpr_mean"] = _mean(rounds.get("fpr"))
    return summary


def final_rounds(config: Mapping[str, Any]) -> int:
    """How many last rounds the final figures average (``eval.final_rounds``)."""
    value = (config.get("eval") or {}).get("final_rounds") if isinstance(config.get("eval"), dict) else None
    return value if isinstance(value, int) and value > 0 else FINAL_WINDOW


def describe_setting(config: Mapping[str, Any]) -> str:
    """'fmnist, simple_cnn, 10 clients, beta 0.5; badnets, 30% attackers; defense fdcr; seed 0'."""

    def get(section: str, key: str) -> Any:
        part = config.get(section)
        return part.get(key) if isinstance(part, dict) else None

    ratio = get("attack", "malicious_ratio")
    attack = f"{get('attack', 'kind')}, {ratio:.0%} attackers" if isinstance(ratio, (int, float)) else "?"
    if get("attack", "fisher") not in (None, "honest"):
        attack += f" (Fisher: {get('attack', 'fisher')})"
    return (f"{get('data', 'dataset')}, {get('model', 'name')}, {get('data', 'num_clients')} clients, "
            f"beta {get('data', 'beta')}; {attack}; defense {get('defense', 'name')}; seed {config.get('seed')}")


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
        ("setting", summary.get("setting")),
        ("clients", f"{summary.get('num_clients')} ({summary.get('num_malicious')} malicious: "
                    f"{summary.get('attackers')})"),
        ("rounds done", f"{summary.get('rounds_done')} of {summary.get('rounds_planned')}"),
        ("round time", "n/a" if summary.get("wall_seconds") is None
         else f"{summary['wall_seconds'] / 60:.1f} min in all"),
        (f"final (last {summary.get('final_window', FINAL_WINDOW)})",
         "  ".join(f"{k} {_fmt(summary.get(f'final_{k}'))}" for k in "ARV")
         + "  (R: triggered images of the other classes)"),
        ("paper's metric", f"R_paper {_fmt(summary.get('final_R_paper'))}  V_paper {_fmt(summary.get('final_V_paper'))}"
         "  (R_paper: every triggered image, as the paper's tables)"),
        ("detection", f"TPR {_fmt(summary.get('tpr_mean'))}  FPR {_fmt(summary.get('fpr_mean'))} (mean over rounds)"),
    ]
    legend = ("A: main-task accuracy on the clean test set.\n"
              "R = 100 - ASR: the share of triggered test images not classified as the target class\n"
              "  (R: the other classes' images; R_paper: every triggered image, as in the paper). V = (A + R) / 2.\n"
              "TPR / FPR: the share of attackers / of benign clients the defense removed in a round.")
    if summary.get("extensions"):
        lines.insert(8, ("extended", "; ".join(f"{e.get('from_rounds')} -> {e.get('to_rounds')} rounds on "
                                               f"{str(e.get('time', ''))[:10]}" for e in summary["extensions"])))
    if summary.get("final_sha256"):
        lines.append(("final sha256", summary["final_sha256"]))
    width = max(len(k) for k, _ in lines)
    text = "\n".join(f"{k:<{width}}  {v}" for k, v in lines) + "\n\n" + legend
    if with_config and summary.get("config"):
        text += "\n\nconfig:\n" + str(summary["config"]).rstrip()
    return text
