"""The attack protocol and its registry (docs/SPEC.md section 3).

An attack is what a malicious client does differently from a benign one, at three points of
its round, each a hook with the benign behaviour as default:

- ``poison``: its training data, built once (relabelled rows, the trigger it stamps);
- ``update``: its trained weights, changed in place before they are sent;
- ``fisher``: the Fisher vector it reports (``None``: the honest one, computed as any client's).

Defenses never see an ``Attack``: it acts on the client side only. Adding an attack is one new
module in this package (or the user's own, loaded with ``--plugin``) with a class decorated by
``@register("name")``; ``attack.kind`` selects it. ``attack.scale`` (model replacement) and
``attack.fisher`` (a forged Fisher vector) apply to any attack: they are this base class's
``update`` and ``fisher``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from fdcr_mpi.attacks import forgery
from fdcr_mpi.client.train import ClientData
from fdcr_mpi.data.datasets import DatasetSpec
from fdcr_mpi.errors import UserError
from fdcr_mpi.models import FlatModel
from fdcr_mpi.registry import Registry

if TYPE_CHECKING:
    from fdcr_mpi.config import BaseConfig


class Attack:
    """Base class: a malicious client's hooks. ``config`` is the run's config."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    has_attackers: ClassVar[bool] = True  # False: the run has no malicious client (attack.kind: none)

    def __init__(self, config: BaseConfig) -> None:
        self.config = config

    def poison(self, data: ClientData, spec: DatasetSpec, client: int, malicious: np.ndarray) -> ClientData:
        """The malicious ``client``'s training data, from its clean ``data``."""
        return data

    @torch.no_grad()
    def update(self, weights: torch.Tensor, global_weights: torch.Tensor) -> None:
        """Model replacement (``attack.scale`` s): w_k <- w_t + s (w_k - w_t), in place."""
        scale = self.config.attack.scale
        if scale != 1.0:
            weights.sub_(global_weights).mul_(scale).add_(global_weights)

    def fisher(self, model: FlatModel, data: ClientData, generator: torch.Generator) -> torch.Tensor | None:
        """The forged Fisher vector ``attack.fisher`` asks for (``attacks.forgery``), or None."""
        return forgery.forged(self.config.attack.fisher, model, generator)

    def honest_data(self, data: ClientData) -> ClientData:
        """The data an attacker computes an 'honest' Fisher on: its own (poisoned) data, or, with
        ``attack.fisher: mimic``, its clean samples only (what a benign client would report)."""
        return data.clean_part() if self.config.attack.fisher == "mimic" else data


REGISTRY: Registry[Attack] = Registry("attack")
register = REGISTRY.register
"""Class decorator: make an attack available as ``attack.kind: name``."""
available = REGISTRY.available


def create(config: BaseConfig) -> Attack:
    """The attack ``attack.kind`` of ``config``; an unknown name is a ``UserError``."""
    name = config.attack.kind
    if name not in REGISTRY.classes:
        raise UserError(f"config key 'attack.kind' has the invalid value {name!r}; "
                        f"choose one of: {REGISTRY.choices()}")
    return REGISTRY.classes[name](config)
