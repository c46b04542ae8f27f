"""Bulyan (El Mhamdi, Guerraoui and Rouault, ICML 2018), docs/SPEC.md section 7.

1. Iterated Krum: theta = n - 2f times, pick the remaining update with the lowest Krum
   score (sum of squared distances to its r - f - 2 nearest remaining updates, r the
   number remaining) and move it to the selection set.
2. Per coordinate, average the beta = theta - 2f selected values closest to the median.

Bulyan needs n >= 4f + 3. The default f = floor((n - 3) / 4) is the largest valid one
(f = 1 for n = 10: theta = 8, beta = 6); a configured f is clamped to that bound, and to
0 when n < 7 (then Bulyan is the plain mean). alpha_hat_k: the fraction of kept values from
client k; clients not selected by Krum are removed.

``variant: marsfl`` is the authors' benchmark (MarsFL ``Sever/BulyanSever.py`` and
``Sever/utils/utils.py: bulyan, krum, trimmed_mean``), which produced the paper's Table 4:

- f defaults to MarsFL's f - k = n // 2 - (n - n // 2 - 1) (1 for an even n, 0 for an odd one),
  clamped like any f to n >= 4f + 3 (where MarsFL stops on an assertion, e.g. n = 6);
- the Krum score sums the plain Euclidean (not squared) distances to the r - f nearest of the
  r - 1 other remaining updates: all of them when f <= 1;
- the trimmed mean keeps theta - 2f - 1 values per coordinate (5 of 8 for n = 10, where the
  original keeps 6);
- the server applies the result with momentum 0.9 to its own, separately drawn model
  (``_baseline.ServerMomentum``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pydantic

from fdcr_mpi.defenses._baseline import (
    MomentumBaseline,
    Variant,
    krum_scores,
    marsfl_corrupted,
    marsfl_kept,
    pairwise_distances,
    trainable_updates,
    trimmed_mean_around_median,
)
from fdcr_mpi.defenses.base import RoundInputs, RoundResult, register


def max_byzantine(n: int) -> int:
    """The largest f with n >= 4f + 3 (0 when there is none)."""
    return max((n - 3) // 4, 0)


def iterated_krum(dist: np.ndarray, count: int, neighbours: Callable[[int], int]) -> list[int]:
    """Indices chosen by ``count`` rounds of Krum over the shrinking remaining set, in pick order;
    ``neighbours(r)``: how many of the nearest remaining updates a score sums over, r remaining."""
    remaining = list(range(dist.shape[0]))
    chosen: list[int] = []
    while len(chosen) < count and remaining:
        sub = dist[np.ix_(remaining, remaining)]
        scores = krum_scores(sub, neighbours(len(remaining)))
        pick = remaining[int(np.argmin(scores))]  # argmin: first minimum, the lowest index
        chosen.append(pick)
        remaining.remove(pick)
    return chosen


@register("bulyan")
class Bulyan(MomentumBaseline):
    """Iterated Krum selection, then a coordinate-wise trimmed mean around the median."""

    summary = "Bulyan: iterated Krum keeps n-2f updates, then per coordinate the n-4f closest to the median"

    class Options(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
        variant: Variant = pydantic.Field(default="original", description="original or marsfl (the authors' benchmark)")
        f: int | None = pydantic.Field(default=None, ge=0,
                                       description="assumed attackers; None: floor((n-3)/4) (original) or MarsFL's "
                                                   "(1 for an even n); clamped to n >= 4f+3")

    def aggregate(self, inputs: RoundInputs) -> RoundResult:
        n = inputs.num_clients
        bound = max_byzantine(n)
        default = marsfl_corrupted(n) if self.marsfl else bound
        f = min(default if self.options.f is None else self.options.f, bound)
        theta = n - 2 * f
        updates = trainable_updates(inputs)
        if self.marsfl:
            beta = marsfl_kept(theta, 2 * f)
            chosen = iterated_krum(pairwise_distances(updates, "euclidean"), theta, lambda r: r - f)
        else:
            beta = n - 4 * f
            chosen = iterated_krum(pairwise_distances(updates, "sqeuclidean"), theta, lambda r: r - f - 2)
        chosen = sorted(chosen)
        step, counts = trimmed_mean_around_median(updates[chosen], beta)
        alpha_hat = np.zeros(n, dtype=np.float64)
        alpha_hat[chosen] = counts / max(int(counts.sum()), 1)
        removed = np.ones(n, dtype=bool)
        removed[chosen] = False
        return self.finish_step(inputs, step, alpha_hat, removed, {"f": f, "theta": theta, "beta": beta})
