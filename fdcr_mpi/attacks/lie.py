"""A Little Is Enough (Baruch, Baruch and Goldberg, NeurIPS 2019): every attacker sends

    m_j = mu_j - z sigma_j                                                        (paper, eq. 3)

per coordinate, mu and sigma the mean and standard deviation of the updates the attackers know
(``attack.knowledge``), with z the largest shift for which the attackers still look like the
majority: s = floor(n / 2 + 1) - f benign clients must sit farther from the mean than the
attackers, z_max = Phi^-1((n - s) / n) (paper, section 3, n participants, f attackers).
``lie.z`` fixes z instead.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import pydantic
import torch

from fdcr_mpi.attacks._crafting import mean_and_std
from fdcr_mpi.attacks.base import Attack, RoundUpdates, register


def z_max(n: int, f: int) -> float:
    """z_max = Phi^-1((n - s) / n), s = floor(n / 2 + 1) - f (0 when the quantile is not inside (0, 1))."""
    s = math.floor(n / 2 + 1) - f
    q = (n - s) / n
    return NormalDist().inv_cdf(q) if 0 < q < 1 else 0.0


def lie_update(reference: torch.Tensor, z: float) -> torch.Tensor:
    """m = mu - z sigma, (P,) float32."""
    mu, sigma = mean_and_std(reference)
    return (mu - z * sigma).to(torch.float32)


@register("lie")
class LittleIsEnough(Attack):
    """Every attacker sends mu - z sigma."""

    summary = "LIE: every attacker sends mean - z_max * std of the known updates (a little is enough)"
    colludes = True

    class Options(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
        z: float | None = pydantic.Field(default=None, ge=0, description="the shift in standard deviations; "
                                         "None: z_max from the participants and attackers (the paper)")

    def collude(self, round_: RoundUpdates) -> torch.Tensor:
        n, f = round_.num_clients, round_.num_attackers
        z = z_max(n, f) if self.options.z is None else self.options.z
        return lie_update(round_.reference, z).expand(f, -1).clone()
