"""Fault injection for resilience tests (``runtime.fault``): a rank or client fails on purpose."""

from __future__ import annotations

import os

import numpy as np

from fdcr_mpi.runtime.protocol import SIZE, SendBlocks


class InjectedFault(RuntimeError):
    """The failure that ``runtime.fault`` asked for (a resilience test, not a bug)."""


def inject_fault(fault, rank: int, client: int, round_: int, blocks: SendBlocks, row: int) -> None:
    """``runtime.fault``: make this rank or client fail on purpose (resilience tests).

    ``exit`` ends the process at once (``os._exit(13)``) on a client rank under MPI, as a rank
    that dies does; in one process it raises ``InjectedFault`` so that the run is marked failed.
    """
    if fault.kind == "none" or fault.rank != rank or fault.round != round_:
        return
    if fault.client is not None and fault.client != client:
        return
    if fault.kind == "raise":
        raise InjectedFault(f"injected fault in client {client} in round {round_ + 1} (runtime.fault.round={round_})")
    if fault.kind == "exit":
        if rank == 0:
            raise InjectedFault(f"injected exit of client {client} in round {round_ + 1} (runtime.fault.round={round_})")
        os._exit(13)
    if fault.kind in ("nan", "inf"):
        blocks.weights[row, ::7] = np.nan if fault.kind == "nan" else np.inf
    if fault.kind == "short":
        blocks.meta[row, SIZE] = 0
