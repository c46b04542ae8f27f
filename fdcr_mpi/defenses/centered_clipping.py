"""Centered clipping (Karimireddy, He and Jaggi, "Learning from History for Byzantine Robust
Optimization", ICML 2021: the CC aggregator).

With n updates x_1..x_n (trainable entries), a clipping radius tau and L iterations:

1. v_0 = the previous round's aggregate step (the "history"; zero in the first round);
2. for l = 0..L-1:  v_{l+1} = v_l + (1/n) sum_i clip_tau(x_i - v_l),
   clip_tau(z) = z * min(1, tau / ||z||_2);
3. w_{t+1} = w_t + v_L, and v_L is kept as the next round's v_0.

Each update moves the centre by at most tau / n per iteration, whatever its norm. The average is
uniform (1/n), as in the paper: the sample sizes N_k play no part.

Defaults tau = 100, L = 1: the authors' released code for this paper
(github.com/epfml/byzantine-robust-optimizer, ``momentum-robustness/cifar10-all.py``:
``Clipping(tau=100, n_iter=1)``); their hyperparameter sweep (``cifar10-CC-HP-explore``) tried
tau in {0.1, 10, 1000} and L in {1, 3, 5}. tau is in the units of the aggregated vectors: there,
the workers' (momentum) gradients; here, the model updates w_k - w_t, which may be much smaller,
so with the default an ordinary update is not clipped and only far-out ones are. Set
``centered_clipping.tau`` to the scale of a benign update's distance to the centre for a
tighter bound.

alpha_hat: expanding the iterations, v_L = c_0 v_0 + sum_i c_i x_i; alpha_hat_k = c_k / sum_i c_i,
the share of client k among the updates (c_0, the weight left on the history, is in the
diagnostics as ``center_weight``). Nobody is removed. The state (v) is a (P,) float32 array,
checkpointed, so a resumed run continues bitwise identically.
``centered_clip(rows, center, tau, iterations)`` is the plain rule on a (B, P) tensor (Bucketing uses it).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pydantic
import torch

from fdcr_mpi.defenses._baseline import distances_to, finish, normalized, trainable_updates
from fdcr_mpi.defenses.base import Defense, RoundInputs, RoundResult, register
from fdcr_mpi.defenses.norm_clipping import clip_factors
from fdcr_mpi.errors import UserError

PAPER_TAU = 100.0  # epfml/byzantine-robust-optimizer, momentum-robustness/cifar10-all.py
PAPER_ITERATIONS = 1


def centered_clip(rows: torch.Tensor, center: torch.Tensor, tau: float,
                  iterations: int) -> tuple[torch.Tensor, np.ndarray, dict[str, Any]]:
    """Step 2 on a (B, P) tensor from v_0 = ``center``: (v_L (P,) float32, the coefficients c_i (B,)
    of the rows in v_L, diagnostics: c_0 and the first iteration's distances and clip factors)."""
    n = rows.shape[0]
    v = center.to(device=rows.device, dtype=torch.float32).clone()
    coef, center_coef = np.zeros(n, dtype=np.float64), 1.0
    first: dict[str, Any] = {}
    for it in range(iterations):
        distance = distances_to(rows, v)
        weight = clip_factors(distance, tau) / n  # (1/n) min(1, tau / ||x_i - v||)
        if it == 0:
            first = {"distance_to_center": distance, "clip_factor": weight * n}
        move = torch.zeros_like(v)
        for i in range(n):  # client order: bitwise reproducible
            move += (rows[i].to(torch.float32) - v) * float(np.float32(weight[i]))
        v = v + move
        kept = 1.0 - float(weight.sum())  # v_{l+1} = (1 - sum_i w_i) v_l + sum_i w_i x_i
        coef, center_coef = kept * coef + weight, kept * center_coef
    return v, coef, {**first, "center_weight": center_coef}


class Center:
    """The state of centered clipping: the previous aggregate step v, (P,) float32 (None: zero)."""

    KEY = "center"

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def start(self, size: int, device: torch.device, name: str) -> torch.Tensor:
        """v_0 on ``device``: the kept step, or zeros before the first round."""
        if self.value is None:
            return torch.zeros(size, dtype=torch.float32, device=device)
        if self.value.numel() != size:
            raise UserError(f"defense {name!r} holds a centre of {self.value.numel()} parameters, this round's "
                            f"updates {size}: the model changed")
        return self.value.to(device)

    def keep(self, step: torch.Tensor) -> None:
        self.value = step.detach().to(torch.float32).clone()

    def state_dict(self) -> dict[str, np.ndarray]:
        return {} if self.value is None else {self.KEY: self.value.cpu().numpy().copy()}

    def load_state_dict(self, state: dict[str, np.ndarray], name: str) -> None:
        unknown = set(state) - {self.KEY}
        if unknown:
            raise UserError(f"the checkpoint holds state {sorted(unknown)} that defense {name!r} does not keep")
        value = state.get(self.KEY)
        self.value = None if value is None else torch.from_numpy(np.asarray(value, dtype=np.float32).copy())


@register("centered_clipping")
class CenteredClipping(Defense):
    """Iterative clipping around the previous aggregate."""

    summary = "Centered clipping: v += mean_i clip_tau(x_i - v) from the last aggregate (tau = 100, 1 iteration)"

    class Options(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
        tau: float = pydantic.Field(default=PAPER_TAU, gt=0.0, description="clipping radius around the centre")
        iterations: int = pydantic.Field(default=PAPER_ITERATIONS, ge=1, description="L: clipping iterations per round")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.center = Center()

    def aggregate(self, inputs: RoundInputs) -> RoundResult:
        updates = trainable_updates(inputs)
        start = self.center.start(updates.shape[1], updates.device, self.name)
        step, coef, diagnostics = centered_clip(updates, start, self.options.tau, self.options.iterations)
        self.center.keep(step)
        alpha_hat = normalized(coef)
        return finish(inputs, step, alpha_hat, alpha_hat == 0, diagnostics)

    def state_dict(self) -> dict[str, np.ndarray]:
        return self.center.state_dict()

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.center.load_state_dict(state, self.name)
