"""SignGuard (Xu, Huang, Song and Lan, "SignGuard: Byzantine-robust Federated Learning through
Collaborative Malicious Gradient Filtering", ICDCS 2022), Algorithm 1 (plain SignGuard).

With delta_k the updates (trainable entries) and n_k = ||delta_k||:

1. norm filter: S1 = {k : L <= n_k / median(n) <= R}, [L, R] = [0.1, 3.0];
2. sign statistics on a random subset J of the coordinates (|J| = floor(0.1 P), at least 1):
   s_k = (#{j in J: delta_kj > 0}, #{= 0}, #{< 0}) / |J|, each of the three features divided by its
   largest value over the clients (+1e-8);
3. MeanShift on the features s_k (bandwidth: sklearn ``estimate_bandwidth`` with quantile 0.5 on
   up to 50 samples; bin seeding; orphans left unclustered); S2 = the largest cluster;
4. S = S1 intersect S2;
5. every update is clipped to the median norm: delta_k <- delta_k * min(1, median(n) / n_k), and
   w_{t+1} = w_t + sum_{k in S} alpha_hat_k delta_k, alpha_hat = alpha renormalised over S.

Defaults and their source: L = 0.1 and R = 3.0, 10% of the coordinates, the feature scaling by the
maximum, MeanShift with ``estimate_bandwidth(quantile=0.5, n_samples=50)``, ``bin_seeding=True``
and ``cluster_all=False``: the authors' released code (``aggregators/signguard.py``, class
``signguard_multiclass``, whose clustering default is MeanShift; their DBSCAN alternative is not
offered here). The paper describes the same norm bounds and a random subset of the coordinates.

Deviations: J is a uniformly random subset of the coordinates, as the paper describes (the code
takes one contiguous block of 10% at a random offset); it is drawn by a numpy Generator of (run
seed, DEFENSE, ``seed`` option, round), which also seeds ``estimate_bandwidth``. The norm filter's
bounds are inclusive (the code's are strict), so that all-zero updates are not all removed. The
median of an even count is the mean of the two middle values (the code's clipping bound uses
torch's lower median). The kept updates are averaged with the FedAvg weights alpha_k renormalised
over S (the code's plain mean when all N_k are equal). Where the estimated bandwidth is zero (the code's
MeanShift would fail: every client's statistics equal, or n <= 3, where the median neighbour of a
point is itself) or MeanShift finds no cluster, the sign filter keeps everyone. Ties between equally large clusters
go to the one holding the lowest client index.
"""

from __future__ import annotations

import numpy as np
import pydantic
import torch

from fdcr_mpi.defenses._baseline import (
    CHUNK,
    clip_factors,
    clipped_kept_mean,
    finish,
    trainable_updates,
    update_norms,
)
from fdcr_mpi.defenses.base import Defense, RoundInputs, RoundResult, register
from fdcr_mpi.seeding import DEFENSE, numpy_rng

FEATURE_EPS = 1e-8  # the authors' code: feature / (max + 1e-8)
BANDWIDTH_QUANTILE = 0.5  # estimate_bandwidth(quantile=0.5, n_samples=50) in the authors' code
BANDWIDTH_SAMPLES = 50


def norm_filter(norms: np.ndarray, lower: float, upper: float) -> np.ndarray:
    """Step 1: L * median(n) <= n_k <= R * median(n)."""
    med = float(np.median(norms))
    return (norms >= lower * med) & (norms <= upper * med)


def sign_features(updates: torch.Tensor, coords: np.ndarray) -> np.ndarray:
    """Step 2: fractions of positive, zero and negative entries of each row on ``coords``, each
    column divided by its maximum over the rows (+1e-8), (K, 3) float64."""
    counts = torch.zeros(updates.shape[0], 3, dtype=torch.float64, device=updates.device)
    index = torch.as_tensor(coords, dtype=torch.long, device=updates.device)
    for start in range(0, index.numel(), CHUNK):
        block = updates[:, index[start:start + CHUNK]]
        counts[:, 0] += (block > 0).sum(dim=1).to(torch.float64)
        counts[:, 1] += (block == 0).sum(dim=1).to(torch.float64)
        counts[:, 2] += (block < 0).sum(dim=1).to(torch.float64)
    fractions = counts.cpu().numpy() / max(int(index.numel()), 1)
    return fractions / (fractions.max(axis=0) + FEATURE_EPS)


def largest_cluster(labels: np.ndarray) -> np.ndarray:
    """Members of the largest cluster (label >= 0); ties to the cluster holding the lowest index.
    All False when every point is an orphan."""
    clusters = [c for c in np.unique(labels) if c >= 0]
    if not clusters:
        return np.zeros(labels.size, dtype=bool)
    best = min((-(labels == c).sum(), int(np.flatnonzero(labels == c)[0]), c) for c in clusters)[2]
    return labels == best


def sign_cluster(features: np.ndarray, random_state: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Step 3: MeanShift (estimated bandwidth, bin seeding, orphans unclustered) on the sign features;
    returns (members of the largest cluster, labels, bandwidth). A zero bandwidth or no cluster:
    everyone is kept (labels all 0)."""
    # imported here: importing scikit-learn at the top would cost every process a second
    from sklearn.cluster import MeanShift, estimate_bandwidth

    n = features.shape[0]
    bandwidth = 0.0
    if n >= 2:
        bandwidth = float(estimate_bandwidth(features, quantile=BANDWIDTH_QUANTILE,
                                             n_samples=min(BANDWIDTH_SAMPLES, n), random_state=random_state))
    if not bandwidth > 0:
        return np.ones(n, dtype=bool), np.zeros(n, dtype=np.int64), 0.0
    labels = MeanShift(bandwidth=bandwidth, bin_seeding=True, cluster_all=False).fit(features).labels_
    labels = np.asarray(labels, dtype=np.int64)
    keep = largest_cluster(labels)
    if not keep.any():
        keep = np.ones(labels.size, dtype=bool)
    return keep, labels, bandwidth


@register("signguard")
class SignGuard(Defense):
    """Norm filter and MeanShift on sign statistics, intersected; median-norm clipping."""

    summary = "SignGuard: norm-ratio filter [0.1, 3] and MeanShift on sign statistics, clip to the median norm"

    def server_imports(self) -> tuple[str, ...]:
        return ("sklearn.cluster",)

    class Options(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
        lower: float = pydantic.Field(default=0.1, ge=0.0, description="L: smallest kept norm / median norm")
        upper: float = pydantic.Field(default=3.0, gt=0.0, description="R: largest kept norm / median norm")
        coordinate_fraction: float = pydantic.Field(default=0.1, gt=0.0, le=1.0,
                                                    description="fraction of coordinates for the sign statistics")
        seed: int = pydantic.Field(default=0, ge=0, description="mixed with the run's seed: varies the draws alone")

    def aggregate(self, inputs: RoundInputs) -> RoundResult:
        updates = trainable_updates(inputs)
        p = updates.shape[1]
        norms = update_norms(updates)
        by_norm = norm_filter(norms, self.options.lower, self.options.upper)
        rng = numpy_rng(inputs.seed, DEFENSE, self.options.seed, inputs.round)
        size = min(max(int(self.options.coordinate_fraction * p), 1), p)
        coords = np.sort(rng.choice(p, size=size, replace=False))
        features = sign_features(updates, coords)
        by_sign, labels, bandwidth = sign_cluster(features, int(rng.integers(2**31 - 1)))
        keep = by_norm & by_sign
        bound = float(np.median(norms))
        factors = clip_factors(norms, bound)  # step 5
        step, alpha_hat = clipped_kept_mean(inputs, updates, keep, factors)
        return finish(inputs, step, alpha_hat, ~keep,
                      {"update_norm": norms, "norm_ratio": norms / bound if bound > 0 else np.zeros_like(norms),
                       "sign_positive": features[:, 0], "sign_zero": features[:, 1], "sign_negative": features[:, 2],
                       "sign_cluster": labels, "bandwidth": bandwidth, "clip_bound": bound,
                       "kept_by_norm": int(by_norm.sum()), "kept_by_sign": int(by_sign.sum())})
