"""CRFL (Xie, Chen, Chen and Li, ICML 2021), server side, ALGORITHM.md section 7.

FedAvg, then clip the global model's trainable parameter vector to the norm bound
rho_t = min(clip_bound, bound_slope * t + bound_bias), then, every round but the last, add
N(0, sigma^2) noise (sigma = 0.01) to every trainable parameter. The noise comes from a
torch.Generator seeded by (seed, DEFENSE, round). Buffers are plain FedAvg.

Defaults: a constant bound of 100. The CRFL code's schedule min(15, 0.1 t + 2)
(``clip_bound=15 bound_slope=0.1 bound_bias=2``) was sized for its own models: SimpleCNN
starts at a parameter norm of 13.9, so that schedule clips it to 2 in round 0 and the run
stays at chance accuracy (measured: A 10.7% on MNIST). The paper's CRFL figures are close
to FedAvg's, which a bound above the model's norm reproduces.
"""

from __future__ import annotations

import numpy as np
import pydantic
import torch

from fdcr_mpi.defenses._baseline import (
    alpha_numpy,
    combine,
    distances_to,
    finish,
    trainable_mask,
    trainable_updates,
)
from fdcr_mpi.defenses.base import Defense, RoundInputs, RoundResult, register
from fdcr_mpi.seeding import DEFENSE, torch_generator


@register("crfl")
class CRFL(Defense):
    """FedAvg, parameter-norm clipping and Gaussian smoothing noise."""

    summary = "CRFL: FedAvg, clip the global parameter norm, add N(0, 0.01^2) noise except in the last round"

    class Options(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
        clip_bound: float = pydantic.Field(default=100.0, gt=0.0, description="largest parameter-norm bound")
        bound_slope: float = pydantic.Field(default=0.0, ge=0.0, description="dynamic bound: slope per round")
        bound_bias: float = pydantic.Field(default=100.0, gt=0.0, description="dynamic bound at round 0")
        sigma: float = pydantic.Field(default=0.01, ge=0.0, description="std of the parameter noise")
        seed: int = pydantic.Field(default=0, description="seed of the noise (with the round)")

    def bound(self, round_: int) -> float:
        """rho_t = min(clip_bound, bound_slope * t + bound_bias)."""
        return min(self.options.clip_bound, self.options.bound_slope * round_ + self.options.bound_bias)

    def aggregate(self, inputs: RoundInputs) -> RoundResult:
        alpha = alpha_numpy(inputs)
        mask = trainable_mask(inputs)
        params = inputs.global_weights[mask].to(torch.float32) + combine(alpha, trainable_updates(inputs))
        norm = float(distances_to(params.unsqueeze(0), torch.zeros_like(params))[0])
        bound = self.bound(inputs.round)
        if norm > bound:
            params = params * float(bound / norm)
        noised = inputs.round < inputs.total_rounds - 1 and self.options.sigma > 0
        if noised:
            gen = torch_generator(self.options.seed, DEFENSE, inputs.round)
            noise = torch.randn(params.numel(), generator=gen, dtype=torch.float32)
            params = params + self.options.sigma * noise.to(params.device)
        return finish(inputs, None, alpha, np.zeros(inputs.num_clients, dtype=bool),
                      {"norm_before_clip": norm, "bound": bound, "noised": bool(noised)}, params=params)
