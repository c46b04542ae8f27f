"""Model replacement (Bagdasaryan et al., "How To Backdoor Federated Learning", AISTATS 2020): a
BadNets attacker (``attacks.badnets``) scales its update by gamma so that it replaces the global
model when averaged,

    w_k <- w_t + gamma (w_k - w_t),   gamma = n / eta                          (paper, eq. 3)

n the participants and eta the server's learning rate (1 here, FedAvg). ``scaling.gamma`` fixes
gamma; ``attack.scale`` applies on top, as for any attack.
"""

from __future__ import annotations

import pydantic
import torch

from fdcr_mpi.attacks.badnets import BadNets
from fdcr_mpi.attacks.base import register
from fdcr_mpi.config import participants


@register("scaling")
class Scaling(BadNets):
    """BadNets with the update scaled by n / eta (model replacement)."""

    summary = "Scaling: BadNets with the update scaled by gamma = participants / server lr (model replacement)"

    class Options(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
        gamma: float | None = pydantic.Field(default=None, gt=0,
                                             description="the scale; None: participants per round (n / eta, eta = 1)")

    @property
    def gamma(self) -> float:
        return float(participants(self.config)) if self.options.gamma is None else self.options.gamma

    @torch.no_grad()
    def update(self, weights: torch.Tensor, global_weights: torch.Tensor) -> None:
        super().update(weights, global_weights)
        weights.sub_(global_weights).mul_(self.gamma).add_(global_weights)
