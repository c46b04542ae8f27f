"""FoolsGold (Fung, Yoon and Beschastnikh, RAID 2020), ALGORITHM.md section 7.

State: per client, the running sum H_k of its unit-norm updates (trainable entries; the
authors' benchmark normalises, the original sums raw gradients: ``normalize: false``).
Each round, with cs = cos(H_i, H_j) off the diagonal:

1. pardoning: cs_ij *= v_i / v_j when v_i < v_j, with v_i = max_j cs_ij;
2. w_i = 1 - max_j cs_ij, clipped to [0, 1], rescaled so that max w = 1, and 1 -> 0.99;
3. logit: w_i = kappa * (ln(w_i / (1 - w_i)) + 0.5), clipped to [0, 1] (kappa = 1).

Aggregation: the original multiplies each update by w_i as a per-client learning rate,
an unnormalised sum; in FedAvg form we use alpha_hat_k = w_k alpha_k / sum_j w_j alpha_j
and w_{t+1} = w_t + sum_k alpha_hat_k delta_k. Clients with w_k = 0 are removed; if all
are (every history identical), w_t is kept. The history is checkpointed as numpy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pydantic
import torch

from fdcr_mpi.defenses._baseline import (
    alpha_numpy,
    combine,
    cosine_matrix,
    distances_to,
    finish,
    normalized,
    trainable_updates,
)
from fdcr_mpi.defenses.base import Defense, RoundInputs, RoundResult, register
from fdcr_mpi.errors import UserError


def foolsgold_weights(cs: np.ndarray, kappa: float) -> np.ndarray:
    """The FoolsGold learning-rate vector from the history cosine matrix (diagonal ignored)."""
    n = cs.shape[0]
    cs = cs.astype(np.float64).copy()
    np.fill_diagonal(cs, 0.0)
    if n == 1:
        return np.ones(1)
    maxcs = cs.max(axis=1)
    for i in range(n):  # pardoning
        for j in range(n):
            if i != j and maxcs[i] < maxcs[j] and maxcs[j] > 0:
                cs[i, j] *= maxcs[i] / maxcs[j]
    wv = np.clip(1.0 - cs.max(axis=1), 0.0, 1.0)
    if wv.max() <= 0:
        return np.zeros(n)
    wv = wv / wv.max()
    wv[wv == 1.0] = 0.99
    with np.errstate(divide="ignore"):
        logit = kappa * (np.log(wv / (1.0 - wv)) + 0.5)
    logit[np.isposinf(logit)] = 1.0
    return np.clip(np.nan_to_num(logit, nan=0.0, neginf=0.0), 0.0, 1.0)


@register("foolsgold")
class FoolsGold(Defense):
    """Down-weight clients whose update histories are too similar (sybils)."""

    summary = "FoolsGold: cosine similarity of update histories, pardoning, logit re-weighting"
    keeps_client_history = True

    class Options(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
        kappa: float = pydantic.Field(default=1.0, gt=0.0, description="logit confidence")
        normalize: bool = pydantic.Field(default=True, description="sum unit-norm updates into the history")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.history: np.ndarray | None = None

    def aggregate(self, inputs: RoundInputs) -> RoundResult:
        updates = trainable_updates(inputs)
        history_rows = updates
        if self.options.normalize:
            norms = distances_to(updates, torch.zeros(updates.shape[1], device=updates.device))
            scale = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
            history_rows = updates * torch.as_tensor(scale, dtype=torch.float32, device=updates.device).unsqueeze(1)
        current = history_rows.detach().cpu().numpy().astype(np.float32)
        if self.history is not None and self.history.shape != current.shape:
            raise UserError(f"FoolsGold history has shape {self.history.shape}, this round's updates "
                            f"{current.shape}: the clients or the model changed")
        self.history = current.copy() if self.history is None else self.history + current
        cs = cosine_matrix(torch.from_numpy(self.history))
        wv = foolsgold_weights(cs, self.options.kappa)
        alpha_hat = normalized(wv * alpha_numpy(inputs))
        step = combine(alpha_hat, updates) if alpha_hat.sum() > 0 else None
        return finish(inputs, step, alpha_hat, alpha_hat == 0, {"foolsgold_weight": wv})

    def state_dict(self) -> dict[str, np.ndarray]:
        return {} if self.history is None else {"history": self.history.copy()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        unknown = set(state) - {"history"}
        if unknown:
            raise UserError(f"the checkpoint holds unknown FoolsGold state {sorted(unknown)}")
        self.history = np.asarray(state["history"], dtype=np.float32).copy() if "history" in state else None
