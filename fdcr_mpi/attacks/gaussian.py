"""Gaussian attack (Fang, Cao, Jia and Gong, "Local Model Poisoning Attacks to Byzantine-Robust
Federated Learning", USENIX Security 2020, section 5.1): every attacker sends a vector drawn from
N(0, sigma^2) per coordinate, the paper's variance 200 (sigma = sqrt(200)) by default. Drawn on
the server from the round's attack generator (attacks.collusion), so any launch sends the same.
"""

from __future__ import annotations

import math

import pydantic
import torch

from fdcr_mpi.attacks.base import Attack, RoundUpdates, register


@register("gaussian")
class Gaussian(Attack):
    """Every attacker sends Gaussian noise."""

    summary = "Gaussian: every attacker sends N(0, sigma^2) noise (variance 200, Fang et al.)"
    colludes = True

    class Options(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
        mean: float = pydantic.Field(default=0.0, description="the noise's mean per coordinate")
        sigma: float = pydantic.Field(default=math.sqrt(200.0), gt=0, description="its standard deviation")

    def collude(self, round_: RoundUpdates) -> torch.Tensor:
        shape = (round_.num_attackers, round_.updates.shape[1])
        noise = round_.rng.normal(self.options.mean, self.options.sigma, size=shape)
        return torch.from_numpy(noise.astype("float32"))
