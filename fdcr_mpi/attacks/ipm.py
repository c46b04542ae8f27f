"""Inner Product Manipulation (Xie, Koyejo and Gupta, "Fall of Empires: Breaking Byzantine-tolerant
SGD by Inner Product Manipulation", UAI 2019/2020): every attacker sends

    m = -epsilon mu

mu the mean of the updates the attackers know, so that the aggregate's inner product with the
true mean turns negative while m stays close to it (small epsilon passes distance-based rules).
The paper evaluates epsilon = 0.1 (against Krum-type rules) and a large epsilon (against
median-type rules); ``ipm.epsilon`` defaults to 0.1.
"""

from __future__ import annotations

import pydantic
import torch

from fdcr_mpi.attacks._crafting import mean_and_std
from fdcr_mpi.attacks.base import Attack, RoundUpdates, register


def ipm_update(reference: torch.Tensor, epsilon: float) -> torch.Tensor:
    """m = -epsilon mu, (P,) float32."""
    mu, _ = mean_and_std(reference)
    return (-epsilon * mu).to(torch.float32)


@register("ipm")
class InnerProductManipulation(Attack):
    """Every attacker sends -epsilon times the known mean update."""

    summary = "IPM: every attacker sends -epsilon * the mean of the known updates (inner product manipulation)"
    colludes = True

    class Options(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
        epsilon: float = pydantic.Field(default=0.1, gt=0, description="the scale of the reversed mean")

    def collude(self, round_: RoundUpdates) -> torch.Tensor:
        return ipm_update(round_.reference, self.options.epsilon).expand(round_.num_attackers, -1).clone()
