"""The adaptive Fisher forgery against FDCR (``attack.fisher: adaptive``): attackers who know the
protocol report the Fisher vector that makes their Fisher discrepancy smallest.

FDCR (``defenses/fdcr.py``) scores client k by V_k = mean_v (gt_v - gt_kv)^2 with gt_k = g_k I_k
(Eq. 8) and gt = sum_j alpha_j gt_j (Eq. 9a), where I_k is the min-max normalised Fisher vector
the client reports (Eq. 6): the attacker's own update g_k is fixed (its backdoor), but I_k is its
to choose. With c = sum_{j != k} alpha_j gt_j the others' part,

    V_k(I_k) = mean_v (c_v - (1 - alpha_k) g_kv I_kv)^2,

which is smallest, coordinate by coordinate, at

    I*_kv = clip(c_v / ((1 - alpha_k) g_kv), 0, 1)   (0 where g_kv = 0).

Several attackers take turns (``SWEEPS`` passes of coordinate descent, each attacker against the
others' current choice). The benign part of c is known exactly (``attack.knowledge: omniscient``:
the benign rows' updates and Fisher vectors of the round) or estimated from the attackers' own
honest rows (``attackers``: their mean g_i I_i, scaled by the benign clients' total weight). The
vector reported is F_k = I*_k with one entry set to 1 where |g_kv| is smallest, so that Eq. 6's
normalisation leaves it unchanged. The updates themselves are not touched; only the reported Fisher
rows are replaced, on the server where the rows meet (``attacks.collusion``).
"""

from __future__ import annotations

import numpy as np
import torch

SWEEPS = 3


def fisher_importance(fisher: torch.Tensor) -> torch.Tensor:
    """Eq. 6, per row: (F - min F) / (max F - min F), 0 for a constant row (float32)."""
    lo = fisher.amin(dim=-1, keepdim=True)
    span = fisher.amax(dim=-1, keepdim=True) - lo
    return torch.where(span > 0, (fisher - lo) / torch.where(span > 0, span, torch.ones_like(span)),
                       torch.zeros_like(fisher))


def best_importance(others: torch.Tensor, update: torch.Tensor, alpha: float) -> torch.Tensor:
    """I*_v = clip(c_v / ((1 - alpha) g_v), 0, 1), 0 where g_v = 0: the minimiser of V_k (module docstring)."""
    scale = (1.0 - alpha) * update
    safe = torch.where(scale != 0, scale, torch.ones_like(scale))
    return torch.where(scale != 0, (others / safe).clamp(0.0, 1.0), torch.zeros_like(scale))


def reportable(importance: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """F = I* with a 1 where |g| is smallest, so that Eq. 6 maps F back onto I* (float32)."""
    fisher = importance.clone()
    if float(fisher.max()) < 1.0:
        fisher[int(torch.argmin(update.abs()))] = 1.0
    return fisher


def adaptive_fisher(updates: torch.Tensor, fisher: torch.Tensor, alpha: np.ndarray, attackers: np.ndarray,
                    known: np.ndarray) -> torch.Tensor:
    """The attackers' reported Fisher rows, (a, D) float32, for the updates (m, D) and Fisher rows
    (m, D) of the round's healthy participants (``attackers``, ``known``: (m,) bool; alpha: (m,))."""
    g = updates.to(torch.float32)
    weighted = g * fisher_importance(fisher.to(torch.float32))  # gt_j, Eq. 8
    a = torch.as_tensor(alpha, dtype=torch.float64)
    benign = ~attackers
    if known[benign].all() and benign.any():  # omniscient: the benign part of c exactly
        benign_part = (a[benign].unsqueeze(1) * weighted[benign].to(torch.float64)).sum(dim=0)
    else:  # the attackers' own honest rows stand for the benign ones
        rows = weighted[np.flatnonzero(known)].to(torch.float64)
        benign_part = float(a[benign].sum()) * rows.mean(dim=0) if rows.shape[0] else torch.zeros(g.shape[1])
    order = np.flatnonzero(attackers)
    chosen = {int(k): fisher_importance(fisher[k:k + 1].to(torch.float32))[0] for k in order}
    for _ in range(SWEEPS):
        for k in order:
            others = benign_part + sum(float(a[i]) * (g[i] * chosen[int(i)]).to(torch.float64)
                                       for i in order if i != k)
            chosen[int(k)] = best_importance(others.to(torch.float32), g[k], float(a[k]))
    return torch.stack([reportable(chosen[int(k)], g[k]) for k in order])
