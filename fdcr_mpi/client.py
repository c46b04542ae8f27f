"""One client's round: local SGD training and the Fisher diagonal (ALGORITHM.md section 1).

Data lives in memory as preprocessed tensors; a batch is augmented on tensors, then the
client's trigger is stamped on its fixed poisoned rows. Every draw comes from the client's
generator for this round, so the result does not depend on the rank hosting the client.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from fdcr_mpi import fisher_layers
from fdcr_mpi.data.datasets import DatasetSpec, augment, model_input
from fdcr_mpi.data.poison import apply_trigger
from fdcr_mpi.models import FlatModel, FlatSGD

LAYER_CHUNK = 128  # samples per backward of the "layers" Fisher: its activations stay in cache


@dataclass
class ClientData:
    """A client's local data as trained on.

    x: (n, C, 32, 32) preprocessed images (C as stored: 1 for grayscale datasets).
    y: (n,) labels, with the poisoned rows already relabelled to the target.
    poisoned: (n,) bool, the fixed rows that carry the trigger.
    trigger: (3, 32, 32) bool mask of this client's trigger, or None for a benign client.
    augment: False when ``x`` holds images augmented once for good (attack.augmentation: frozen).
    """

    x: torch.Tensor
    y: torch.Tensor
    poisoned: torch.Tensor
    trigger: torch.Tensor | None = None
    trigger_value: float = 1.0
    true_y: torch.Tensor | None = None  # labels before poisoning (an attacker knows its clean data)
    augment: bool = True

    def __len__(self) -> int:
        return int(self.y.numel())

    def clean_part(self) -> ClientData:
        """The samples that carry no trigger, with their true labels (what a benign client holds)."""
        keep = ~self.poisoned
        labels = self.true_y if self.true_y is not None else self.y
        return ClientData(x=self.x[keep], y=labels[keep], poisoned=torch.zeros(int(keep.sum()), dtype=torch.bool))

    def inputs(self, idx: torch.Tensor, spec: DatasetSpec, generator: torch.Generator | None) -> torch.Tensor:
        """Model-ready batch of rows ``idx``: augmented when a generator is given, then triggered."""
        x = self.x[idx]  # advanced indexing copies: safe to stamp in place
        if generator is not None and self.augment:
            x = augment(x, spec, generator)
        if self.trigger is not None:
            rows = self.poisoned[idx]
            if bool(rows.any()):
                x[rows] = apply_trigger(x[rows], self.trigger[: x.shape[1]], self.trigger_value)
        return model_input(x)


@dataclass(frozen=True)
class TrainSettings:
    """Local training (ALGORITHM.md 1.1): E epochs of SGD, fresh optimizer every round."""

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


def local_train(model: FlatModel, data: ClientData, spec: DatasetSpec, settings: TrainSettings,
                generator: torch.Generator) -> float:
    """Train ``model`` in place on the client's data; returns the mean training loss (nan if no step)."""
    module = model.module
    module.train()
    optimizer = FlatSGD(model, settings.lr, settings.momentum, settings.weight_decay)
    total, steps = torch.zeros((), dtype=torch.float64), 0
    for _ in range(settings.local_epochs):
        order = torch.randperm(len(data), generator=generator)
        for idx in batches(len(data), settings.batch_size, settings.drop_last, order):
            x = data.inputs(idx, spec, generator)
            model.zero_grad()
            loss = F.cross_entropy(module(x), data.y[idx])
            loss.backward()
            optimizer.step()
            total += loss.detach()
            steps += 1
    return float(total / steps) if steps else float("nan")


def fisher_samples(data: ClientData, max_samples: int | None, generator: torch.Generator) -> torch.Tensor:
    """Indices of the samples the Fisher is computed on: all, or a seeded subset of ``max_samples``."""
    n = len(data)
    if max_samples is None or max_samples >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=generator)[:max_samples].sort().values


def default_chunk(num_params: int, budget_bytes: int = 1 << 28) -> int:
    """Per-sample gradient chunk that keeps the (chunk, P) float32 block under ``budget_bytes``."""
    return max(1, min(256, budget_bytes // (4 * max(num_params, 1))))


def empirical_fisher(model: FlatModel, data: ClientData, spec: DatasetSpec, idx: torch.Tensor,
                     chunk_size: int | None = None, backend: str = "layers") -> torch.Tensor:
    """Eq. 5: F = (1/n) sum_i (d log p(y_i | x_i, w) / d w)^2, over chunks of samples.

    ``backend="layers"`` sums the squared per-sample gradients in closed form per layer
    (``fdcr_mpi.fisher_layers``, one backward per chunk); ``"vmap"`` materialises them with
    ``torch.func.vmap(grad(...))``. Both give the same F; "layers" falls back to "vmap" for
    models with other parametrised layers. Returns a (D,) vector: the trainable entries hold F,
    buffer entries are 0.
    """
    module = model.module
    module.eval()
    if backend == "layers" and fisher_layers.supports(module):
        return _layer_fisher(model, data, spec, idx, chunk_size or LAYER_CHUNK)
    params = {k: v.detach() for k, v in module.named_parameters()}
    buffers = {k: v.detach() for k, v in module.named_buffers()}

    def nll(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(module, (p, buffers), (x.unsqueeze(0),))
        return F.cross_entropy(logits, y.unsqueeze(0))

    per_sample_grad = vmap(grad(nll), in_dims=(None, 0, 0))
    chunk = chunk_size or default_chunk(model.num_params)
    fisher = torch.zeros(model.size, dtype=torch.float32)
    acc = fisher[: model.num_params]
    for start in range(0, idx.numel(), chunk):
        rows = idx[start:start + chunk]
        grads = per_sample_grad(params, data.inputs(rows, spec, None), data.y[rows])
        offset = 0
        for name in params:
            g = grads[name].reshape(rows.numel(), -1)
            acc[offset:offset + g.shape[1]] += g.square().sum(dim=0)
            offset += g.shape[1]
    return fisher.div_(max(idx.numel(), 1))


def _layer_fisher(model: FlatModel, data: ClientData, spec: DatasetSpec, idx: torch.Tensor,
                  chunk: int) -> torch.Tensor:
    fisher = torch.zeros(model.size, dtype=torch.float32, device=model.flat.device)
    names = [name for name, _ in model.module.named_parameters()]
    for start in range(0, idx.numel(), chunk):
        rows = idx[start:start + chunk]
        squares = fisher_layers.sum_squared_grads(model.module, data.inputs(rows, spec, None), data.y[rows])
        offset = 0
        for name in names:
            sq = squares[name].reshape(-1)
            fisher[offset:offset + sq.numel()] += sq
            offset += sq.numel()
    return fisher.div_(max(idx.numel(), 1))


def batch_mean_sq_fisher(model: FlatModel, data: ClientData, spec: DatasetSpec, idx: torch.Tensor,
                         batch_size: int = 64) -> torch.Tensor:
    """The released code's estimator: F = (mean over batches of the batch-mean gradient)^2."""
    module = model.module
    module.eval()
    total = torch.zeros(model.num_params, dtype=torch.float32)
    parts = batches(idx.numel(), batch_size, False, idx)
    for rows in parts:
        model.zero_grad()
        F.cross_entropy(module(data.inputs(rows, spec, None)), data.y[rows]).backward()
        total += model.grad
    model.zero_grad()
    fisher = torch.zeros(model.size, dtype=torch.float32)
    fisher[: model.num_params] = (total / max(len(parts), 1)).square()
    return fisher
