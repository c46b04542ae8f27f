"""The attack protocol and its registry (docs/SPEC.md section 3).

An attack is what a malicious client does differently from a benign one, at three points of
its round, each a hook with the benign behaviour as default:

- ``poison``: its training data, built once (relabelled rows, the trigger it stamps);
- ``update``: its trained weights, changed in place before they are sent;
- ``fisher``: the Fisher vector it reports (``None``: the honest one, computed as any client's);
- ``train`` (attacks whose ``trains_differently`` is true): its local training itself, in place of
  ``client.train_client``; such an attacker is trained alone, outside a batched group
  (``runtime.clients``). The base class's ``train`` is ``train_client`` with PGD's projection after
  every ``attack.pgd_every``-th SGD step (``step_hook``);
- ``collude`` (attacks with ``colludes = True``): the attackers' updates crafted together from
  the round's updates (``attack.knowledge``: every participant's, or the attackers' own honest
  ones), the model-poisoning attacks of the robust-aggregation literature. The attackers'
  coordination is simulated where their rows meet, on the server right after the gather and
  before the defense sees any row (so the gather path only); it is the attack's code, never the
  defense's, that knows which rows are the attackers'.

Defenses never see an ``Attack``: it acts on the client side only. Adding an attack is one new
module in this package (or the user's own, loaded with ``--plugin``) with a class decorated by
``@register("name")``; ``attack.kind`` selects it. ``attack.scale`` (model replacement),
``attack.pgd_radius`` / ``attack.pgd_every`` (projected gradient descent) and ``attack.fisher`` (a
forged Fisher vector) apply to any attack: they are this base class's ``update``, ``send``,
``train`` and ``fisher``. An attack's hyperparameters are its pydantic ``Options``: the config
section ``<name>.*`` (as a defense's), ``self.options`` here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import pydantic
import torch

from fdcr_mpi.attacks import forgery
from fdcr_mpi.client.train import ClientData, TrainSettings, train_client
from fdcr_mpi.data.datasets import DatasetSpec
from fdcr_mpi.data.poison import Trigger, trigger_mask
from fdcr_mpi.errors import UserError
from fdcr_mpi.models import FlatModel
from fdcr_mpi.registry import Registry

if TYPE_CHECKING:
    from fdcr_mpi.config import BaseConfig


class NoOptions(pydantic.BaseModel):
    """Options of an attack that has none."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


@dataclass
class RoundUpdates:
    """What colluding attackers see of a round (``Attack.collude``), on the trainable entries.

    updates: delta_k = w_k - w_t of every healthy participant, (m, P) float32, client order.
    attackers: (m,) bool, the attackers' rows. known: (m,) bool, the rows whose honest update the
    attackers know (every row, or their own: ``attack.knowledge``). num_clients: m.
    rng: the round's generator of the attack (seeded by the run seed and the round).
    """

    updates: torch.Tensor
    attackers: np.ndarray
    known: np.ndarray
    rng: np.random.Generator

    @property
    def num_clients(self) -> int:
        return int(self.updates.shape[0])

    @property
    def num_attackers(self) -> int:
        return int(self.attackers.sum())

    @property
    def reference(self) -> torch.Tensor:
        """The honest updates the attackers know, (r, P)."""
        return self.updates[torch.from_numpy(np.flatnonzero(self.known)).to(self.updates.device)]


StepHook = Callable[[int], None]
"""Called after the s-th local SGD step of an attacker (s = 1, 2, ...), with s."""


@torch.no_grad()
def project_onto_ball(weights: torch.Tensor, center: torch.Tensor, radius: float) -> None:
    """PGD's projection, in place and without reading a value back to the host:

        w <- c + (w - c) min(1, r / ||w - c||)

    the norm taken in float64 (as ``Attack.send``); a ``w`` inside the ball is left bit for bit.
    The factor r / ||w - c|| is rounded to float32 before it scales w - c, as ``Attack.send``'s
    Python scalar is, so both give the same bits."""
    delta = weights - center
    norm = torch.linalg.vector_norm(delta.to(torch.float64))
    factor = (radius / norm).to(torch.float32)
    projected = delta.mul_(factor).add_(center)
    weights.copy_(torch.where(norm > radius, projected, weights))


class Attack:
    """Base class: a malicious client's hooks. ``config`` is the run's config."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    has_attackers: ClassVar[bool] = True  # False: the run has no malicious client (attack.kind: none)
    colludes: ClassVar[bool] = False  # True: ``collude`` crafts the attackers' updates on the server
    per_round_trigger: ClassVar[bool] = False  # True: ``round_trigger`` makes each round's trigger on the server
    Options: ClassVar[type[pydantic.BaseModel]] = NoOptions

    def __init__(self, config: BaseConfig) -> None:
        self.config = config
        section = getattr(config, self.name, None) if self.Options.model_fields else None
        self.options = section if isinstance(section, self.Options) else self.Options()

    def collude(self, round_: RoundUpdates) -> torch.Tensor:
        """The attackers' crafted updates, (a, P), one per attacker row in client order (``colludes``)."""
        raise NotImplementedError  # pragma: no cover - only attacks with colludes = True

    def poison(self, data: ClientData, spec: DatasetSpec, client: int, malicious: np.ndarray) -> ClientData:
        """The malicious ``client``'s training data, from its clean ``data``."""
        return data

    def test_trigger(self, spec: DatasetSpec) -> Trigger:
        """The trigger of the triggered test set (the ASR's): the whole ``trigger.pattern`` stamped
        with ``trigger.value`` (BadNets, DBA, and the attacks that stamp none)."""
        return Trigger(mask=trigger_mask(self.config.trigger.pattern)[: spec.channels], value=self.config.trigger.value)

    def round_trigger(self, model: FlatModel, weights: torch.Tensor, data: ClientData, spec: DatasetSpec,
                      round_: int) -> torch.Tensor:
        """(``per_round_trigger``) Round ``round_``'s trigger pattern, (C, 32, 32) float32 on the CPU, from
        w_t = ``weights`` and the clean ``data`` of the lowest-id attacker, computed on the server
        (``runtime.round``, ``attacks.round_trigger``) with ``model`` (a CPU model to compute with).
        Every rank then puts it in the attackers' ``test_trigger`` (``Trigger.with_pattern``)."""
        raise NotImplementedError  # pragma: no cover - only attacks with per_round_trigger = True

    def trigger_rows(self, rows: np.ndarray) -> np.ndarray:
        """(``per_round_trigger``) Which of the lowest-id attacker's training ``rows`` the server holds: all."""
        return rows

    @torch.no_grad()
    def update(self, weights: torch.Tensor, global_weights: torch.Tensor) -> None:
        """Model replacement (``attack.scale`` s): w_k <- w_t + s (w_k - w_t), in place."""
        scale = self.config.attack.scale
        if scale != 1.0:
            weights.sub_(global_weights).mul_(scale).add_(global_weights)

    @torch.no_grad()
    def send(self, weights: torch.Tensor, global_weights: torch.Tensor) -> None:
        """What an attacker sends, in place: its ``update`` hook, then, with ``attack.pgd_radius`` r,
        the projection of its update onto the L2 ball of radius r around w_t (PGD's projection, applied
        once to the sent update; with ``attack.pgd_every`` also during training, ``train``):
        w_k <- w_t + (w_k - w_t) min(1, r / ||w_k - w_t||)."""
        self.update(weights, global_weights)
        radius = self.config.attack.pgd_radius
        if radius is not None:
            norm = float(torch.linalg.vector_norm((weights - global_weights).to(torch.float64)))
            if norm > radius:
                weights.sub_(global_weights).mul_(radius / norm).add_(global_weights)

    @property
    def trains_differently(self) -> bool:
        """Whether an attacker's local training is this attack's ``train`` rather than
        ``client.train_client`` (then it is trained alone, outside a batched group): with
        ``attack.pgd_every`` set, or for an attack with a training of its own (``chameleon``)."""
        return self.config.attack.pgd_every is not None

    def step_hook(self, model: FlatModel, global_weights: torch.Tensor) -> StepHook | None:
        """PGD during training (``attack.pgd_every`` n, radius r = ``attack.pgd_radius``): after every
        n-th local SGD step, w <- w_t + (w - w_t) min(1, r / ||w - w_t||) (``project_onto_ball``) on
        ``model.flat``, as the projected gradient descent of Sun et al. 2019 ("Can You Really Backdoor
        Federated Learning?") and Wang et al. 2020 ("Attack of the Tails", PGD every few steps).
        None without ``attack.pgd_every``."""
        every, radius = self.config.attack.pgd_every, self.config.attack.pgd_radius
        if every is None:
            return None

        def project(step: int) -> None:
            if step % every == 0:
                project_onto_ball(model.flat, global_weights, radius)

        return project

    def finish_training(self, model: FlatModel, global_weights: torch.Tensor) -> None:
        """The end of an attacker's training with ``attack.pgd_every``: one last projection (the steps
        after the last n-th are projected too). ``send`` projects again after the ``update`` hook."""
        if self.config.attack.pgd_every is not None:
            project_onto_ball(model.flat, global_weights, self.config.attack.pgd_radius)

    def train(self, model: FlatModel, data: ClientData, spec: DatasetSpec | None, settings: TrainSettings,
              generator: torch.Generator, global_weights: torch.Tensor) -> torch.Tensor:
        """An attacker's local training, in place on ``model`` (loaded with w_t = ``global_weights``),
        when ``trains_differently``: ``train_client`` with PGD's projection every ``attack.pgd_every``
        steps and once at the end. Returns the mean training loss (a float64 device scalar, as
        ``train_client``). Every draw comes from ``generator``, the client's."""
        loss = train_client(model, data, spec, settings, generator, after_step=self.step_hook(model, global_weights))
        self.finish_training(model, global_weights)
        return loss

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
