"""Where a rank runs: its node, its device and how many clients it trains at once.

Rank 0 is the server: it runs on the CPU (its arithmetic, the defenses and the proxy training of
some of them, is the same on every node type) and, in one-process mode, also hosts every client.
The client ranks of a node take the GPUs visible to them in turn by their index among the node's
client ranks (rank 0 is never counted), so with G GPUs and G client ranks per node each rank
owns one GPU. When SLURM or the user gives each task its own ``CUDA_VISIBLE_DEVICES``, a task
sees one GPU and takes it. More client ranks than GPUs share them round-robin (for small models
run the CUDA MPS daemon, see docs/CLUSTER.md).

Every client's computation uses ``runtime.client_threads`` intra-op threads (1 by default), a
fixed number, so its arithmetic never depends on the node's core count or the rank count. A CPU
rank uses its spare cores by training several clients at once, one per worker thread
(``workers``); a GPU rank trains one client (or one batched group) at a time on its GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from fdcr_mpi.errors import UserError


@dataclass(frozen=True)
class Node:
    """The ranks sharing this rank's node, from every rank's node name (in rank order)."""

    name: str
    ranks: tuple[int, ...]

    @classmethod
    def of(cls, rank: int, node_names: list[str]) -> Node:
        name = node_names[rank]
        return cls(name, tuple(r for r, n in enumerate(node_names) if n == name))

    @property
    def client_ranks(self) -> tuple[int, ...]:
        """The node's ranks that host clients (every rank but the server, rank 0)."""
        return tuple(r for r in self.ranks if r != 0)

    def client_index(self, rank: int) -> int:
        """``rank``'s position among the node's client ranks (0 for rank 0 in one-process mode)."""
        ranks = self.client_ranks
        return ranks.index(rank) if rank in ranks else 0


def node_name() -> str:
    """This process's node: ``$FDCR_NODE_NAME`` when set (containers whose host names repeat,
    tests that simulate several nodes), else the host name."""
    import socket

    return os.environ.get("FDCR_NODE_NAME") or socket.gethostname()


def cuda_count() -> int:
    """The number of CUDA GPUs visible to this process (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def select_device(preference: str, hosts_clients: bool, client_index: int) -> torch.device:
    """The device of a rank's clients: ``cpu``, ``cuda`` (a GPU is required) or ``auto`` (a GPU
    when one is visible). A rank that hosts no client (the server under MPI) stays on the CPU."""
    if preference == "cpu" or not hosts_clients:
        return torch.device("cpu")
    count = cuda_count()
    if count == 0:
        if preference == "cuda":
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            hint = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
            built = "" if torch.backends.cuda.is_built() else "; this torch is a CPU-only build"
            raise UserError(f"runtime.device is 'cuda' but no CUDA GPU is visible to this process{hint}{built}; "
                            "use runtime.device=auto or cpu, or give the job a GPU")
        return torch.device("cpu")
    device = torch.device("cuda", client_index % count)
    torch.cuda.set_device(device)
    return device


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity: SLURM's and taskset's binding)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def default_threads(cores: int, sharing: int) -> int:
    """The cores of a rank whose ``cores`` are shared with ``sharing`` client ranks (those on its node
    whose CPU affinity overlaps its own), at least one."""
    return max(1, cores // max(sharing, 1))


def workers(threads: int, client_threads: int, device: torch.device) -> int:
    """How many clients a rank trains at once: its threads over the threads of one client on a
    CPU; one at a time on a GPU (batched groups fill a GPU, threads would only contend for it)."""
    if device.type != "cpu":
        return 1
    return max(1, threads // max(client_threads, 1))
