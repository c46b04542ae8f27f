"""Bucketing (Karimireddy, He and Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets via
Bucketing", ICLR 2022, Algorithm 1), around one of this package's robust aggregators.

With n updates x_1..x_n (trainable entries) and bucket size s:

1. pi = a random permutation of the n clients;
2. B = ceil(n / s) buckets: bucket t holds the clients pi(t s), ..., pi(min((t + 1) s, n) - 1)
   (the last one may be smaller);
3. y_t = the plain mean of bucket t's updates;
4. step = Aggr(y_1, ..., y_B) with the robust aggregator ``aggregator``;
5. w_{t+1} = w_t + step.

Averaging s updates shrinks the spread between heterogeneous benign clients before the robust rule
sees it, at the price of at most s times as many contaminated inputs.

Defaults, from the authors' released code (github.com/epfml/byzantine-robust-noniid-optimizer,
``utils.py``): s = 2 (the bucket size of the paper's main experiments, ``--bucketing 2`` in
``run.sh``); ``aggregator: centered_clipping``, the rule the paper pairs bucketing with in its
further experiments (the s and f sweeps of ``exp4.py`` run CClip alone; the main comparison runs
Krum, CM, RFA and CClip, each with s = 2); CClip there is ``Clipping(tau=10, n_iter=3)``
(``--clip-tau`` 10, 3 iterations), so ``tau = 10``, ``iterations = 3`` here (the bare
``centered_clipping`` defense uses the ICML 2021 code's tau = 100, L = 1). As in that code, the
centre of centered clipping is the previous round's aggregate, kept across rounds (the state);
Krum runs on the B bucket means with f = ``f`` (default (B - 3) // 2, Krum's largest valid f; the
code passes the true attacker count, which a defense does not know);
the trimmed mean trims b = floor(beta B) bucket means at each end (default beta = 0.1).
The inner rules are the functions of ``krum_single``, ``coordinate_median``, ``trimmed_mean``
and ``centered_clipping``.

The permutation comes from a numpy Generator of (run seed, DEFENSE, ``seed`` option, round).
Means are unweighted, as in the paper (the sample sizes N_k play no part).
alpha_hat_k = (the share the inner rule gives client k's bucket) / (the bucket's size); a client
whose bucket gets no share is removed (Krum: all but one bucket).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import pydantic
import torch

from fdcr_mpi.defenses._baseline import combine, finish, normalized, trainable_updates
from fdcr_mpi.defenses.base import Defense, RoundInputs, RoundResult, register
from fdcr_mpi.defenses.centered_clipping import Center, centered_clip
from fdcr_mpi.defenses.coordinate_median import coordinate_median
from fdcr_mpi.defenses.krum_single import krum
from fdcr_mpi.defenses.trimmed_mean import DEFAULT_BETA, trim_count, trimmed_mean
from fdcr_mpi.seeding import DEFENSE, numpy_rng

Aggregator = Literal["krum", "median", "trimmed_mean", "centered_clipping"]
BUCKETING_TAU = 10.0  # epfml/byzantine-robust-noniid-optimizer, utils.py: --clip-tau 10, Clipping(tau, n_iter=3)
BUCKETING_ITERATIONS = 3


def bucket_of(n: int, s: int, rng: np.random.Generator) -> np.ndarray:
    """Steps 1-2: the bucket index of every client, (n,) int64 (client pi(j) goes to bucket j // s)."""
    order = rng.permutation(n)
    bucket = np.empty(n, dtype=np.int64)
    bucket[order] = np.arange(n) // s
    return bucket


def bucket_means(rows: torch.Tensor, bucket: np.ndarray) -> torch.Tensor:
    """Step 3: y_t = the mean of the rows in bucket t, (B, P) float32 (sums in client order)."""
    count = int(bucket.max()) + 1 if bucket.size else 0
    means = torch.empty(count, rows.shape[1], dtype=torch.float32, device=rows.device)
    for t in range(count):
        members = bucket == t
        means[t] = combine(members / float(members.sum()), rows)
    return means


@register("bucketing")
class Bucketing(Defense):
    """Average random buckets of s updates, then a robust aggregator on the bucket means."""

    summary = "Bucketing: random buckets of s = 2 updates averaged, then centered clipping (or Krum, median, TM)"

    class Options(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
        s: int = pydantic.Field(default=2, ge=1, description="bucket size")
        aggregator: Aggregator = pydantic.Field(default="centered_clipping",
                                                description="robust rule on the bucket means")
        f: int | None = pydantic.Field(default=None, ge=0,
                                       description="krum: assumed bad buckets; None: (B - 3) // 2")
        beta: float = pydantic.Field(default=DEFAULT_BETA, ge=0.0, lt=0.5,
                                     description="trimmed_mean: floor(beta * B) bucket means trimmed at each end")
        tau: float = pydantic.Field(default=BUCKETING_TAU, gt=0.0, description="centered_clipping: clipping radius")
        iterations: int = pydantic.Field(default=BUCKETING_ITERATIONS, ge=1,
                                         description="centered_clipping: clipping iterations per round")
        seed: int = pydantic.Field(default=0, ge=0, description="mixed with the run's seed: varies the permutation alone")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.center = Center()

    def robust(self, means: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """Step 4: (the aggregate (P,) float32, each bucket's (B,) share)."""
        o = self.options
        if o.aggregator == "krum":
            return krum(means, o.f)
        if o.aggregator == "median":
            return coordinate_median(means)
        if o.aggregator == "trimmed_mean":
            return trimmed_mean(means, trim_count(means.shape[0], o.beta))
        start = self.center.start(means.shape[1], means.device, self.name)
        step, coef, _ = centered_clip(means, start, o.tau, o.iterations)
        self.center.keep(step)
        return step, normalized(coef)

    def aggregate(self, inputs: RoundInputs) -> RoundResult:
        n = inputs.num_clients
        rng = numpy_rng(inputs.seed, DEFENSE, self.options.seed, inputs.round)
        bucket = bucket_of(n, self.options.s, rng)
        updates = trainable_updates(inputs)
        step, share = self.robust(bucket_means(updates, bucket))
        sizes = np.bincount(bucket, minlength=share.size).astype(np.float64)
        alpha_hat = normalized(share[bucket] / sizes[bucket])
        return finish(inputs, step, alpha_hat, alpha_hat == 0,
                      {"bucket": bucket, "bucket_share": share[bucket], "num_buckets": math.ceil(n / self.options.s)})

    def state_dict(self) -> dict[str, np.ndarray]:
        return self.center.state_dict()

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.center.load_state_dict(state, self.name)
