"""Sign flipping (e.g. Li et al., "RSA: Byzantine-Robust Stochastic Aggregation Methods", AAAI 2019;
the ``sign_flip`` of byzfl and FLPoison): an attacker trains honestly and sends its update reversed,

    w_k <- w_t - s (w_k - w_t),

s = ``sign_flip.scale`` (1: the update's exact opposite). A client-side attack (the ``update``
hook), after ``attack.scale``.
"""

from __future__ import annotations

import pydantic
import torch

from fdcr_mpi.attacks.base import Attack, register


@register("sign_flip")
class SignFlip(Attack):
    """An attacker sends its own update, reversed and scaled."""

    summary = "Sign flip: an attacker sends -s times its own honest update"

    class Options(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
        scale: float = pydantic.Field(default=1.0, gt=0, description="s: the reversed update's scale")

    @torch.no_grad()
    def update(self, weights: torch.Tensor, global_weights: torch.Tensor) -> None:
        super().update(weights, global_weights)
        weights.sub_(global_weights).mul_(-self.options.scale).add_(global_weights)
