"""A per-round trigger (``Attack.per_round_trigger``, e.g. ``attacks.a3fl``) from the server to every rank.

Each round, before the clients train (``runtime.round.one_round``):

1. the server computes round t's pattern from w_t on its CPU (``Attack.round_trigger``, on its copy
   of the lowest-id attacker's clean data, ``Experiment.trigger_data``) into ``buffer``;
2. ``buffer`` (C * 32 * 32 float32) is broadcast with w_t, one small extra broadcast;
3. every rank installs it (``install``): the attackers it hosts stamp it on their poisoned rows, and
   its triggered test rows are made anew from their clean images (``EvalSets.retrigger``), so the
   ASR of round t is that of round t's trigger.

In one process the same code runs (the broadcast is a no-op). The pattern depends on the config and
w_t only: the same on any launch, and recomputed on resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from fdcr_mpi.attacks.base import Attack
from fdcr_mpi.data.datasets import SIZE
from fdcr_mpi.data.poison import Trigger
from fdcr_mpi.models import FlatModel, build_model

if TYPE_CHECKING:
    from fdcr_mpi.data.experiment import Experiment


@dataclass
class RoundTrigger:
    """One rank's side of a per-round trigger: the attack's trigger, whose pattern each round
    replaces, the buffer that crosses ranks and, on the server, the model it computes with."""

    attack: Attack
    exp: Experiment
    trigger: Trigger  # the attack's test trigger (on the CPU); each round puts its own pattern in
    buffer: np.ndarray  # (C * 32 * 32,) float32, the round's pattern
    model: FlatModel | None = None  # the server's CPU model

    @classmethod
    def make(cls, attack: Attack, exp: Experiment, server: bool) -> RoundTrigger | None:
        """This rank's side when the run's attack has a per-round trigger, else None."""
        if not attack.per_round_trigger:
            return None
        trigger = attack.test_trigger(exp.spec)
        model = build_model(exp.config.model.name, 0) if server else None
        return cls(attack, exp, trigger, np.zeros(exp.spec.channels * SIZE * SIZE, np.float32), model)

    def compute(self, weights: torch.Tensor, round_: int) -> None:
        """The server: round ``round_``'s pattern from w_t = ``weights`` into ``buffer``."""
        data = self.exp.trigger_data
        if data is None:  # no attacker: the initial trigger stays
            self.buffer[:] = self.trigger.pattern.reshape(-1).numpy()
            return
        pattern = self.attack.round_trigger(self.model, weights, data, self.exp.spec, round_)
        self.buffer[:] = pattern.detach().to(torch.float32).cpu().reshape(-1).numpy()

    def install(self) -> None:
        """Every rank: the pattern in ``buffer`` on the attackers it hosts and on its triggered test rows."""
        trigger = self.trigger.with_pattern(torch.from_numpy(self.buffer.copy()).view_as(self.trigger.pattern))
        exp = self.exp
        for k, data in exp.clients.items():
            if exp.malicious[k]:
                data.trigger = trigger.to(data.device)
        if exp.eval_sets is not None:
            exp.eval_sets.retrigger(trigger.to(exp.eval_sets.test_x.device))
