"""Min-Max (Shejwalkar and Houmansadr, "Manipulating the Byzantine: Optimizing Model Poisoning
Attacks and Defenses for Federated Learning", NDSS 2021, section IV-B): every attacker sends

    m = mu - gamma p,   the largest gamma with  max_i ||m - b_i|| <= max_{i,j} ||b_i - b_j||

(eq. 7) over the updates b_i the attackers know, mu their mean and p the perturbation
(``unit_vec``, ``std`` or ``sign``, attacks._crafting). gamma by the authors' halving search
from gamma_init; defaults gamma_init = 10, tau = 1e-5 and the ``unit_vec`` perturbation, those of
the authors' released code (NDSS21-Model-Poisoning) as re-implemented by Blades and others.
"""

from __future__ import annotations

from typing import Literal

import pydantic
import torch

from fdcr_mpi.attacks._crafting import pairwise_squared, shifted_mean, squared_distances
from fdcr_mpi.attacks.base import Attack, RoundUpdates, register


class SearchOptions(pydantic.BaseModel):
    """The options Min-Max and Min-Sum share."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    perturbation: Literal["unit_vec", "std", "sign"] = pydantic.Field(
        default="unit_vec", description="the direction p subtracted from the mean")
    gamma_init: float = pydantic.Field(default=10.0, gt=0, description="the search's first gamma")
    tau: float = pydantic.Field(default=1e-5, gt=0, description="the search stops when gamma moves by less")


def min_max_update(reference: torch.Tensor, kind: str, gamma_init: float, tau: float) -> tuple[torch.Tensor, float]:
    """(m, gamma): eq. 7's largest gamma, m = mu - gamma p, (P,) float32: m no farther from any
    known update than the two farthest known updates are from each other."""
    bound = float(pairwise_squared(reference).max())
    return shifted_mean(reference, kind, gamma_init, tau,
                        lambda m: float(squared_distances(reference, m).max()) <= bound)


@register("min_max")
class MinMax(Attack):
    """Every attacker sends mu - gamma p, no farther from any known update than they are from each other."""

    summary = "Min-Max: mean - gamma*p, the largest gamma keeping it within the known updates' max distance"
    colludes = True
    Options = SearchOptions

    def collude(self, round_: RoundUpdates) -> torch.Tensor:
        o = self.options
        update, self.gamma = min_max_update(round_.reference, o.perturbation, o.gamma_init, o.tau)
        return update.expand(round_.num_attackers, -1).clone()
