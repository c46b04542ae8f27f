"""Faulty clients: rows with NaN/inf weights or Fisher, or no samples, are set aside for the round.

The defense runs on the remaining rows, which keep their client ids (``RoundInputs.client_ids``):
a defense with per-client state finds each client's own history whoever is set aside. The
quarantined clients get alpha_hat 0 and are recorded in the round's ``quarantined`` column.
The run goes on.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from fdcr_mpi.defenses.base import Defense, RoundInputs, RoundResult
from fdcr_mpi.defenses.ops import RowsOnServer
from fdcr_mpi.store.schema import fill


def faulty_rows(inputs: RoundInputs) -> np.ndarray:
    """(K,) bool: rows whose weights or Fisher hold NaN/inf, or that claim no samples."""
    sizes = inputs.sizes.cpu()
    ok = torch.isfinite(inputs.client_weights).all(dim=1).cpu() & (sizes > 0) & torch.isfinite(sizes)
    if inputs.fisher is not None:
        ok &= torch.isfinite(inputs.fisher).all(dim=1).cpu()
    return (~ok).numpy()


def defend(defense: Defense, inputs: RoundInputs, healthy: np.ndarray | None = None) -> RoundResult:
    """``defense`` on the ``healthy`` rows of ``inputs`` (the clients' own check, or computed from
    the rows when None), its result spread back over every row. A reducible defense runs on
    ``RowsOnServer``, any other on the rows as ``RoundInputs``; the reduce path filters its rows
    with the same mask (``runtime.round``) and spreads its result with ``expand_result``."""
    if healthy is None:
        healthy = ~faulty_rows(inputs)
    keep = np.flatnonzero(healthy)
    k = inputs.num_clients
    if keep.size == 0:
        return kept_model(inputs.global_weights, k)
    if keep.size == k:
        return run(defense, inputs)
    rows = torch.from_numpy(keep)

    def kept(t: torch.Tensor) -> torch.Tensor:
        return t[rows.to(t.device)]

    subset = dataclasses.replace(  # every other field (round, seed, proxy, ...) as given
        inputs, client_weights=kept(inputs.client_weights), sizes=kept(inputs.sizes),
        fisher=None if inputs.fisher is None else kept(inputs.fisher),
        client_ids=inputs.ids[keep])  # the rows keep their client ids: per-client state stays aligned
    return expand_result(run(defense, subset), keep, k)


def run(defense: Defense, inputs: RoundInputs) -> RoundResult:
    """One round of ``defense`` on rows held by the server."""
    return defense.aggregate_ops(RowsOnServer(inputs)) if defense.reducible else defense.aggregate(inputs)


def kept_model(global_weights: torch.Tensor, num_clients: int) -> RoundResult:
    """Every participant quarantined: w_t is kept and nobody gets weight."""
    return RoundResult(weights=global_weights.clone(), alpha_hat=np.zeros(num_clients),
                       removed=np.zeros(num_clients, dtype=bool), diagnostics={})


def defend_with_quarantine(defense: Defense, inputs: RoundInputs) -> tuple[RoundResult, np.ndarray]:
    """``defend`` with the health computed from the rows; returns (result, the quarantined mask)."""
    quarantined = faulty_rows(inputs)
    return defend(defense, inputs, ~quarantined), quarantined


def expand_result(result: RoundResult, keep: np.ndarray, num_clients: int) -> RoundResult:
    """A defense's result on the kept rows, spread back to all K clients (the others get 0)."""
    alpha_hat = np.zeros(num_clients)
    removed = np.zeros(num_clients, dtype=bool)
    alpha_hat[keep] = result.alpha_hat
    removed[keep] = result.removed
    diagnostics: dict[str, object] = {}
    for name, value in result.diagnostics.items():
        array = np.asarray(value)
        if array.ndim == 1 and array.shape[0] == keep.size:
            dtype = array.dtype if array.dtype.kind in "bf" else np.dtype(np.int64)
            full = np.full(num_clients, fill(dtype), dtype=dtype)  # the run file's fill: nan, -1 or False
            full[keep] = array
            diagnostics[name] = full
        else:
            diagnostics[name] = value
    return RoundResult(weights=result.weights, alpha_hat=alpha_hat, removed=removed, diagnostics=diagnostics)
