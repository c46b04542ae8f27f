"""Coordinate-wise trimmed mean (Yin, Chen, Ramchandran and Bartlett, "Byzantine-Robust Distributed
Learning: Towards Optimal Statistical Rates", ICML 2018, Algorithm 1 option II).

With n updates delta_1..delta_n (trainable entries) and trim fraction beta, per coordinate j:

1. b = floor(beta * n), at most (n - 1) // 2 so that at least one value remains;
2. sort the column, drop the b largest and the b smallest values;
3. trmean_j = the mean of the n - 2b remaining values (unweighted, as in the paper);
4. w_{t+1} = w_t + trmean.

Default beta = 0.1: the paper's guarantee for the trimmed mean needs beta >= alpha, the fraction
of Byzantine machines, and its experiments set beta to the alpha they simulate (we read 0.05 and
0.1 there); 0.1 trims one value from each end for 10 clients. Set it to at least the expected
attacker fraction (``trimmed_mean.beta``).
This is the textbook rule (drop the extremes); ``trimmed_median`` is the other published form
(keep the n - 2b values closest to the median).

alpha_hat_k: the share of the kept values that are client k's (averaged over coordinates; equal
values share equally, see ``coordinate_median.order_statistic_mean``); a client never kept is
removed. ``trimmed_mean(rows, b)`` is the plain rule on a (B, P) tensor (Bucketing uses it).
"""

from __future__ import annotations

import math

import numpy as np
import pydantic
import torch

from fdcr_mpi.defenses._baseline import finish, trainable_updates
from fdcr_mpi.defenses.base import Defense, RoundInputs, RoundResult, register
from fdcr_mpi.defenses.coordinate_median import order_statistic_mean

DEFAULT_BETA = 0.1


def trim_count(n: int, beta: float) -> int:
    """Step 1: b = floor(beta * n), at most (n - 1) // 2 (at least one value is kept)."""
    return max(min(int(math.floor(beta * n + 1e-9)), (n - 1) // 2), 0)


def trimmed_mean_weights(n: int, b: int) -> np.ndarray:
    """Position weights of the trimmed mean: 1 / (n - 2b) on sorted positions b..n-b-1, 0 on the rest."""
    c = np.zeros(n, dtype=np.float64)
    c[b:n - b] = 1.0 / (n - 2 * b)
    return c


def trimmed_mean(rows: torch.Tensor, b: int) -> tuple[torch.Tensor, np.ndarray]:
    """Steps 2-3 on a (B, P) tensor: the trimmed mean (P,) float32 and each row's (B,) share of kept values."""
    n = rows.shape[0]
    b = max(min(int(b), (n - 1) // 2), 0)
    return order_statistic_mean(rows, trimmed_mean_weights(n, b))


@register("trimmed_mean")
class TrimmedMean(Defense):
    """Per coordinate, drop the b largest and b smallest values and average the rest."""

    summary = "Trimmed Mean: per coordinate, drop the b largest and b smallest values, average the rest (b = 0.1 n)"

    class Options(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
        beta: float = pydantic.Field(default=DEFAULT_BETA, ge=0.0, lt=0.5,
                                     description="trim fraction: b = floor(beta * n) values dropped at each end")

    def aggregate(self, inputs: RoundInputs) -> RoundResult:
        b = trim_count(inputs.num_clients, self.options.beta)
        step, share = trimmed_mean(trainable_updates(inputs), b)
        return finish(inputs, step, share, share == 0, {"b": b, "kept_share": share})
