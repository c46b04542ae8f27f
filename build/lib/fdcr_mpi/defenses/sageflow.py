"""Sageflow (Park, Han, Hong, Moon and Sohn, NeurIPS 2021), server side, docs/SPEC.md section 7.

Each client model w_k is evaluated on the proxy set (make_model() + load(w_k), eval
mode, no grad): mean cross-entropy l_k and mean predictive entropy e_k over the samples.
Entropy-based filtering drops clients with e_k > eth (2.2; an untrained 10-class model
sits at ln 10 = 2.30); loss-weighted averaging gives the rest weights proportional to
1 / l_k^delta (delta = 5), normalised (the authors' benchmark uses no data sizes;
``weight_by_size: true`` multiplies by alpha_k as in the Sageflow paper). w_{t+1} is the
weighted mean of the surviving client models; if none survives, w_t is kept.

``variant: marsfl`` is the authors' benchmark (MarsFL ``Sever/SageFlowSever.py``), which produced
the paper's Table 4: it evaluates the global model w_t, not the client's, for every client, so
all clients get the same loss l and entropy e; a client counts as an attacker when e >= eth,
and its weight is [e < eth] / l^delta + 1e-5, normalised. Every weight is equal: the round is
the plain (unweighted) mean of the client models, FedAvg without the sample sizes.
(``weight_by_size`` has no effect. MarsFL averages per-batch means over a 5,000-image public
set; with equal weights the figures do not matter.)
"""

from __future__ import annotations

import numpy as np
import pydantic

from fdcr_mpi.defenses._baseline import (
    Variant,
    alpha_numpy,
    combine,
    evaluate_on_proxy,
    finish,
    normalized,
    proxy_model,
    require_proxy,
    trainable_updates,
)
from fdcr_mpi.defenses.base import Defense, RoundInputs, RoundResult, register

TINY_LOSS = 1e-12
MARSFL_EPS = 1e-5  # added to every weight


@register("sageflow")
class Sageflow(Defense):
    """Entropy filtering and loss-weighted averaging on the server's proxy set."""

    summary = "Sageflow: drop client models with proxy entropy > 2.2, weight the rest by 1/loss^5"
    needs_proxy = True

    class Options(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
        variant: Variant = pydantic.Field(default="original", description="original or marsfl (the authors' benchmark)")
        eth: float = pydantic.Field(default=2.2, description="entropy threshold: higher mean entropy is dropped")
        delta: float = pydantic.Field(default=5.0, ge=0.0, description="loss exponent of the weights")
        weight_by_size: bool = pydantic.Field(default=False, description="also multiply the weights by N_k / N")

    def aggregate(self, inputs: RoundInputs) -> RoundResult:
        proxy = require_proxy(inputs, self.name)
        model = proxy_model(proxy, inputs.global_weights)
        losses, entropies = np.zeros(inputs.num_clients), np.zeros(inputs.num_clients)
        if self.options.variant == "marsfl":  # MarsFL scores w_t (already loaded) for every client
            losses[:], entropies[:] = evaluate_on_proxy(model, proxy)
            kept = entropies < self.options.eth
            raw = np.where(kept, 1.0, 0.0) / np.maximum(losses, TINY_LOSS) ** self.options.delta + MARSFL_EPS
            alpha_hat = normalized(raw)
            return finish(inputs, combine(alpha_hat, trainable_updates(inputs)), alpha_hat, alpha_hat == 0,
                          {"proxy_loss": losses, "proxy_entropy": entropies})
        for k in range(inputs.num_clients):
            model.load(inputs.client_weights[k].to(model.flat.device))
            losses[k], entropies[k] = evaluate_on_proxy(model, proxy)
        kept = entropies <= self.options.eth
        raw = np.where(kept, 1.0 / np.maximum(losses, TINY_LOSS) ** self.options.delta, 0.0)
        if self.options.weight_by_size:
            raw = raw * alpha_numpy(inputs)
        alpha_hat = normalized(raw)
        step = combine(alpha_hat, trainable_updates(inputs)) if alpha_hat.sum() > 0 else None
        return finish(inputs, step, alpha_hat, alpha_hat == 0,
                      {"proxy_loss": losses, "proxy_entropy": entropies})
