"""Multi-Metrics Adaptive (MMA; Huang et al., ICCV 2023), docs/SPEC.md section 7.

Our reading, on the trainable entries of the updates delta_k:

1. Three distance scores per client, each summed over the other clients j != i:
   Manhattan ||d_i - d_j||_1, Euclidean ||d_i - d_j||_2 and cosine 1 - cos(d_i, d_j).
   (The MMA code uses the norm difference | ||w_i|| - ||w_j|| | as its "Euclidean" term,
   (1 - cos)^2, and whole models; the spec names Euclidean and cosine distances of
   updates, which is what we compute.)
2. Normalisation (``standardize: true``, default): each score is z-scored over clients
   (zero mean, unit std). The Mahalanobis-style score below is then the Mahalanobis
   distance of the client to the mean score vector.
3. Score x_i^T S^+ x_i, S the 3 x 3 covariance of the normalised scores over clients
   (pseudo-inverse). The MMA code applies this form to the raw, uncentred scores
   (``standardize: false`` divides each score by its maximum instead, a pure rescale that
   leaves that form unchanged); uncentred, the common part of the scores dominates and a
   lone outlier among tightly grouped clients is not flagged, hence our default.
4. Keep the floor(keep_fraction * n) clients with the lowest scores (at least one); the
   MMA code's selection ratio p = 0.3 is the default. The kept updates are averaged with
   alpha renormalised.
"""

from __future__ import annotations

import math

import numpy as np
import pydantic

from fdcr_mpi.defenses._baseline import (
    alpha_numpy,
    combine,
    cosine_matrix,
    finish,
    normalized,
    pairwise_distances,
    trainable_updates,
)
from fdcr_mpi.defenses.base import Defense, RoundInputs, RoundResult, register


def metric_features(manhattan: np.ndarray, euclidean: np.ndarray, cosine: np.ndarray) -> np.ndarray:
    """(n, 3): per-client sums of the Manhattan, Euclidean and cosine distances to the others."""
    cos_dist = 1.0 - cosine
    np.fill_diagonal(cos_dist, 0.0)
    return np.stack([manhattan.sum(axis=1), euclidean.sum(axis=1), cos_dist.sum(axis=1)], axis=1)


def normalise(feats: np.ndarray, standardize: bool) -> np.ndarray:
    """z-score each column (``standardize``) or divide it by its maximum; constant columns give 0."""
    if standardize:
        centred = feats - feats.mean(axis=0)
        std = feats.std(axis=0)
        return np.divide(centred, std, out=np.zeros_like(feats), where=std > 0)
    top = feats.max(axis=0)
    return np.divide(feats, top, out=np.zeros_like(feats), where=top > 0)


def mahalanobis_scores(feats: np.ndarray) -> np.ndarray:
    """x_i^T S^+ x_i with S the covariance of the rows of ``feats`` (not centred here)."""
    if feats.shape[0] < 2:
        return np.zeros(feats.shape[0])
    inv = np.linalg.pinv(np.cov(feats, rowvar=False), hermitian=True)
    return np.einsum("ij,jk,ik->i", feats, inv, feats)


@register("mma")
class MMA(Defense):
    """Keep the clients with the lowest multi-metric Mahalanobis-style score."""

    summary = "MMA: Manhattan/Euclidean/cosine distance scores, Mahalanobis-style combination, keep the lowest 30%"

    class Options(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
        keep_fraction: float = pydantic.Field(default=0.3, gt=0.0, le=1.0,
                                              description="fraction of clients kept (lowest scores)")
        standardize: bool = pydantic.Field(default=True, description="z-score the distance scores (false: "
                                           "divide by the max, the MMA code's uncentred form)")

    def aggregate(self, inputs: RoundInputs) -> RoundResult:
        n = inputs.num_clients
        kept = min(max(int(math.floor(self.options.keep_fraction * n + 1e-9)), 1), n)
        updates = trainable_updates(inputs)
        feats = metric_features(pairwise_distances(updates, "manhattan"),
                                pairwise_distances(updates, "euclidean"), cosine_matrix(updates))
        scores = mahalanobis_scores(normalise(feats, self.options.standardize))
        keep = np.zeros(n, dtype=bool)
        keep[np.argsort(scores, kind="stable")[:kept]] = True
        alpha_hat = normalized(np.where(keep, alpha_numpy(inputs), 0.0))
        return finish(inputs, combine(alpha_hat, updates), alpha_hat, ~keep, {"mma_score": scores})
