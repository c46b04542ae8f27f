"""Blended injection (Chen, Liu, Li, Lu and Song, "Targeted Backdoor Attacks on Deep Learning Systems
Using Data Poisoning", arXiv:1712.05526, 2017): a BadNets attacker (``attacks.badnets``: the same
poisoned rows, relabelled to the target) whose trigger is a key pattern P blended into the whole
image instead of a stamped patch:

    x' = (1 - alpha) x + alpha P   on every pixel

(the paper's blended injection function Pi_alpha(k, x) = alpha k + (1 - alpha) x with key k = P),
both at training time and on the triggered test set (the ASR). P is the paper's random-pattern key
(its other key, the Hello Kitty image, cannot be downloaded here): drawn uniform in pixel space
[0, 1], one value per pixel and channel (grayscale data: one channel), from the run's generator of
``seeding.TRIGGER`` (stream 0), then normalised like an image of the data set. Normalisation is
affine per channel, so blending the normalised images equals normalising the blend of the pixels.

Default alpha = 0.2 (``blended.alpha``): BackdoorBench's blended default (SCLBD/BackdoorBench,
config/attack/blended/default.yaml: attack_train_blended_alpha and attack_test_blended_alpha 0.2),
which is also the paper's alpha_train for its Hello Kitty key (from memory of the paper, not checked).

Deviation, stated plainly: as every trigger here (docs/SPEC.md section 3), the blend acts on the
model input after augmentation (the crop's black border is blended too), not on the stored image.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pydantic
import torch

from fdcr_mpi import seeding
from fdcr_mpi.attacks.badnets import BadNets
from fdcr_mpi.attacks.base import register
from fdcr_mpi.client.train import ClientData
from fdcr_mpi.data.datasets import SIZE, DatasetSpec
from fdcr_mpi.data.poison import Trigger, normalise

KEY_STREAM = 0  # seeding.TRIGGER's stream of the blended key pattern


def key_pattern(seed: int, spec: DatasetSpec) -> torch.Tensor:
    """The random key P, (C, 32, 32) float32 normalised: U[0, 1) pixels from (seed, TRIGGER, 0)."""
    pixels = torch.rand((spec.channels, SIZE, SIZE), generator=seeding.torch_generator(seed, seeding.TRIGGER,
                                                                                         KEY_STREAM))
    return normalise(pixels, spec)


@register("blended")
class Blended(BadNets):
    """BadNets whose trigger is a random key pattern blended into the whole image."""

    summary = "Blended: BadNets with a random key pattern blended into every pixel, x' = (1-a) x + a P"

    class Options(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
        alpha: float = pydantic.Field(default=0.2, gt=0.0, le=1.0, description="the blend ratio a of x' = "
                                      "(1 - a) x + a P, in training and on the triggered test set")

    def blend(self, spec: DatasetSpec) -> Trigger:
        """x' = (1 - alpha) x + alpha P on every pixel."""
        return Trigger(pattern=key_pattern(self.config.seed, spec), alpha=self.options.alpha)

    def poison(self, data: ClientData, spec: DatasetSpec, client: int, malicious: np.ndarray) -> ClientData:
        return dataclasses.replace(super().poison(data, spec, client, malicious), trigger=self.blend(spec))

    def test_trigger(self, spec: DatasetSpec) -> Trigger:
        return self.blend(spec)
