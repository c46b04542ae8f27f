"""A client's data and its local SGD training (docs/SPEC.md section 1.1).

Data lives on the rank's device as preprocessed tensors; a batch is augmented on tensors, then
the client's trigger is stamped on its fixed poisoned rows. Every draw comes from the client's
generator for this round (a CPU generator), so the result does not depend on the rank hosting
the client. An epoch's draws are made when it starts, in the order of the batches, and reach
the device in one copy: a training step never waits for the host (no per-step transfer, no
value read back), so a GPU runs ahead of Python.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fdcr_mpi.data.datasets import DatasetSpec, Shifts, model_input, shift
from fdcr_mpi.data.poison import Trigger
from fdcr_mpi.models import FlatModel, FlatSGD


@dataclass
class ClientData:
    """A client's local data as trained on.

    x: (n, C, 32, 32) preprocessed images (C as stored: 1 for grayscale datasets).
    y: (n,) labels, with the poisoned rows already relabelled to the target.
    poisoned: (n,) bool, the fixed rows that carry the trigger.
    trigger: (3, 32, 32) bool mask of this client's trigger (stamped with ``trigger_value``), or a
        ``data.poison.Trigger`` (a blend, a patch), or None for a benign client.
    augment: False when ``x`` holds images augmented once for good (attack.augmentation: frozen).
    """

    x: torch.Tensor
    y: torch.Tensor
    poisoned: torch.Tensor
    trigger: torch.Tensor | Trigger | None = None
    trigger_value: float = 1.0
    true_y: torch.Tensor | None = None  # labels before poisoning (an attacker knows its clean data)
    augment: bool = True

    def __len__(self) -> int:
        return int(self.y.numel())

    @property
    def device(self) -> torch.device:
        return self.x.device

    def to(self, device: torch.device | str) -> ClientData:
        """This client's tensors on ``device`` (the rank's device: they are used there every step)."""
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return ClientData(x=move(self.x), y=move(self.y), poisoned=move(self.poisoned), trigger=move(self.trigger),
                          trigger_value=self.trigger_value, true_y=move(self.true_y), augment=self.augment)

    def clean_part(self) -> ClientData:
        """The samples that carry no trigger, with their true labels (what a benign client holds)."""
        keep = ~self.poisoned
        labels = self.true_y if self.true_y is not None else self.y
        return ClientData(x=self.x[keep], y=labels[keep], poisoned=torch.zeros(int(keep.sum()), dtype=torch.bool,
                                                                                device=self.device))

    def inputs(self, idx: torch.Tensor, spec: DatasetSpec | None, shifts: Shifts | None) -> torch.Tensor:
        """Model-ready batch of rows ``idx`` (on the data's device): augmented by ``shifts`` when
        given, then triggered on its poisoned rows."""
        x = self.x[idx]
        if shifts is not None:
            x = shift(x, spec, shifts)
        if self.trigger is not None:
            x = Trigger.of(self.trigger, self.trigger_value).apply(x, self.poisoned[idx])
        return model_input(x)


@dataclass(frozen=True)
class TrainSettings:
    """Local training (docs/SPEC.md section 1.1): E epochs of SGD, fresh optimizer every round."""

    local_epochs: int = 10
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-5
    batch_size: int = 64
    drop_last: bool = True


def batches(n: int, batch_size: int, drop_last: bool, order: torch.Tensor) -> list[torch.Tensor]:
    """The index batches of one epoch over ``order``."""
    stop = (n // batch_size) * batch_size if drop_last else n
    return [order[i:i + batch_size] for i in range(0, stop, batch_size)]


@dataclass(frozen=True)
class Epoch:
    """One epoch of a client's draws, on the device: its index batches and each batch's shifts."""

    batches: list[torch.Tensor]
    shifts: list[Shifts | None]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Shifts | None]]:
        return iter(zip(self.batches, self.shifts))


def draw_epoch(n: int, settings: TrainSettings, spec: DatasetSpec | None, generator: torch.Generator,
               device: torch.device, augment: bool = True) -> Epoch:
    """An epoch's draws from ``generator``, in the order training consumes them: the permutation
    of the ``n`` samples, then each batch's crops (and flips) unless ``augment`` is off (data
    augmented once for good); moved to ``device`` in one copy."""
    order = torch.randperm(n, generator=generator)
    parts = batches(n, settings.batch_size, settings.drop_last, order)
    if not parts:
        return Epoch([], [])
    if not augment:
        return Epoch(list(torch.cat(parts).to(device).split([len(p) for p in parts])), [None] * len(parts))
    shifts = [Shifts.draw(len(p), spec, generator) for p in parts]
    columns = [torch.cat(parts), torch.cat([s.top for s in shifts]), torch.cat([s.left for s in shifts])]
    if spec.hflip:
        columns.append(torch.cat([s.flip for s in shifts]).long())
    rows = torch.stack(columns).to(device).split([len(p) for p in parts], dim=1)
    return Epoch([r[0] for r in rows], [Shifts(r[1], r[2], r[3].bool() if spec.hflip else None) for r in rows])


def train_client(model: FlatModel, data: ClientData, spec: DatasetSpec | None, settings: TrainSettings,
                 generator: torch.Generator, after_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """Train ``model`` in place on the client's data (docs/SPEC.md section 1.1); returns the mean training
    loss as a float64 scalar tensor on the model's device (nan if no step), without waiting for it.
    ``spec`` (how the data set augments) may be None for data that is not augmented.
    ``after_step(s)``, when given, runs after the s-th SGD step (s = 1, 2, ...): an attacker's hook
    (``Attack.train``, e.g. PGD's projection), which may change ``model.flat`` in place."""
    module = model.module
    module.train()
    device = model.flat.device
    optimizer = FlatSGD(model, settings.lr, settings.momentum, settings.weight_decay)
    total, steps = torch.zeros((), dtype=torch.float64, device=device), 0
    for _ in range(settings.local_epochs):
        for idx, shifts in draw_epoch(len(data), settings, spec, generator, device, data.augment):
            x = data.inputs(idx, spec, shifts)
            model.zero_grad()
            loss = F.cross_entropy(module(x), data.y[idx])
            loss.backward()
            optimizer.step()
            total += loss.detach()
            steps += 1
            if after_step is not None:
                after_step(steps)
    return total / steps if steps else torch.full((), float("nan"), dtype=torch.float64, device=device)


def local_train(model: FlatModel, data: ClientData, spec: DatasetSpec, settings: TrainSettings,
                generator: torch.Generator) -> float:
    """``train_client``, with the mean training loss read back as a float."""
    return float(train_client(model, data, spec, settings, generator))
