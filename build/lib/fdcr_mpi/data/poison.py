"""BadNets triggers (paper pattern, solid block, DBA parts), poisoned subsets, backdoor test set.

Triggers act on model input: (B, 3, 32, 32) floats after normalisation and augmentation,
whose masked pixels are set to ``value`` (docs/SPEC.md section 3).
"""

from __future__ import annotations

import numpy as np
import torch

from fdcr_mpi.errors import UserError

_PATTERNS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "paper": ((0, 2), (0, 1, 2, 4, 5, 6)),  # the released code's pattern
    "solid": ((0, 1), (0, 1, 2, 3, 4, 5)),  # a full 2x6 block
}


def _pixels(pattern: str, size: int) -> list[tuple[int, int]]:
    """The trigger's (row, col) pixels in row-major order, or a UserError."""
    if pattern not in _PATTERNS:
        raise UserError(
            f"trigger.pattern has the invalid value {pattern!r}; choose one of: {', '.join(_PATTERNS)}"
        )
    rows, cols = _PATTERNS[pattern]
    if max(*rows, *cols) >= size:
        raise ValueError(f"a {size}x{size} image is too small for the '{pattern}' trigger")
    return [(r, c) for r in rows for c in cols]


def _mask_of(pixels: list[tuple[int, int]], channels: int, size: int) -> torch.Tensor:
    """Bool (channels, size, size) with ``pixels`` set in every channel."""
    mask = torch.zeros((channels, size, size), dtype=torch.bool)
    for r, c in pixels:
        mask[:, r, c] = True
    return mask


def trigger_mask(pattern: str = "paper", channels: int = 3, size: int = 32) -> torch.Tensor:
    """The full trigger as a bool mask (channels, size, size) in the top-left corner."""
    return _mask_of(_pixels(pattern, size), channels, size)


def dba_masks(pattern: str, parts: int, channels: int = 3, size: int = 32) -> list[torch.Tensor]:
    """The trigger split into ``parts`` disjoint local triggers whose union is the full trigger.

    Pixels are taken in row-major order and cut into ``parts`` contiguous runs of (nearly)
    equal length: for the paper pattern and 4 parts these are DBA's four row segments.
    """
    pixels = _pixels(pattern, size)
    if not 1 <= parts <= len(pixels):
        raise UserError(
            f"a DBA attack splits the {len(pixels)}-pixel '{pattern}' trigger into one part per "
            f"attacker, so it needs 1 to {len(pixels)} attackers, got {parts}"
        )
    runs = np.array_split(np.arange(len(pixels)), parts)
    return [_mask_of([pixels[i] for i in run], channels, size) for run in runs]


def apply_trigger(x: torch.Tensor, mask: torch.Tensor, value: float = 1.0) -> torch.Tensor:
    """A copy of the model input ``x`` (B, C, H, W) with the pixels of ``mask`` set to ``value``."""
    return x.masked_fill(mask.to(x.device), value)


def poison_mask(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Bool (n,): a fixed seeded subset of exactly round(rate * n) samples carries the trigger."""
    if not 0.0 <= rate <= 1.0:
        raise UserError(f"attack.poison_rate must be in [0, 1], got {rate}")
    mask = np.zeros(n, dtype=bool)
    mask[rng.choice(n, size=int(round(rate * n)), replace=False)] = True
    return mask


def backdoor_test_set(
    x: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    value: float,
    target: int,
    include_target: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triggered copies of the model inputs ``x`` labelled ``target``.

    Samples whose true label is ``target`` are left out unless ``include_target``.
    """
    keep = torch.ones_like(y, dtype=torch.bool) if include_target else y != target
    xs = apply_trigger(x[keep], mask, value)
    return xs, torch.full((xs.shape[0],), int(target), dtype=torch.int64, device=y.device)
