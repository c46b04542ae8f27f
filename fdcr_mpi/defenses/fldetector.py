"""FLDetector (Zhang, Cao, Jia and Gong, "FLDetector: Defending Federated Learning Against Model
Poisoning Attacks via Detecting Malicious Clients", KDD 2022).

The server predicts each client's update from its previous one and the curvature of the
global model's path, and flags the clients whose updates keep disagreeing with the prediction.
With w_t the global model (trainable entries), delta_k^t = w_k - w_t the updates and G^t the
aggregated update of round t:

1. Window (the last N = 10 rounds): s_i = w_i - w_{i-1} (global-model differences) and
   y_i = G^i - G^{i-1} (global-update differences), stacked as the columns of S and Y (P x n).
2. L-BFGS, compact form (Byrd, Nocedal and Schnabel 1994), Hessian-vector product with
   v = w_t - w_{t-1}:  sigma = y_n's / s_n's,  S'Y = L + triu(S'Y), D = diag(S'Y),
   M = [[sigma S'S, L], [L', -D]],  H v ~ sigma v - [sigma S, Y] M^{-1} [sigma S'v; Y'v].
3. Prediction of client k's update: delta_k^{t-1} + H v; distance
   d_k^t = ||delta_k^{t-1} + H v - delta_k^t||, normalised d^t / sum_j d_j^t over this round's
   predicted clients.
4. Suspicious score: s_k = (1/N) sum_{r=0}^{N-1} d_k^{t-r}, the mean of the client's last N
   normalised distances.
5. Gap statistic (Tibshirani, Walther and Hastie 2001) on the min-max normalised scores with B = 10
   uniform [0, 1] reference sets and k = 1..7 clusters: Gap(k) = log(mean_b W*_kb) - log(W_k),
   s_k = sqrt(1 + 1/B) std_b(log W*_kb); the number of clusters is the smallest k with
   Gap(k) >= Gap(k+1) - s_{k+1} (the largest k tried if none). More than one cluster means an attack.
6. On an attack: k-means with 2 clusters on the scores; the cluster with the larger mean score
   is removed this round.
7. Aggregation: FedAvg over the kept clients (alpha renormalised): G^t = sum_k alpha_hat_k delta_k^t,
   w_{t+1} = w_t + G^t. Until the window is full (and for the clients that cannot be scored yet)
   this is plain FedAvg.

FLDetector works with gradients g = -delta / eta; the L-BFGS product is linear in the scale of
Y, so using updates instead of gradients gives the same normalised distances (for a constant
learning rate).

Defaults and where they come from: N = 10 (the paper's window size; the authors' released code,
zaixizhang/FLDetector, keeps 10 weight/gradient differences), B = 10 reference sets and k = 1..7
(``detection1`` in the released code, which also takes Gap as the log of the mean reference
dispersion and normalises the scores to [0, 1]). The k-means fits are scikit-learn's
``KMeans(n_init=10)`` with ``random_state`` drawn, like the reference sets, from
``numpy_rng(run seed, DEFENSE, seed option, round)``, run on one thread. Draw order per k = 1..kmax:
the data fit's random_state, then for each of the B reference sets its n uniform values and its
fit's random_state; then the final 2-means fit's random_state.

Deviations: (a) the paper restarts training from scratch, or from an earlier checkpoint, once
it detects attackers; this defense removes the detected cluster in that round and keeps
scoring every round (a client is removed in each round it is detected). (b) The released code
aggregates with the coordinate-wise median by default (the paper evaluates FLDetector on top of
several aggregation rules); here the aggregation is FedAvg, before and after detection. (c) A client is predicted only if
it took part in the previous aggregation, and scored (step 4) only once it has N distances; the
others are kept unjudged (score 0 in the diagnostics). The gap statistic needs at least 3 scored
clients, and tries at most k = n - 1 clusters for n scored clients; a zero dispersion W_k (tied
scores) is floored at the smallest positive float. (d) A window pair is skipped when the global
model did not move (s = 0), and if M is singular its pseudo-inverse is used; a non-finite product
counts as H v = 0.

State (checkpointed, exact round trip): per client id its last update (M x P float32), the
number of the aggregation it was recorded in, and its last N normalised distances; the window S,
Y (n <= N rows of P float32); w_{t-1} and G^{t-1} (P each). Memory: O(M P + N P), i.e. O(K D + N D).
``keeps_client_history``: the predictions need every client every round.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pydantic
import torch

from fdcr_mpi.defenses._baseline import (
    alpha_numpy,
    column_chunks,
    combine,
    finish,
    normalized,
    trainable_mask,
    trainable_updates,
)
from fdcr_mpi.defenses.base import Defense, RoundInputs, RoundResult, register
from fdcr_mpi.errors import UserError
from fdcr_mpi.seeding import DEFENSE, numpy_rng

KMEANS_INITS = 10
STATE_KEYS = ("client_ids", "prev_updates", "prev_call", "distances", "distance_counts", "window_s", "window_y",
              "last_global", "last_aggregate", "calls")


def lbfgs_coefficients(inner: np.ndarray, n: int) -> tuple[float, np.ndarray] | None:
    """sigma and c = M^{-1} [sigma S'v; Y'v] of the compact L-BFGS product (step 2), so that
    H v = sigma v - sigma S c[:n] - Y c[n:].

    ``inner`` is the (2n+1) Gram matrix of the rows [s_1..s_n, y_1..y_n, v]. None when sigma is
    undefined (s_n = 0) or the result is not finite."""
    sts, sty = inner[:n, :n], inner[:n, n:2 * n]
    stv, ytv = inner[:n, 2 * n], inner[n:2 * n, 2 * n]
    if sts[-1, -1] <= 0:
        return None
    sigma = float(sty[-1, -1] / sts[-1, -1])
    lower = np.tril(sty, -1)
    m = np.block([[sigma * sts, lower], [lower.T, -np.diag(np.diag(sty))]])
    p = np.concatenate([sigma * stv, ytv])
    try:
        c = np.linalg.solve(m, p)
    except np.linalg.LinAlgError:
        c = np.linalg.pinv(m) @ p
    if not (np.isfinite(c).all() and np.isfinite(sigma)):
        return None
    return sigma, c


def stacked_gram(*parts: torch.Tensor) -> np.ndarray:
    """The float64 Gram matrix of the rows of ``parts`` stacked, without stacking them whole
    (one float64 column chunk at a time)."""
    rows = sum(int(x.shape[0]) for x in parts)
    g = torch.zeros(rows, rows, dtype=torch.float64, device=parts[0].device)
    for sl in column_chunks(int(parts[0].shape[1])):
        block = torch.cat([x[:, sl].to(torch.float64) for x in parts])
        g += block @ block.T
    return g.cpu().numpy()


def prediction_distances(prev: torch.Tensor, updates: torch.Tensor, window_s: torch.Tensor, window_y: torch.Tensor,
                         v: torch.Tensor) -> np.ndarray:
    """d_k = ||delta_k^{t-1} + H v - delta_k^t|| (step 3), accumulated in float64 column chunks; (K,)."""
    n = window_s.shape[0]
    coef = lbfgs_coefficients(stacked_gram(window_s, window_y, v.unsqueeze(0)), n) if n > 0 else None
    acc = torch.zeros(prev.shape[0], dtype=torch.float64, device=prev.device)
    for sl in column_chunks(prev.shape[1]):
        diff = prev[:, sl].to(torch.float64) - updates[:, sl].to(torch.float64)
        if coef is not None:
            sigma, c = coef
            cs = torch.as_tensor(c[:n], dtype=torch.float64, device=prev.device)
            cy = torch.as_tensor(c[n:], dtype=torch.float64, device=prev.device)
            hvp = (sigma * v[sl].to(torch.float64) - sigma * (cs @ window_s[:, sl].to(torch.float64))
                   - cy @ window_y[:, sl].to(torch.float64))
            diff += hvp
        acc += diff.square().sum(dim=1)
    return acc.sqrt().cpu().numpy()


def l1_normalized(d: np.ndarray) -> np.ndarray:
    """d / sum(d) (step 3); zeros stay zeros."""
    total = float(d.sum())
    return d / total if total > 0 else np.zeros_like(d)


def kmeans_fit(x: np.ndarray, k: int, rng: np.random.Generator) -> Any:
    """scikit-learn k-means on 1-D data, random_state drawn from ``rng``, on one thread (the
    result then does not depend on the machine's thread count, and a tiny fit does not pay for
    a thread pool). scikit-learn is imported here: at the top it would cost every process a second."""
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        return KMeans(n_clusters=k, n_init=KMEANS_INITS, random_state=int(rng.integers(2**31 - 1))).fit(
            x.reshape(-1, 1))


def gap_clusters(scores: np.ndarray, rng: np.random.Generator, references: int, max_clusters: int) -> int:
    """The number of clusters chosen by the gap statistic (step 5); 1 when it cannot be computed
    (fewer than 3 scores, or all equal)."""
    n = scores.size
    lo, hi = float(scores.min(initial=0.0)), float(scores.max(initial=0.0))
    if n < 3 or hi - lo <= 0:
        return 1
    x = (scores - lo) / (hi - lo)
    kmax = min(max_clusters, n - 1)
    tiny = np.finfo(np.float64).tiny
    gaps, sds = np.zeros(kmax), np.zeros(kmax)
    for i, k in enumerate(range(1, kmax + 1)):
        w = max(float(kmeans_fit(x, k, rng).inertia_), tiny)
        ref = np.array([max(float(kmeans_fit(rng.uniform(0.0, 1.0, n), k, rng).inertia_), tiny)
                        for _ in range(references)])
        gaps[i] = np.log(ref.mean()) - np.log(w)
        sds[i] = np.sqrt(1.0 + 1.0 / references) * np.log(ref).std()
    for i in range(kmax - 1):
        if gaps[i] - gaps[i + 1] + sds[i + 1] >= 0:
            return i + 1
    return kmax


def larger_score_cluster(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Step 6: k-means with 2 clusters; True for the members of the cluster with the larger mean."""
    labels = kmeans_fit(scores, 2, rng).labels_
    if not (labels == 0).any() or not (labels == 1).any():
        return np.zeros(scores.size, dtype=bool)
    bad = 0 if scores[labels == 0].mean() > scores[labels == 1].mean() else 1
    return labels == bad


@register("fldetector")
class FLDetector(Defense):
    """Remove clients whose updates are inconsistent with their L-BFGS-predicted updates."""

    summary = "FLDetector: L-BFGS-predicted updates, window-mean prediction error, gap statistic + 2-means removal"
    keeps_client_history = True

    def server_imports(self) -> tuple[str, ...]:
        return ("sklearn.cluster",)

    class Options(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
        window_size: int = pydantic.Field(default=10, ge=1,
                                          description="N: L-BFGS pairs kept and distances averaged per client")
        gap_references: int = pydantic.Field(default=10, ge=1, description="B: uniform reference sets of the gap statistic")
        max_clusters: int = pydantic.Field(default=7, ge=2, description="largest cluster count the gap statistic tries")
        seed: int = pydantic.Field(default=0, ge=0, description="mixed with the run's seed: varies the k-means draws alone")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.reset()

    def reset(self) -> None:
        """Forget every client and the window (a fresh run)."""
        n = self.options.window_size
        self.ids = np.zeros(0, dtype=np.int64)  # (M,) ascending client ids
        self.prev: torch.Tensor | None = None  # (M, P) float32: each client's last update
        self.prev_call = np.zeros(0, dtype=np.int64)  # (M,) the aggregation that recorded it
        self.distances = np.zeros((0, n))  # (M, N) last normalised distances, the newest last
        self.counts = np.zeros(0, dtype=np.int64)  # (M,) distances recorded (capped at N)
        self.window_s: torch.Tensor | None = None  # (n, P) float32
        self.window_y: torch.Tensor | None = None
        self.last_global: torch.Tensor | None = None  # (P,) w_{t-1}
        self.last_aggregate: torch.Tensor | None = None  # (P,) G^{t-1}
        self.calls = 0

    def aggregate(self, inputs: RoundInputs) -> RoundResult:
        o = self.options
        updates = trainable_updates(inputs)
        device = updates.device
        w = inputs.global_weights[trainable_mask(inputs)].to(torch.float32)
        if self.prev is not None and self.prev.shape[1] != updates.shape[1]:
            raise UserError(f"FLDetector holds {self.prev.shape[1]} entries per client, this round's updates "
                            f"{updates.shape[1]}: the model changed")
        ids = inputs.ids
        self.grow(ids, updates.shape[1], device)
        at = np.searchsorted(self.ids, ids)
        k = inputs.num_clients

        distance = np.zeros(k)
        window_full = self.window_s is not None and self.window_s.shape[0] >= o.window_size
        predicted = (self.prev_call[at] == self.calls - 1) & window_full & (self.last_global is not None)
        if predicted.any():
            assert self.prev is not None and self.window_s is not None and self.window_y is not None
            assert self.last_global is not None
            rows = torch.as_tensor(np.flatnonzero(predicted), device=device)
            prev = self.prev.to(device)[torch.as_tensor(at[predicted], device=device)]
            d = prediction_distances(prev, updates[rows], self.window_s.to(device), self.window_y.to(device),
                                     w - self.last_global.to(device))
            distance[predicted] = l1_normalized(d)
            for j, slot in zip(np.flatnonzero(predicted), at[predicted], strict=True):
                self.distances[slot] = np.roll(self.distances[slot], -1)
                self.distances[slot, -1] = distance[j]
                self.counts[slot] = min(self.counts[slot] + 1, o.window_size)

        judged = self.counts[at] >= o.window_size
        score = np.where(judged, self.distances[at].mean(axis=1), 0.0)
        rng = numpy_rng(inputs.seed, DEFENSE, o.seed, inputs.round)
        clusters = gap_clusters(score[judged], rng, o.gap_references, o.max_clusters) if judged.sum() >= 3 else 1
        removed = np.zeros(k, dtype=bool)
        if clusters > 1:
            removed[np.flatnonzero(judged)[larger_score_cluster(score[judged], rng)]] = True

        alpha_hat = normalized(np.where(removed, 0.0, alpha_numpy(inputs)))
        aggregate = combine(alpha_hat, updates)
        self.record(at, updates, w, aggregate)
        return finish(inputs, aggregate, alpha_hat, removed, {
            "fldetector_score": score, "prediction_distance": distance, "scored": int(judged.sum()),
            "gap_clusters": clusters, "attack_detected": int(clusters > 1)})

    def grow(self, ids: np.ndarray, p: int, device: torch.device) -> None:
        """Add a zero row for each client id seen for the first time (ids kept ascending)."""
        if self.prev is not None and np.isin(ids, self.ids).all():
            return
        merged = np.union1d(self.ids, ids)
        where = np.searchsorted(merged, self.ids)
        prev = torch.zeros(merged.size, p, dtype=torch.float32, device=device)
        prev_call = np.full(merged.size, -2, dtype=np.int64)
        distances = np.zeros((merged.size, self.options.window_size))
        counts = np.zeros(merged.size, dtype=np.int64)
        if self.prev is not None:
            prev[torch.as_tensor(where, device=device)] = self.prev.to(device)
            prev_call[where], distances[where], counts[where] = self.prev_call, self.distances, self.counts
        self.ids, self.prev, self.prev_call, self.distances, self.counts = merged, prev, prev_call, distances, counts

    def record(self, at: np.ndarray, updates: torch.Tensor, w: torch.Tensor, aggregate: torch.Tensor) -> None:
        """Step 1's window pair (s, y) of this round, the clients' updates and w_t, G^t for the next."""
        assert self.prev is not None
        if self.last_global is not None and self.last_aggregate is not None:
            s = w - self.last_global.to(w.device)
            if bool((s != 0).any()):
                y = (aggregate - self.last_aggregate.to(w.device)).unsqueeze(0)
                s = s.unsqueeze(0)
                keep = self.options.window_size - 1
                old_s = self.window_s.to(w.device)[-keep:] if self.window_s is not None and keep else s[:0]
                old_y = self.window_y.to(w.device)[-keep:] if self.window_y is not None and keep else y[:0]
                self.window_s, self.window_y = torch.cat([old_s, s]), torch.cat([old_y, y])
        self.prev = self.prev.to(updates.device)
        self.prev[torch.as_tensor(at, device=updates.device)] = updates
        self.prev_call[at] = self.calls
        self.last_global, self.last_aggregate = w.clone(), aggregate.clone()
        self.calls += 1

    def state_dict(self) -> dict[str, np.ndarray]:
        if self.prev is None or self.last_global is None or self.last_aggregate is None:
            return {}
        p = self.prev.shape[1]
        window_s = self.window_s if self.window_s is not None else torch.zeros(0, p)
        window_y = self.window_y if self.window_y is not None else torch.zeros(0, p)
        return {"client_ids": self.ids.copy(), "prev_updates": self.prev.detach().cpu().numpy().copy(),
                "prev_call": self.prev_call.copy(), "distances": self.distances.copy(),
                "distance_counts": self.counts.copy(), "window_s": window_s.detach().cpu().numpy().copy(),
                "window_y": window_y.detach().cpu().numpy().copy(),
                "last_global": self.last_global.detach().cpu().numpy().copy(),
                "last_aggregate": self.last_aggregate.detach().cpu().numpy().copy(),
                "calls": np.array([self.calls], dtype=np.int64)}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if not state:
            self.reset()
            return
        if set(state) != set(STATE_KEYS):
            raise UserError(f"the checkpoint holds FLDetector state {sorted(state)}, expected {sorted(STATE_KEYS)}")
        distances = np.asarray(state["distances"], dtype=np.float64)
        if distances.shape[1] != self.options.window_size:
            raise UserError(f"the checkpoint's FLDetector window has {distances.shape[1]} rounds, "
                            f"fldetector.window_size is {self.options.window_size}")

        def tensor(key: str) -> torch.Tensor:
            return torch.from_numpy(np.asarray(state[key], dtype=np.float32).copy())

        self.ids = np.asarray(state["client_ids"], dtype=np.int64).copy()
        self.prev, self.window_s, self.window_y = tensor("prev_updates"), tensor("window_s"), tensor("window_y")
        self.last_global, self.last_aggregate = tensor("last_global"), tensor("last_aggregate")
        self.prev_call = np.asarray(state["prev_call"], dtype=np.int64).copy()
        self.distances = distances.copy()
        self.counts = np.asarray(state["distance_counts"], dtype=np.int64).copy()
        self.calls = int(np.asarray(state["calls"]).reshape(-1)[0])
