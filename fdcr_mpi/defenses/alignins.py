"""AlignIns (Xu, Zhang and Hu, "Detecting Backdoor Attacks in Federated Learning via Direction
Alignment Inspection", CVPR 2025), Algorithm 1.

With delta_k the updates and theta_t = w_t the global model (trainable entries, P of them):

1. TDA (temporal direction alignment): TDA_k = cos(delta_k, theta_t);
2. MPSA (masked principal sign alignment): p = sgn(sum_k sgn(delta_k)), the principal sign of each
   coordinate; T_k = the top-s (s = floor(sparsity * P), at least 1) coordinates of |delta_k|;
   MPSA_k = |{j in T_k : sgn(delta_kj) = p_j}| / s;
3. MZ-scores: MZ(x_k) = |x_k - median(x)| / std(x) (population std; 0 when std = 0), for
   x = TDA and x = MPSA;
4. filtering: S = {k : MZ(MPSA_k) < lambda_s and MZ(TDA_k) < lambda_c};
5. post-filtering clipping: c = median_{k in S} ||delta_k||; delta_k <- delta_k * min(1, c / ||delta_k||);
6. w_{t+1} = w_t + sum_{k in S} alpha_hat_k delta_k, alpha_hat = alpha renormalised over S
   (the authors' ``agg_avg``: weighted by the clients' data sizes). S empty: w_t is kept.

Defaults and their source: sparsity 0.3, lambda_s = 1.0, lambda_c = 1.0: the authors' released code
(``src/federated.py`` arguments ``--sparsity``, ``--lambda_s``, ``--lambda_c``; the filter and
clipping in ``src/aggregation.py: agg_alignins``), which also fixes the MZ-score's denominator
as the standard deviation, the strict thresholds, the reference of TDA (the flattened global
model) and the clipping to the median norm of the kept updates.

Deviations: TDA and MPSA use the trainable entries only (the code flattens the whole state dict,
BatchNorm statistics included). Ties among equal |delta_kj| at the top-s boundary go to the lower
coordinate index (torch.topk leaves them unspecified). The median of an even count is the mean of
the two middle values (the code's clipping bound uses torch's lower median). MZ-scores are rounded
to 12 decimals before the strict comparison, so that values equal in exact arithmetic are treated
alike: with two clients, two distinct values both have MZ-score 1 and both are removed (in the
code, float rounding decides which of the two passes), and w_t is kept.
``tda_reference: mean_update`` measures TDA against the mean update instead (a variant, not the
paper's).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pydantic
import torch

from fdcr_mpi.defenses._baseline import (
    clip_factors,
    clipped_kept_mean,
    column_chunks,
    combine,
    distances_to,
    finish,
    trainable_mask,
    trainable_updates,
    update_norms,
)
from fdcr_mpi.defenses.base import Defense, RoundInputs, RoundResult, register

MZ_DECIMALS = 12


def cosine_to(rows: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """TDA_k = cos(rows_k, reference), (K,) float64 accumulated over column chunks; 0 for a zero vector."""
    dots = torch.zeros(rows.shape[0], dtype=torch.float64, device=rows.device)
    for sl in column_chunks(rows.shape[1]):
        dots += rows[:, sl].to(torch.float64) @ reference[sl].to(torch.float64)
    zeros = torch.zeros(rows.shape[1], dtype=rows.dtype, device=rows.device)
    denom = distances_to(rows, zeros) * float(distances_to(reference.unsqueeze(0), zeros)[0])
    d = dots.cpu().numpy()
    return np.divide(d, denom, out=np.zeros_like(d), where=denom > 0)


def principal_sign(rows: torch.Tensor) -> torch.Tensor:
    """p = sgn(sum_k sgn(delta_k)), (P,) float32 on the rows' device."""
    out = torch.empty(rows.shape[1], dtype=torch.float32, device=rows.device)
    for sl in column_chunks(rows.shape[1]):
        out[sl] = torch.sign(torch.sign(rows[:, sl]).sum(dim=0))
    return out


def top_mask(values: torch.Tensor, count: int) -> torch.Tensor:
    """(P,) bool: the ``count`` largest entries of ``values``, ties at the boundary to the lower index."""
    p = values.numel()
    count = min(max(count, 1), p)
    threshold = torch.kthvalue(values, p - count + 1).values
    above = values > threshold
    need = count - int(above.sum())
    tied = values == threshold
    return above | (tied & (torch.cumsum(tied.to(torch.int32), dim=0, dtype=torch.int32) <= need))


def mpsa(rows: torch.Tensor, principal: torch.Tensor, count: int) -> np.ndarray:
    """MPSA_k: the fraction of the top-``count`` |delta_k| coordinates whose sign is the principal sign."""
    out = np.zeros(rows.shape[0])
    for k in range(rows.shape[0]):
        mask = top_mask(rows[k].abs(), count)
        out[k] = int((mask & (torch.sign(rows[k]) == principal)).sum()) / int(mask.sum())
    return out


def mz_scores(x: np.ndarray) -> np.ndarray:
    """MZ(x_k) = |x_k - median(x)| / std(x), rounded to 12 decimals so that scores equal in exact
    arithmetic compare equal with the thresholds; zeros when std(x) = 0."""
    std = float(np.std(x))
    dev = np.abs(x - np.median(x))
    return np.round(dev / std, MZ_DECIMALS) if std > 0 else np.zeros_like(dev)


@register("alignins")
class AlignIns(Defense):
    """MZ-score filter on direction (TDA) and top-k sign (MPSA) alignment, then median-norm clipping."""

    summary = "AlignIns: MZ-score filter on cosine to the global model and top-30% sign alignment, clip to median"

    class Options(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
        sparsity: float = pydantic.Field(default=0.3, gt=0.0, le=1.0,
                                         description="fraction of the largest |update| coordinates in MPSA")
        lambda_s: float = pydantic.Field(default=1.0, gt=0.0, description="MZ-score threshold of MPSA")
        lambda_c: float = pydantic.Field(default=1.0, gt=0.0, description="MZ-score threshold of TDA")
        tda_reference: Literal["global_model", "mean_update"] = pydantic.Field(
            default="global_model", description="TDA: cosine to the global model (paper) or to the mean update")

    def aggregate(self, inputs: RoundInputs) -> RoundResult:
        o = self.options
        updates = trainable_updates(inputs)
        p = updates.shape[1]
        if o.tda_reference == "global_model":
            reference = inputs.global_weights[trainable_mask(inputs)].to(torch.float32)
        else:
            reference = combine(np.full(updates.shape[0], 1.0 / updates.shape[0]), updates)
        tda = cosine_to(updates, reference)
        sign_alignment = mpsa(updates, principal_sign(updates), int(o.sparsity * p))
        mz_tda, mz_mpsa = mz_scores(tda), mz_scores(sign_alignment)
        keep = (mz_mpsa < o.lambda_s) & (mz_tda < o.lambda_c)
        norms = update_norms(updates)
        bound = float(np.median(norms[keep])) if keep.any() else 0.0
        factors = clip_factors(norms, bound)
        step, alpha_hat = clipped_kept_mean(inputs, updates, keep, factors)
        return finish(inputs, step, alpha_hat, ~keep,
                      {"tda": tda, "mpsa": sign_alignment, "mz_tda": mz_tda, "mz_mpsa": mz_mpsa,
                       "update_norm": norms, "clip_factor": factors, "clip_bound": bound})
