"""Coordinate-wise median (Yin, Chen, Ramchandran and Bartlett, "Byzantine-Robust Distributed
Learning: Towards Optimal Statistical Rates", ICML 2018, Algorithm 1 option I).

With n updates delta_1..delta_n (trainable entries), per coordinate j:

1. sort the column: x_(1) <= ... <= x_(n);
2. med_j = x_((n+1)/2) for odd n, (x_(n/2) + x_(n/2+1)) / 2 for even n (the mean of the two middle
   values, the usual convention: the paper leaves the even case open);
3. w_{t+1} = w_t + med (unweighted, as in the paper: the sample sizes N_k play no part).

alpha_hat_k, the share of the aggregate that client k carries: the average over coordinates of the
weight its value gets in step 2 (1 for the middle value, 1/2 for each of the two middle values),
split equally among clients holding an equal value, so that ties (identical updates) share
instead of going to one client by position. A client whose value is never used is removed.
There are no hyperparameters.

``order_statistic_mean`` is the general step "a weighted sum of sorted positions per coordinate";
the median here and the trimmed mean (``trimmed_mean.py``) are two choices of position weights.
``coordinate_median(rows)`` is the plain rule on a (B, P) tensor (Bucketing uses it on bucket means).
"""

from __future__ import annotations

import numpy as np
import torch

from fdcr_mpi.defenses._baseline import column_chunks, finish, normalized, trainable_updates
from fdcr_mpi.defenses.base import Defense, RoundInputs, RoundResult, register

SORT_CHUNK = 1 << 16  # columns per chunk: the tie bookkeeping holds a few (n, SORT_CHUNK) int64 blocks


def order_statistic_mean(rows: torch.Tensor, position_weights: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """Per coordinate j, sum_p c_p x_(p) over the sorted column (c: ``position_weights``, (n,), sum 1).

    Returns the (P,) float32 result (accumulated in float64) and each row's share, (n,) float64:
    the mean over coordinates of c summed over the sorted positions that row's value occupies,
    divided by how many rows hold that value (a run of equal values shares its weight equally),
    normalised to sum to 1.
    """
    n, p = rows.shape
    c = torch.as_tensor(np.asarray(position_weights, dtype=np.float64), device=rows.device)
    used = torch.nonzero(c != 0).flatten()
    cumulative = torch.cat([torch.zeros(1, dtype=torch.float64, device=rows.device), c.cumsum(0)])
    out = torch.empty(p, dtype=torch.float32, device=rows.device)
    share = torch.zeros(n, dtype=torch.float64, device=rows.device)
    for sl in column_chunks(p, SORT_CHUNK):
        block = rows[:, sl].to(torch.float32)
        ordered = block.sort(dim=0).values
        out[sl] = (c[used].unsqueeze(1) * ordered[used].to(torch.float64)).sum(dim=0).to(torch.float32)
        columns, values = ordered.T.contiguous(), block.T.contiguous()
        first = torch.searchsorted(columns, values, right=False)  # the run of equal values: [first, last)
        last = torch.searchsorted(columns, values, right=True)
        share += ((cumulative[last] - cumulative[first]) / (last - first).to(torch.float64)).sum(dim=0)
    return out, normalized(share.cpu().numpy())


def median_weights(n: int) -> np.ndarray:
    """Position weights of the median: 1 on the middle position (odd n), 1/2 on the two middle ones (even n)."""
    c = np.zeros(n, dtype=np.float64)
    c[(n - 1) // 2] += 0.5
    c[n // 2] += 0.5
    return c


def coordinate_median(rows: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """Steps 1-2 on a (B, P) tensor: the coordinate-wise median (P,) float32 and each row's (B,) share."""
    return order_statistic_mean(rows, median_weights(rows.shape[0]))


@register("median")
class CoordinateMedian(Defense):
    """Coordinate-wise median of the updates."""

    summary = "Median: coordinate-wise median of the updates (mean of the two middle values for even n)"

    def aggregate(self, inputs: RoundInputs) -> RoundResult:
        step, share = coordinate_median(trainable_updates(inputs))
        return finish(inputs, step, share, share == 0, {"median_share": share})
