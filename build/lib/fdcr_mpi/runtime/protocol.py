"""What crosses process boundaries in a round: the header, each client's rows and their layout.

Every round rank 0 broadcasts a header (round, ROUND or STOP) and w_t; each client rank fills its
``SendBlocks`` (one row per participating client it hosts: weights, Fisher, metadata) and the
rows meet on rank 0 in client-id order (Gatherv, the gather path) or stay where they are (the
reduce path, where only the metadata moves). Both sides read this one module.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Columns of the per-client metadata row sent with the weights; "finite" is 1 when the row
# is usable (finite weights and Fisher, samples > 0), else 0 (the client is quarantined).
META = ("size", "train_loss", "train_seconds", "fisher_seconds", "finite")
SIZE, LOSS, TRAIN_SECONDS, FISHER_SECONDS, FINITE = range(len(META))
STOP, ROUND = 0, 1  # header[1]: what the ranks do next (header[0] is the round)


def header() -> np.ndarray:
    """The (round, ROUND | STOP) header, int64."""
    return np.zeros(2, dtype=np.int64)


@dataclass
class SendBlocks:
    """This rank's rows, in the order of its client ids: weights, Fisher (or None) and metadata."""

    weights: np.ndarray  # (n_local, D) float32
    fisher: np.ndarray | None  # (n_local, D) float32
    meta: np.ndarray  # (n_local, len(META)) float64


def row_is_usable(blocks: SendBlocks, row: int) -> bool:
    """Finite weights and Fisher, and a positive sample count (else the server quarantines it)."""
    ok = bool(np.isfinite(blocks.weights[row]).all()) and blocks.meta[row, SIZE] > 0
    return ok and (blocks.fisher is None or bool(np.isfinite(blocks.fisher[row]).all()))


