"""Clustering of the per-client discrepancies V (docs/SPEC.md section 2, step 5; paper Eq. 10).

``cluster_labels`` splits the K scalars into groups with FINCH (the method's choice), or with
the alternatives of the paper's Table 1 (k-means with two clusters, DBSCAN);
``largest_mean_cluster`` marks the group with the largest mean value as malicious.

Every method is deterministic: FINCH runs its exact 1-NN path (no approximate neighbours for
K <= 20,000), k-means has a fixed seed, DBSCAN has no randomness. Labels are renumbered
0, 1, ... in order of first appearance so that equal partitions give equal label arrays.
"""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np

ClusteringMethod = Literal["finch", "kmeans", "dbscan"]

DEFAULT_DBSCAN_EPS = 0.2
"""DBSCAN radius, relative to the largest |value| (values are divided by it first)."""


def _canonical(labels: np.ndarray) -> np.ndarray:
    """Renumber labels 0, 1, ... in order of first appearance."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # cluster ids sorted by first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return rank[inverse.reshape(-1)].astype(np.int64)


FINCH_IMPORT_WARNING = "pynndescent is not installed"
"""finch-clust warns at import time when the optional pynndescent is missing; it is only used for
more than 20,000 points (ann_threshold), never for K clients."""


def _finch(values: np.ndarray, partition_level: int) -> np.ndarray:
    """FINCH, euclidean distance (the library default, cosine, merges every 1-D point)."""
    with warnings.catch_warnings():  # imported here: finch and scikit-learn cost every process a second
        warnings.filterwarnings("ignore", message=FINCH_IMPORT_WARNING, category=UserWarning)
        from finch import FINCH
    c, _num_clust, _req_c = FINCH(
        data=values.reshape(-1, 1).astype(np.float64),
        distance="euclidean",
        verbose=False,
    )
    level = min(partition_level, c.shape[1] - 1)
    return np.asarray(c[:, level])


def _kmeans(values: np.ndarray) -> np.ndarray:
    """k-means with two clusters; fewer than two distinct values is one cluster."""
    if np.unique(values).size < 2:
        return np.zeros(values.size, dtype=np.int64)
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=2, n_init=10, random_state=0)
    return np.asarray(km.fit(values.reshape(-1, 1)).labels_)


def _dbscan(values: np.ndarray, eps: float, min_samples: int) -> np.ndarray:
    """DBSCAN on values / max|values|; each noise point (-1) becomes its own cluster."""
    from sklearn.cluster import DBSCAN

    scale = float(np.max(np.abs(values)))
    scaled = values / scale if scale > 0 else values
    labels = np.asarray(DBSCAN(eps=eps, min_samples=min_samples).fit(scaled.reshape(-1, 1)).labels_)
    labels = labels.astype(np.int64)
    noise = np.flatnonzero(labels == -1)
    labels[noise] = labels.max(initial=-1) + 1 + np.arange(noise.size)
    return labels


def cluster_labels(
    values: np.ndarray,
    method: ClusteringMethod = "finch",
    partition_level: int = 0,
    dbscan_eps: float = DEFAULT_DBSCAN_EPS,
    dbscan_min_samples: int = 2,
) -> np.ndarray:
    """Cluster K scalars (Eq. 10); returns (K,) int64 labels numbered by first appearance.

    finch: the partition ``c[:, partition_level]`` of FINCH (clamped to the coarsest one it
    returns), euclidean distance. kmeans: two clusters (n_init 10, seed 0). dbscan: ``eps``
    is relative to the largest |value| (the values are divided by it, so the same eps suits
    V at any scale: mse or l2, any model size); noise points are singleton clusters.
    Raises ``ValueError`` on NaN or inf.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"cluster_labels expects a 1-D array of K values, got shape {v.shape}")
    if v.size == 0:
        raise ValueError("cluster_labels needs at least one value")
    bad = np.flatnonzero(~np.isfinite(v))
    if bad.size:
        raise ValueError(
            f"cannot cluster non-finite values (NaN or inf) at positions {bad.tolist()}: "
            f"{v[bad].tolist()}; a client's weights or Fisher vector has diverged"
        )
    if partition_level < 0:
        raise ValueError(f"partition_level must be >= 0, got {partition_level}")
    if v.size == 1:
        return np.zeros(1, dtype=np.int64)
    if method == "finch":
        labels = _finch(v, partition_level)
    elif method == "kmeans":
        labels = _kmeans(v)
    elif method == "dbscan":
        labels = _dbscan(v, dbscan_eps, dbscan_min_samples)
    else:
        raise ValueError(f"unknown clustering method {method!r}; choose one of: finch, kmeans, dbscan")
    return _canonical(labels)


def largest_mean_cluster(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(K,) bool: the members of the cluster with the largest mean value (Eq. 10).

    A single cluster flags nobody. Equal means (only with degenerate input) pick the cluster
    with the smallest label, so the result is deterministic.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    lab = np.asarray(labels).reshape(-1)
    if v.shape != lab.shape:
        raise ValueError(f"values {v.shape} and labels {lab.shape} differ in shape")
    ids = np.unique(lab)
    if ids.size <= 1:
        return np.zeros(v.size, dtype=bool)
    means = np.array([v[lab == i].mean() for i in ids])
    return lab == ids[int(np.argmax(means))]
