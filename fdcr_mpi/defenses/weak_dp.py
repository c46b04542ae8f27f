"""Weak differential privacy (Sun, Kairouz, Suresh and McMahan, "Can You Really Backdoor Federated
Learning?", arXiv:1911.07963, 2019): norm clipping, then Gaussian noise on the aggregate.

1. step = sum_k alpha_k delta_k min(1, M / ||delta_k||)   (``norm_clipping``, same bound M);
2. w_{t+1} = w_t + step + xi,  xi ~ N(0, sigma^2 I) on every trainable parameter, every round.

"Weak": sigma is far below what a formal (epsilon, delta) guarantee would need; the paper's
value is sigma = 0.025 (the default). The bound M defaults to the round's median update norm,
as in ``norm_clipping`` (the paper fixes M; ``weak_dp.bound`` takes a number for that).
Buffers (BatchNorm statistics) are averaged with alpha_hat and not noised: they are not
parameters (the paper's EMNIST CNN has none).

The noise comes from a CPU ``torch.Generator`` seeded from (run seed, DEFENSE, ``seed`` option,
round) (``seeding.torch_generator``, the derivation of ``seeding.numpy_rng``) and is then moved to
the updates' device, so CPU and GPU runs add the same noise. alpha_hat, removed and the clipping
diagnostics are those of ``norm_clipping``.
"""

from __future__ import annotations

import pydantic

from fdcr_mpi.defenses._baseline import alpha_numpy, finish, gaussian_noise, trainable_updates
from fdcr_mpi.defenses.base import Defense, RoundInputs, RoundResult, register
from fdcr_mpi.defenses.norm_clipping import BOUND_DESCRIPTION, Bound, clipped_mean
from fdcr_mpi.seeding import DEFENSE, torch_generator

PAPER_SIGMA = 0.025


@register("weak_dp")
class WeakDP(Defense):
    """Norm clipping, then N(0, sigma^2) noise on the aggregate."""

    summary = "Weak DP: norm clipping (median norm), then add N(0, 0.025^2) noise to the aggregate"

    class Options(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
        bound: Bound = pydantic.Field(default="median", description=BOUND_DESCRIPTION)
        sigma: float = pydantic.Field(default=PAPER_SIGMA, ge=0.0, description="std of the Gaussian noise on the aggregate")
        seed: int = pydantic.Field(default=0, ge=0, description="mixed with the run's seed: varies the noise alone")

    def aggregate(self, inputs: RoundInputs) -> RoundResult:
        step, alpha_hat, diagnostics = clipped_mean(trainable_updates(inputs), alpha_numpy(inputs), self.options.bound)
        generator = torch_generator(inputs.seed, DEFENSE, self.options.seed, inputs.round)
        step = step + gaussian_noise(step.numel(), self.options.sigma, generator, step.device)
        return finish(inputs, step, alpha_hat, alpha_hat == 0, diagnostics)
