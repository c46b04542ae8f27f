"""Fang et al.'s full-knowledge local model poisoning attacks (Fang, Cao, Jia and Gong, "Local Model
Poisoning Attacks to Byzantine-Robust Federated Learning", USENIX Security 2020, section 3): the
attackers craft their updates together so that the robust rule moves the global model against the
direction it would take without them. ``fang.target`` names the rule they attack.

With the known updates b_1..b_r (``attack.knowledge``: the benign ones, the paper's full knowledge),
n participants, c attackers and P trainable entries:

1. s = sign(mean_i b_i), the estimated changing direction of every coordinate (the paper's s_j:
   the direction the global model would move without attack);

``trimmed_mean`` (the paper's attack on trimmed mean, which it also uses against the median):

2. per coordinate j, w_max,j = max_i b_ij and w_min,j = min_i b_ij;
3. if s_j = -1 (the benign clients move the coordinate down), every attacker sends a value drawn
   uniformly between w_max,j and b w_max,j (w_max,j > 0) or between w_max,j / b and w_max,j
   (w_max,j <= 0): at least the largest benign value; otherwise (s_j = +1, and s_j = 0, see below)
   a value drawn between w_min,j / b and w_min,j (w_min,j > 0) or between b w_min,j and w_min,j
   (w_min,j <= 0): at most the smallest benign value. b = ``fang.b`` > 1, the paper's b = 2. The
   draws are u in [0, 1) from the round's generator, one per attacker and coordinate in row-major
   order (``round_.rng.uniform(size=(c, P))``): value = w + u (far - w), w the benign extreme and
   far the other end.

``krum`` (the paper's attack on Krum):

2. the upper bound on lambda (the paper's bound, with D the Euclidean distance and Gamma_i the
   n - c - 2 known updates closest to b_i):
       lambda_0 = min_i sum_{l in Gamma_i} D(b_l, b_i) / ((n - 2c - 1) sqrt(P)) + max_i ||b_i|| / sqrt(P)
   (||b_i|| = D(w_i, w_t), the distance of a benign local model to the global one);
3. lambda = lambda_0, lambda_0 / 2, lambda_0 / 4, ...: every attacker sends -lambda s, and the first
   lambda for which Krum (``defenses.krum_single.krum_select``, f = c) run on the known updates
   followed by the c crafted rows selects a crafted row is kept; the search stops once lambda has
   fallen below ``fang.lambda_threshold`` (the paper's 1e-5): then the last lambda tried (the first
   one below the threshold) is sent although Krum did not select it.

Defaults: b = 2 and the threshold 1e-5, the paper's values as recalled (its experiments' b, its
stopping value for lambda; not checked against its text, which was not at hand); ``trimmed_mean``
is the default target, the rule the coordinate-wise defenses share.

Deviations from the paper, stated plainly:

- the rules act on updates delta_k = w_k - w_t, not on the local models w_k: w_max,j, w_min,j and
  the sign tests of step 3 are taken on the benign updates (as re-implementations such as Blades'
  do on gradients), since the colluding stage sees only the round's updates
  (``attacks.collusion``); the Krum attack's w_t - lambda s is sent as the update
  -lambda s, which is the same model;
- s is the sign of the mean known update (the paper's full-knowledge attacker computes the
  direction the rule itself would take); a coordinate with s_j = 0 is treated as s_j = +1 (the
  attackers send at most the benign minimum there);
- the paper's other c - 1 Krum attackers send models within epsilon of the first one; here all c
  send the same -lambda s (epsilon = 0);
- the neighbour count n - c - 2 of the bound is clamped to 1..r - 1 (r known updates) and its
  divisor n - 2c - 1 to at least 1, so the bound exists when the paper's condition n > 2c + 2 fails
  or the attackers know only their own updates (``attack.knowledge: attackers``);
- in the Krum search the crafted rows come after the known ones, so a tie goes to a known row.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import pydantic
import torch

from fdcr_mpi.attacks._crafting import mean_and_std, pairwise_squared
from fdcr_mpi.attacks.base import Attack, RoundUpdates, register
from fdcr_mpi.defenses.krum_single import krum_select


def direction(reference: torch.Tensor) -> torch.Tensor:
    """Step 1: s = sign(mean of the known updates), (P,) float64 in {-1, 0, 1}."""
    mu, _ = mean_and_std(reference)
    return torch.sign(mu)


def trimmed_mean_update(reference: torch.Tensor, num_attackers: int, b: float,
                        rng: np.random.Generator) -> torch.Tensor:
    """Steps 2-3 of the trimmed-mean attack: (c, P) float32, each value drawn between the benign
    extreme that opposes s and b times (or 1 / b times) it."""
    rows = reference.to(torch.float64)
    s = direction(reference)
    w_max, w_min = rows.max(dim=0).values, rows.min(dim=0).values
    up = s < 0  # the benign clients move the coordinate down: push it up, beyond the largest value
    near = torch.where(up, w_max, w_min)
    far_up = torch.where(w_max > 0, b * w_max, w_max / b)
    far_down = torch.where(w_min > 0, w_min / b, b * w_min)
    far = torch.where(up, far_up, far_down)
    u = torch.from_numpy(rng.uniform(size=(num_attackers, rows.shape[1])))
    return (near + u * (far - near)).to(torch.float32)


def lambda_bound(reference: torch.Tensor, num_clients: int, num_attackers: int) -> float:
    """Step 2 of the Krum attack: the paper's upper bound lambda_0 on the known updates."""
    r, p = reference.shape
    distance = pairwise_squared(reference).sqrt().numpy()
    neighbours = min(max(num_clients - num_attackers - 2, 1), r - 1)
    if neighbours >= 1:
        closest = [np.sort(np.delete(distance[i], i), kind="stable")[:neighbours].sum() for i in range(r)]
        spread = float(min(closest)) / (max(num_clients - 2 * num_attackers - 1, 1) * math.sqrt(p))
    else:  # a single known update: no neighbours
        spread = 0.0
    farthest = float(torch.linalg.vector_norm(reference.to(torch.float64), dim=1).max())
    return spread + farthest / math.sqrt(p)


def krum_update(reference: torch.Tensor, num_clients: int, num_attackers: int,
                threshold: float) -> tuple[torch.Tensor, float, bool]:
    """Step 3 of the Krum attack: (-lambda s as (P,) float32, lambda, whether Krum selected it)."""
    s = direction(reference)
    lam = lambda_bound(reference, num_clients, num_attackers)
    known = reference.to(torch.float32)
    while True:
        crafted = (-lam * s).to(torch.float32)
        rows = torch.cat([known, crafted.expand(num_attackers, -1)])
        chosen, _, _ = krum_select(rows, num_attackers)
        if chosen >= known.shape[0]:
            return crafted, lam, True
        if not threshold <= lam < math.inf:  # below the threshold (or not finite: halving never ends)
            return crafted, lam, False
        lam /= 2


@register("fang")
class Fang(Attack):
    """Fang et al.'s full-knowledge attack on the trimmed mean / median or on Krum."""

    summary = "Fang: full-knowledge attack on trimmed mean/median (beyond the benign extremes) or Krum (-lambda*sign)"
    colludes = True

    class Options(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
        target: Literal["trimmed_mean", "krum"] = pydantic.Field(
            default="trimmed_mean", description="the rule attacked; trimmed_mean also serves against the median")
        b: float = pydantic.Field(default=2.0, gt=1.0, description="trimmed_mean: how far beyond the benign "
                                  "extremes the values reach (the paper's b = 2)")
        lambda_threshold: float = pydantic.Field(default=1e-5, gt=0, description="krum: the search for lambda "
                                                 "stops below this value (the paper's 1e-5)")

    def collude(self, round_: RoundUpdates) -> torch.Tensor:
        o, c = self.options, round_.num_attackers
        if o.target == "trimmed_mean":
            return trimmed_mean_update(round_.reference, c, o.b, round_.rng)
        update, self.lam, self.selected = krum_update(round_.reference, round_.num_clients, c, o.lambda_threshold)
        return update.expand(c, -1).clone()
