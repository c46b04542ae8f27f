"""Multi-Krum (Blanchard et al., NeurIPS 2017), docs/SPEC.md section 7.

Score of update i: the sum of squared distances to its n - f - 2 nearest other updates.
The m = n - f updates with the lowest scores are averaged (weights alpha_k renormalised
over the selection, i.e. FedAvg over the survivors). Defaults: f = n // 2 (the authors'
benchmark assumes up to half malicious), m = n - f. Both are clamped to valid ranges
(at least one neighbour, 1 <= m <= n); the effective values are in the diagnostics.
Distances use the trainable entries of the updates; ties go to the lower client index.

``variant: marsfl`` is the authors' benchmark (MarsFL ``Sever/MultiKrumSever.py`` and
``Sever/utils/utils.py: multi_krum``), which produced the paper's Table 4:

- the score sums the plain Euclidean (not squared) distances to all n - 1 other updates
  (MarsFL passes f - k = 1 attacker for an even n, so ``f`` has no effect);
- MarsFL lists the scores in the order its distance table was filled (client 1, 0, 2, ...,
  n - 1) and selects rows by position in that list, so clients 0 and 1 trade scores;
- m = 5 updates are kept (``m`` overrides) and averaged without the sample weights;
- the server applies the mean with momentum 0.9 to its own, separately drawn model
  (``_baseline.ServerMomentum``).
"""

from __future__ import annotations

import numpy as np
import pydantic

from fdcr_mpi.defenses._baseline import (
    MomentumBaseline,
    Variant,
    alpha_numpy,
    combine,
    krum_scores,
    marsfl_corrupted,
    normalized,
    pairwise_distances,
    trainable_updates,
)
from fdcr_mpi.defenses.base import RoundInputs, RoundResult, register

MARSFL_KEPT = 5  # MultiKrumSever's self.n


def marsfl_scores(dist: np.ndarray) -> np.ndarray:
    """MarsFL's Multi-Krum score of each row: the sum of the Euclidean distances to every other
    update, read in MarsFL's order, where rows 0 and 1 carry each other's score."""
    scores = krum_scores(dist, dist.shape[0] - 1)
    order = np.arange(scores.size)
    if scores.size >= 2:
        order[[0, 1]] = [1, 0]
    return scores[order]


@register("multi_krum")
class MultiKrum(MomentumBaseline):
    """Average the m updates with the lowest Krum scores."""

    summary = "Multi-Krum: average the n-f updates closest to their n-f-2 nearest neighbours"

    class Options(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
        variant: Variant = pydantic.Field(default="original", description="original or marsfl (the authors' benchmark)")
        f: int | None = pydantic.Field(default=None, ge=0, description="assumed attackers; None: n // 2 (original only)")
        m: int | None = pydantic.Field(default=None, ge=1,
                                       description="updates averaged; None: n - f (original) or 5 (marsfl)")

    def aggregate(self, inputs: RoundInputs) -> RoundResult:
        n = inputs.num_clients
        updates = trainable_updates(inputs)
        if self.marsfl:
            f = marsfl_corrupted(n)  # what MarsFL assumes; its score uses every other update anyway
            m = min(MARSFL_KEPT if self.options.m is None else self.options.m, n)
            scores = marsfl_scores(pairwise_distances(updates, "euclidean"))
        else:
            f = min(n // 2 if self.options.f is None else self.options.f, n - 1)
            m = min(max(n - f if self.options.m is None else self.options.m, 1), n)
            scores = krum_scores(pairwise_distances(updates, "sqeuclidean"), n - f - 2)
        selected = np.sort(np.argsort(scores, kind="stable")[:m])
        keep = np.zeros(n, dtype=bool)
        keep[selected] = True
        weights = np.ones(n) if self.marsfl else alpha_numpy(inputs)  # MarsFL: the plain mean
        alpha_hat = normalized(np.where(keep, weights, 0.0))
        return self.finish_step(inputs, combine(alpha_hat, updates), alpha_hat, ~keep,
                                {"krum_score": scores, "f": f, "m": m})
