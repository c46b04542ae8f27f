"""FLAME (Nguyen, Rieger, Chen, Yalame, Möllering, Fereidooni, Marchal, Miettinen, Mirhoseini,
Zeitouni, Koushanfar, Sadeghi and Schneider, "FLAME: Taming Backdoors in Federated Learning",
USENIX Security 2022), Algorithm 1.

With W_k the client models (trainable entries), G_{t-1} = w_t the global model and
delta_k = W_k - w_t the updates:

1. filtering: c_ij = 1 - cos(W_i, W_j) (Eq. "CosineDistance" of Alg. 1, on the local models);
   HDBSCAN on the precomputed c with min_cluster_size = n // 2 + 1, min_samples = 1 and
   allow_single_cluster = True, so that at most one cluster exists: the majority. Its members are
   admitted; HDBSCAN's noise points (label -1) are removed;
2. clipping bound: e_k = ||W_k - G_{t-1}|| = ||delta_k|| for every client, S_t = median(e_1..e_n);
3. adaptive clipping: delta_k <- delta_k * min(1, S_t / e_k) for the admitted clients;
4. aggregation: G_t = G_{t-1} + sum_k alpha_hat_k delta_k (clipped), alpha_hat = alpha renormalised
   over the admitted clients;
5. adaptive noise: G_t <- G_t + N(0, sigma^2 I) on the trainable parameters, sigma = lambda * S_t.

Defaults and their source:
- min_cluster_size n // 2 + 1: paper, "Dynamic Model Filtering" and Algorithm 1; min_samples = 1 and
  allow_single_cluster = True: the common re-implementations (BackdoorIndicator's ``FLAME``,
  BackFed's ``flame_server.py``), which the paper does not spell out; without
  allow_single_cluster a cluster of more than n/2 points is never reported;
- lambda = 0.001: the paper's noise level for image classification (0.01 for its NLP / IoT tasks);
- the cosine distance is taken between the local models, as in Algorithm 1 (``space: updates``
  uses the updates delta_k instead, as several re-implementations do).

Deviations: the admitted updates are averaged with the FedAvg weights alpha_k renormalised
over them (the paper's plain mean when all N_k are equal), as every filter of this package.
If HDBSCAN labels every point noise (not observed with allow_single_cluster), every client is
admitted. For n = 1 (HDBSCAN needs at least two points) the single client is admitted. The noise
is drawn on the CPU from a torch generator of (run seed, DEFENSE, ``seed`` option, round) and
moved to the device; float buffers (BatchNorm statistics) are averaged with alpha_hat, no noise.
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
    cosine_matrix,
    finish,
    gaussian_noise,
    trainable_mask,
    trainable_updates,
    update_norms,
)
from fdcr_mpi.defenses.base import Defense, RoundInputs, RoundResult, register
from fdcr_mpi.seeding import DEFENSE, torch_generator


def masked_cosine_matrix(rows: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """cos(W_i[mask], W_j[mask]), (K, K) float64, accumulated over column chunks in float64
    (no (K, P) copy of the masked rows); a zero row has cosine 0 with everything."""
    k = rows.shape[0]
    g = torch.zeros(k, k, dtype=torch.float64, device=rows.device)
    for sl in column_chunks(rows.shape[1]):
        block = rows[:, sl][:, mask[sl]].to(torch.float64)
        g += block @ block.T
    gram = g.cpu().numpy()
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    denom = np.outer(norms, norms)
    return np.divide(gram, denom, out=np.zeros_like(gram), where=denom > 0)


def cosine_distances(cos: np.ndarray) -> np.ndarray:
    """c_ij = 1 - cos_ij, symmetric, zero diagonal, clipped at 0 (HDBSCAN's precomputed input)."""
    d = np.clip(1.0 - cos, 0.0, None)
    d = (d + d.T) / 2
    np.fill_diagonal(d, 0.0)
    return d


def majority_cluster(distances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Step 1: HDBSCAN(min_cluster_size = n // 2 + 1, min_samples = 1, single cluster allowed) on the
    precomputed distances. Returns (admitted mask, labels); noise points (-1) are not admitted.
    The largest cluster is kept (ties: the one holding the lowest client index)."""
    n = distances.shape[0]
    if n < 2:
        return np.ones(n, dtype=bool), np.zeros(n, dtype=np.int64)
    from sklearn.cluster import HDBSCAN  # here: importing scikit-learn costs every process a second

    labels = HDBSCAN(min_cluster_size=n // 2 + 1, min_samples=1, allow_single_cluster=True,
                     metric="precomputed", copy=True).fit(distances).labels_.astype(np.int64)
    clusters = [c for c in np.unique(labels) if c >= 0]
    if not clusters:
        return np.ones(n, dtype=bool), labels
    sizes = [(-(labels == c).sum(), int(np.flatnonzero(labels == c)[0]), c) for c in clusters]
    best = min(sizes)[2]
    return labels == best, labels


@register("flame")
class Flame(Defense):
    """HDBSCAN majority cluster of cosine distances, median-norm clipping, Gaussian noise."""

    summary = "FLAME: HDBSCAN majority cluster on cosine distances, clip to the median norm, add N(0, (0.001 S_t)^2)"

    def server_imports(self) -> tuple[str, ...]:
        return ("sklearn.cluster",)

    class Options(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
        noise_lambda: float = pydantic.Field(default=0.001, ge=0.0,
                                             description="lambda: noise std = lambda * S_t (paper: 0.001 for images)")
        space: Literal["models", "updates"] = pydantic.Field(
            default="models", description="cosine distances between the local models (paper) or the updates")
        seed: int = pydantic.Field(default=0, ge=0, description="mixed with the run's seed: varies the noise alone")

    def aggregate(self, inputs: RoundInputs) -> RoundResult:
        updates = trainable_updates(inputs)
        if self.options.space == "models":
            cos = masked_cosine_matrix(inputs.client_weights, trainable_mask(inputs))
        else:
            cos = cosine_matrix(updates)
        admitted, labels = majority_cluster(cosine_distances(cos))
        norms = update_norms(updates)
        bound = float(np.median(norms)) if norms.size else 0.0  # step 3: S_t, the median norm
        factors = clip_factors(norms, bound)
        step, alpha_hat = clipped_kept_mean(inputs, updates, admitted, factors)
        std = self.options.noise_lambda * bound
        if std > 0 and step is not None:  # step 4: N(0, (lambda S_t)^2), drawn on the CPU
            generator = torch_generator(inputs.seed, DEFENSE, self.options.seed, inputs.round)
            step = step + gaussian_noise(step.numel(), std, generator, step.device)
        return finish(inputs, step, alpha_hat, ~admitted,
                      {"flame_label": labels, "update_norm": norms, "clip_factor": factors,
                       "clip_bound": bound, "noise_std": std, "admitted_count": int(admitted.sum())})
