"""No attack: a clean run (no client is malicious, whatever ``attack.malicious_ratio`` says)."""

from __future__ import annotations

from fdcr_mpi.attacks.base import Attack, register


@register("none")
class NoAttack(Attack):
    """Every client is benign."""

    summary = "none: a clean run, every client benign"
    has_attackers = False
