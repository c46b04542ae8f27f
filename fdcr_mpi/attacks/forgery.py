"""Fisher vectors an attacker may report instead of its own (``attack.fisher``).

FDCR trusts the Fisher diagonal a client reports (docs/SPEC.md section 2); these are the ways an
attacker can lie about it: ``uniform`` (a constant vector: its importance I_k is 0 everywhere),
``noise`` (N(0, 1) on every parameter, what the released FDCR code substitutes for the attackers'
vectors, here reported by the attackers themselves) and ``mimic`` (the Fisher of its clean
samples only, computed as a benign client would: see ``Attack.honest_data``). ``honest`` reports
the Fisher of its own poisoned data.
"""

from __future__ import annotations

import torch

from fdcr_mpi.models import FlatModel

FORGERIES = ("honest", "uniform", "mimic", "noise", "adaptive")  # adaptive: attacks.adaptive_fisher


def forged(kind: str, model: FlatModel, generator: torch.Generator) -> torch.Tensor | None:
    """The (D,) vector of forgery ``kind`` on the model's device, or None for a computed one
    (``honest``, ``mimic``). ``noise`` draws from the client's round generator."""
    device = model.flat.device
    if kind == "uniform":
        return torch.ones(model.size, device=device)
    if kind == "noise":
        fisher = torch.zeros(model.size, device=device)
        fisher[: model.num_params] = torch.randn(model.num_params, generator=generator).to(device)
        return fisher
    return None
