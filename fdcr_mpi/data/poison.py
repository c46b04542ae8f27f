"""Backdoor triggers (BadNets' paper pattern and solid block, DBA parts, blends and patches),
poisoned subsets, backdoor test set.

Triggers act on model input: (B, C, 32, 32) floats after normalisation and augmentation
(docs/SPEC.md section 3). A BadNets trigger sets its masked pixels to ``value``; the ``Trigger``
type also blends a pattern into the image (``attacks.blended``) or pastes one inside a region
(``attacks.a3fl``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fdcr_mpi.data.datasets import DatasetSpec
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


@dataclass(frozen=True)
class Trigger:
    """What a backdoor does to a model input x (B, C, H, W), on the rows that carry it.

    - stamp (``pattern`` None; BadNets, DBA): x'[c, i, j] = ``value`` where ``mask``, x elsewhere;
    - blend (``pattern`` P, ``alpha`` a < 1; Chen et al. 2017, blended injection):
      x' = (1 - a) x + a P, on every pixel (``mask`` None) or inside ``mask``;
    - patch (``alpha`` 1; A3FL): x' = P inside ``mask``, x elsewhere (the authors'
      ``trigger * mask + (1 - mask) * x``).

    ``mask``: (C', H, W) bool; ``pattern``: (C', H, W) float, in the model's input space
    (normalised). C' may exceed the batch's C (a 3-channel mask on grayscale data): the first C
    channels act. Neither is moved: they must be on the batch's device (``to``).
    """

    mask: torch.Tensor | None = None
    value: float = 1.0
    pattern: torch.Tensor | None = None
    alpha: float = 1.0

    @classmethod
    def of(cls, trigger: Trigger | torch.Tensor, value: float) -> Trigger:
        """``trigger`` itself, or the stamp of the bool mask ``trigger`` with ``value``."""
        return trigger if isinstance(trigger, Trigger) else cls(mask=trigger, value=value)

    @property
    def device(self) -> torch.device:
        return (self.mask if self.mask is not None else self.pattern).device

    def to(self, device: torch.device | str) -> Trigger:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return Trigger(mask=move(self.mask), value=self.value, pattern=move(self.pattern), alpha=self.alpha)

    def with_pattern(self, pattern: torch.Tensor) -> Trigger:
        """The same trigger with another ``pattern`` (a per-round trigger, ``attacks.a3fl``)."""
        return Trigger(mask=self.mask, value=self.value, pattern=pattern, alpha=self.alpha)

    def apply(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """A copy of ``x`` (B, C, H, W) with the trigger on the rows where ``rows`` (B,) bool is
        True (every row when None)."""
        c = x.shape[1]
        if self.pattern is None:  # the stamp: exactly BadNets' masked_fill (same bits as before)
            where = self.mask[:c] if rows is None else rows.view(-1, 1, 1, 1) & self.mask[:c]
            return x.masked_fill(where, self.value)
        pattern = self.pattern[:c].to(x.dtype)
        out = pattern.expand_as(x) if self.alpha == 1.0 else x * (1.0 - self.alpha) + pattern * self.alpha
        where = None if self.mask is None else self.mask[:c]
        if rows is not None:
            picked = rows.view(-1, 1, 1, 1)
            where = picked if where is None else picked & where
        if where is None:
            return out.clone() if self.alpha == 1.0 else out
        return torch.where(where, out, x)


def normalise(pixels: torch.Tensor, spec: DatasetSpec) -> torch.Tensor:
    """A (C, H, W) image in pixel space [0, 1] as the model sees it: (p - mean_c) / std_c."""
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(-1, 1, 1)
    return (pixels.to(torch.float32) - mean) / std


def input_range(spec: DatasetSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The (C, 1, 1) bounds of a valid model input: the normalised values of pixels 0 and 1."""
    ones = torch.ones((spec.channels, 1, 1))
    return normalise(0 * ones, spec), normalise(ones, spec)


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
