"""Robust Learning Rate (Ozdayi, Kantarcioglu and Gel, AAAI 2021), docs/SPEC.md section 7.

Per coordinate v: server lr_v = +eta_s if |sum_k sign(delta_kv)| >= theta, else -eta_s
(theta = 4 for 10 clients, eta_s = 1); w_{t+1} = w_t + lr * sum_k alpha_k delta_k
(elementwise). sign(0) = 0. The authors' benchmark takes the signs of w_t - w_k (the
negated update), which leaves |sum sign| unchanged; it then adds lr times the sum of
negated updates, which we read as a sign slip and do not reproduce.
"""

from __future__ import annotations

import numpy as np
import pydantic
import torch

from fdcr_mpi.defenses._baseline import (
    alpha_numpy,
    column_chunks,
    combine,
    finish,
    trainable_updates,
)
from fdcr_mpi.defenses.base import Defense, RoundInputs, RoundResult, register


def robust_lr(updates: torch.Tensor, theta: float, server_lr: float) -> torch.Tensor:
    """(P,) float32: +server_lr where at least theta clients agree in sign (net), else -server_lr."""
    out = torch.empty(updates.shape[1], dtype=torch.float32, device=updates.device)
    for sl in column_chunks(updates.shape[1]):
        agreement = torch.sign(updates[:, sl]).sum(dim=0).abs()
        out[sl] = torch.where(agreement >= theta, server_lr, -server_lr)
    return out


@register("rlr")
class RobustLR(Defense):
    """Flip the server learning rate where too few clients agree on the update's sign."""

    summary = "RLR: per coordinate server lr = +1 if |sum sign(delta_k)| >= theta (4) else -1"

    class Options(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
        theta: float = pydantic.Field(default=4.0, ge=0.0, description="sign agreement threshold")
        server_lr: float = pydantic.Field(default=1.0, gt=0.0, description="|server learning rate|")

    def aggregate(self, inputs: RoundInputs) -> RoundResult:
        updates = trainable_updates(inputs)
        alpha = alpha_numpy(inputs)
        lr = robust_lr(updates, self.options.theta, self.options.server_lr)
        step = lr * combine(alpha, updates)
        flipped = float((lr < 0).to(torch.float64).mean()) if lr.numel() else 0.0
        return finish(inputs, step, alpha, np.zeros(inputs.num_clients, dtype=bool),
                      {"flipped_fraction": flipped})
