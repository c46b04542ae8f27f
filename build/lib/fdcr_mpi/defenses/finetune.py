"""Finetuning, docs/SPEC.md section 7: FedAvg, then fine-tune the global model on the proxy set.

Every round, w_bar = sum_k alpha_k w_k (parameters and buffers), then ``epochs`` epochs
(default 1) of SGD on the server's proxy set with the clients' settings (FlatSGD, batches
of batch_size, shuffled by the generator of (proxy.seed, PROXY, round)), train mode, so
BatchNorm statistics are fine-tuned too. Nobody is removed; alpha_hat = alpha.
"""

from __future__ import annotations

import numpy as np
import pydantic
import torch

from fdcr_mpi.defenses._baseline import alpha_numpy, combine, require_proxy, train_on_proxy
from fdcr_mpi.defenses.base import Defense, RoundInputs, RoundResult, register


@register("finetuning")
class Finetuning(Defense):
    """FedAvg followed by server-side fine-tuning on the proxy set."""

    summary = "Finetuning: FedAvg, then one epoch of SGD on the server's proxy set every round"
    needs_proxy = True

    class Options(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
        epochs: int = pydantic.Field(default=1, ge=1, description="fine-tuning epochs per round")

    def aggregate(self, inputs: RoundInputs) -> RoundResult:
        proxy = require_proxy(inputs, self.name)
        alpha = alpha_numpy(inputs)
        averaged = combine(alpha, inputs.client_weights)
        tuned, loss = train_on_proxy(proxy, averaged, self.options.epochs, inputs.round)
        weights = tuned.to(inputs.global_weights.device, torch.float32)
        return RoundResult(weights=weights, alpha_hat=alpha, removed=np.zeros(inputs.num_clients, dtype=bool),
                           diagnostics={"proxy_train_loss": loss})
