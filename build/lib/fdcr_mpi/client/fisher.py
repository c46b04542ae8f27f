"""The Fisher diagonal a client reports (docs/SPEC.md section 1.2): the empirical Fisher of Eq. 5
(``layers`` and ``vmap`` backends) and the (mean batch gradient)^2 estimator; the released code's
estimator is in ``fisher_released``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from fdcr_mpi.client import fisher_layers
from fdcr_mpi.client.train import ClientData, batches
from fdcr_mpi.data.datasets import DatasetSpec
from fdcr_mpi.models import FlatModel

LAYER_CHUNK = 128  # samples per backward of the "layers" Fisher: its activations stay in cache


def fisher_samples(data: ClientData, max_samples: int | None, generator: torch.Generator) -> torch.Tensor:
    """Indices of the samples the Fisher is computed on: all, or a seeded subset of ``max_samples``."""
    n = len(data)
    if max_samples is None or max_samples >= n:
        return torch.arange(n, device=data.device)
    return torch.randperm(n, generator=generator)[:max_samples].sort().values.to(data.device)


def default_chunk(num_params: int, budget_bytes: int = 1 << 28) -> int:
    """Per-sample gradient chunk that keeps the (chunk, P) float32 block under ``budget_bytes``."""
    return max(1, min(256, budget_bytes // (4 * max(num_params, 1))))


def empirical_fisher(model: FlatModel, data: ClientData, spec: DatasetSpec, idx: torch.Tensor,
                     chunk_size: int | None = None, backend: str = "layers") -> torch.Tensor:
    """Eq. 5: F = (1/n) sum_i (d log p(y_i | x_i, w) / d w)^2, over chunks of samples.

    ``backend="layers"`` sums the squared per-sample gradients in closed form per layer
    (``fdcr_mpi.client.fisher_layers``, one backward per chunk); ``"vmap"`` materialises them with
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
    fisher = torch.zeros(model.size, dtype=torch.float32, device=model.flat.device)
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
    total = torch.zeros(model.num_params, dtype=torch.float32, device=model.flat.device)
    parts = batches(idx.numel(), batch_size, False, idx)
    for rows in parts:
        model.zero_grad()
        F.cross_entropy(module(data.inputs(rows, spec, None)), data.y[rows]).backward()
        total += model.grad
    model.zero_grad()
    fisher = torch.zeros(model.size, dtype=torch.float32, device=model.flat.device)
    fisher[: model.num_params] = (total / max(len(parts), 1)).square()
    return fisher
