"""Shared helpers of the baseline defenses (docs/SPEC.md section 7).

- the trainable part of the updates, and the final assembly of a ``RoundResult``
  (robust rules act on trainable entries; buffers are averaged with alpha_hat);
- pairwise statistics of client updates, accumulated in float64 over column chunks so
  that a ResNet-18 update matrix never needs a float64 copy;
- Krum scores and the coordinate-wise trimmed mean around the median;
- training and evaluation on the server's proxy set (FLTrust, Sageflow, Finetuning);
- what the ``marsfl`` variants share: MarsFL's attacker counts and its server momentum.

Every function is deterministic: fixed reduction order, stable sorts, seeded generators.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from fdcr_mpi.client.train import ClientData, TrainSettings, train_client
from fdcr_mpi.defenses.base import Defense, ProxyData, RoundInputs, RoundResult
from fdcr_mpi.defenses.ops import ordered_weighted_sum
from fdcr_mpi.errors import UserError
from fdcr_mpi.models import FlatModel
from fdcr_mpi.seeding import PROXY, SERVER_MODEL, derive_seed, torch_generator

CHUNK = 1 << 18  # columns per chunk: a (K, CHUNK) float64 block is 2 MiB per client


def column_chunks(n: int, size: int = CHUNK) -> Iterator[slice]:
    """Consecutive slices covering range(n)."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def trainable_mask(inputs: RoundInputs) -> torch.Tensor:
    """(D,) bool: the trainable entries (all of them when ``inputs.trainable`` is None)."""
    if inputs.trainable is None:
        return torch.ones(inputs.global_weights.numel(), dtype=torch.bool, device=inputs.global_weights.device)
    return inputs.trainable.to(device=inputs.global_weights.device, dtype=torch.bool)


def trainable_updates(inputs: RoundInputs) -> torch.Tensor:
    """delta_k = w_k - w_t restricted to the trainable entries, (K, P) float32."""
    if inputs.trainable is None or bool(inputs.trainable.all()):
        return inputs.updates.to(torch.float32)
    mask = trainable_mask(inputs)
    return (inputs.client_weights[:, mask] - inputs.global_weights[mask].unsqueeze(0)).to(torch.float32)


def combine(coef: np.ndarray, rows: torch.Tensor) -> torch.Tensor:
    """sum_k coef_k rows_k in float32, in client order, zero coefficients skipped (on rows' device)."""
    return ordered_weighted_sum(coef, rows)


def normalized(weights: np.ndarray) -> np.ndarray:
    """weights / sum(weights) in float64; all zeros stay zeros."""
    w = np.asarray(weights, dtype=np.float64)
    total = float(w.sum())
    return w / total if total > 0 else np.zeros_like(w)


def alpha_numpy(inputs: RoundInputs) -> np.ndarray:
    """alpha_k = N_k / N as a float64 numpy array."""
    return inputs.alpha.detach().cpu().numpy().astype(np.float64)


def finish(inputs: RoundInputs, step: torch.Tensor | None, alpha_hat: np.ndarray, removed: np.ndarray,
           diagnostics: dict[str, Any] | None = None, *, params: torch.Tensor | None = None) -> RoundResult:
    """w_{t+1} = w_t + step on the trainable entries (``None``: keep w_t there), or ``params``
    there when given; float buffers are the alpha_hat-weighted mean of the clients' buffers
    (kept at w_t if alpha_hat is all 0)."""
    mask = trainable_mask(inputs)
    weights = inputs.global_weights.detach().to(torch.float32).clone()
    if params is not None:
        weights[mask] = params.to(weights.device, torch.float32)
    elif step is not None:
        if bool(mask.all()):
            weights += step.to(weights.device, torch.float32)
        else:
            weights[mask] += step.to(weights.device, torch.float32)
    buffers = ~mask
    a = normalized(alpha_hat)
    if bool(buffers.any()) and a.sum() > 0:
        weights[buffers] = combine(a, inputs.client_weights[:, buffers])
    return RoundResult(weights=weights, alpha_hat=np.asarray(alpha_hat, dtype=np.float64),
                       removed=np.asarray(removed, dtype=bool), diagnostics=diagnostics or {})


# ---------------------------------------------------------------- pairwise statistics


def gram(rows: torch.Tensor) -> np.ndarray:
    """G_ij = <u_i, u_j>, (K, K) float64."""
    k = rows.shape[0]
    g = torch.zeros(k, k, dtype=torch.float64, device=rows.device)
    for sl in column_chunks(rows.shape[1]):
        block = rows[:, sl].to(torch.float64)
        g += block @ block.T
    return g.cpu().numpy()


def pairwise_distances(rows: torch.Tensor, metric: str = "sqeuclidean") -> np.ndarray:
    """(K, K) float64: ``sqeuclidean`` sum_v (u_iv - u_jv)^2 (from the float64 Gram matrix),
    ``euclidean`` its root, ``manhattan`` sum_v |u_iv - u_jv|."""
    if metric in ("sqeuclidean", "euclidean"):
        g = gram(rows)
        sq = np.diag(g)
        out = np.clip(sq[:, None] + sq[None, :] - 2.0 * g, 0.0, None)
        out = (out + out.T) / 2  # exact symmetry
        np.fill_diagonal(out, 0.0)
        return np.sqrt(out) if metric == "euclidean" else out
    if metric != "manhattan":
        raise ValueError(f"unknown metric {metric!r}")
    k = rows.shape[0]
    out_t = torch.zeros(k, k, dtype=torch.float64, device=rows.device)
    for sl in column_chunks(rows.shape[1]):
        block = rows[:, sl].to(torch.float64)
        for i in range(k - 1):
            out_t[i, i + 1:] += (block[i + 1:] - block[i]).abs().sum(dim=1)
    upper = out_t.cpu().numpy()
    return upper + upper.T


def distances_to(rows: torch.Tensor, point: torch.Tensor) -> np.ndarray:
    """||u_k - point||_2 for every row, (K,) float64."""
    acc = torch.zeros(rows.shape[0], dtype=torch.float64, device=rows.device)
    for sl in column_chunks(rows.shape[1]):
        acc += (rows[:, sl].to(torch.float64) - point[sl].to(torch.float64)).square().sum(dim=1)
    return acc.sqrt().cpu().numpy()


# ---------------------------------------------------------------- norm clipping, noise


def update_norms(rows: torch.Tensor) -> np.ndarray:
    """||delta_k||_2 of every row, (K,) float64."""
    return distances_to(rows, torch.zeros(rows.shape[1], dtype=rows.dtype, device=rows.device))


def clip_factors(norms: np.ndarray, bound: float) -> np.ndarray:
    """c_k = min(1, bound / ||delta_k||), 1 for a zero update (norm clipping, FLAME, SignGuard, ...)."""
    norms = np.asarray(norms, dtype=np.float64)
    return np.minimum(1.0, np.divide(bound, norms, out=np.ones_like(norms), where=norms > 0))


def clipped_kept_mean(inputs: RoundInputs, updates: torch.Tensor, keep: np.ndarray, factors: np.ndarray
                      ) -> tuple[torch.Tensor | None, np.ndarray]:
    """(step, alpha_hat): the alpha-weighted mean of the kept updates, each clipped by its factor
    c_k (sum_k alpha_hat_k c_k delta_k, alpha_hat_k = alpha_k renormalised over the kept clients);
    step None when nobody is kept (w_t stays)."""
    alpha_hat = normalized(np.where(keep, alpha_numpy(inputs), 0.0))
    return (combine(alpha_hat * factors, updates) if alpha_hat.sum() > 0 else None), alpha_hat


def gaussian_noise(size: int, std: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """std * N(0, 1) draws, (size,) float32, drawn on the CPU (the same on any device), then moved to ``device``."""
    return (std * torch.randn(size, generator=generator, dtype=torch.float32)).to(device)


def cosine_matrix(rows: torch.Tensor) -> np.ndarray:
    """cos(u_i, u_j), (K, K) float64; a zero row has cosine 0 with everything."""
    g = gram(rows)
    norms = np.sqrt(np.clip(np.diag(g), 0.0, None))
    denom = np.outer(norms, norms)
    return np.divide(g, denom, out=np.zeros_like(g), where=denom > 0)


def krum_scores(sq_dist: np.ndarray, neighbours: int) -> np.ndarray:
    """Krum score: the sum of the ``neighbours`` smallest squared distances to the other points
    (MarsFL's variant passes plain Euclidean distances and n - 1 neighbours: all the others)."""
    n = sq_dist.shape[0]
    nb = int(min(max(neighbours, 1), n - 1))
    scores = np.zeros(n, dtype=np.float64)
    if n <= 1:
        return scores
    for i in range(n):
        others = np.sort(np.delete(sq_dist[i], i), kind="stable")
        scores[i] = others[:nb].sum()
    return scores


def trimmed_mean_around_median(rows: torch.Tensor, keep: int) -> tuple[torch.Tensor, np.ndarray]:
    """Per coordinate, the mean of the ``keep`` values closest to the median.

    The median of an even count is the mean of the two middle values; ties in the distance
    to the median go to the lower client index. Returns the (P,) float32 result and, per
    row, how many coordinates kept its value ((n,) int64).
    """
    n = rows.shape[0]
    keep = int(min(max(keep, 1), n))
    out = torch.empty(rows.shape[1], dtype=torch.float32, device=rows.device)
    counts = torch.zeros(n, dtype=torch.int64, device=rows.device)
    for sl in column_chunks(rows.shape[1]):
        block = rows[:, sl].to(torch.float32)
        srt = block.sort(dim=0).values
        med = (srt[(n - 1) // 2] + srt[n // 2]) / 2
        order = (block - med).abs().argsort(dim=0, stable=True)[:keep]
        out[sl] = block.gather(0, order).to(torch.float64).mean(dim=0).to(torch.float32)
        counts += torch.bincount(order.reshape(-1), minlength=n)
    return out, counts.cpu().numpy()


# ---------------------------------------------------------------- proxy set


def require_proxy(inputs: RoundInputs, name: str) -> ProxyData:
    """The proxy data of this round, or a clear error when the runtime did not pass it."""
    proxy = inputs.proxy
    if proxy is None or proxy.make_model is None:
        raise ValueError(f"defense {name!r} needs the server's proxy set (RoundInputs.proxy with make_model)")
    if proxy.y.numel() == 0:
        raise ValueError(f"defense {name!r} got an empty proxy set")
    return proxy


def proxy_model(proxy: ProxyData, weights: torch.Tensor) -> FlatModel:
    """A fresh model from ``proxy.make_model()`` holding ``weights``."""
    model: FlatModel = proxy.make_model()  # type: ignore[misc]
    model.load(weights.detach().to(model.flat.device, torch.float32))
    return model


def train_on_proxy(proxy: ProxyData, weights: torch.Tensor, epochs: int, round_: int) -> tuple[torch.Tensor, float]:
    """``epochs`` of the clients' local training (``client.train_client``: the clients' lr,
    momentum and weight decay) on the proxy set, starting from ``weights``; batches of
    ``proxy.batch_size`` (last one partial), no augmentation, shuffled by the generator of
    (proxy.seed, PROXY, round). Returns the trained (D,) vector (CPU float32) and the mean
    training loss (nan if no step)."""
    model = proxy_model(proxy, weights)
    device = model.flat.device
    data = ClientData(x=proxy.x.to(device), y=proxy.y.to(device),
                      poisoned=torch.zeros(int(proxy.y.numel()), dtype=torch.bool, device=device), augment=False)
    settings = TrainSettings(local_epochs=epochs, lr=proxy.lr, momentum=proxy.momentum,
                             weight_decay=proxy.weight_decay, batch_size=proxy.batch_size, drop_last=False)
    loss = train_client(model, data, None, settings, torch_generator(proxy.seed, PROXY, round_))  # no augmentation: no spec
    return model.flat.detach().cpu().clone(), float(loss)


@torch.no_grad()
def evaluate_on_proxy(model: FlatModel, proxy: ProxyData) -> tuple[float, float]:
    """Mean cross-entropy and mean predictive entropy -sum_c p_c log p_c over the proxy set (eval mode)."""
    module = model.module
    module.eval()
    device = model.flat.device
    loss, entropy = 0.0, 0.0
    n = int(proxy.y.numel())
    for start in range(0, n, proxy.batch_size):
        xb = proxy.x[start:start + proxy.batch_size].to(device)
        yb = proxy.y[start:start + proxy.batch_size].to(device)
        logits = module(xb).to(torch.float64)
        logp = F.log_softmax(logits, dim=1)
        loss += float(F.nll_loss(logp, yb, reduction="sum"))
        entropy += float(-(logp.exp() * logp).sum())
    return loss / n, entropy / n


# ---------------------------------------------------------------- MarsFL, the authors' benchmark

Variant = Literal["original", "marsfl"]
"""The ``variant`` option of the baselines the paper's Table 4 took from MarsFL: ``original``
(the published algorithm, our default) or ``marsfl`` (what the authors' benchmark code runs;
every difference is listed in docs/METHOD.md with its source file)."""

MARSFL_MOMENTUM = 0.9  # the server momentum of MarsFL's Krum, Multi-Krum, Trimmed Median and Bulyan


def marsfl_corrupted(n: int) -> int:
    """The attacker count MarsFL passes to Krum and Bulyan: f - k with f = n // 2 and
    k = n - f - 1, which is 1 for an even n and 0 for an odd one (Sever/MultiKrumSever.py)."""
    f = n // 2
    return f - (n - f - 1)


def marsfl_kept(n: int, corrupted: int) -> int:
    """Values MarsFL's coordinate-wise trimmed mean keeps: n - corrupted - 1, at least 1
    (Sever/utils/utils.py, ``trimmed_mean``)."""
    return max(n - corrupted - 1, 1)


def unit_rows(rows: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """u_k / (||u_k|| + eps), float32 (a zero row stays zero)."""
    norms = distances_to(rows, torch.zeros(rows.shape[1], device=rows.device)) + eps
    scale = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    return rows * torch.as_tensor(scale, dtype=torch.float32, device=rows.device).unsqueeze(1)


class ServerMomentum:
    """MarsFL's server optimiser in Krum, Multi-Krum, Trimmed Median and Bulyan.

    The server keeps its own weights w^s, which start from a separately drawn model (not the
    clients' w_0), and a velocity v; with s the rule's aggregate of the updates w_k - w_t:

        v <- 0.9 v + s;   w^s <- w^s + v;   w_{t+1} = w^s   (trainable entries)

    MarsFL writes this with g_k = (w_t - w_k) / eta as v <- 0.9 v - eta rule(g): the same step,
    as each rule commutes with the scaling by -eta. The starting model is
    ``inputs.fresh_model(derive_seed(seed, SERVER_MODEL))``. The state is checkpointed, so a
    resumed run continues exactly.
    """

    KEYS = ("server_weights", "server_velocity")

    def __init__(self, momentum: float = MARSFL_MOMENTUM) -> None:
        self.momentum = momentum
        self.weights: torch.Tensor | None = None
        self.velocity: torch.Tensor | None = None

    def start(self, inputs: RoundInputs, name: str) -> torch.Tensor:
        """The trainable entries of the separately drawn starting model, on the updates' device."""
        if inputs.fresh_model is None:
            raise UserError(f"defense {name!r} with variant marsfl starts its server momentum from a separately "
                            "drawn model, but the caller passed none (RoundInputs.fresh_model, or "
                            "aggregate(..., fresh_model=...))")
        drawn = inputs.fresh_model(derive_seed(inputs.seed, SERVER_MODEL))
        return drawn.to(inputs.global_weights.device, torch.float32)[trainable_mask(inputs)]

    def apply(self, inputs: RoundInputs, step: torch.Tensor, name: str) -> torch.Tensor:
        """The new trainable parameters w^s after one momentum step with ``step``."""
        step = step.to(torch.float32)
        if self.weights is None or self.velocity is None:
            self.weights = self.start(inputs, name)
            self.velocity = torch.zeros_like(self.weights)
        if self.weights.shape != step.shape:
            raise UserError(f"defense {name!r}: the server momentum holds {self.weights.numel()} parameters, "
                            f"this round's updates {step.numel()}: the model changed")
        self.velocity = self.momentum * self.velocity.to(step.device) + step
        self.weights = self.weights.to(step.device) + self.velocity
        return self.weights.clone()

    def state_dict(self) -> dict[str, np.ndarray]:
        if self.weights is None or self.velocity is None:
            return {}
        return {"server_weights": self.weights.detach().cpu().numpy().copy(),
                "server_velocity": self.velocity.detach().cpu().numpy().copy()}

    def load_state_dict(self, state: dict[str, np.ndarray], name: str) -> None:
        unknown = set(state) - set(self.KEYS)
        if unknown or (state and set(state) != set(self.KEYS)):
            raise UserError(f"the checkpoint holds state {sorted(state)} that defense {name!r} does not keep")
        self.weights = torch.from_numpy(np.asarray(state["server_weights"], np.float32).copy()) if state else None
        self.velocity = torch.from_numpy(np.asarray(state["server_velocity"], np.float32).copy()) if state else None


class MomentumBaseline(Defense):
    """A baseline whose ``marsfl`` variant applies MarsFL's server momentum (``ServerMomentum``),
    the defense's only state."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.server = ServerMomentum()

    @property
    def marsfl(self) -> bool:
        return getattr(self.options, "variant", "original") == "marsfl"

    def finish_step(self, inputs: RoundInputs, step: torch.Tensor, alpha_hat: np.ndarray, removed: np.ndarray,
                    diagnostics: dict[str, Any]) -> RoundResult:
        """w_{t+1}: w_t + step (original), or the server momentum's weights (marsfl)."""
        if not self.marsfl:
            return finish(inputs, step, alpha_hat, removed, diagnostics)
        params = self.server.apply(inputs, step, self.name)
        return finish(inputs, None, alpha_hat, removed, diagnostics, params=params)

    def state_dict(self) -> dict[str, np.ndarray]:
        return self.server.state_dict()

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.server.load_state_dict(state, self.name)
