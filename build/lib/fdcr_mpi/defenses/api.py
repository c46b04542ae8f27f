"""``aggregate``: one server step of any registered defense, for use outside the simulator.

No MPI, no config file: arrays in, the new global model and the per-client decision out.

    >>> from fdcr_mpi.defenses import aggregate
    >>> res = aggregate("fdcr", w_t, client_ws, fisher, sizes, lr=0.01)
    >>> res.weights, res.alpha_hat, res.removed, res.diagnostics["discrepancy"]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fdcr_mpi.defenses.base import Defense, ProxyData, RoundInputs, create
from fdcr_mpi.errors import UserError

ArrayLike = np.ndarray | torch.Tensor


@dataclass
class AggregateResult:
    """weights: w_{t+1} (D,), numpy float32 when ``global_weights`` was numpy, else a float32
    torch tensor on its device. alpha_hat: (K,) float64, the weight each client got (0 if
    removed). removed: (K,) bool. diagnostics: the defense's named values."""

    weights: ArrayLike
    alpha_hat: np.ndarray
    removed: np.ndarray
    diagnostics: dict[str, Any] = field(default_factory=dict)


def _as_tensor(x: Any, what: str, dtype: torch.dtype, device: torch.device | None) -> torch.Tensor:
    try:
        t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError) as exc:
        raise UserError(f"{what} is not a numeric array: {exc}") from None
    if t.dtype == torch.bool and dtype != torch.bool:
        raise UserError(f"{what} must hold numbers, not booleans")
    return t.to(device=device, dtype=dtype)


def aggregate(
    name: str | Defense,
    global_weights: ArrayLike,
    client_weights: ArrayLike,
    fisher: ArrayLike | None = None,
    sizes: ArrayLike | None = None,
    *,
    lr: float = 0.01,
    trainable: ArrayLike | None = None,
    round: int = 0,
    total_rounds: int | None = None,
    proxy: ProxyData | None = None,
    seed: int = 0,
    fresh_model: Callable[[int], torch.Tensor] | None = None,
    client_ids: ArrayLike | None = None,
    **options: Any,
) -> AggregateResult:
    """Run one aggregation step of the defense ``name`` with ``options`` (its ``Options`` fields).

    global_weights: w_t, (D,). client_weights: w_k, (K, D). fisher: F_k, (K, D), for the
    defenses that need it. sizes: N_k, (K,); None means equal weights. trainable: (D,) bool,
    None means every entry is a trainable parameter. lr: the clients' learning rate eta.
    numpy arrays or torch tensors; the computation runs in float32 on the device of
    ``global_weights``. total_rounds defaults to round + 1. seed: the run's seed, which the
    defense's random draws derive from; fresh_model: seed -> a newly initialised model's (D,)
    weights (the MarsFL variants with server momentum start from one); client_ids: the client of
    each row (None: 0..K-1), which per-client state (FoolsGold's history) is kept by.
    ``name`` may also be a ``Defense`` instance (to keep a stateful defense across rounds;
    ``options`` must then be empty). Bad shapes, names or options raise ``UserError``.
    """
    if isinstance(name, Defense):
        if options:
            raise UserError("pass options either to the Defense instance or to aggregate(), not both")
        defense = name
    else:
        defense = create(name, **options)

    device = global_weights.device if isinstance(global_weights, torch.Tensor) else None
    w_t = _as_tensor(global_weights, "global_weights", torch.float32, device)
    w = _as_tensor(client_weights, "client_weights", torch.float32, device)
    if w_t.ndim != 1:
        raise UserError(f"global_weights must be a vector (D,), got shape {tuple(w_t.shape)}")
    dim = int(w_t.shape[0])
    if w.ndim != 2 or w.shape[1] != dim or w.shape[0] < 1:
        raise UserError(
            f"client_weights must be (K, D) = (K, {dim}) with K >= 1 to match global_weights, "
            f"got shape {tuple(w.shape)}"
        )
    num_clients = int(w.shape[0])

    f = None
    if fisher is not None:
        f = _as_tensor(fisher, "fisher", torch.float32, device)
        if tuple(f.shape) != tuple(w.shape):
            raise UserError(f"fisher must have the shape of client_weights {tuple(w.shape)}, got {tuple(f.shape)}")

    if sizes is None:
        n = torch.ones(num_clients, dtype=torch.float64)
    else:
        n = _as_tensor(sizes, "sizes", torch.float64, None)
        if tuple(n.shape) != (num_clients,):
            raise UserError(f"sizes must be a vector of the K = {num_clients} sample counts, got shape {tuple(n.shape)}")
        if not bool(torch.isfinite(n).all()) or bool((n < 0).any()) or not float(n.sum()) > 0:
            raise UserError(f"sizes must be finite, non-negative and not all zero, got {n.tolist()}")

    mask = None
    if trainable is not None:
        mask = _as_tensor(trainable, "trainable", torch.bool, device)
        if tuple(mask.shape) != (dim,):
            raise UserError(f"trainable must be a (D,) = ({dim},) mask, got shape {tuple(mask.shape)}")

    if not (np.isfinite(lr) and lr > 0):
        raise UserError(f"lr must be a positive number, got {lr}")

    ids = None
    if client_ids is not None:
        ids = np.asarray(client_ids.cpu() if isinstance(client_ids, torch.Tensor) else client_ids)
        if ids.shape != (num_clients,) or ids.dtype.kind not in "iu" or np.unique(ids).size != num_clients:
            raise UserError(f"client_ids must be {num_clients} distinct integers, one per row, got {ids.tolist()}")

    inputs = RoundInputs(
        global_weights=w_t,
        client_weights=w,
        sizes=n,
        fisher=f,
        trainable=mask,
        lr=float(lr),
        round=int(round),
        total_rounds=int(round) + 1 if total_rounds is None else int(total_rounds),
        proxy=proxy,
        client_ids=ids,
        seed=int(seed),
        fresh_model=fresh_model,
    )
    result = defense.aggregate(inputs)
    weights: ArrayLike = result.weights.detach()
    if isinstance(global_weights, torch.Tensor):
        weights = weights.to(device=global_weights.device, dtype=torch.float32)
    else:
        weights = weights.cpu().numpy().astype(np.float32, copy=True)
    return AggregateResult(
        weights=weights,
        alpha_hat=np.asarray(result.alpha_hat, dtype=np.float64),
        removed=np.asarray(result.removed, dtype=bool),
        diagnostics=dict(result.diagnostics),
    )
