"""Min-Sum (Shejwalkar and Houmansadr, NDSS 2021, section IV-B): every attacker sends

    m = mu - gamma p,   the largest gamma with  sum_i ||m - b_i||^2 <= max_i sum_j ||b_i - b_j||^2

(eq. 8) over the updates b_i the attackers know; p, the search and the defaults as Min-Max
(``attacks.min_max``).
"""

from __future__ import annotations

import torch

from fdcr_mpi.attacks._crafting import pairwise_squared, shifted_mean, squared_distances
from fdcr_mpi.attacks.base import Attack, RoundUpdates, register
from fdcr_mpi.attacks.min_max import SearchOptions


def min_sum_update(reference: torch.Tensor, kind: str, gamma_init: float, tau: float) -> tuple[torch.Tensor, float]:
    """(m, gamma): eq. 8's largest gamma, m = mu - gamma p, (P,) float32: m's summed squared distance
    to the known updates within the largest such sum of a known update."""
    bound = float(pairwise_squared(reference).sum(dim=1).max())
    return shifted_mean(reference, kind, gamma_init, tau,
                        lambda m: float(squared_distances(reference, m).sum()) <= bound)


@register("min_sum")
class MinSum(Attack):
    """Every attacker sends mu - gamma p, its summed squared distance within the known updates' largest."""

    summary = "Min-Sum: mean - gamma*p, the largest gamma keeping its summed squared distance within the known"
    colludes = True
    Options = SearchOptions

    def collude(self, round_: RoundUpdates) -> torch.Tensor:
        o = self.options
        update, self.gamma = min_sum_update(round_.reference, o.perturbation, o.gamma_init, o.tau)
        return update.expand(round_.num_attackers, -1).clone()
