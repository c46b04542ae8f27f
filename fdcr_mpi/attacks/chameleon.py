"""Chameleon (Dai and Li, "Chameleon: Adapting to Peer Images for Planting Durable Backdoors in
Federated Learning", ICML 2023): a BadNets attacker (``attacks.badnets``: the same poisoned rows, the
same trigger) whose local training makes the poisoned images' features adapt to their peer images,
so that the benign clients' later updates erase the backdoor more slowly.

Its local training has two stages (the authors' code, github.com/ybdai7/Chameleon-durable-backdoor,
``training.py``: the contrastive stage, then the classification stage with ``is_frozen_params``):

1. The feature extractor (the model without its head, ``models.nets``: ``features``) is trained
   with the supervised contrastive loss of the authors' ``utils/losses.py`` (SupConLoss, Khosla et
   al. 2020, with Chameleon's weights). With z_i = f(x_i) / ||f(x_i)|| the normalised features of a
   batch of B images and y_i their labels (the poisoned images relabelled to the target t):

       s_ij = c_ij z_i . z_j / tau
       log p_ij = s_ij - log sum_{a != i} exp(s_ia)
       L = -(tau / tau_base) (1/B) sum_i w_i (1/|P(i)|) sum_{p in P(i)} log p_ip

   P(i) = {p != i : y_p = y_i} (empty: the anchor adds 0). So a poisoned image is pulled toward the
   images of the target class (the "facilitators") and toward the other poisoned images, and pushed
   from every other image, its original class's images (the "interferers") included. Anchors of the
   target class weigh w_i = ``facilitator_weight`` (the code's ``contrastive_loss_scale_weight``),
   the others 1. c_ij = ``interferer_weight`` (``contrastive_loss_down_scale_weight``) when one of
   i, j is a poisoned image and the other a clean image of its original class (not the target),
   else 1. The head is not trained (its weights stay w_t's); no projection head: the authors'
   ``SupConResNet`` backbone returns the normalised pooled features (its MLP head is commented out).
2. The head (the model's last ``nn.Linear``) is trained with cross-entropy on the same poisoned
   data, the extractor frozen (its parameters keep their stage-1 bits, unless ``attack.pgd_every``
   projects the whole model).

The paper's own text was not at hand: the loss, its weights and the defaults below are read from
the authors' code, not checked against the paper's equations.

Each stage is SGD with momentum and weight decay from a fresh optimizer, its learning rate
multiplied by ``gamma`` at each milestone epoch (``MultiStepLR`` stepped at the start of each epoch,
as the code does: epoch e = 1..E trains with lr gamma^{#(milestones <= e)}). Batches are the client's
(``train.batch_size``, ``train.drop_last``, its augmentation), every draw from the client's generator,
an epoch at a time (``client.draw_epoch``). With ``attack.pgd_every`` the weights are projected
after every n-th step of either stage (the authors' code projects after every step of both stages,
``s_norm`` 5: ``attack.pgd_radius=5 attack.pgd_every=1``), and ``attack.pgd_radius`` /
``attack.scale`` act on the sent update as for any attack.

Defaults: the authors' pixel-pattern CIFAR-10 setting (``utils/params_pixel_trigger_cifar10.yaml``
with ``--contrastive_loss_scale_weight 6.0`` in ``commands.sh``): stage 1 10 epochs, lr 0.005,
momentum 0.9, weight decay 5e-4, milestones 3, 5, 7, 9, gamma 0.1; tau = tau_base = 0.07
(``SupConLoss()``); stage 2 3 epochs (``retrain_poison``), lr 0.001 (``poison_lr``), momentum 0.9
and weight decay 5e-4 (the optimizer's ``momentum`` / ``decay``), milestones 3, 5, gamma 0.005.

The authors tuned these per data set: their pixel-pattern EMNIST setting
(``utils/params_pixel_trigger_emnist.yaml``, ``--contrastive_loss_scale_weight 3.0``) trains stage 1
at lr 0.05 with gamma 0.005 and stage 2 at lr 0.01, facilitator weight 3. Observed here (digits and
synthetic, simple_cnn from a model pretrained on clean data, one local training, not tuned further):
stage 1 at these lrs grows the extractor's features without bound (the loss sees them normalised)
and the head, trained at lr 0.001, does not follow them; bounding the update as the authors do
(``attack.pgd_radius`` with ``attack.pgd_every=1``) keeps the model usable, but in such short
trainings the corner trigger was not learned (by BadNets at the same budget either). On a model
whose extractor sees the trigger's pixels directly, the defaults plant a trigger-specific backdoor
(tests/test_attack_chameleon.py).

Deviations, stated plainly: the poisoned images are BadNets's fixed rows (``attack.poison_rate`` of
the attacker's data), not 7 triggered images per batch of 64; no N(0, 0.01) noise is added to them;
the interferers are the clean images of each poisoned image's own original class (the code fixes
class 1, the original class of its semantic backdoors, and its default weight 1 turns it off). The
loss reported in the run file is the mean cross-entropy of stage 2 (of stage 1 when stage 2 takes no
step). With BatchNorm (resnet18) the running statistics keep updating in stage 2 (train mode, as
the authors' code).
"""

from __future__ import annotations

from collections.abc import Callable

import pydantic
import torch
import torch.nn.functional as F

from fdcr_mpi.attacks.badnets import BadNets
from fdcr_mpi.attacks.base import register
from fdcr_mpi.client.train import ClientData, TrainSettings, draw_epoch
from fdcr_mpi.data.datasets import DatasetSpec
from fdcr_mpi.errors import UserError
from fdcr_mpi.models import FlatModel, sgd_step
from fdcr_mpi.models.nets import head_of


def chameleon_loss(z: torch.Tensor, labels: torch.Tensor, poisoned: torch.Tensor, true_labels: torch.Tensor,
                   target: int, temperature: float = 0.07, base_temperature: float = 0.07,
                   facilitator_weight: float = 6.0, interferer_weight: float = 1.0) -> torch.Tensor:
    """Stage 1's loss L (module docstring) of a batch: ``z`` (B, d) L2-normalised features, ``labels``
    (B,) as trained on (poisoned rows relabelled to ``target``), ``poisoned`` (B,) bool, ``true_labels``
    (B,) the labels before poisoning. A scalar on ``z``'s device (no value read back)."""
    b = z.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=z.device)
    sim = z @ z.T / temperature
    if interferer_weight != 1.0:
        clean = ~poisoned
        same = true_labels[:, None] == true_labels[None, :]
        mine = poisoned[:, None] & clean[None, :] & same & (true_labels != target)[:, None]
        sim = sim * torch.where(mine | mine.T, interferer_weight, 1.0)
    logits = sim - sim.max(dim=1, keepdim=True).values.detach()  # stability only: log p is shift-free
    others = torch.exp(logits).masked_fill(eye, 0.0).sum(dim=1, keepdim=True)
    log_prob = logits - torch.log(others.clamp_min(torch.finfo(others.dtype).tiny))
    positive = (labels[:, None] == labels[None, :]) & ~eye
    count = positive.sum(dim=1).clamp_min(1)
    weight = torch.where(labels == target, facilitator_weight, 1.0)
    mean_positive = torch.where(positive, log_prob, 0.0).sum(dim=1) * weight / count
    return -(temperature / base_temperature) * mean_positive.mean()


def learning_rate(lr: float, milestones: tuple[int, ...], gamma: float, epoch: int) -> float:
    """The lr of epoch ``epoch`` (1-based) under MultiStepLR stepped at the start of each epoch."""
    return lr * gamma ** sum(1 for m in milestones if m <= epoch)


@register("chameleon")
class Chameleon(BadNets):
    """BadNets trained in two stages: a contrastive feature extractor, then the head alone."""

    summary = ("Chameleon: BadNets whose extractor is trained contrastively toward the target class's images, "
               "then its head alone (durable backdoor)")

    class Options(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
        temperature: float = pydantic.Field(default=0.07, gt=0, description="tau of the contrastive loss")
        base_temperature: float = pydantic.Field(default=0.07, gt=0, description="tau_base: the loss is scaled "
                                                 "by tau / tau_base")
        facilitator_weight: float = pydantic.Field(default=6.0, ge=0, description="w of the anchors of the "
                                                   "target class (contrastive_loss_scale_weight)")
        interferer_weight: float = pydantic.Field(default=1.0, ge=0, description="c of the similarities between "
                                                  "a poisoned image and its original class's clean images")
        contrastive_epochs: int = pydantic.Field(default=10, ge=0, description="epochs of stage 1 (extractor)")
        contrastive_lr: float = pydantic.Field(default=0.005, gt=0)
        contrastive_momentum: float = pydantic.Field(default=0.9, ge=0, lt=1)
        contrastive_weight_decay: float = pydantic.Field(default=5e-4, ge=0)
        contrastive_milestones: tuple[int, ...] = pydantic.Field(default=(3, 5, 7, 9), description="epochs "
                                                                 "(1-based) from which the lr is multiplied by gamma")
        contrastive_gamma: float = pydantic.Field(default=0.1, gt=0)
        head_epochs: int = pydantic.Field(default=3, ge=0, description="epochs of stage 2 (head, extractor frozen)")
        head_lr: float = pydantic.Field(default=0.001, gt=0)
        head_momentum: float = pydantic.Field(default=0.9, ge=0, lt=1)
        head_weight_decay: float = pydantic.Field(default=5e-4, ge=0)
        head_milestones: tuple[int, ...] = pydantic.Field(default=(3, 5))
        head_gamma: float = pydantic.Field(default=0.005, gt=0)

    @property
    def trains_differently(self) -> bool:
        return True

    def loss(self, z: torch.Tensor, data: ClientData, idx: torch.Tensor) -> torch.Tensor:
        """``chameleon_loss`` of the batch ``idx`` with this attack's options."""
        o = self.options
        true = data.true_y if data.true_y is not None else data.y
        return chameleon_loss(z, data.y[idx], data.poisoned[idx], true[idx], self.config.attack.target_label,
                              o.temperature, o.base_temperature, o.facilitator_weight, o.interferer_weight)

    def train(self, model: FlatModel, data: ClientData, spec: DatasetSpec | None, settings: TrainSettings,
              generator: torch.Generator, global_weights: torch.Tensor) -> torch.Tensor:
        o = self.options
        module = model.module
        try:
            head = head_of(module)
            start, stop = model.span(head)
        except ValueError as exc:
            raise UserError(f"attack chameleon needs a model split into features and a head: {exc}") from None
        if stop != model.num_params:
            raise UserError("attack chameleon needs the head's parameters last in the model")
        module.train()
        hook = self.step_hook(model, global_weights)
        steps = 0

        def run_stage(epochs: int, lr: float, momentum: float, decay: float, milestones: tuple[int, ...],
                      gamma: float, part: slice,
                      batch_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
            nonlocal steps
            weights, grads = model.params[part], model.grad[part]
            buf = torch.empty_like(weights) if momentum else None
            total = torch.zeros((), dtype=torch.float64, device=model.flat.device)
            taken = 0
            for epoch in range(1, epochs + 1):
                rate = learning_rate(lr, milestones, gamma, epoch)
                for idx, shifts in draw_epoch(len(data), settings, spec, generator, model.flat.device, data.augment):
                    x = data.inputs(idx, spec, shifts)
                    model.zero_grad()
                    loss = batch_loss(x, idx)
                    loss.backward()
                    sgd_step(weights, grads, buf, rate, momentum, decay, taken == 0)
                    total += loss.detach()
                    taken += 1
                    steps += 1
                    if hook is not None:
                        hook(steps)
            return total / taken if taken else None

        def contrastive(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return self.loss(F.normalize(module.features(x), dim=1), data, idx)

        def classification(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                features = module.features(x)
            return F.cross_entropy(head(features), data.y[idx])

        first = run_stage(o.contrastive_epochs, o.contrastive_lr, o.contrastive_momentum, o.contrastive_weight_decay,
                          o.contrastive_milestones, o.contrastive_gamma, slice(0, start), contrastive)
        second = run_stage(o.head_epochs, o.head_lr, o.head_momentum, o.head_weight_decay, o.head_milestones,
                           o.head_gamma, slice(start, stop), classification)
        self.finish_training(model, global_weights)
        loss = second if second is not None else first
        return loss if loss is not None else torch.full((), float("nan"), dtype=torch.float64,
                                                        device=model.flat.device)

