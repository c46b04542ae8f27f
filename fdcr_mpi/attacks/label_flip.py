"""Label flipping (Tolpegin et al., "Data Poisoning Attacks Against Federated Learning Systems",
ESORICS 2020; here in the all-classes form of FLPoison and Blades): every label y of an attacker's
data becomes C - 1 - y (C classes), no trigger. An untargeted data-poisoning attack: it lowers A,
R is not its aim.
"""

from __future__ import annotations

import numpy as np
import torch

from fdcr_mpi.attacks.base import Attack, register
from fdcr_mpi.client.train import ClientData
from fdcr_mpi.data.datasets import DatasetSpec


def flipped(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """y -> C - 1 - y."""
    return num_classes - 1 - labels


@register("label_flip")
class LabelFlip(Attack):
    """Every label of an attacker's data flipped to C - 1 - y."""

    summary = "Label flip: every label y of an attacker's data becomes C-1-y (no trigger)"

    def poison(self, data: ClientData, spec: DatasetSpec, client: int, malicious: np.ndarray) -> ClientData:
        return ClientData(x=data.x, y=flipped(data.y, spec.num_classes), poisoned=torch.zeros_like(data.poisoned),
                          true_y=data.y, augment=data.augment)
