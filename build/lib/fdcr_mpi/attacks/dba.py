"""DBA, the distributed backdoor attack (Xie et al., ICLR 2020): the trigger's pixels are split into
one part per attacker; each attacker stamps its own part, the test set the whole trigger."""

from __future__ import annotations

import numpy as np
import torch

from fdcr_mpi.attacks.badnets import BadNets
from fdcr_mpi.attacks.base import register
from fdcr_mpi.data.poison import dba_masks


@register("dba")
class Dba(BadNets):
    """BadNets where each attacker stamps its own part of the trigger."""

    summary = "DBA: the trigger split into one part per attacker (the whole trigger at test time)"

    def trigger(self, client: int, malicious: np.ndarray) -> torch.Tensor:
        attackers = np.flatnonzero(malicious)
        parts = dba_masks(self.config.trigger.pattern, len(attackers))
        return parts[int(np.searchsorted(attackers, client))]
