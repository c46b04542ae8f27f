"""CRFL (Xie, Chen, Chen and Li, ICML 2021), server side, docs/SPEC.md section 7.

FedAvg, then clip the global model's trainable parameter vector to the norm bound
rho_t = min(clip_bound, bound_slope * t + bound_bias), then, every round but the last, add
N(0, sigma^2) noise (sigma = 0.01) to every trainable parameter. Buffers are plain FedAvg.
The noise comes from a torch.Generator of (run seed, DEFENSE, ``seed`` option, round): a seed
sweep varies it, and the option (default 0) varies it alone.

Defaults: a constant bound of 100. The CRFL code's schedule min(15, 0.1 t + 2)
(``clip_bound=15 bound_slope=0.1 bound_bias=2``) was sized for its own models: SimpleCNN
starts at a parameter norm of 13.9, so that schedule clips it to 2 in round 0 and the run
stays at chance accuracy (measured: A 10.7% on MNIST). The paper's CRFL figures are close
to FedAvg's, which a bound above the model's norm reproduces.

``variant: marsfl`` is the authors' benchmark (MarsFL ``Sever/CRFLSever.py``, its settings in
``utils/cfg.py``), which produced the paper's Table 4: the bound is min(15, 2t + 10) (the three
bound options have no effect), the clipping factor is rho_t / (norm + 1e-6), and the noise is
added to every entry of the model, buffers included.
"""

from __future__ import annotations

import numpy as np
import pydantic
import torch

from fdcr_mpi.defenses._baseline import (
    Variant,
    alpha_numpy,
    combine,
    distances_to,
    finish,
    trainable_mask,
    trainable_updates,
)
from fdcr_mpi.defenses.base import Defense, RoundInputs, RoundResult, register
from fdcr_mpi.seeding import DEFENSE, torch_generator

MARSFL_SCHEDULE = (15.0, 2.0, 10.0)  # param_clip_thres, epoch_index_weight, epoch_index_bias
MARSFL_CLIP_EPS = 1e-6


@register("crfl")
class CRFL(Defense):
    """FedAvg, parameter-norm clipping and Gaussian smoothing noise."""

    uses_total_rounds = True  # no noise in the last round
    summary = "CRFL: FedAvg, clip the global parameter norm, add N(0, 0.01^2) noise except in the last round"

    class Options(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
        variant: Variant = pydantic.Field(default="original", description="original or marsfl (the authors' benchmark)")
        clip_bound: float = pydantic.Field(default=100.0, gt=0.0, description="largest parameter-norm bound")
        bound_slope: float = pydantic.Field(default=0.0, ge=0.0, description="dynamic bound: slope per round")
        bound_bias: float = pydantic.Field(default=100.0, gt=0.0, description="dynamic bound at round 0")
        sigma: float = pydantic.Field(default=0.01, ge=0.0, description="std of the parameter noise")
        seed: int = pydantic.Field(default=0, ge=0, description="mixed with the run's seed: varies the noise alone")

    @property
    def marsfl(self) -> bool:
        return self.options.variant == "marsfl"

    def bound(self, round_: int) -> float:
        """rho_t = min(clip_bound, bound_slope * t + bound_bias) (MarsFL: min(15, 2t + 10))."""
        o = self.options
        clip, slope, bias = MARSFL_SCHEDULE if self.marsfl else (o.clip_bound, o.bound_slope, o.bound_bias)
        return min(clip, slope * round_ + bias)

    def noise(self, inputs: RoundInputs, size: int) -> torch.Tensor:
        """sigma * N(0, 1) draws of this round, (size,) float32 on the weights' device."""
        gen = torch_generator(inputs.seed, DEFENSE, self.options.seed, inputs.round)
        draw = torch.randn(size, generator=gen, dtype=torch.float32)
        return self.options.sigma * draw.to(inputs.global_weights.device)

    def aggregate(self, inputs: RoundInputs) -> RoundResult:
        alpha = alpha_numpy(inputs)
        mask = trainable_mask(inputs)
        params = inputs.global_weights[mask].to(torch.float32) + combine(alpha, trainable_updates(inputs))
        norm = float(distances_to(params.unsqueeze(0), torch.zeros_like(params))[0])
        bound = self.bound(inputs.round)
        if norm > bound:
            params = params * float(bound / (norm + (MARSFL_CLIP_EPS if self.marsfl else 0.0)))
        noised = inputs.round < inputs.total_rounds - 1 and self.options.sigma > 0
        if noised and not self.marsfl:
            params = params + self.noise(inputs, params.numel())
        result = finish(inputs, None, alpha, np.zeros(inputs.num_clients, dtype=bool),
                        {"norm_before_clip": norm, "bound": bound, "noised": bool(noised)}, params=params)
        if noised and self.marsfl:  # MarsFL smooths every entry of the state dict, buffers too
            result.weights += self.noise(inputs, result.weights.numel())
        return result
