"""Bulyan (El Mhamdi, Guerraoui and Rouault, ICML 2018), ALGORITHM.md section 7.

1. Iterated Krum: theta = n - 2f times, pick the remaining update with the lowest Krum
   score (sum of squared distances to its r - f - 2 nearest remaining updates, r the
   number remaining) and move it to the selection set.
2. Per coordinate, average the beta = theta - 2f selected values closest to the median.

Bulyan needs n >= 4f + 3. The default f = floor((n - 3) / 4) is the largest valid one
(f = 1 for n = 10: theta = 8, beta = 6); a configured f is clamped to that bound, and to
0 when n < 7 (then Bulyan is the plain mean). The authors' benchmark also ends up with
f = 1 for 10 clients (its n // 2 - (n - n // 2 - 1)). alpha_hat_k: the fraction of kept
values from client k; clients not selected by Krum are removed.
"""

from __future__ import annotations

import numpy as np
import pydantic

from fdcr_mpi.defenses._baseline import (
    finish,
    krum_scores,
    pairwise_distances,
    trainable_updates,
    trimmed_mean_around_median,
)
from fdcr_mpi.defenses.base import Defense, RoundInputs, RoundResult, register


def max_byzantine(n: int) -> int:
    """The largest f with n >= 4f + 3 (0 when there is none)."""
    return max((n - 3) // 4, 0)


def iterated_krum(sq_dist: np.ndarray, f: int, count: int) -> list[int]:
    """Indices chosen by ``count`` rounds of Krum over the shrinking remaining set, in pick order."""
    remaining = list(range(sq_dist.shape[0]))
    chosen: list[int] = []
    while len(chosen) < count and remaining:
        sub = sq_dist[np.ix_(remaining, remaining)]
        scores = krum_scores(sub, len(remaining) - f - 2)
        pick = remaining[int(np.argmin(scores))]  # argmin: first minimum, the lowest index
        chosen.append(pick)
        remaining.remove(pick)
    return chosen


@register("bulyan")
class Bulyan(Defense):
    """Iterated Krum selection, then a coordinate-wise trimmed mean around the median."""

    summary = "Bulyan: iterated Krum keeps n-2f updates, then per coordinate the n-4f closest to the median"

    class Options(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
        f: int | None = pydantic.Field(default=None, ge=0,
                                       description="assumed attackers; None: floor((n-3)/4); clamped to n >= 4f+3")

    def aggregate(self, inputs: RoundInputs) -> RoundResult:
        n = inputs.num_clients
        bound = max_byzantine(n)
        f = bound if self.options.f is None else min(self.options.f, bound)
        theta, beta = n - 2 * f, n - 4 * f
        updates = trainable_updates(inputs)
        chosen = sorted(iterated_krum(pairwise_distances(updates, "sqeuclidean"), f, theta))
        step, counts = trimmed_mean_around_median(updates[chosen], beta)
        alpha_hat = np.zeros(n, dtype=np.float64)
        alpha_hat[chosen] = counts / max(int(counts.sum()), 1)
        removed = np.ones(n, dtype=bool)
        removed[chosen] = False
        return finish(inputs, step, alpha_hat, removed, {"f": f, "theta": theta, "beta": beta})
