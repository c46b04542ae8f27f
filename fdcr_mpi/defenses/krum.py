"""Multi-Krum (Blanchard et al., NeurIPS 2017), ALGORITHM.md section 7.

Score of update i: the sum of squared distances to its n - f - 2 nearest other updates.
The m = n - f updates with the lowest scores are averaged (weights alpha_k renormalised
over the selection, i.e. FedAvg over the survivors). Defaults: f = n // 2 (the authors'
benchmark assumes up to half malicious), m = n - f. Both are clamped to valid ranges
(at least one neighbour, 1 <= m <= n); the effective values are in the diagnostics.
Distances use the trainable entries of the updates; ties go to the lower client index.
"""

from __future__ import annotations

import numpy as np
import pydantic

from fdcr_mpi.defenses._baseline import (
    alpha_numpy,
    combine,
    finish,
    krum_scores,
    normalized,
    pairwise_distances,
    trainable_updates,
)
from fdcr_mpi.defenses.base import Defense, RoundInputs, RoundResult, register


@register("multi_krum")
class MultiKrum(Defense):
    """Average the m updates with the lowest Krum scores."""

    summary = "Multi-Krum: average the n-f updates closest to their n-f-2 nearest neighbours"

    class Options(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
        f: int | None = pydantic.Field(default=None, ge=0, description="assumed attackers; None: n // 2")
        m: int | None = pydantic.Field(default=None, ge=1, description="updates averaged; None: n - f")

    def aggregate(self, inputs: RoundInputs) -> RoundResult:
        n = inputs.num_clients
        f = min(n // 2 if self.options.f is None else self.options.f, n - 1)
        m = min(max(n - f if self.options.m is None else self.options.m, 1), n)
        updates = trainable_updates(inputs)
        scores = krum_scores(pairwise_distances(updates, "sqeuclidean"), n - f - 2)
        selected = np.sort(np.argsort(scores, kind="stable")[:m])
        keep = np.zeros(n, dtype=bool)
        keep[selected] = True
        alpha_hat = normalized(np.where(keep, alpha_numpy(inputs), 0.0))
        return finish(inputs, combine(alpha_hat, updates), alpha_hat, ~keep,
                      {"krum_score": scores, "f": f, "m": m})
