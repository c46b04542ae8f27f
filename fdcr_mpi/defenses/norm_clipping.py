"""Norm clipping (Sun, Kairouz, Suresh and McMahan, "Can You Really Backdoor Federated Learning?",
arXiv:1911.07963, 2019: the defense it calls "norm thresholding of updates").

With updates delta_k (trainable entries) and FedAvg weights alpha_k = N_k / N:

1. M: the norm bound (see below);
2. clipped_k = delta_k * min(1, M / ||delta_k||_2)   (c_k = min(1, M / ||delta_k||), 1 for a zero update);
3. w_{t+1} = w_t + sum_k alpha_k clipped_k.

The bound M (option ``bound``):

- ``median`` (default): M = the median of this round's update norms (mean of the two middle norms
  for an even count). This is the form later work uses (e.g. the median-norm clipping of
  Nguyen et al., FLAME, USENIX Security 2022); it needs no tuning, whatever the model's scale,
  and bounds every update to the norm of a typical one. A deviation from the paper, which fixes M.
- a number: the paper's fixed M, in the units of the update w_k - w_t. The paper sweeps M
  for its EMNIST CNN; a fixed value only makes sense for a given model and training setup,
  so there is no model-independent default.

alpha_hat_k = alpha_k c_k / sum_j alpha_j c_j: the share of client k among the raw updates in
the step (the step is (sum_j alpha_j c_j) * sum_k alpha_hat_k delta_k); buffers are averaged
with it. Nobody is removed (a client is removed only if its share is 0, which needs M = 0).
``weak_dp`` adds Gaussian noise to this step.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import numpy as np
import pydantic
import torch

from fdcr_mpi.defenses._baseline import (
    alpha_numpy,
    clip_factors,
    combine,
    finish,
    normalized,
    trainable_updates,
    update_norms,
)
from fdcr_mpi.defenses.base import Defense, RoundInputs, RoundResult, register


def check_bound(value: Any) -> Any:
    """The ``bound`` option: 'median' or a finite number > 0 (checked before the type, for one clear message)."""
    if value == "median":
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError("M must be 'median' or a positive number") from None
    if isinstance(value, bool) or not 0 < number < math.inf:
        raise ValueError("M must be 'median' or a positive number")
    return number


Bound = Annotated[float | Literal["median"], pydantic.BeforeValidator(check_bound)]
BOUND_DESCRIPTION = "norm bound M: 'median' (the median update norm of the round) or a fixed number (the paper's M)"


def norm_bound(norms: np.ndarray, bound: float | str) -> float:
    """Step 1: M = the median norm (``bound='median'``) or the fixed number given."""
    return float(np.median(norms)) if bound == "median" else float(bound)


def clipped_mean(rows: torch.Tensor, alpha: np.ndarray, bound: float | str) -> tuple[torch.Tensor, np.ndarray,
                                                                                    dict[str, Any]]:
    """Steps 1-3: the step sum_k alpha_k c_k delta_k (P,) float32, alpha_hat (K,) and the diagnostics."""
    norms = update_norms(rows)
    m = norm_bound(norms, bound)
    factors = clip_factors(norms, m)
    coef = np.asarray(alpha, dtype=np.float64) * factors
    return combine(coef, rows), normalized(coef), {"update_norm": norms, "clip_factor": factors, "norm_bound": m}


@register("norm_clipping")
class NormClipping(Defense):
    """Clip every update to norm M, then FedAvg."""

    summary = "Norm clipping: clip each update to norm M (default: the round's median norm), then FedAvg"

    class Options(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
        bound: Bound = pydantic.Field(default="median", description=BOUND_DESCRIPTION)

    def aggregate(self, inputs: RoundInputs) -> RoundResult:
        step, alpha_hat, diagnostics = clipped_mean(trainable_updates(inputs), alpha_numpy(inputs), self.options.bound)
        return finish(inputs, step, alpha_hat, alpha_hat == 0, diagnostics)
