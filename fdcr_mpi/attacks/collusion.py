"""The colluding attackers' stage: where the round's rows meet on the server, right after the
gather and before the defense, the attackers' rows are replaced by the updates their attack crafts
from the updates they know (``Attack.collude``), and their Fisher rows by the adaptive forgery
(``attack.fisher: adaptive``, ``attacks.adaptive_fisher``).

Only the trainable entries are crafted (buffers such as BatchNorm statistics stay the attacker's
honest ones: a crafted running variance could turn negative). The attackers know either every
benign participant's update (``attack.knowledge: omniscient``, the full-knowledge threat model of
LIE, Fang et al. and Shejwalkar & Houmansadr) or only their own honest updates (``attackers``,
the partial-knowledge model). Rows a client flagged non-finite take no part. Randomness comes
from (seed, COLLUDE, round): the same rows on any launch.
"""

from __future__ import annotations

import numpy as np
import torch

from fdcr_mpi.attacks.adaptive_fisher import adaptive_fisher
from fdcr_mpi.attacks.base import Attack, RoundUpdates
from fdcr_mpi.seeding import COLLUDE, numpy_rng


def stage_needed(attack: Attack) -> bool:
    """Whether the attack acts where the rows meet (a colluding attack, or the adaptive Fisher forgery)."""
    return attack.colludes or attack.config.attack.fisher == "adaptive"


def collude(attack: Attack, weights: np.ndarray, global_weights: torch.Tensor, trainable: torch.Tensor | None,
            attackers: np.ndarray, healthy: np.ndarray, seed: int, round_: int,
            fisher: np.ndarray | None = None, sizes: np.ndarray | None = None) -> None:
    """Replace the attackers' rows of ``weights`` (m, D), in place, by w_t + their crafted updates,
    then (``attack.fisher: adaptive``, when the defense reads Fisher rows) their rows of ``fisher``."""
    rows = np.flatnonzero(healthy)
    malicious = np.asarray(attackers, bool)[rows]
    if not malicious.any():
        return
    omniscient = attack.config.attack.knowledge == "omniscient"
    if attack.colludes:
        craft_updates(attack, weights, global_weights, trainable, rows, malicious, omniscient, seed, round_)
    if attack.config.attack.fisher == "adaptive" and fisher is not None:
        w, f = torch.from_numpy(weights), torch.from_numpy(fisher)  # views of the receive buffers
        index = torch.from_numpy(rows)
        sizes = np.ones(len(weights)) if sizes is None else np.asarray(sizes, np.float64)
        alpha = sizes[rows] / sizes[rows].sum()
        forged = adaptive_fisher(w[index] - global_weights.detach().cpu().to(torch.float32), f[index], alpha,
                                 malicious, ~malicious if omniscient else malicious)
        for i, row in enumerate(rows[malicious]):
            f[row] = forged[i]


def craft_updates(attack: Attack, weights: np.ndarray, global_weights: torch.Tensor, trainable: torch.Tensor | None,
                  rows: np.ndarray, malicious: np.ndarray, omniscient: bool, seed: int, round_: int) -> None:
    """``Attack.collude`` on the trainable entries of the healthy ``rows``; the attackers' rows rewritten."""
    w = torch.from_numpy(weights)  # a view: the writes below land in the server's receive buffer
    mask = torch.ones(w.shape[1], dtype=torch.bool) if trainable is None else trainable.cpu().to(torch.bool)
    w_t = global_weights.detach().cpu().to(torch.float32)[mask]
    updates = w[torch.from_numpy(rows)][:, mask] - w_t
    known = ~malicious if omniscient else malicious
    crafted = attack.collude(RoundUpdates(updates, malicious, known, numpy_rng(seed, COLLUDE, round_)))
    if crafted.shape != (int(malicious.sum()), updates.shape[1]):
        raise ValueError(f"attack {attack.name!r} crafted {tuple(crafted.shape)} updates for "
                         f"{int(malicious.sum())} attackers of {updates.shape[1]} entries")
    for i, row in enumerate(rows[malicious]):
        w[row, mask] = w_t + crafted[i].to(torch.float32)
