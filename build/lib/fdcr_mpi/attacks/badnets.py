"""BadNets (Gu et al., 2017), the paper's attack (docs/SPEC.md section 3): a fixed, seeded half of
each attacker's samples carry a trigger in the top-left corner and the target label.

``attack.poison_rate`` of the samples (exactly round(rate n), seeded by (seed, POISON, client));
``attack.poisoning: bernoulli`` poisons each sample independently instead, and
``attack.augmentation: frozen`` augments the attacker's images once for good (both as the
released FDCR code does, ``data.released``). The trigger is ``trigger.pattern``, stamped with
``trigger.value`` after normalisation and augmentation.
"""

from __future__ import annotations

import numpy as np
import torch

from fdcr_mpi import seeding
from fdcr_mpi.attacks.base import Attack, register
from fdcr_mpi.client.train import ClientData
from fdcr_mpi.data import released
from fdcr_mpi.data.datasets import DatasetSpec
from fdcr_mpi.data.poison import trigger_mask


@register("badnets")
class BadNets(Attack):
    """A trigger on a fixed share of the attacker's samples, relabelled to the target."""

    summary = "BadNets: a fixed seeded share of the attacker's samples carry the trigger and the target label"

    def trigger(self, client: int, malicious: np.ndarray) -> torch.Tensor:
        """The (3, 32, 32) bool mask the attacker ``client`` stamps."""
        return trigger_mask(self.config.trigger.pattern)

    def poison(self, data: ClientData, spec: DatasetSpec, client: int, malicious: np.ndarray) -> ClientData:
        attack, seed = self.config.attack, self.config.seed
        rng = seeding.numpy_rng(seed, seeding.POISON, client)
        poisoned = torch.as_tensor(released.poisoned_rows(attack.poisoning, len(data), attack.poison_rate, rng))
        y = data.y.clone()
        y[poisoned] = attack.target_label
        frozen = attack.augmentation == "frozen"
        x = released.augment_once(data.x, spec, seeding.torch_generator(seed, seeding.AUGMENT, client)) \
            if frozen else data.x
        return ClientData(x=x, y=y, poisoned=poisoned, trigger=self.trigger(client, malicious),
                          trigger_value=self.config.trigger.value, true_y=data.y, augment=not frozen)
