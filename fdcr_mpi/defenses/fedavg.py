"""FedAvg (paper Eq. 1b): w_{t+1} = sum_k alpha_k w_k with alpha_k = N_k / N; nobody removed."""

from __future__ import annotations

import numpy as np
import torch

from fdcr_mpi.defenses.base import Defense, RoundInputs, RoundResult, register
from fdcr_mpi.reduction import Reduction


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


@register("fedavg")
class FedAvg(Defense):
    """Vanilla FedAvg: the sample-weighted mean of the client models."""

    summary = "FedAvg (Vanilla): w = sum_k N_k/N w_k, no defense"
    reducible = True

    def aggregate(self, inputs: RoundInputs) -> RoundResult:
        alpha = inputs.alpha.cpu().numpy().astype(np.float64)
        weights = ordered_weighted_sum(alpha, inputs.client_weights)
        return RoundResult(
            weights=weights,
            alpha_hat=alpha,
            removed=np.zeros(inputs.num_clients, dtype=bool),
            diagnostics={},
        )

    def aggregate_reduced(self, ctx: Reduction) -> RoundResult | None:
        """The same sum as one exact reduction over the ranks (``fdcr_mpi.reduction``)."""
        weights = ctx.weighted_sum(ctx.alpha, ctx.weights, to_all=False)
        if not ctx.is_server:
            return None
        return RoundResult(weights=weights, alpha_hat=ctx.alpha_all.copy(),
                           removed=np.zeros(ctx.participants, dtype=bool), diagnostics={})
