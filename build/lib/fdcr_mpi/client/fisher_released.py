"""The released FDCR code's Fisher estimator (``fisher.estimator: released``).

The released code does not compute Eq. 5. Its Fisher step (the ``FedFish`` optimiser, as the
project's audit of the FDCR repository found it; the same step is ``fish_calculate`` in
``Optims/PrevAbsFedFish.py`` of the authors' SDFC repository, zekunshi/SDFC, which we could
read) runs over the batches of the client's training loader (shuffled, augmented, batches of
``train.batch_size``, the last partial batch dropped) and takes the gradient of

    log_softmax(logits)[:, labels].mean()

Indexing a (B, 10) matrix with the B labels gives the (B, B) matrix of log p(y_j | x_i) for
every pair (i, j), not the B diagonal entries, so the batch's objective is

    (1/B^2) sum_i sum_j log p(y_j | x_i) = (1/B) sum_i sum_c q_c log p(c | x_i),

q the batch's label histogram divided by B: every image is scored against the batch's label
mix, not its own label. The gradients are averaged over the batches and the average is
squared: F = ((1/nb) sum_b grad_b)^2, the (mean batch gradient)^2, not a mean of squares.
An attacker's batches are its poisoned data. Departure kept on purpose: the model is in eval
mode (the released code leaves it in training mode, which only matters with BatchNorm, whose
statistics the Fisher pass must not change; SimpleCNN has none). A client with fewer samples
than one batch has no batch: its F is 0 (the released code divides by zero).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fdcr_mpi.client.train import ClientData, batches
from fdcr_mpi.data.datasets import DatasetSpec, Shifts
from fdcr_mpi.models import FlatModel


def batch_label_mix_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(1/B^2) sum_i sum_j log p(labels_j | x_i), what ``log_softmax(logits)[:, labels].mean()``
    computes, as the mean over i of log p(. | x_i) weighted by the batch's label histogram."""
    classes = torch.arange(logits.shape[1], device=labels.device)
    mix = (labels[:, None] == classes).to(logits.dtype).mean(dim=0)  # the batch's label histogram / B
    return (F.log_softmax(logits, dim=1) @ mix).mean()


def released_fisher(model: FlatModel, data: ClientData, spec: DatasetSpec, idx: torch.Tensor, batch_size: int,
                    generator: torch.Generator) -> torch.Tensor:
    """F = ((1/nb) sum_b grad batch_label_mix_log_likelihood_b)^2 over shuffled, augmented full
    batches of the samples ``idx`` (draws from ``generator``). Returns a (D,) float32 vector on
    the model's device: the trainable entries hold F, buffer entries are 0."""
    module = model.module
    module.eval()
    device = model.flat.device
    order = idx[torch.randperm(idx.numel(), generator=generator).to(idx.device)]
    parts = batches(order.numel(), batch_size, True, order)
    total = torch.zeros(model.num_params, dtype=torch.float32, device=device)
    for rows in parts:
        shifts = Shifts.draw(rows.numel(), spec, generator).to(device) if data.augment else None
        model.zero_grad()
        batch_label_mix_log_likelihood(module(data.inputs(rows, spec, shifts)), data.y[rows]).backward()
        total += model.grad
    model.zero_grad()
    fisher = torch.zeros(model.size, dtype=torch.float32, device=device)
    fisher[: model.num_params] = (total / max(len(parts), 1)).square()
    return fisher
