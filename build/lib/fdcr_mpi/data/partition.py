"""Client partitions (Dirichlet label skew or IID), train/validation/proxy splits, attacker ids.

Every draw comes from the ``np.random.Generator`` passed in, so each result is a function
of that generator's seed alone.
"""

from __future__ import annotations

import math

import numpy as np

from fdcr_mpi.errors import UserError

_EPS = 1e-9  # guards floor(ratio * K) against 0.29 * 100 = 28.999999999999996


def dirichlet_partition(
    labels: np.ndarray,
    num_clients: int,
    beta: float | str,
    rng: np.random.Generator,
    min_size: int = 10,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Sorted int64 index arrays into ``labels``, one per client (docs/SPEC.md section 3).

    Per class: p ~ Dir(beta * 1_K), p_j = 0 for clients already holding >= N / K samples,
    renormalise, split the shuffled class indices at the cumulative proportions. The whole
    partition is drawn again until every client holds >= ``min_size`` samples.
    ``beta == "iid"`` is an equal random split.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if num_clients < 1:
        raise UserError(f"the number of clients must be at least 1, got {num_clients}")
    if num_clients * min_size > n:
        raise UserError(
            f"more clients than samples: {num_clients} clients of at least {min_size} samples "
            f"need {num_clients * min_size}, but the training pool holds {n}"
        )
    if isinstance(beta, str) and beta.strip().lower() == "iid":
        return _iid(n, num_clients, rng)
    concentration = _beta_value(beta)
    for _ in range(max_tries):
        parts = _dirichlet_once(labels, num_clients, concentration, rng)
        if parts is not None and min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise UserError(
        f"no Dirichlet partition with beta={concentration} gave each of {num_clients} clients at "
        f"least {min_size} samples in {max_tries} tries; raise the beta or use fewer clients"
    )


def _beta_value(beta: float | str) -> float:
    """``beta`` as a positive float, or a UserError."""
    try:
        value = float(beta)
    except (TypeError, ValueError):
        value = float("nan")
    if not (value > 0 and math.isfinite(value)):
        raise UserError(f"the Dirichlet beta must be a positive number or 'iid', got {beta!r}")
    return value


def _iid(n: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """An equal random split of range(n) into ``num_clients`` parts (sizes differ by at most 1)."""
    perm = rng.permutation(n)
    return [np.sort(part).astype(np.int64) for part in np.array_split(perm, num_clients)]


def _dirichlet_once(
    labels: np.ndarray, num_clients: int, beta: float, rng: np.random.Generator
) -> list[list[int]] | None:
    """One draw of the Dirichlet partition; None when a class's proportions all vanish."""
    cap = len(labels) / num_clients
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        p = rng.dirichlet(np.full(num_clients, beta))
        p = p * np.array([len(part) < cap for part in parts])
        total = p.sum()
        if not total > 0:
            return None
        cuts = (np.cumsum(p / total) * len(idx)).astype(int)[:-1]
        for part, chunk in zip(parts, np.split(idx, cuts)):
            part.extend(chunk.tolist())
    return parts


def train_val_split(
    n: int, rng: np.random.Generator, val_fraction: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, val) indices of range(n) from a seeded permutation; val holds round(f * n)."""
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"the validation fraction must be in [0, 1), got {val_fraction}")
    perm = rng.permutation(n).astype(np.int64)
    n_val = int(round(val_fraction * n))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def proxy_indices(val_idx: np.ndarray, rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A sorted seeded subset of ``size`` entries of ``val_idx``: the server's proxy set."""
    val_idx = np.asarray(val_idx, dtype=np.int64)
    if size > len(val_idx):
        raise UserError(
            f"the validation split holds {len(val_idx)} samples, fewer than the {size} the "
            f"server's proxy set needs; use a larger dataset or a smaller proxy size"
        )
    return np.sort(rng.choice(val_idx, size=size, replace=False))


def choose_malicious(
    num_clients: int, ratio: float, mode: str, rng: np.random.Generator
) -> np.ndarray:
    """Bool (K,) ground truth: floor(ratio * K) attackers, the last ids or a seeded choice."""
    if not 0.0 <= ratio <= 1.0:
        raise UserError(f"attack.malicious_ratio must be in [0, 1], got {ratio}")
    if mode not in ("last", "random"):
        raise UserError(
            f"attack.malicious_ids has the invalid value {mode!r}; choose one of: last, random"
        )
    count = int(math.floor(ratio * num_clients + _EPS))
    if ratio > 0 and count == 0:
        raise UserError(
            f"attack.malicious_ratio {ratio} gives no attacker among {num_clients} clients; "
            f"raise the ratio to at least {1 / num_clients:.3g} or set it to 0"
        )
    malicious = np.zeros(num_clients, dtype=bool)
    if mode == "last":
        malicious[num_clients - count :] = True
    else:
        malicious[rng.choice(num_clients, size=count, replace=False)] = True
    return malicious
