"""RFLBAT (Wang, Zhai, Zhan and Xia, "RFLBAT: A Robust Federated Learning Algorithm against Backdoor
Attack", arXiv:2201.03772, 2022), Algorithm 1.

With delta_k the updates (trainable entries):

1. PCA: x_k in R^2, the scores of delta_k on the first two principal components of the centred
   updates (computed from the (K, K) Gram matrix: the eigenvectors of H G H, H = I - 11^T / K,
   scaled by the square roots of their eigenvalues; PCA's sign ambiguity does not change anything
   below);
2. first outlier removal: ED_k = sum_j ||x_k - x_j||; keep ED_k <= eps1 * median(ED);
3. number of clusters by the gap statistic (Tibshirani, Walther and Hastie 2001) on the kept points,
   min-max scaled to [0, 1] per axis: W_k = sum_i ||x_i - c(x_i)|| for a k-means partition,
   Gap(k) = mean_b log W*_kb - log W_k over B uniform reference sets of the same size in
   [0, 1]^2, s_k = std_b(log W*_kb) sqrt(1 + 1/B); k = the smallest k with
   Gap(k) >= Gap(k+1) - s_{k+1} (k_max when none);
4. k-means with that k on the kept points; for each cluster C, with cs_ij = cos(delta_i, delta_j)
   of the full updates, score(C) = median_{i in C} mean_{j in C} cs_ij (a single-member cluster
   scores 1); the cluster with the lowest score is selected (backdoored updates are similar to one
   another, so the benign cluster is the least self-similar: the paper's Algorithm 1 and the
   authors' code ``v_med.index(min(v_med))``);
5. second outlier removal on the selected cluster's points x_k (from step 1):
   keep ED_k <= eps2 * median(ED) with ED recomputed among them;
6. w_{t+1} = w_t + sum_k alpha_hat_k delta_k, alpha_hat = alpha renormalised over the survivors.

Defaults and their source: eps1 = 10, eps2 = 4, B = 5 reference draws, k_max = 10, the min-max
scaling, the Euclidean (not squared) dispersion W_k and k-means++ with 10 initialisations: the
RFLBAT implementation (``RFLBAT`` and ``gap_statistics``) in the BackdoorIndicator code base
(Li et al., USENIX Security 2023), which other re-implementations copy; we found no repository of
the RFLBAT authors themselves.

Deviations: the code's dispersion sums, for each cluster, the distance of its *first* member to
the centre once per member (``predicts.index``); we sum every member's distance, the within-cluster
dispersion the gap statistic is defined with. The code stops at the smallest k with Gap(k) > Gap(k+1) - s_k; we use the
gap statistic's rule with s_{k+1}. k_max is at most (number of distinct kept points - 1), as
W_k = 0 beyond. The thresholds are inclusive (the code's strict "<" removes every client when
the updates are all equal). The PCA runs on all trainable entries (the code uses the ``fc`` and
``layer4.1.conv`` layers of its ResNet). The survivors are averaged with the FedAvg weights
alpha_k renormalised (the code's plain sum when all N_k are equal). Every random draw (reference
sets, k-means seeds) comes from a numpy Generator of (run seed, DEFENSE, ``seed`` option, round).
Ties between equally scored clusters go to the one holding the lowest client index.
"""

from __future__ import annotations

import warnings

import numpy as np
import pydantic

from fdcr_mpi.defenses._baseline import (
    alpha_numpy,
    combine,
    finish,
    gram,
    normalized,
    trainable_updates,
)
from fdcr_mpi.defenses.base import Defense, RoundInputs, RoundResult, register
from fdcr_mpi.seeding import DEFENSE, numpy_rng

KMEANS_INITS = 10  # sklearn's KMeans default when the authors' code was written


def pca_scores(g: np.ndarray, components: int = 2) -> np.ndarray:
    """Step 1: principal-component scores (K, components) from the Gram matrix G of the rows."""
    n = g.shape[0]
    h = np.eye(n) - 1.0 / n
    centred = h @ g @ h
    centred = (centred + centred.T) / 2
    vals, vecs = np.linalg.eigh(centred)
    order = np.argsort(-vals, kind="stable")[:components]
    scores = vecs[:, order] * np.sqrt(np.clip(vals[order], 0.0, None))
    out = np.zeros((n, components))
    out[:, : scores.shape[1]] = scores
    return out


def distance_sums(points: np.ndarray) -> np.ndarray:
    """ED_k = sum_j ||x_k - x_j|| (steps 2 and 5)."""
    diff = points[:, None, :] - points[None, :, :]
    return np.sqrt((diff**2).sum(axis=2)).sum(axis=1)


def within_median(values: np.ndarray, eps: float) -> np.ndarray:
    """values_k <= eps * median(values) (steps 2 and 5)."""
    return values <= eps * float(np.median(values))


def minmax_scale(points: np.ndarray) -> np.ndarray:
    """(x - min) / (max - min) per axis; an axis with no range maps to 0."""
    lo, hi = points.min(axis=0), points.max(axis=0)
    span = hi - lo
    return np.divide(points - lo, span, out=np.zeros_like(points), where=span > 0)


def kmeans(points: np.ndarray, k: int, random_state: int) -> tuple[np.ndarray, np.ndarray]:
    """k-means++ with 10 initialisations: (labels, centres)."""
    from sklearn.cluster import KMeans  # here: importing scikit-learn costs every process a second
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        km = KMeans(n_clusters=k, init="k-means++", n_init=KMEANS_INITS, random_state=random_state).fit(points)
    return np.asarray(km.labels_, dtype=np.int64), np.asarray(km.cluster_centers_, dtype=np.float64)


def dispersion(points: np.ndarray, labels: np.ndarray, centres: np.ndarray) -> float:
    """W_k = sum_i ||x_i - c_{label(i)}|| (Euclidean, as the authors' code)."""
    return float(np.sqrt(((points - centres[labels]) ** 2).sum(axis=1)).sum())


def gap_statistic(points: np.ndarray, k_max: int, draws: int,
                  rng: np.random.Generator) -> tuple[int, np.ndarray, np.ndarray]:
    """Step 3: (k, Gap(1..k_max), s(1..k_max)); smallest k with Gap(k) >= Gap(k+1) - s_{k+1}."""
    n_distinct = np.unique(points, axis=0).shape[0]
    k_max = max(1, min(k_max, n_distinct - 1))
    if k_max == 1:
        return 1, np.zeros(1), np.zeros(1)
    data = minmax_scale(points)
    gaps, sds = np.zeros(k_max), np.zeros(k_max)
    for k in range(1, k_max + 1):
        w = dispersion(data, *kmeans(data, k, int(rng.integers(2**31 - 1))))
        log_ref = np.empty(draws)
        for b in range(draws):
            ref = rng.uniform(0.0, 1.0, size=data.shape)
            log_ref[b] = np.log(dispersion(ref, *kmeans(ref, k, int(rng.integers(2**31 - 1)))))
        gaps[k - 1] = log_ref.mean() - np.log(w)
        sds[k - 1] = log_ref.std() * np.sqrt(1.0 + 1.0 / draws)
    for k in range(1, k_max):
        if gaps[k - 1] >= gaps[k] - sds[k]:
            return k, gaps, sds
    return k_max, gaps, sds


def cluster_scores(cos: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Step 4: median over the members of their mean cosine similarity within the cluster; 1 for a
    cluster of at most one member, (k,)."""
    scores = np.ones(k)
    for c in range(k):
        members = np.flatnonzero(labels == c)
        if members.size > 1:
            scores[c] = float(np.median(cos[np.ix_(members, members)].mean(axis=1)))
    return scores


def select_cluster(scores: np.ndarray, labels: np.ndarray) -> int:
    """The lowest-scored non-empty cluster; ties to the cluster holding the lowest index."""
    present = [c for c in range(scores.size) if (labels == c).any()]
    return min((scores[c], int(np.flatnonzero(labels == c)[0]), c) for c in present)[2]


@register("rflbat")
class RFLBAT(Defense):
    """PCA to 2-D, distance outliers, gap-statistic k-means, least self-similar cluster."""

    summary = "RFLBAT: 2-D PCA, distance-sum outliers (eps1=10, eps2=4), gap-statistic k-means, least similar cluster"

    def server_imports(self) -> tuple[str, ...]:
        return ("sklearn.cluster",)

    class Options(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
        eps1: float = pydantic.Field(default=10.0, gt=0.0, description="first removal: ED > eps1 * median(ED)")
        eps2: float = pydantic.Field(default=4.0, gt=0.0, description="second removal: ED > eps2 * median(ED)")
        k_max: int = pydantic.Field(default=10, ge=1, description="largest number of clusters the gap statistic tries")
        reference_draws: int = pydantic.Field(default=5, ge=1, description="B: uniform reference sets per k")
        seed: int = pydantic.Field(default=0, ge=0, description="mixed with the run's seed: varies the draws alone")

    def aggregate(self, inputs: RoundInputs) -> RoundResult:
        o = self.options
        n = inputs.num_clients
        updates = trainable_updates(inputs)
        g = gram(updates)
        norms = np.sqrt(np.clip(np.diag(g), 0.0, None))
        denom = np.outer(norms, norms)
        cos = np.divide(g, denom, out=np.zeros_like(g), where=denom > 0)
        points = pca_scores(g)
        first_ed = distance_sums(points)
        stage1 = np.flatnonzero(within_median(first_ed, o.eps1))

        rng = numpy_rng(inputs.seed, DEFENSE, o.seed, inputs.round)
        k, _, _ = gap_statistic(points[stage1], o.k_max, o.reference_draws, rng)
        labels = np.zeros(stage1.size, dtype=np.int64)
        if k > 1:
            labels = kmeans(points[stage1], k, int(rng.integers(2**31 - 1)))[0]
        scores = cluster_scores(cos[np.ix_(stage1, stage1)], labels, k)
        chosen = select_cluster(scores, labels)
        stage2 = stage1[labels == chosen]
        second_ed = distance_sums(points[stage2])
        final = stage2[within_median(second_ed, o.eps2)]

        keep = np.zeros(n, dtype=bool)
        keep[final] = True
        cluster = np.full(n, -1, dtype=np.int64)
        cluster[stage1] = labels
        cluster_score = np.zeros(n)
        cluster_score[stage1] = scores[labels]
        second = np.zeros(n)
        second[stage2] = second_ed
        alpha_hat = normalized(np.where(keep, alpha_numpy(inputs), 0.0))
        return finish(inputs, combine(alpha_hat, updates), alpha_hat, ~keep,
                      {"pca_1": points[:, 0], "pca_2": points[:, 1], "distance_sum": first_ed,
                       "cluster": cluster, "cluster_cos_median": cluster_score, "second_distance_sum": second,
                       "num_clusters": k, "selected_cluster": chosen})
