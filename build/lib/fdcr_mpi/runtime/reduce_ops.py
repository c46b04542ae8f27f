"""The reduce path: ``ClientOps`` (defenses/ops.py) as exact integer reductions across ranks.

With many clients the server cannot hold K full rows (K x D floats). FedAvg and FDCR need
from the clients only sums of D-vectors (the global weighted update, the new model) and one
scalar per client (the discrepancy), so each rank sums its own rows and the ranks reduce.

A float sum depends on the order of its terms, hence on how the clients are split among the
ranks. Here every term c_k x_k is turned into a 64-bit integer at one fixed-point scale shared
by all ranks (2^e, from the largest bound of |c_k x_k| anywhere, so that the sum of all the
terms cannot overflow); integer addition is associative, so the total, and the float32 it converts
back to, is bit-identical however the job is launched (one process or any number of ranks).
Each term is one float32 product, as in the gather path; the sum adds no rounding beyond the
absolute resolution 2^-e (about 2^-53 of the largest term for K <= 2^9) and the final
conversion to float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from fdcr_mpi.runtime.transport import Transport

INT_BITS = 62  # the sum of all terms stays below 2^62 in magnitude
CHUNK_BYTES = 1 << 26  # int64 working set of one chunk of rows
RowFn = Callable[[np.ndarray], torch.Tensor]


def chunk_rows(dim: int) -> int:
    """Rows of D int64 entries per chunk, within CHUNK_BYTES."""
    return max(1, CHUNK_BYTES // (8 * max(dim, 1)))


def fixed_point_exponent(max_abs: float, num_terms: int) -> int:
    """e such that num_terms terms of magnitude <= max_abs, scaled by 2^e, sum below 2^62."""
    if not max_abs > 0 or not math.isfinite(max_abs):
        return 0
    _, exponent = math.frexp(max_abs)  # max_abs < 2^exponent
    return min(1000, INT_BITS - exponent - max(1, math.ceil(math.log2(max(num_terms, 1)))))


def fixed_terms(rows: torch.Tensor, coef: np.ndarray, exponent: int) -> torch.Tensor:
    """The int64 terms round(float32(coef_k 2^e) * rows_k) of (n, D) float32 rows.

    One float32 product per entry (as the gather path's float32 arithmetic), scaled by the
    power of two 2^e, then rounded to an integer: a deterministic function of the client's own
    row, whichever rank computes it.
    """
    scale = torch.from_numpy(np.ldexp(np.asarray(coef, dtype=np.float64), exponent).astype(np.float32))
    return (rows.to(torch.float32) * scale.unsqueeze(1)).round_().to(torch.int64)


def from_fixed(total: torch.Tensor, exponent: int) -> torch.Tensor:
    """The float32 value of an int64 fixed-point total."""
    return torch.ldexp(total.to(torch.float64), torch.tensor(float(-exponent), dtype=torch.float64)).float()


@dataclass
class ReducedAcrossRanks:
    """``ClientOps`` for one rank on the reduce path: its own clients' rows, sums reduced exactly.

    ids: this rank's participating clients (ascending); weights / fisher: their (n, D) rows;
    alpha: their alpha_k = N_k / N over all participants; alpha_all: every participant's, in
    client-id order (rank 0 receives per-client values in that order); rows_per_rank: how
    many participants each rank holds.
    """

    transport: Transport
    ids: np.ndarray
    weights: torch.Tensor
    fisher: torch.Tensor | None
    alpha: np.ndarray
    alpha_all: np.ndarray
    rows_per_rank: list[int]
    global_weights: torch.Tensor
    trainable: torch.Tensor | None
    lr: float
    round: int
    total_rounds: int

    @property
    def is_server(self) -> bool:
        return self.transport.rank == 0

    @property
    def participants(self) -> int:
        return int(sum(self.rows_per_rank))

    def weighted_sum(self, coef: np.ndarray, rows: torch.Tensor | RowFn, to_all: bool,
                     bounds: Callable[[], np.ndarray] | None = None) -> torch.Tensor | None:
        """sum over every participating client of coef_k x_k, (D,) float32, rounded the same way
        for any split of the clients among ranks. Collective; ``to_all``: every rank gets it
        (else rank 0 only, None elsewhere).

        ``rows`` is this rank's (n, D) tensor of x_k, or a function from local row indices to
        those rows (computed chunk by chunk, never all at once); then ``bounds()`` must give an
        upper bound of max_v |x_k,v| per row (it sets the fixed-point scale).
        """
        c = np.asarray(coef, dtype=np.float64)
        live = np.flatnonzero(c != 0)
        if callable(rows):
            if bounds is None:
                raise ValueError("weighted_sum needs row bounds when the rows are computed on the fly")
            fetch, bounds = rows, bounds()
        else:
            tensor = rows
            fetch = lambda idx: tensor[torch.from_numpy(idx)]  # noqa: E731
            bounds = np.zeros(tensor.shape[0])
            for i in live:
                bounds[i] = float(tensor[i].abs().max())
        local_max = float(np.max(np.abs(c[live]) * bounds[live])) if live.size else 0.0
        exponent = fixed_point_exponent(self.transport.max_all(local_max), self.participants)
        total = torch.zeros(self.global_weights.numel(), dtype=torch.int64)
        for start in range(0, live.size, chunk_rows(total.numel())):
            idx = live[start:start + chunk_rows(total.numel())]
            total += fixed_terms(fetch(idx), c[idx], exponent).sum(dim=0)
        self.transport.sum_int64(total.numpy(), to_all)
        return from_fixed(total, exponent) if to_all or self.is_server else None

    def chunks(self) -> list[np.ndarray]:
        """This rank's row indices in chunks of ``chunk_rows`` (for streaming computations)."""
        step = chunk_rows(self.global_weights.numel())
        n = int(self.weights.shape[0])
        return [np.arange(start, min(start + step, n)) for start in range(0, n, step)]

    def gather(self, values: np.ndarray) -> np.ndarray | None:
        """Per-client float64 values to rank 0, (participants,) in client-id order (None elsewhere)."""
        send = np.ascontiguousarray(values, dtype=np.float64)
        recv = np.empty(self.participants, dtype=np.float64) if self.is_server else None
        self.transport.gather_rows(send, recv, self.rows_per_rank)
        return recv

    def scatter(self, values: np.ndarray | None) -> np.ndarray:
        """Rank 0's per-client values (participants,) to every rank; returns this rank's share."""
        full = np.ascontiguousarray(values, dtype=np.float64) if self.is_server else np.empty(self.participants)
        self.transport.broadcast(full)
        start = int(sum(self.rows_per_rank[: self.transport.rank]))
        return full[start:start + len(self.ids)]
