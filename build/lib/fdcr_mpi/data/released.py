"""The released FDCR code's data pipeline, where it departs from the specification.

Each departure is a named config option (docs/METHOD.md, "The released code"); the preset
``configs/paper/released_fdcr.yaml`` sets them all.

- ``attack.poisoning: bernoulli``: each of an attacker's samples carries the trigger with
  probability ``poison_rate``, independently (the released ``Attack/backdoor/utils.py`` draws
  ``torch.rand(1) < noise_data_rate`` per image), where the specification poisons a fixed
  seeded subset of exactly round(rate n) samples.
- ``attack.augmentation: frozen``: an attacker's images are augmented once, when its poisoned
  copy of the data is built (the released code stores the transformed images in a
  ``BackdoorDataset``), and never again; a benign client's are augmented anew every epoch.
- ``data.normalization: released``: CIFAR-10 normalised with the std (0.2023, 0.1994, 0.2010)
  of the released code, where the specification uses (0.2470, 0.2435, 0.2615). The grayscale
  datasets are normalised the same way in both.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from fdcr_mpi.data.datasets import DatasetSpec, augment
from fdcr_mpi.data.poison import poison_mask
from fdcr_mpi.errors import UserError

RELEASED_STD = {"cifar10": (0.2023, 0.1994, 0.2010)}
FREEZE_CHUNK = 4096  # images augmented per call when freezing


def bernoulli_mask(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Bool (n,): each sample poisoned independently with probability ``rate``."""
    if not 0.0 <= rate <= 1.0:
        raise UserError(f"attack.poison_rate must be in [0, 1], got {rate}")
    return rng.random(n) < rate


def poisoned_rows(kind: str, n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """An attacker's poisoned rows: ``fixed`` (exactly round(rate n), seeded) or ``bernoulli``."""
    return bernoulli_mask(n, rate, rng) if kind == "bernoulli" else poison_mask(n, rate, rng)


def augment_once(x: torch.Tensor, spec: DatasetSpec, generator: torch.Generator) -> torch.Tensor:
    """``attack.augmentation: frozen``: one draw of the training augmentation for every image of
    ``x`` (n, C, 32, 32), kept for the whole run; draws in order from ``generator``."""
    parts = [augment(x[start:start + FREEZE_CHUNK], spec, generator) for start in range(0, x.shape[0], FREEZE_CHUNK)]
    return torch.cat(parts) if parts else x.clone()


def normalized_spec(spec: DatasetSpec, normalization: str) -> DatasetSpec:
    """The dataset's spec with the released code's normalisation when asked (CIFAR-10 only differs)."""
    if normalization == "released" and spec.name in RELEASED_STD:
        return dataclasses.replace(spec, std=RELEASED_STD[spec.name])
    return spec
