"""The operations a defense asks over the round's clients, and their implementation on rows held
by the server (pfl-research's pattern: the algorithm never communicates, a backend reduces).

A defense that needs only sums over clients and one value per client (FedAvg, FDCR) is written
once against ``ClientOps``:

- ``chunks()`` / ``weights`` / ``fisher``: the rows this backend holds, by local row index;
- ``weighted_sum(coef, rows, to_all)``: sum_k coef_k x_k over every client, with the rows given
  or computed chunk by chunk from a function of row indices (never all at once);
- ``gather(values)``: one float per local row to the server, (participants,) in client order;
- ``scatter(values)``: the server's per-client values back to every holder of rows;
- ``global_weights``, ``trainable``, ``lr``, ``alpha`` (local rows), ``alpha_all`` (every
  participant, on the server), ``is_server``, ``participants``.

Two backends implement it: ``RowsOnServer`` (this module: the server holds every row, the gather
path and the ``aggregate()`` library call; sums are ordered float32 sums) and
``runtime.reduce_ops.ReducedAcrossRanks`` (every rank holds its own clients' rows; sums are exact
integer reductions across ranks, so the result does not depend on the launch). Both are built
over the healthy rows only: the quarantine filters rows once, before the defense sees them.

Defenses that need every client's update at once (Krum, medians, ...) take ``RoundInputs``,
which ``RowsOnServer.inputs`` holds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch

from fdcr_mpi.defenses.base import RoundInputs

RowFn = Callable[[np.ndarray], torch.Tensor]


class ClientOps(Protocol):
    """What a reducible defense may ask over the clients (module docstring)."""

    global_weights: torch.Tensor
    weights: torch.Tensor
    fisher: torch.Tensor | None
    trainable: torch.Tensor | None
    alpha: np.ndarray
    alpha_all: np.ndarray | None
    lr: float

    @property
    def is_server(self) -> bool: ...

    @property
    def participants(self) -> int: ...

    def chunks(self) -> list[np.ndarray]: ...

    def weighted_sum(self, coef: np.ndarray, rows: torch.Tensor | RowFn, to_all: bool,
                     bounds: Callable[[], np.ndarray] | None = None) -> torch.Tensor | None: ...

    def gather(self, values: np.ndarray) -> np.ndarray | None: ...

    def scatter(self, values: np.ndarray | None) -> np.ndarray: ...


def ordered_weighted_sum(alpha: np.ndarray | torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """sum_k alpha_k rows_k, accumulated in float32 in client-id order k = 0, 1, ..., K-1.

    The fixed order makes the result bit-identical from run to run. Rows with alpha_k = 0
    are skipped (same value for finite rows; a removed client's NaN cannot leak in).
    """
    a = np.asarray(alpha, dtype=np.float64).reshape(-1)
    if a.size != rows.shape[0]:
        raise ValueError(f"{a.size} weights for {rows.shape[0]} rows")
    acc = torch.zeros(rows.shape[1:], dtype=torch.float32, device=rows.device)
    for k in range(a.size):
        if a[k] != 0.0:
            acc += rows[k].to(torch.float32) * float(np.float32(a[k]))
    return acc


class RowsOnServer:
    """``ClientOps`` on rows the server holds: every client of ``inputs`` is local, sums are
    ordered float32 sums (``ordered_weighted_sum``), gather and scatter are the identity."""

    is_server = True

    def __init__(self, inputs: RoundInputs) -> None:
        self.inputs = inputs
        self.global_weights = inputs.global_weights
        self.weights = inputs.client_weights
        self.fisher = inputs.fisher
        self.trainable = inputs.trainable
        self.lr = inputs.lr
        self.alpha = inputs.alpha.cpu().numpy().astype(np.float64)
        self.alpha_all = self.alpha

    @property
    def participants(self) -> int:
        return int(self.weights.shape[0])

    def chunks(self) -> list[np.ndarray]:
        """Every row at once: the server holds them all already."""
        return [np.arange(self.participants)]

    def weighted_sum(self, coef: np.ndarray, rows: torch.Tensor | RowFn, to_all: bool,
                     bounds: Callable[[], np.ndarray] | None = None) -> torch.Tensor:
        """sum_k coef_k x_k in client order; a row function is asked for one row at a time, only
        for the rows with coef_k != 0 (``bounds`` matter to fixed-point backends only). One row at
        a time also fixes the rounding: element-wise functions such as the sigmoid round some
        entries differently when the rows are laid out in a larger block."""
        c = np.asarray(coef, dtype=np.float64)
        if not callable(rows):
            return ordered_weighted_sum(c, rows)
        acc = torch.zeros(self.global_weights.numel(), dtype=torch.float32, device=self.weights.device)
        for k in np.flatnonzero(c != 0):
            acc += rows(np.array([k]))[0].to(torch.float32) * float(np.float32(c[k]))
        return acc

    def gather(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values, dtype=np.float64)

    def scatter(self, values: np.ndarray | None) -> np.ndarray:
        return np.asarray(values, dtype=np.float64)
