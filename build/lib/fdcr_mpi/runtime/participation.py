"""Which clients train in a round (``clients_per_round``) and where their rows come from.

The draw depends on (seed, round) only, so every rank computes the same participants and
the result does not depend on how the job is launched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fdcr_mpi import seeding


def select_clients(seed: int, num_clients: int, per_round: int | None, round_: int) -> np.ndarray:
    """The participants of round ``round_``, ascending: all K, or ``per_round`` drawn without
    replacement from the generator of (seed, SELECT, round)."""
    if per_round is None or per_round >= num_clients:
        return np.arange(num_clients)
    rng = seeding.numpy_rng(seed, seeding.SELECT, round_)
    return np.sort(rng.choice(num_clients, size=per_round, replace=False))


@dataclass(frozen=True)
class RoundPlan:
    """A round's participants and how many of them each rank hosts (rows of the gathers)."""

    selected: np.ndarray
    rows_per_rank: list[int]

    @classmethod
    def make(cls, seed: int, num_clients: int, per_round: int | None, round_: int,
             blocks: list[list[int]]) -> RoundPlan:
        selected = select_clients(seed, num_clients, per_round, round_)
        chosen = np.zeros(num_clients, dtype=bool)
        chosen[selected] = True
        return cls(selected=selected, rows_per_rank=[int(chosen[b].sum()) for b in blocks])

    def spread(self, values: np.ndarray, num_clients: int, fill: object) -> np.ndarray:
        """Per-participant values as a (K,) array in client order, ``fill`` for the others (the run
        file's fill for the values' dtype: ``store.schema.fill``)."""
        values = np.asarray(values)
        out = np.full(num_clients, fill, dtype=values.dtype if values.dtype.kind != "f" else np.float64)
        out[self.selected] = values
        return out
