"""FLTrust (Cao, Fang, Liu and Gong, NDSS 2021), docs/SPEC.md section 7.

The server trains a copy of w_t on its proxy set (the clients' SGD settings, seeded
shuffling) to get the root update delta_0: for ``epochs`` epochs, or by default for about as
many SGD steps as the median client takes, as FLTrust's server runs the clients' number of
local iterations: round(E * median_k N_k / |proxy|) epochs, at least 1. (One epoch of the
256-sample proxy set is a few steps; a root update that short stays at the initial loss
plateau, and scaling every update to its norm froze training at chance accuracy.) Trust score
TS_k = ReLU(cos(delta_k, delta_0)); each update is rescaled to the root norm and
w_{t+1} = w_t + sum_k TS_k (||delta_0|| / ||delta_k||) delta_k / sum_k TS_k, on the
trainable entries. A zero update has TS 0. If every TS is 0, w_t is kept.
alpha_hat_k = TS_k / sum_j TS_j; clients with TS 0 are removed.
"""

from __future__ import annotations

import numpy as np
import pydantic
import torch

from fdcr_mpi.defenses._baseline import (
    combine,
    finish,
    gram,
    normalized,
    require_proxy,
    train_on_proxy,
    trainable_mask,
    trainable_updates,
)
from fdcr_mpi.defenses.base import Defense, ProxyData, RoundInputs, RoundResult, register


def trust_scores(updates: torch.Tensor, root: torch.Tensor) -> tuple[np.ndarray, np.ndarray, float]:
    """ReLU(cos(delta_k, delta_0)), the norms ||delta_k|| and ||delta_0||."""
    g = gram(torch.cat([updates, root.unsqueeze(0)], dim=0))
    norms = np.sqrt(np.clip(np.diag(g), 0.0, None))
    client_norms, root_norm = norms[:-1], float(norms[-1])
    denom = client_norms * root_norm
    cos = np.divide(g[:-1, -1], denom, out=np.zeros_like(client_norms), where=denom > 0)
    return np.maximum(cos, 0.0), client_norms, root_norm


def matching_epochs(proxy: ProxyData, sizes: np.ndarray) -> int:
    """Proxy epochs giving about the median client's number of local steps: E * median N_k / |proxy|."""
    return max(1, round(proxy.local_epochs * float(np.median(sizes)) / max(int(proxy.y.numel()), 1)))


@register("fltrust")
class FLTrust(Defense):
    """Trust-weighted, norm-equalised aggregation against a server update from the proxy set."""

    summary = "FLTrust: ReLU-cosine trust to a server update trained on the proxy set, norms equalised"
    needs_proxy = True

    class Options(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
        epochs: int | None = pydantic.Field(
            default=None, ge=1, description="server epochs on the proxy set (null: as many steps as the median client)")

    def aggregate(self, inputs: RoundInputs) -> RoundResult:
        proxy = require_proxy(inputs, self.name)
        mask = trainable_mask(inputs)
        epochs = self.options.epochs or matching_epochs(proxy, inputs.sizes.numpy())
        trained, loss = train_on_proxy(proxy, inputs.global_weights, epochs, inputs.round)
        root = (trained.to(inputs.global_weights.device) - inputs.global_weights.to(torch.float32))[mask]
        updates = trainable_updates(inputs)
        ts, norms, root_norm = trust_scores(updates, root)
        alpha_hat = normalized(ts)
        step = None
        if alpha_hat.sum() > 0:
            coef = np.divide(alpha_hat * root_norm, norms, out=np.zeros_like(norms), where=norms > 0)
            step = combine(coef, updates)
        return finish(inputs, step, alpha_hat, ts == 0,
                      {"trust_score": ts, "root_norm": root_norm, "proxy_loss": loss})
