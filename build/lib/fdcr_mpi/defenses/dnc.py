"""Divide-and-Conquer (Shejwalkar and Houmansadr, NDSS 2021), docs/SPEC.md section 7.

Per iteration: normalise every update to unit norm, draw sub_dim = 10,000 coordinates, centre
the sub-matrix, take its top right singular vector v and score s_k = <u_k - mu, v>^2; the
floor(c * n) clients with the largest scores are removed. The good set is the intersection
over iterations (one iteration by default, as the authors' benchmark). The coordinates come
from a numpy Generator of (run seed, DEFENSE, ``seed`` option, round): a seed sweep varies
them, and the option (default 0) varies them alone.

c (``filter_fraction``) is the expected attacker fraction: the authors' benchmark removes
int(filter_frac (1.0) x int(bad_client_rate x n)) clients, 3 for 30% of 10 clients, so the
default c = 0.3; for another attacker ratio set it to that ratio (for example
``dnc.filter_fraction='${attack.malicious_ratio}'``). The survivors' original (not unit-norm)
updates are averaged with alpha renormalised.

``variant: marsfl`` is the authors' benchmark (MarsFL ``Sever/DncSever.py``), which produced the
paper's Table 4: updates are divided by their norm + 1e-5, int(c * n) clients are removed, the
good set is the union over iterations, and w_{t+1} = w_t + the plain mean of the survivors'
unit-norm updates (the step has length at most 1, whatever the updates' scale).
"""

from __future__ import annotations

import math

import numpy as np
import pydantic
import torch

from fdcr_mpi.defenses._baseline import (
    Variant,
    alpha_numpy,
    combine,
    finish,
    normalized,
    trainable_updates,
    unit_rows,
)
from fdcr_mpi.defenses.base import Defense, RoundInputs, RoundResult, register
from fdcr_mpi.seeding import DEFENSE, numpy_rng

MARSFL_NORM_EPS = 1e-5


def outlier_scores(unit: torch.Tensor, coords: np.ndarray) -> np.ndarray:
    """s_k = <u_k[coords] - mu, v>^2 with v the top right singular vector of the centred block."""
    block = unit[:, torch.as_tensor(coords, device=unit.device)].to(torch.float64).cpu().numpy()
    centred = block - block.mean(axis=0)
    v = np.linalg.svd(centred, full_matrices=False)[2][0]
    return (centred @ v) ** 2


def removed_count(n: int, fraction: float, variant: str) -> int:
    """Clients removed per iteration: floor(c n) (original) or int(c n) (MarsFL), at most n - 1."""
    count = int(fraction * n) if variant == "marsfl" else int(math.floor(fraction * n + 1e-9))
    return min(count, n - 1)


@register("dnc")
class DnC(Defense):
    """Remove the clients with the largest projections on the top singular direction."""

    summary = "DnC: SVD of centred unit-norm updates on 10k random coordinates, drop the c*n largest projections"

    class Options(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
        variant: Variant = pydantic.Field(default="original", description="original or marsfl (the authors' benchmark)")
        sub_dim: int = pydantic.Field(default=10_000, ge=1, description="random coordinates per iteration")
        num_iters: int = pydantic.Field(default=1, ge=1, description="iterations (good sets intersected)")
        filter_fraction: float = pydantic.Field(default=0.3, ge=0.0, lt=1.0,
                                                description="c: floor(c * n) clients removed per iteration")
        seed: int = pydantic.Field(default=0, ge=0, description="mixed with the run's seed: varies the draws alone")

    def aggregate(self, inputs: RoundInputs) -> RoundResult:
        marsfl = self.options.variant == "marsfl"
        n = inputs.num_clients
        drop = removed_count(n, self.options.filter_fraction, self.options.variant)
        updates = trainable_updates(inputs)
        unit = unit_rows(updates, MARSFL_NORM_EPS if marsfl else 0.0)
        rng = numpy_rng(inputs.seed, DEFENSE, self.options.seed, inputs.round)
        p = updates.shape[1]
        good = np.zeros(n, dtype=bool) if marsfl else np.ones(n, dtype=bool)
        scores = np.zeros(n)
        for _ in range(self.options.num_iters):
            coords = np.sort(rng.choice(p, size=min(self.options.sub_dim, p), replace=False))
            scores = outlier_scores(unit, coords)
            keep = np.zeros(n, dtype=bool)
            keep[np.argsort(scores, kind="stable")[: n - drop]] = True
            good = good | keep if marsfl else good & keep
        weights = np.ones(n) if marsfl else alpha_numpy(inputs)
        alpha_hat = normalized(np.where(good, weights, 0.0))
        step = combine(alpha_hat, unit if marsfl else updates) if alpha_hat.sum() > 0 else None
        return finish(inputs, step, alpha_hat, ~good, {"dnc_score": scores, "removed_count": int((~good).sum())})
