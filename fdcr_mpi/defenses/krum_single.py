"""Krum (Blanchard, El Mhamdi, Guerraoui and Stainer, "Machine Learning with Adversaries: Byzantine
Tolerant Gradient Descent", NeurIPS 2017): keep the ONE update closest to its neighbours.

With n updates delta_1..delta_n (trainable entries) and f assumed attackers:

1. d_ij = ||delta_i - delta_j||^2 (squared Euclidean distances);
2. score(i) = sum of d_ij over the n - f - 2 nearest other updates j (the paper's Krum score);
3. i* = argmin_i score(i), ties to the lower client index;
4. w_{t+1} = w_t + delta_{i*}; alpha_hat is 1 for client i* and 0 for the others (all removed).

Default f: the paper's assumption 2f + 2 < n, at its largest: f = (n - 3) // 2 (3 for n = 10), and
0 when n < 3. A configured f is used as is; the neighbour count n - f - 2 is clamped to
1..n - 1 (so K = 1 and K = 2 work: with K = 2 both scores are equal and client 0 is chosen).
This is Multi-Krum's ``multi_krum`` with m = 1, but with the paper's f instead of n // 2.
``krum(rows, f)`` is the plain rule on a (B, P) tensor (Bucketing uses it on bucket means).
"""

from __future__ import annotations

import numpy as np
import pydantic
import torch

from fdcr_mpi.defenses._baseline import (
    combine,
    finish,
    krum_scores,
    pairwise_distances,
    trainable_updates,
)
from fdcr_mpi.defenses.base import Defense, RoundInputs, RoundResult, register


def default_byzantine(n: int) -> int:
    """The largest f that the paper's condition 2f + 2 < n allows: (n - 3) // 2, at least 0."""
    return max((n - 3) // 2, 0)


def krum_select(rows: torch.Tensor, f: int | None = None) -> tuple[int, np.ndarray, int]:
    """Steps 1-3: (i*, the (n,) Krum scores, the f used); ``f`` None means ``default_byzantine(n)``."""
    n = rows.shape[0]
    f_used = default_byzantine(n) if f is None else int(f)
    scores = krum_scores(pairwise_distances(rows, "sqeuclidean"), n - f_used - 2)
    return int(np.argmin(scores)), scores, f_used  # argmin: the first minimum, the lower index


def krum(rows: torch.Tensor, f: int | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """Krum on a (B, P) tensor: (the selected row (P,) float32, its (B,) one-hot share)."""
    chosen, _, _ = krum_select(rows, f)
    share = np.zeros(rows.shape[0], dtype=np.float64)
    share[chosen] = 1.0
    return combine(share, rows), share


@register("krum")
class Krum(Defense):
    """Keep the single update with the lowest Krum score."""

    summary = "Krum: keep the one update with the smallest sum of squared distances to its n-f-2 neighbours"

    class Options(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
        f: int | None = pydantic.Field(default=None, ge=0,
                                       description="assumed attackers; None: (n - 3) // 2, the largest with 2f + 2 < n")

    def aggregate(self, inputs: RoundInputs) -> RoundResult:
        updates = trainable_updates(inputs)
        chosen, scores, f = krum_select(updates, self.options.f)
        alpha_hat = np.zeros(inputs.num_clients, dtype=np.float64)
        alpha_hat[chosen] = 1.0
        return finish(inputs, combine(alpha_hat, updates), alpha_hat, alpha_hat == 0,
                      {"krum_score": scores, "f": f, "selected": chosen})
