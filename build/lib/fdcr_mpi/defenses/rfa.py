"""Robust Federated Aggregation (Pillutla, Kakade and Harchaoui, IEEE TSP 2022), docs/SPEC.md section 7.

The update is the alpha-weighted geometric median argmin_z sum_k alpha_k ||z - delta_k||,
approximated by the smoothed Weiszfeld algorithm from z_0 = sum_k alpha_k delta_k:
beta_k = alpha_k / max(eps, ||z - delta_k||), z = sum_k beta_k delta_k / sum_k beta_k,
for at most 3 iterations (eps = 1e-5), stopping early when the objective improves by less
than ftol (1e-6) relative, as the authors' benchmark. alpha_hat = the final beta, normalised.
"""

from __future__ import annotations

import numpy as np
import pydantic

from fdcr_mpi.defenses._baseline import (
    alpha_numpy,
    combine,
    distances_to,
    finish,
    normalized,
    trainable_updates,
)
from fdcr_mpi.defenses.base import Defense, RoundInputs, RoundResult, register


@register("rfa")
class RFA(Defense):
    """Weighted geometric median of the updates by smoothed Weiszfeld."""

    summary = "RFA: weighted geometric median of the updates (smoothed Weiszfeld, 3 iterations)"

    class Options(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
        max_iter: int = pydantic.Field(default=3, ge=0, description="Weiszfeld iterations")
        eps: float = pydantic.Field(default=1e-5, gt=0.0, description="smoothing: distances below are eps")
        ftol: float = pydantic.Field(default=1e-6, ge=0.0, description="relative objective change that stops")

    def aggregate(self, inputs: RoundInputs) -> RoundResult:
        updates = trainable_updates(inputs)
        alpha = normalized(alpha_numpy(inputs))
        weights = alpha
        median = combine(weights, updates)
        objective = float(alpha @ distances_to(updates, median))
        iterations = 0
        for _ in range(self.options.max_iter):
            dist = distances_to(updates, median)
            weights = normalized(alpha / np.maximum(dist, self.options.eps))
            median = combine(weights, updates)
            previous, objective = objective, float(alpha @ distances_to(updates, median))
            iterations += 1
            if abs(previous - objective) < self.options.ftol * objective:
                break
        return finish(inputs, median, weights, np.zeros(inputs.num_clients, dtype=bool),
                      {"iterations": iterations, "objective": objective})
