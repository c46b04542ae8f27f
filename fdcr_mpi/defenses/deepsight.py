"""DeepSight (Rieger, Nguyen, Miettinen and Sadeghi, "DeepSight: Mitigating Backdoor Attacks in
Federated Learning Through Deep Model Inspection", NDSS 2022).

With w_t the global model, w_k the K local models, delta_k = w_k - w_t, and (W, b) the weight
(C x F) and bias (C,) of the output layer (the model's last ``nn.Linear``, C classes):

1. Update energies (NEUPs): e_kc = |delta b_kc| + sum_j |delta W_kcj| and
   NEUP_kc = e_kc^2 / sum_c' e_kc'^2 (all zeros for a client whose output layer did not move).
2. Threshold Exceedings: TE_k = #{c : NEUP_kc > max(0.01, 1/C) * max_c' NEUP_kc'}.
3. Labels: client k is suspicious when TE_k < median_j(TE_j) / 2, below the classification
   boundary (a backdoor concentrates the output-layer update on few classes, so few NEUPs exceed
   the threshold).
4. Division differences (DDifs): for each of the S = 3 seeds s, N random inputs x_m and
   DDif_{s,k,c} = (1/N) sum_m p_k(x_m)_c / p_t(x_m)_c, with p the softmax output of the local model
   and of the global model (eval mode). The ratio is exp(log p_k - log p_t) in float64, so no
   epsilon is needed (the exponent is capped at 700 so that it stays finite). The inputs are uniform in [0, 1) with the shape of the proxy images; block b
   (of ``DDIF_BLOCK`` samples) of seed s is drawn by ``torch_generator(run seed, DEFENSE, seed
   option, round, s, b)``.
5. Clustering: HDBSCAN on (a) the cosine distances 1 - cos(delta b_i, delta b_j) of the output-layer
   bias updates (precomputed; the weight updates for an output layer without bias), (b) each seed's DDifs (K x C), (c) the NEUPs (K x C). Each clustering
   gives the 0/1 distance "not in the same cluster" (an HDBSCAN noise point is in no cluster with
   anyone); the merged distance is the mean of the three, the DDif one being the mean over seeds;
   a final HDBSCAN on the merged distances gives the clusters.
6. Poisoned-cluster identification: a cluster is accepted when fewer than tau = 1/3 of its members
   are suspicious; each noise point of the final clustering is a cluster of its own (so it is
   accepted exactly when it is not suspicious itself).
7. Clipping and aggregation: S_t = median_k ||delta_k|| over all K clients; every accepted update is
   scaled by min(1, S_t / ||delta_k||) and w_{t+1} = w_t + sum_k alpha_hat_k min(1, S_t/||delta_k||)
   delta_k with alpha_hat = alpha (= N_k / N) renormalised over the accepted clients. Trainable
   entries only; buffers are the alpha_hat mean. If no client is accepted, w_t is kept.

Defaults and where they come from: the threshold factor 0.01 of step 2, the boundary median / 2 of
step 3 and tau = 1/3 of step 6 are the paper's (its DeepSight algorithm). N = 20,000 random samples
and 3 seeds are the values of the public re-implementations (FLPoison, the backdoors101-based
benchmarks); we found no code released by the authors. HDBSCAN runs with the defaults of the ``hdbscan``
library those re-implementations call (min_cluster_size = 5, min_samples = min_cluster_size),
here through ``sklearn.cluster.HDBSCAN``, with ``allow_single_cluster`` so that a round without
attackers can be one cluster. Both sizes are clamped to the number of clients (at least 2).

Deviations: alpha-weighted (FedAvg) average of the clipped updates where the paper takes the
plain mean (equal for equal sizes); the random inputs change every round (a generator per round,
as every random draw of this package) where the re-implementations reuse seeds 0, 1, 2; the norm
of step 7 is over the trainable entries only. At the boundary of step 3 (TE_k == median / 2) a
client is not suspicious, as in the backdoors101-based re-implementation (FLPoison counts it as
suspicious); so when every TE is 0 (no output-layer movement at all) nobody is suspicious.

Cost: S * ceil(N / DDIF_BLOCK) * (K + 1) forward passes of blocks of DDIF_BLOCK inputs (the model is
reloaded from the flat vectors, no per-client model copies): with ResNet-18 and the defaults,
mind the GPU time; ``num_samples`` trades accuracy of the DDifs for speed.
"""

from __future__ import annotations

import numpy as np
import pydantic
import torch
import torch.nn.functional as F
from torch import nn

from fdcr_mpi.defenses._baseline import (
    clip_factors,
    clipped_kept_mean,
    cosine_matrix,
    finish,
    require_proxy,
    trainable_updates,
    update_norms,
)
from fdcr_mpi.defenses.base import Defense, RoundInputs, RoundResult, register
from fdcr_mpi.models import FlatModel
from fdcr_mpi.seeding import DEFENSE, torch_generator

DDIF_BLOCK = 500  # random inputs per generator and per forward pass
MAX_LOG_RATIO = 700.0  # exp(700) is finite in float64: a ratio never becomes inf


def output_layer(model: FlatModel) -> tuple[slice, slice | None, int]:
    """The slices of the flat vector holding the last ``nn.Linear``'s weight and bias, and its
    number of outputs C."""
    last = None
    for module in model.module.modules():
        if isinstance(module, nn.Linear):
            last = module
    if last is None:
        raise ValueError("DeepSight needs a model whose output layer is an nn.Linear")
    base, item = model.flat.data_ptr(), model.flat.element_size()

    def span(p: torch.Tensor) -> slice:
        start = (p.data_ptr() - base) // item
        if p.untyped_storage().data_ptr() != model.flat.untyped_storage().data_ptr() or not (
                0 <= start and start + p.numel() <= model.size):
            raise ValueError("the output layer's parameters are not views of the model's flat vector")
        return slice(start, start + p.numel())

    bias = span(last.bias) if last.bias is not None else None
    return span(last.weight), bias, int(last.out_features)


def normalized_energy_updates(weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """NEUP_kc = e_kc^2 / sum_c e_kc^2, e_kc = |delta b_kc| + sum_j |delta W_kcj| (step 1); (K, C).

    ``weight`` (K, C, F) and ``bias`` (K, C) are the output-layer updates; a zero row stays zero."""
    energy = np.abs(weight).sum(axis=2)
    if bias is not None:
        energy = energy + np.abs(bias)
    sq = energy**2
    total = sq.sum(axis=1, keepdims=True)
    return np.divide(sq, total, out=np.zeros_like(sq), where=total > 0)


def threshold_exceedings(neups: np.ndarray, factor: float) -> np.ndarray:
    """TE_k = #{c : NEUP_kc > max(factor, 1/C) * max_c NEUP_kc} (step 2); (K,) int64."""
    c = neups.shape[1]
    threshold = max(factor, 1.0 / c) * neups.max(axis=1, keepdims=True)
    return (neups > threshold).sum(axis=1).astype(np.int64)


def suspicious_labels(te: np.ndarray) -> np.ndarray:
    """Suspicious when TE_k < median(TE) / 2 (step 3); (K,) bool."""
    return te < np.median(te) / 2.0


def random_inputs(seed: int, keys: tuple[int, ...], shape: tuple[int, ...], count: int) -> torch.Tensor:
    """``count`` uniform [0, 1) inputs of ``shape`` from the generator of (seed, *keys), CPU float32."""
    return torch.rand((count, *shape), generator=torch_generator(seed, *keys), dtype=torch.float32)


@torch.no_grad()
def division_differences(model: FlatModel, global_weights: torch.Tensor, client_weights: torch.Tensor,
                         input_shape: tuple[int, ...], num_samples: int, num_seeds: int, seed: int,
                         keys: tuple[int, ...]) -> np.ndarray:
    """DDif_{s,k,c} = (1/N) sum_m p_k(x_m)_c / p_t(x_m)_c (step 4); (S, K, C) float64.

    Block b of seed s holds the inputs ``random_inputs(seed, (*keys, s, b), ...)``."""
    device = model.flat.device
    module = model.module
    module.eval()
    k = client_weights.shape[0]
    out: list[torch.Tensor] = []
    for s in range(num_seeds):
        acc: torch.Tensor | None = None
        for b, start in enumerate(range(0, num_samples, DDIF_BLOCK)):
            count = min(DDIF_BLOCK, num_samples - start)
            x = random_inputs(seed, (*keys, s, b), input_shape, count).to(device)
            model.load(global_weights.to(device, torch.float32))
            log_global = F.log_softmax(module(x).to(torch.float64), dim=1)
            if acc is None:
                acc = torch.zeros(k, log_global.shape[1], dtype=torch.float64, device=device)
            for i in range(k):
                model.load(client_weights[i].to(device, torch.float32))
                log_local = F.log_softmax(module(x).to(torch.float64), dim=1)
                acc[i] += (log_local - log_global).clamp(max=MAX_LOG_RATIO).exp().sum(dim=0)
        assert acc is not None
        out.append(acc / num_samples)
    return torch.stack(out).cpu().numpy()


def hdbscan_labels(data: np.ndarray, min_cluster_size: int, min_samples: int | None,
                   precomputed: bool = False) -> np.ndarray:
    """HDBSCAN cluster labels (-1: noise), sizes clamped to [2, K]; one cluster for K = 1."""
    n = data.shape[0]
    if n < 2:
        return np.zeros(n, dtype=np.int64)
    size = max(2, min(min_cluster_size, n))
    samples = min(size if min_samples is None else min_samples, n)
    from sklearn.cluster import HDBSCAN  # here: importing scikit-learn costs every process a second

    estimator = HDBSCAN(min_cluster_size=size, min_samples=samples, allow_single_cluster=True,
                        metric="precomputed" if precomputed else "euclidean", copy=True)
    return estimator.fit_predict(np.ascontiguousarray(data, dtype=np.float64)).astype(np.int64)


def cluster_distances(labels: np.ndarray) -> np.ndarray:
    """d_ij = 0 when i and j are in the same cluster (noise is in none), else 1; zero diagonal."""
    same = (labels[:, None] == labels[None, :]) & (labels[:, None] >= 0)
    dist = np.where(same, 0.0, 1.0)
    np.fill_diagonal(dist, 0.0)
    return dist


def accepted_clients(clusters: np.ndarray, suspicious: np.ndarray, tau: float) -> np.ndarray:
    """Step 6: members of clusters with fewer than tau * size suspicious members; a noise point
    is its own cluster. (K,) bool."""
    accepted = np.zeros(clusters.size, dtype=bool)
    for label in np.unique(clusters):
        members = [np.array([i]) for i in np.flatnonzero(clusters == label)] if label < 0 else [
            np.flatnonzero(clusters == label)]
        for group in members:
            if suspicious[group].sum() < tau * group.size:
                accepted[group] = True
    return accepted


@register("deepsight")
class DeepSight(Defense):
    """Label models by their output-layer update energy, cluster them, drop suspicious clusters, clip."""

    summary = "DeepSight: NEUP threshold exceedings, DDif/NEUP/bias-cosine HDBSCAN clusters, median-norm clipping"
    needs_proxy = True

    def server_imports(self) -> tuple[str, ...]:
        return ("sklearn.cluster",)

    class Options(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
        num_samples: int = pydantic.Field(default=20_000, ge=1, description="N: random inputs per seed for the DDifs")
        num_seeds: int = pydantic.Field(default=3, ge=1, description="S: DDif input sets (one clustering each)")
        threshold_factor: float = pydantic.Field(default=0.01, gt=0.0, lt=1.0,
                                                 description="TE threshold: max(factor, 1/C) * max NEUP")
        tau: float = pydantic.Field(default=1 / 3, gt=0.0, le=1.0,
                                    description="a cluster is accepted below this fraction of suspicious members")
        min_cluster_size: int = pydantic.Field(default=5, ge=2, description="HDBSCAN min_cluster_size (clamped to K)")
        min_samples: int | None = pydantic.Field(default=None, ge=1,
                                                 description="HDBSCAN min_samples; null: min_cluster_size")
        seed: int = pydantic.Field(default=0, ge=0, description="mixed with the run's seed: varies the inputs alone")

    def aggregate(self, inputs: RoundInputs) -> RoundResult:
        o = self.options
        proxy = require_proxy(inputs, self.name)
        model: FlatModel = proxy.make_model()  # type: ignore[misc]
        if model.size != inputs.global_weights.numel():
            raise ValueError(f"DeepSight: the proxy model has {model.size} entries, the weights "
                             f"{inputs.global_weights.numel()}")
        w_span, b_span, classes = output_layer(model)
        k = inputs.num_clients
        weight = (inputs.client_weights[:, w_span] - inputs.global_weights[w_span]).double().cpu().numpy()
        weight = weight.reshape(k, classes, -1)
        bias_rows = None
        if b_span is not None:
            bias_rows = (inputs.client_weights[:, b_span] - inputs.global_weights[b_span]).to(torch.float32)
        neups = normalized_energy_updates(weight, None if bias_rows is None else bias_rows.double().cpu().numpy())
        te = threshold_exceedings(neups, o.threshold_factor)
        suspicious = suspicious_labels(te)

        ddifs = division_differences(model, inputs.global_weights, inputs.client_weights,
                                     tuple(proxy.x.shape[1:]), o.num_samples, o.num_seeds, inputs.seed,
                                     (DEFENSE, o.seed, inputs.round))
        cos_rows = bias_rows if bias_rows is not None else torch.from_numpy(weight.reshape(k, -1))
        cos_dist = np.clip(1.0 - cosine_matrix(cos_rows), 0.0, 2.0)
        cos_dist = (cos_dist + cos_dist.T) / 2
        np.fill_diagonal(cos_dist, 0.0)
        size, samples = o.min_cluster_size, o.min_samples
        d_cos = cluster_distances(hdbscan_labels(cos_dist, size, samples, precomputed=True))
        d_ddif = np.mean([cluster_distances(hdbscan_labels(ddifs[s], size, samples)) for s in range(o.num_seeds)],
                         axis=0)
        d_neup = cluster_distances(hdbscan_labels(neups, size, samples))
        merged = (d_ddif + d_neup + d_cos) / 3.0
        clusters = hdbscan_labels(merged, size, samples, precomputed=True)
        accepted = accepted_clients(clusters, suspicious, o.tau)

        updates = trainable_updates(inputs)
        norms = update_norms(updates)
        bound = float(np.median(norms)) if norms.size else 0.0  # step 7: S, the median norm
        factors = clip_factors(norms, bound)
        step, alpha_hat = clipped_kept_mean(inputs, updates, accepted, factors)
        return finish(inputs, step, alpha_hat, ~accepted, {
            "threshold_exceedings": te.astype(np.float64), "suspicious": suspicious.astype(np.float64),
            "cluster": clusters.astype(np.float64), "clip_factor": factors, "clip_bound": bound,
            "ddif_mean": ddifs.mean(axis=(0, 2))})

