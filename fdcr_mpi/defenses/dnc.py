"""Divide-and-Conquer (Shejwalkar and Houmansadr, NDSS 2021), ALGORITHM.md section 7.

Per iteration: normalise every update to unit norm, draw sub_dim = 10,000 coordinates
(numpy Generator seeded from (seed, DEFENSE, round), never the global RNG), centre the
sub-matrix, take its top right singular vector v and score s_k = <u_k - mu, v>^2; the
floor(c * n) clients with the largest scores are removed. The good set is the
intersection over iterations (one iteration by default, as the authors' benchmark).

c (``filter_fraction``) is the expected attacker fraction: the authors' benchmark
removes filter_frac (1.0) x bad_client_rate x n, which is 3 for 30% of 10 clients, so the
default c = 0.3. The survivors' original (not unit-norm) updates are averaged with alpha
renormalised (the benchmark averages the unit-norm ones uniformly, which rescales the
step; we keep FedAvg's scale).
"""

from __future__ import annotations

import math

import numpy as np
import pydantic
import torch

from fdcr_mpi.defenses._baseline import (
    alpha_numpy,
    combine,
    distances_to,
    finish,
    normalized,
    trainable_updates,
)
from fdcr_mpi.defenses.base import Defense, RoundInputs, RoundResult, register
from fdcr_mpi.seeding import DEFENSE, numpy_rng


def outlier_scores(unit: torch.Tensor, coords: np.ndarray) -> np.ndarray:
    """s_k = <u_k[coords] - mu, v>^2 with v the top right singular vector of the centred block."""
    block = unit[:, torch.as_tensor(coords, device=unit.device)].to(torch.float64).cpu().numpy()
    centred = block - block.mean(axis=0)
    v = np.linalg.svd(centred, full_matrices=False)[2][0]
    return (centred @ v) ** 2


@register("dnc")
class DnC(Defense):
    """Remove the clients with the largest projections on the top singular direction."""

    summary = "DnC: SVD of centred unit-norm updates on 10k random coordinates, drop the c*n largest projections"

    class Options(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
        sub_dim: int = pydantic.Field(default=10_000, ge=1, description="random coordinates per iteration")
        num_iters: int = pydantic.Field(default=1, ge=1, description="iterations (good sets intersected)")
        filter_fraction: float = pydantic.Field(default=0.3, ge=0.0, lt=1.0,
                                                description="c: floor(c * n) clients removed per iteration")
        seed: int = pydantic.Field(default=0, description="seed of the coordinate draws (with the round)")

    def aggregate(self, inputs: RoundInputs) -> RoundResult:
        n = inputs.num_clients
        drop = min(int(math.floor(self.options.filter_fraction * n + 1e-9)), n - 1)
        updates = trainable_updates(inputs)
        norms = distances_to(updates, torch.zeros(updates.shape[1], device=updates.device))
        scale = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
        unit = updates * torch.as_tensor(scale, dtype=torch.float32, device=updates.device).unsqueeze(1)
        rng = numpy_rng(self.options.seed, DEFENSE, inputs.round)
        p = updates.shape[1]
        good = np.ones(n, dtype=bool)
        scores = np.zeros(n)
        for _ in range(self.options.num_iters):
            coords = np.sort(rng.choice(p, size=min(self.options.sub_dim, p), replace=False))
            scores = outlier_scores(unit, coords)
            keep = np.zeros(n, dtype=bool)
            keep[np.argsort(scores, kind="stable")[: n - drop]] = True
            good &= keep
        alpha_hat = normalized(np.where(good, alpha_numpy(inputs), 0.0))
        step = combine(alpha_hat, updates) if alpha_hat.sum() > 0 else None
        return finish(inputs, step, alpha_hat, ~good, {"dnc_score": scores, "removed_count": int((~good).sum())})
