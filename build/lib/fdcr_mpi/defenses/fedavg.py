"""FedAvg (paper Eq. 1b): w_{t+1} = sum_k alpha_k w_k with alpha_k = N_k / N; nobody removed."""

from __future__ import annotations

import numpy as np

from fdcr_mpi.defenses.base import Defense, RoundResult, register
from fdcr_mpi.defenses.ops import ClientOps


@register("fedavg")
class FedAvg(Defense):
    """Vanilla FedAvg: the sample-weighted mean of the client models."""

    summary = "FedAvg (Vanilla): w = sum_k N_k/N w_k, no defense"
    reducible = True

    def aggregate_ops(self, ops: ClientOps) -> RoundResult | None:
        """Eq. 1b as one weighted sum over the clients (ordered on the server, exact across ranks)."""
        weights = ops.weighted_sum(ops.alpha, ops.weights, to_all=False)
        if not ops.is_server:
            return None
        return RoundResult(weights=weights, alpha_hat=ops.alpha_all.copy(),
                           removed=np.zeros(ops.participants, dtype=bool), diagnostics={})
