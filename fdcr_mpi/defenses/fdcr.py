"""FDCR: Fisher Discrepancy Cluster and Rescale (docs/SPEC.md section 2, paper Eqs. 6-12).

Server step, one function per equation:

    I_k     = (F_k - min F_k) / max(max F_k - min F_k, tiny)          Eq. 6   importance
    g_k     = (w_k - w_t) / eta                                       Eq. 7   client_update
    gt_k    = g_k * I_k                                               Eq. 8   weighted_update
    gt      = sum_k alpha_k gt_k                                      Eq. 9a  global_weighted_update
    V_k     = sum_v (gt - gt_k)_v^2 / |w|   (mse)  or ||gt - gt_k||_2 Eq. 9b  discrepancy
    cluster V, the cluster with the largest mean is malicious         Eq. 10  clustering.py
    alpha_hat_k = 0 (malicious) or alpha_k / sum_benign alpha_j       Eq. 11  reallocate
    s_k = 2 sigmoid(I_k);  what_k = w_t + s_k (w_k - w_t)             Eq. 12  rescale_factor, rescale
    w_{t+1} = sum_k alpha_hat_k what_k                                        new_global_model

The (K, D) arithmetic is float32 torch; per-client scalars (alpha, V) are float64. Sums over
clients run in client-id order and sums over entries use numpy's pairwise float64 sum, so
the result is bit-identical from run to run. Nothing here reads the ground truth: the
released code's replacement of the attackers' Fisher vectors by noise is not part of it.

Ablations (paper Tables 2 and 3):
  use_importance = false: I_k = 1 in Eq. 8 only (detection on the raw updates, Table 2 is an
      ablation of I_k "in FCDC Eq. (8)"); FPRA keeps the Fisher importance I_k of Eq. 6, so
      this switch changes detection and nothing else.
  fcdc = false: no detection, alpha_hat = alpha (V is still reported; no clustering).
  fpra = false: s_k = 1, what_k = w_k exactly.
With use_importance and fpra both off the Fisher vectors are not used and may be absent.

variant = released: the server step of the authors' released code (``Server/OurRandomControl.py``
in the FDCR repository): Eq. 9b is the l2 distance ||gt - gt_k||_2 (``discrepancy`` has no
effect), and when the clustering finds a single cluster (the released FINCH then returns no
partition) nobody is removed and FPRA is skipped: w_{t+1} = sum_k alpha_k w_k, plain FedAvg.
The released code's client side (its Fisher estimator, the attackers' data) is in config
options of other sections (docs/METHOD.md, "The released code"); its replacement of the
attackers' Fisher vectors is reproduced by the attackers themselves (attack.fisher: noise),
never by the server.

Detection (Eqs. 6-9b) uses the whole flat vector, as the specification states (buffer
entries have F = 0, hence I = 0, and add nothing to V unless use_importance is off). FPRA
applies to trainable entries only; buffers (BatchNorm statistics) are averaged with
alpha_hat, i.e. what_k = w_k there.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pydantic
import torch

from fdcr_mpi.defenses.base import Defense, RoundResult, register
from fdcr_mpi.defenses.clustering import DEFAULT_DBSCAN_EPS, cluster_labels, largest_mean_cluster
from fdcr_mpi.defenses.ops import ClientOps, ordered_weighted_sum
from fdcr_mpi.errors import UserError

TINY = float(torch.finfo(torch.float32).tiny)


def importance(fisher: torch.Tensor) -> torch.Tensor:
    """Eq. 6: I_k = (F_k - min F_k) / max(max F_k - min F_k, tiny), per row over all entries.

    ``fisher`` is (D,) or (K, D); float32 out in [0, 1]. A constant F_k gives I_k = 0.
    """
    f = fisher.to(torch.float32)
    lo = f.amin(dim=-1, keepdim=True)
    hi = f.amax(dim=-1, keepdim=True)
    return (f - lo) / torch.clamp(hi - lo, min=TINY)


def client_update(client_weights: torch.Tensor, global_weights: torch.Tensor, lr: float) -> torch.Tensor:
    """Eq. 7: g_k = (w_k - w_t) / eta, float32, (K, D) (or (D,) for one client)."""
    return (client_weights.to(torch.float32) - global_weights.to(torch.float32)) / lr


def weighted_update(update: torch.Tensor, imp: torch.Tensor | None) -> torch.Tensor:
    """Eq. 8: gt_k = g_k * I_k elementwise; ``imp=None`` means I_k = 1 (the use_importance ablation)."""
    return update if imp is None else update * imp


def global_weighted_update(weighted: torch.Tensor, alpha: np.ndarray) -> torch.Tensor:
    """Eq. 9a: gt = sum_k alpha_k gt_k with the original alpha_k = N_k / N, in client order."""
    return ordered_weighted_sum(alpha, weighted)


def discrepancy(
    global_weighted: torch.Tensor, weighted: torch.Tensor, kind: Literal["mse", "l2"] = "mse"
) -> np.ndarray:
    """Eq. 9b: V_k = sum_v (gt - gt_k)_v^2 / |w| (mse) or ||gt - gt_k||_2 (l2); (K,) float64.

    The differences are float32; their squares are summed in float64.
    """
    num_entries = weighted.shape[-1]
    out = np.empty(weighted.shape[0], dtype=np.float64)
    for k in range(weighted.shape[0]):
        d = (global_weighted - weighted[k]).detach().cpu().numpy().astype(np.float64)
        sq = float(np.sum(d * d))
        out[k] = sq / num_entries if kind == "mse" else np.sqrt(sq)
    return out


def reallocate(alpha: np.ndarray, malicious: np.ndarray) -> np.ndarray:
    """Eq. 11: alpha_hat_k = 0 for the malicious set, alpha_k / sum_{j benign} alpha_j otherwise."""
    a = np.asarray(alpha, dtype=np.float64)
    benign = ~np.asarray(malicious, dtype=bool)
    total = float(a[benign].sum())
    if not total > 0.0:
        raise ValueError("Eq. 11: the benign clients hold no weight (sum of their alpha is 0)")
    return np.where(benign, a / total, 0.0)


def rescale_factor(imp: torch.Tensor) -> torch.Tensor:
    """Eq. 12: s_k = 2 sigmoid(I_k) elementwise, in [1, 2e/(1+e)] = [1, 1.462] for I_k in [0, 1]."""
    return 2.0 * torch.sigmoid(imp.to(torch.float32))


def rescale(
    global_weights: torch.Tensor,
    client_weights: torch.Tensor,
    factor: torch.Tensor | None,
    trainable: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 12: what_k = w_t + s_k (w_k - w_t) on trainable entries; what_k = w_k on buffers.

    The client's own step, amplified where its parameters matter (the released code's
    self-consistent reading). ``factor=None`` is the fpra ablation: what_k = w_k exactly.
    """
    w_k = client_weights.to(torch.float32)
    if factor is None:
        return w_k
    w_t = global_weights.to(torch.float32)
    stepped = w_t + factor * (w_k - w_t)
    return stepped if trainable is None else torch.where(trainable, stepped, w_k)


def new_global_model(
    alpha_hat: np.ndarray,
    global_weights: torch.Tensor,
    client_weights: torch.Tensor,
    imp: torch.Tensor | None,
    trainable: torch.Tensor | None = None,
) -> torch.Tensor:
    """w_{t+1} = sum_k alpha_hat_k what_k, what_k from Eq. 12 (``imp=None``: no rescale).

    One rescaled row at a time, in client order; removed clients (alpha_hat_k = 0) are skipped.
    """
    out = torch.zeros(client_weights.shape[1], dtype=torch.float32, device=client_weights.device)
    for k in range(client_weights.shape[0]):
        if alpha_hat[k] == 0.0:
            continue
        factor = None if imp is None else rescale_factor(imp[k])
        out += rescale(global_weights, client_weights[k], factor, trainable) * float(np.float32(alpha_hat[k]))
    return out


class FdcrOptions(pydantic.BaseModel):
    """The ``fdcr.*`` config section (docs/SPEC.md section 2)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    variant: Literal["paper", "released"] = "paper"
    """paper (the specification) or released (the authors' released server step: l2 discrepancy,
    no FPRA when the clustering finds one cluster)."""
    discrepancy: Literal["mse", "l2"] = "mse"
    """Eq. 9b: mse (paper, default) or l2 (released code)."""
    clustering: Literal["finch", "kmeans", "dbscan"] = "finch"
    """Eq. 10: FINCH (paper) or the Table 1 alternatives."""
    partition_level: int = pydantic.Field(0, ge=0)
    """FINCH partition c[:, level], clamped to the coarsest one returned."""
    dbscan_eps: float = pydantic.Field(DEFAULT_DBSCAN_EPS, gt=0)
    """DBSCAN radius relative to max V (V is divided by its largest value first), so it is
    independent of the scale of V (mse vs l2, model size, learning rate)."""
    dbscan_min_samples: int = pydantic.Field(2, ge=1)
    use_importance: bool = True
    """False: I_k = 1 in Eq. 8 (detection on raw updates); FPRA still uses the Fisher I_k."""
    fcdc: bool = True
    """False: no detection, alpha_hat = alpha."""
    fpra: bool = True
    """False: no rescale, s_k = 1."""


@register("fdcr")
class Fdcr(Defense):
    """FDCR (NeurIPS 2024): Fisher-weighted discrepancy, FINCH, reallocation and rescale."""

    summary = "FDCR: Fisher-importance discrepancy clustering (FCDC) + Fisher rescale (FPRA)"
    needs_fisher = True
    reducible = True
    Options = FdcrOptions

    def server_imports(self) -> tuple[str, ...]:
        if not self.options.fcdc:
            return ()
        return ("finch",) if self.options.clustering == "finch" else ("sklearn.cluster",)

    def aggregate_ops(self, ops: ClientOps) -> RoundResult | None:
        """Eqs. 6-12 over the clients (defenses/ops.py): gt (Eq. 9a) is a weighted sum every holder
        of rows gets, V_k and the importance sums go to the server as one value per client, the
        server clusters and sends alpha_hat back, and w_{t+1} (Eq. 12) is a weighted sum of the
        rescaled rows, computed chunk by chunk. On rows held by the server this is the plain
        computation; across ranks every sum is an exact reduction."""
        opt: FdcrOptions = self.options  # type: ignore[assignment]
        self.check_inputs(ops.fisher, ops.weights, ops.lr)
        w_t, w, fisher = ops.global_weights, ops.weights, ops.fisher
        trainable = None if ops.trainable is None else ops.trainable.to(torch.bool)
        imp = (lambda idx: importance(fisher[idx])) if fisher is not None else (lambda idx: None)  # noqa: E731  Eq. 6

        gt_k = torch.empty_like(w)
        imp_sums_local = np.zeros(w.shape[0])
        for idx in ops.chunks():  # Eqs. 6-8
            imp_k = imp(idx)
            gt_k[idx] = weighted_update(client_update(w[idx], w_t, ops.lr), imp_k if opt.use_importance else None)
            imp_sums_local[idx] = importance_sums(imp_k, len(idx))

        fpra = opt.fpra  # the released variant decides on the server, after the clustering

        def rescaled_rows(idx: np.ndarray) -> torch.Tensor:  # Eq. 12, what_k
            factor = rescale_factor(imp(idx)) if fpra and fisher is not None else None
            return rescale(w_t, w[idx], factor, trainable)

        def bounds() -> np.ndarray:  # |what_k| <= |w_t| + 2 sigmoid(1) |w_k - w_t|: the fixed-point scale
            step = np.zeros(w.shape[0])
            for idx in ops.chunks():
                step[idx] = (w[idx] - w_t).abs().amax(dim=1).double().cpu().numpy()
            return float(w_t.abs().max()) + 1.5 * step

        gt = ops.weighted_sum(ops.alpha, gt_k, to_all=True)  # Eq. 9a
        v = ops.gather(discrepancy(gt, gt_k, self.discrepancy_kind))  # Eq. 9b
        imp_sums = ops.gather(imp_sums_local)
        del gt_k, gt
        if ops.is_server:
            labels, removed, alpha_hat, num_clusters = self.detect(v, ops.alpha_all)  # Eqs. 10-11
        mine = ops.scatter(alpha_hat if ops.is_server else None)
        if opt.variant == "released" and opt.fpra:  # every holder of rows must know whether FPRA runs
            flags = ops.scatter(np.full(ops.participants, float(self.rescales(num_clusters))) if ops.is_server
                                else None)
            fpra = bool(flags[0]) if flags.size else False
        weights = ops.weighted_sum(mine, rescaled_rows, to_all=False, bounds=bounds)  # Eq. 12
        if not ops.is_server:
            return None
        return RoundResult(weights=weights, alpha_hat=alpha_hat, removed=removed,
                           diagnostics=self.diagnostics(v, imp_sums, labels, num_clusters))

    @property
    def discrepancy_kind(self) -> Literal["mse", "l2"]:
        """Eq. 9b's form: ``discrepancy`` (paper variant) or l2 (released variant)."""
        opt: FdcrOptions = self.options  # type: ignore[assignment]
        return "l2" if opt.variant == "released" else opt.discrepancy

    def rescales(self, num_clusters: int) -> bool:
        """Whether FPRA (Eq. 12) runs this round: ``fpra``, except that the released code skips it
        when the clustering found a single cluster (its FINCH returns no partition)."""
        opt: FdcrOptions = self.options  # type: ignore[assignment]
        return opt.fpra and not (opt.variant == "released" and opt.fcdc and num_clusters <= 1)

    def detect(self, v: np.ndarray, alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """Eqs. 10-11: cluster labels, the removed mask, alpha_hat and the number of clusters."""
        opt: FdcrOptions = self.options  # type: ignore[assignment]
        if not opt.fcdc:
            return np.full(v.size, -1, dtype=np.int64), np.zeros(v.size, dtype=bool), alpha.copy(), 0
        labels = cluster_labels(v, opt.clustering, partition_level=opt.partition_level,
                                dbscan_eps=opt.dbscan_eps, dbscan_min_samples=opt.dbscan_min_samples)
        removed = largest_mean_cluster(v, labels)
        return labels, removed, reallocate(alpha, removed), int(np.unique(labels).size)

    @staticmethod
    def diagnostics(v: np.ndarray, imp_sums: np.ndarray, labels: np.ndarray, num_clusters: int) -> dict[str, object]:
        return {"discrepancy": v, "importance_sum": imp_sums, "cluster": labels, "num_clusters": num_clusters}

    def check_inputs(self, fisher: torch.Tensor | None, w: torch.Tensor, lr: float) -> None:
        """One sentence for inputs FDCR cannot use."""
        opt: FdcrOptions = self.options  # type: ignore[assignment]
        if fisher is None and (opt.use_importance or opt.fpra):
            raise UserError(
                "defense 'fdcr' needs the clients' Fisher vectors (RoundInputs.fisher / "
                "aggregate(..., fisher=...)); only with fdcr.use_importance and fdcr.fpra "
                "both false can it run without them"
            )
        if fisher is not None and tuple(fisher.shape) != tuple(w.shape):
            raise UserError(
                f"defense 'fdcr': the Fisher vectors have shape {tuple(fisher.shape)}, "
                f"the client weights {tuple(w.shape)}"
            )
        if not lr > 0:
            raise UserError(f"defense 'fdcr' needs a positive local learning rate, got {lr}")


def importance_sums(imp: torch.Tensor | None, num_clients: int) -> np.ndarray:
    """sum_v I_k,v per client (float64 sums), NaN without Fisher vectors (a diagnostic)."""
    if imp is None:
        return np.full(num_clients, np.nan)
    return np.array([float(np.sum(imp[k].cpu().numpy(), dtype=np.float64)) for k in range(num_clients)])
