"""The math the colluding attacks share (``attacks.collusion``), as plain functions on stacked
update vectors (r, P): the reference statistics, the perturbation directions of Shejwalkar &
Houmansadr and their search for the largest scale that stays inside the benign spread."""

from __future__ import annotations

from collections.abc import Callable

import torch

PERTURBATIONS = ("unit_vec", "std", "sign")


def mean_and_std(reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per coordinate mean mu_j and population std sigma_j of the known updates, in float64."""
    rows = reference.to(torch.float64)
    return rows.mean(dim=0), rows.std(dim=0, unbiased=False) if rows.shape[0] > 1 else torch.zeros_like(rows[0])


def perturbation(reference: torch.Tensor, kind: str) -> torch.Tensor:
    """The direction p subtracted from the mean (NDSS 2021, section IV-B): ``unit_vec`` mu / ||mu||,
    ``sign`` sign(mu), ``std`` sigma (per coordinate), in float64."""
    mu, sigma = mean_and_std(reference)
    if kind == "unit_vec":
        norm = torch.linalg.vector_norm(mu)
        return mu / norm if norm > 0 else mu
    if kind == "sign":
        return torch.sign(mu)
    if kind == "std":
        return sigma
    raise ValueError(f"unknown perturbation {kind!r}; choose one of {PERTURBATIONS}")


def largest_gamma(fits: Callable[[float], bool], gamma_init: float, tau: float) -> float:
    """The largest gamma with ``fits(gamma)``, by the authors' halving search (NDSS 2021, Algorithm 1):
    start at gamma_init with step gamma_init / 2; a fitting gamma is kept and raised by the step,
    another lowered by it; the step halves until two candidates differ by at most tau. 0 when
    nothing fits."""
    gamma, step, found = gamma_init, gamma_init / 2, 0.0
    while abs(found - gamma) > tau:
        if fits(gamma):
            found = gamma
            gamma += step
        else:
            gamma -= step
        step /= 2
    return found


def shifted_mean(reference: torch.Tensor, kind: str, gamma_init: float, tau: float,
                 within: Callable[[torch.Tensor], bool]) -> tuple[torch.Tensor, float]:
    """(m, gamma): m = mu - gamma p with the largest gamma (``largest_gamma``) for which ``within(m)``
    holds, mu the mean of the known updates and p the ``kind`` perturbation; m (P,) float32."""
    mu, _ = mean_and_std(reference)
    p = perturbation(reference, kind)
    gamma = largest_gamma(lambda g: within(mu - g * p), gamma_init, tau)
    return (mu - gamma * p).to(torch.float32), gamma


def squared_distances(rows: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
    """||b_i - point||^2 for every row b_i, (r,) float64."""
    return ((rows.to(torch.float64) - point.to(torch.float64)) ** 2).sum(dim=1)


def pairwise_squared(rows: torch.Tensor) -> torch.Tensor:
    """||b_i - b_j||^2 for every pair, (r, r) float64 (from the Gram matrix, clipped at 0)."""
    x = rows.to(torch.float64)
    sq = (x * x).sum(dim=1)
    return (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_min(0.0)
