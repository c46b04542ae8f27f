"""FoolsGold (Fung, Yoon and Beschastnikh, RAID 2020), docs/SPEC.md section 7.

State: per client id, the running sum H_k of its unit-norm updates (trainable entries; the
authors' benchmark normalises, the original sums raw gradients: ``normalize: false``). The
history is kept by client id (``RoundInputs.client_ids``), so a client set aside by the
quarantine, or absent from a round, keeps its own history and nobody else's; it is updated
only in the rounds the client takes part in. Each round, with cs = cos(H_i, H_j) among this
round's clients, off the diagonal:

1. pardoning: cs_ij *= v_i / v_j when v_i < v_j, with v_i = max_j cs_ij;
2. w_i = 1 - max_j cs_ij, clipped to [0, 1], rescaled so that max w = 1, and 1 -> 0.99;
3. logit: w_i = kappa * (ln(w_i / (1 - w_i)) + 0.5), clipped to [0, 1] (kappa = 1).

Aggregation: the original multiplies each update by w_i as a per-client learning rate,
an unnormalised sum; in FedAvg form we use alpha_hat_k = w_k alpha_k / sum_j w_j alpha_j
and w_{t+1} = w_t + sum_k alpha_hat_k delta_k. Clients with w_k = 0 are removed; if all
are (every history identical), w_t is kept. The history is checkpointed as numpy.

``variant: marsfl`` is the authors' benchmark (MarsFL ``Sever/FoolsGoldSever.py`` and
``Sever/utils/utils.py: fools_gold``), which produced the paper's Table 4: updates are divided
by their norm + 1e-5; the cosine similarity is taken on the first n coordinates of the
histories only (n = this round's clients: MarsFL passes ``np.arange(n)`` as the "significant
features"); v_i gets + 1e-5 and the logit is ln(w / (1 - w) + 1e-5) + 0.5 (no kappa); and
w_{t+1} = w_t + sum_k w_k u_k, the unnormalised sum of the unit-norm updates u_k.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pydantic
import torch

from fdcr_mpi.defenses._baseline import (
    Variant,
    alpha_numpy,
    combine,
    cosine_matrix,
    finish,
    normalized,
    trainable_updates,
    unit_rows,
)
from fdcr_mpi.defenses.base import Defense, RoundInputs, RoundResult, register
from fdcr_mpi.errors import UserError

MARSFL_EPS = 1e-5


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


def marsfl_weights(cs: np.ndarray) -> np.ndarray:
    """MarsFL's ``fools_gold`` weights from the cosine matrix of the histories (its diagonal is
    replaced by cos - 1). Where every weight would be 0 MarsFL divides by zero; we return 0s."""
    n = cs.shape[0]
    cs = cs.astype(np.float64) - np.eye(n)
    maxcs = cs.max(axis=1) + MARSFL_EPS
    for i in range(n):  # pardoning
        for j in range(n):
            if i != j and maxcs[i] < maxcs[j]:
                cs[i, j] *= maxcs[i] / maxcs[j]
    wv = np.clip(1.0 - cs.max(axis=1), 0.0, 1.0)
    if wv.max() <= 0:
        return np.zeros(n)
    wv = wv / wv.max()
    wv[wv == 1.0] = 0.99
    wv = np.log(wv / (1.0 - wv) + MARSFL_EPS) + 0.5
    wv[np.isposinf(wv) | (wv > 1)] = 1.0
    return np.maximum(wv, 0.0)


@register("foolsgold")
class FoolsGold(Defense):
    """Down-weight clients whose update histories are too similar (sybils)."""

    summary = "FoolsGold: cosine similarity of update histories, pardoning, logit re-weighting"
    keeps_client_history = True

    class Options(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
        variant: Variant = pydantic.Field(default="original", description="original or marsfl (the authors' benchmark)")
        kappa: float = pydantic.Field(default=1.0, gt=0.0, description="logit confidence (original)")
        normalize: bool = pydantic.Field(default=True, description="sum unit-norm updates into the history (original)")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.history: np.ndarray | None = None  # (M, P) float32, one row per client id seen
        self.history_ids = np.zeros(0, dtype=np.int64)  # (M,) ascending

    def aggregate(self, inputs: RoundInputs) -> RoundResult:
        marsfl = self.options.variant == "marsfl"
        updates = trainable_updates(inputs)
        if marsfl:
            rows = unit_rows(updates, MARSFL_EPS)
        else:
            rows = unit_rows(updates) if self.options.normalize else updates
        history = self.accumulate(inputs.ids, rows.detach().cpu().numpy().astype(np.float32))
        if marsfl:
            first = history[:, : inputs.num_clients]  # MarsFL's "significant features": np.arange(n)
            wv = marsfl_weights(cosine_matrix(torch.from_numpy(np.ascontiguousarray(first))))
            return finish(inputs, combine(wv, rows), normalized(wv), wv == 0, {"foolsgold_weight": wv})
        wv = foolsgold_weights(cosine_matrix(torch.from_numpy(history)), self.options.kappa)
        alpha_hat = normalized(wv * alpha_numpy(inputs))
        step = combine(alpha_hat, updates) if alpha_hat.sum() > 0 else None
        return finish(inputs, step, alpha_hat, alpha_hat == 0, {"foolsgold_weight": wv})

    def accumulate(self, ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """H_k += this round's row for each client id in ``ids``; returns their histories, (K, P),
        in the order of ``ids`` (a client seen for the first time starts from zero)."""
        if self.history is not None and self.history.shape[1] != rows.shape[1]:
            raise UserError(f"FoolsGold history has {self.history.shape[1]} entries per client, this round's "
                            f"updates {rows.shape[1]}: the model changed")
        known = np.isin(ids, self.history_ids)
        if not known.all() or self.history is None:
            merged = np.union1d(self.history_ids, ids)
            grown = np.zeros((merged.size, rows.shape[1]), dtype=np.float32)
            if self.history is not None:
                grown[np.searchsorted(merged, self.history_ids)] = self.history
            self.history, self.history_ids = grown, merged
        at = np.searchsorted(self.history_ids, ids)
        self.history[at] += rows
        return self.history[at]

    def state_dict(self) -> dict[str, np.ndarray]:
        if self.history is None:
            return {}
        return {"history": self.history.copy(), "history_ids": self.history_ids.copy()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        unknown = set(state) - {"history", "history_ids"}
        if unknown:
            raise UserError(f"the checkpoint holds unknown FoolsGold state {sorted(unknown)}")
        if "history" not in state:
            self.history, self.history_ids = None, np.zeros(0, dtype=np.int64)
            return
        self.history = np.asarray(state["history"], dtype=np.float32).copy()
        ids = state.get("history_ids")  # checkpoints before ids were kept: rows are clients 0..M-1
        self.history_ids = (np.arange(self.history.shape[0], dtype=np.int64) if ids is None
                            else np.asarray(ids, dtype=np.int64).copy())
