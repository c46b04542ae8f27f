"""Trimmed Median: coordinate-wise trimmed mean around the median, docs/SPEC.md section 7.

Per coordinate, keep the n - 2b client values closest to the coordinate's median and
average them (Yin et al., ICML 2018, in the "closest to the median" form of Bulyan's
second stage, El Mhamdi et al., ICML 2018). b = floor(trim_fraction * n), default 0.2,
clamped so that at least one value is kept. The median of an even count is the mean of
the two middle values; ties go to the lower client index. Applied to the trainable
entries of the updates. alpha_hat_k is the fraction of kept values that came from
client k (how much of the aggregate it carries); a client never kept counts as removed.

``variant: marsfl`` is the authors' benchmark (MarsFL ``Sever/TrimmedMeanSever.py`` and
``Sever/utils/utils.py: trimmed_mean``): it passes k = n - n // 2 - 1 as the attacker count
and keeps n - k - 1 = n // 2 values per coordinate (5 of 10; ``trim_fraction`` has no
effect), and applies the mean with momentum 0.9 to its own, separately drawn model
(``_baseline.ServerMomentum``).
"""

from __future__ import annotations

import math

import numpy as np
import pydantic

from fdcr_mpi.defenses._baseline import (
    MomentumBaseline,
    Variant,
    marsfl_kept,
    trainable_updates,
    trimmed_mean_around_median,
)
from fdcr_mpi.defenses.base import RoundInputs, RoundResult, register


def trim_count(n: int, fraction: float) -> int:
    """b = floor(fraction * n), at most (n - 1) // 2 so that n - 2b >= 1."""
    return min(int(math.floor(fraction * n + 1e-9)), (n - 1) // 2)


def marsfl_trim(n: int) -> int:
    """The attacker count MarsFL's Trimmed Median passes: k = n - n // 2 - 1."""
    return n - n // 2 - 1


@register("trimmed_median")
class TrimmedMedian(MomentumBaseline):
    """Per coordinate, the mean of the n - 2b values closest to the median."""

    summary = "Trimmed Median: per coordinate, average the n-2b values closest to the median (b = 0.2 n)"

    class Options(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
        variant: Variant = pydantic.Field(default="original", description="original or marsfl (the authors' benchmark)")
        trim_fraction: float = pydantic.Field(default=0.2, ge=0.0, lt=0.5,
                                              description="b = floor(trim_fraction * n) trimmed on each side (original)")

    def aggregate(self, inputs: RoundInputs) -> RoundResult:
        n = inputs.num_clients
        if self.marsfl:
            b = marsfl_trim(n)
            keep = marsfl_kept(n, b)
        else:
            b = trim_count(n, self.options.trim_fraction)
            keep = n - 2 * b
        updates = trainable_updates(inputs)
        step, counts = trimmed_mean_around_median(updates, keep)
        alpha_hat = counts.astype(np.float64) / max(int(counts.sum()), 1)
        return self.finish_step(inputs, step, alpha_hat, counts == 0, {"b": b, "kept_fraction": alpha_hat * keep})
