"""A3FL (Zhang, Jia, Chen, Lin and Wu, "A3FL: Adversarially Adaptive Backdoor Attacks to Federated
Learning", NeurIPS 2023): a BadNets attacker (``attacks.badnets``: the same poisoned rows, relabelled
to the target) whose trigger is a patch optimised every round against the current global model
w_t and against an adversarially adapted copy of it, so that it survives the global model's
later updates.

The trigger is a pattern delta pasted in a square region R (the authors' ``trigger * mask +
(1 - mask) * x``; ``data.poison.Trigger``): x (+) delta = delta inside R, x elsewhere, on the model
input (after normalisation and augmentation, as every trigger here). Round t's trigger, from the
clean data D of an attacker (the authors' ``Attacker.search_trigger``):

    delta <- delta_0 (``INIT`` inside R)
    for e = 0 .. E-1                                                   (E: a3fl.trigger_epochs)
      (a) if e > 0 and e % K == 0 (K: a3fl.adv_every): theta' <- w_t, then a3fl.adv_epochs epochs of
          SGD (lr 0.01, momentum 0.9, weight decay 5e-4) on (x (+) delta, y) with the TRUE labels y:
          a model that unlearns the current trigger; lambda <- lambda_0 cos(theta', w_t)
      (b) for each batch B of D (shuffled, augmented):
          L = CE(f_{w_t}(x (+) delta), target) + lambda CE(f_{theta'}(x (+) delta), target)   (once theta' exists)
          delta <- clip(delta - eta sign(dL/d delta), valid input range)        (eta: a3fl.trigger_lr)

Defaults are the authors' (hfzhang31/A3FL, main/configs/config.yaml and fl_utils/attacker.py):
trigger_size 5 at rows and columns 2..6 (``size``, ``offset``), trigger_lr 0.01,
trigger_outter_epochs 200, dm_adv_epochs 5, dm_adv_K 1, dm_adv_model_count 1, noise_loss_lambda
0.01, the adversarial model's SGD (lr 0.01, momentum 0.9, weight decay 5e-4) and the initial
trigger 0.5. Their ``bkd_ratio`` (0.25 of each batch) is here ``attack.poison_rate`` (BadNets'
fixed rows; set it to 0.25 to match).

Where it runs (docs/ARCHITECTURE.md): the attackers' trigger search is simulated on the server,
as the colluding attackers' coordination is (``attacks.collusion``); the authors too search once
per round, on the data of the first sampled attacker, for every attacker. Rank 0 holds the clean
data of the lowest-id attacker (``a3fl.samples``: a seeded subset of it), computes round t's
trigger from w_t on its CPU and broadcasts it with w_t (``attacks.round_trigger``); every rank
stamps it: the attackers on their poisoned rows, the evaluating ranks on their triggered test rows
(the ASR of round t is measured with round t's trigger). Draws come from (seed, TRIGGER, stream,
round): the trigger is a function of the config and w_t, whatever the launch, and a resumed run
recomputes it.

Cost: at the defaults a search is 200 trigger epochs and 199 x 5 unlearning epochs over the
attacker's data, every round, on the server's CPU (about 3 minutes for 600 MNIST-sized samples on
one core of a loaded two-core box); ``a3fl.samples``, ``a3fl.trigger_epochs`` and ``a3fl.adv_every``
shorten it. Its time counts in the round's ``broadcast`` phase.

Deviations from the authors' code, stated plainly:
- their trigger carries over from one attacking round to the next; here every round's search
  starts from the same initial trigger (clients keep no state across rounds, and the trigger must
  be a function of the config and w_t for resume and launch invariance);
- lambda = lambda_0 cos(theta', w_t), the cosine similarity of the two models' trainable
  parameters, as the paper weighs the adversarial term by the similarity of the adversarial and
  global models; the authors' code takes the cosine similarity of the two models' convolution
  gradients, where the global model's is the trigger loss' gradient accumulated since the search
  began;
- the trigger is clipped to the valid input range (the normalised values of pixels 0 and 1, per
  channel), not to the authors' [-2, 2];
- the models are in eval mode in (b) (the authors keep the adversarial model in train mode: only
  BatchNorm models differ);
- the search runs every round, whether or not the lowest-id attacker takes part.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pydantic
import torch
import torch.nn.functional as F

from fdcr_mpi import seeding
from fdcr_mpi.attacks.badnets import BadNets
from fdcr_mpi.attacks.base import register
from fdcr_mpi.client.train import ClientData, TrainSettings, draw_epoch
from fdcr_mpi.data.datasets import SIZE, DatasetSpec, model_input, shift
from fdcr_mpi.data.poison import Trigger, input_range
from fdcr_mpi.models import FlatModel, FlatSGD, build_model

INIT = 0.5  # the authors' initial trigger value (in the model's input space)
ADV_LR, ADV_MOMENTUM, ADV_WEIGHT_DECAY = 0.01, 0.9, 5e-4  # the authors' get_adv_model optimiser
SEARCH_STREAM, SUBSET_STREAM = 1, 2  # seeding.TRIGGER's streams (0 is attacks.blended's key)


def region_mask(channels: int, size: int, offset: int) -> torch.Tensor:
    """R: the (channels, 32, 32) bool square of rows and columns offset .. offset + size - 1."""
    mask = torch.zeros((channels, SIZE, SIZE), dtype=torch.bool)
    mask[:, offset:offset + size, offset:offset + size] = True
    return mask


def initial_pattern(spec: DatasetSpec, mask: torch.Tensor) -> torch.Tensor:
    """delta_0: ``INIT`` inside R (within the valid input range), 0 outside, (C, 32, 32) float32."""
    lo, hi = input_range(spec)
    start = torch.full((spec.channels, SIZE, SIZE), INIT).clamp(lo, hi)
    return torch.where(mask, start, torch.zeros(()))


def _batch(data: ClientData, idx: torch.Tensor, spec: DatasetSpec, shifts) -> torch.Tensor:
    x = data.x[idx]
    return x if shifts is None else shift(x, spec, shifts)


def adversarial_model(adversary: FlatModel, weights: torch.Tensor, data: ClientData, spec: DatasetSpec,
                      trigger: Trigger, epochs: int, settings: TrainSettings, generator: torch.Generator) -> float:
    """Step (a): ``adversary`` <- w_t trained ``epochs`` epochs to unlearn ``trigger`` (every sample
    triggered, TRUE labels); returns cos(theta', w_t) over the trainable entries."""
    adversary.load(weights)
    adversary.module.train()
    optimizer = FlatSGD(adversary, ADV_LR, ADV_MOMENTUM, ADV_WEIGHT_DECAY)
    for _ in range(epochs):
        for idx, shifts in draw_epoch(len(data), settings, spec, generator, torch.device("cpu"), data.augment):
            adversary.zero_grad()
            x = trigger.apply(_batch(data, idx, spec, shifts))
            F.cross_entropy(adversary.module(model_input(x)), data.y[idx]).backward()
            optimizer.step()
    adversary.module.eval()
    a = adversary.params.to(torch.float64)
    b = weights[: adversary.num_params].to(torch.float64)
    return float(torch.dot(a, b) / (torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b)).clamp_min(1e-12))


def search_trigger(model: FlatModel, adversary: FlatModel, weights: torch.Tensor, data: ClientData,
                   spec: DatasetSpec, mask: torch.Tensor, options: A3fl.Options, target: int, batch_size: int,
                   generator: torch.Generator) -> torch.Tensor:
    """Round t's trigger pattern delta (C, 32, 32) float32 against w_t = ``weights`` (the module
    docstring's algorithm), on ``data``'s clean samples; every draw from ``generator``."""
    model.load(weights)
    model.module.eval()
    lo, hi = input_range(spec)
    delta = initial_pattern(spec, mask)
    settings = TrainSettings(local_epochs=1, batch_size=batch_size, drop_last=False)
    lam = None
    for epoch in range(options.trigger_epochs):
        if epoch > 0 and epoch % options.adv_every == 0 and options.adv_lambda > 0:
            trigger = Trigger(mask=mask, pattern=delta)
            lam = options.adv_lambda * adversarial_model(adversary, weights, data, spec, trigger, options.adv_epochs,
                                                         settings, generator)
        for idx, shifts in draw_epoch(len(data), settings, spec, generator, torch.device("cpu"), data.augment):
            x = _batch(data, idx, spec, shifts)
            d = delta.clone().requires_grad_(True)
            triggered = model_input(torch.where(mask, d, x))
            labels = torch.full((len(idx),), target, dtype=torch.int64)
            loss = F.cross_entropy(model.module(triggered), labels)
            if lam is not None:
                loss = loss + lam * F.cross_entropy(adversary.module(triggered), labels)
            (grad,) = torch.autograd.grad(loss, d)
            delta = torch.minimum(torch.maximum(delta - options.trigger_lr * grad.sign(), lo), hi)
    return torch.where(mask, delta, torch.zeros(())).contiguous()


@register("a3fl")
class A3fl(BadNets):
    """BadNets with a patch trigger optimised every round against w_t and an adversarially adapted copy."""

    summary = "A3FL: BadNets with a patch trigger optimised each round against w_t and a model unlearning it"
    per_round_trigger = True

    class Options(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
        size: int = pydantic.Field(default=5, ge=1, le=SIZE, description="the side of the square trigger region")
        offset: int = pydantic.Field(default=2, ge=0, lt=SIZE, description="the region's first row and column")
        trigger_lr: float = pydantic.Field(default=0.01, gt=0, description="eta, the signed-gradient step")
        trigger_epochs: int = pydantic.Field(default=200, ge=0, description="E, epochs of the trigger search")
        adv_epochs: int = pydantic.Field(default=5, ge=0, description="epochs of the adversarial model's unlearning")
        adv_every: int = pydantic.Field(default=1, ge=1, description="K: the adversarial model is made anew "
                                        "every K search epochs")
        adv_lambda: float = pydantic.Field(default=0.01, ge=0, description="lambda_0, the adversarial term's weight")
        samples: int | None = pydantic.Field(default=None, ge=1, description="the server searches on a seeded "
                                             "subset of this many of the attacker's samples (null: all)")

        @pydantic.model_validator(mode="after")
        def _inside(self) -> A3fl.Options:
            if self.offset + self.size > SIZE:
                raise ValueError(f"a3fl.offset + a3fl.size must be at most {SIZE} (the region must fit the image), "
                                 f"got {self.offset} + {self.size}")
            return self

    def region(self, spec: DatasetSpec) -> torch.Tensor:
        return region_mask(spec.channels, self.options.size, self.options.offset)

    def test_trigger(self, spec: DatasetSpec) -> Trigger:
        """The patch with the initial trigger; each round puts its own pattern in (``Trigger.with_pattern``)."""
        mask = self.region(spec)
        return Trigger(mask=mask, pattern=initial_pattern(spec, mask))

    def poison(self, data: ClientData, spec: DatasetSpec, client: int, malicious: np.ndarray) -> ClientData:
        return dataclasses.replace(super().poison(data, spec, client, malicious), trigger=self.test_trigger(spec))

    def trigger_rows(self, rows: np.ndarray) -> np.ndarray:
        """The attacker's rows the server searches on: all, or a seeded subset of ``a3fl.samples``."""
        cap = self.options.samples
        if cap is None or cap >= len(rows):
            return rows
        pick = seeding.numpy_rng(self.config.seed, seeding.TRIGGER, SUBSET_STREAM).choice(len(rows), cap, replace=False)
        return rows[np.sort(pick)]

    def round_trigger(self, model: FlatModel, weights: torch.Tensor, data: ClientData, spec: DatasetSpec,
                      round_: int) -> torch.Tensor:
        cfg = self.config
        adversary = build_model(cfg.model.name, 0)
        generator = seeding.torch_generator(cfg.seed, seeding.TRIGGER, SEARCH_STREAM, round_)
        return search_trigger(model, adversary, weights.detach().cpu().to(torch.float32), data, spec,
                              self.region(spec), self.options, cfg.attack.target_label, cfg.train.batch_size,
                              generator)
