"""Moving flat buffers between the server (rank 0) and the client ranks.

This is the only module that imports mpi4py. ``LocalTransport`` runs everything in one
process; ``MpiTransport`` uses buffer-based collectives (``Bcast`` of w_t, ``Gatherv`` of
the clients' rows), as in mpi4py's demos.

Placement: rank 0 is the server and hosts no client; clients are dealt to ranks 1..P-1 in
contiguous, balanced blocks of ids (``np.array_split``), so ``Gatherv`` lands every row in
client-id order with no permutation copy (dealing k mod (P-1) would give the same balance but
need a permutation). Ranks beyond K hold no client.

Waiting ranks do not busy-poll: before each collective that may wait long, every rank
enters an ``Ibarrier`` and sleeps between tests (MPICH spins a core inside a blocking
collective otherwise, halving the speed of the ranks that are working).
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from typing import Any, Protocol

import numpy as np

from fdcr_mpi.errors import UserError

ABORT_GRACE = 1.0  # seconds between a failing rank's report and MPI_Abort (see MpiTransport.abort)

MPI_ENV_VARS = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS",
                "HYDI_CONTROL_FD", "PMI_FD")


def client_blocks(num_clients: int, num_ranks: int, group: int = 1) -> list[list[int]]:
    """Client ids hosted by each rank: rank 0 none, ranks 1..P-1 contiguous balanced blocks.

    With one rank, rank 0 hosts everyone. ``group`` > 1 (batched training, ``train.batch_clients``)
    keeps each group of ids [jG, (j+1)G) on one rank: the groups, not the clients, are dealt out.
    """
    if num_ranks == 1:
        return [list(range(num_clients))]
    groups = [list(range(start, min(start + group, num_clients))) for start in range(0, num_clients, group)]
    return [[]] + [[k for g in part for k in groups[g]]
                   for part in np.array_split(np.arange(len(groups)), num_ranks - 1)]


class Transport(Protocol):
    rank: int
    size: int

    @property
    def is_server(self) -> bool: ...

    def clients_of(self, rank: int, num_clients: int, group: int = 1) -> list[int]: ...

    def broadcast(self, buf: np.ndarray) -> None: ...

    def gather_rows(self, send: np.ndarray, recv: np.ndarray | None, rows_per_rank: list[int]) -> None: ...

    def allgather_rows(self, send: np.ndarray, recv: np.ndarray, rows_per_rank: list[int]) -> None: ...

    def sum_int64(self, buf: np.ndarray, to_all: bool) -> None: ...

    def max_all(self, value: float) -> float: ...

    def wait_quietly(self) -> None: ...

    def first_error(self, message: str | None) -> str | None: ...

    def allgather(self, value: object) -> list[object]: ...

    def share(self, value: object) -> object: ...

    def abort(self, code: int) -> None: ...

    def describe(self) -> str: ...


class LocalTransport:
    """One process: rank 0 is the server and hosts every client; collectives are no-ops."""

    rank = 0
    size = 1
    is_server = True

    def clients_of(self, rank: int, num_clients: int, group: int = 1) -> list[int]:
        return client_blocks(num_clients, 1)[rank]

    def broadcast(self, buf: np.ndarray) -> None:
        return None

    def gather_rows(self, send: np.ndarray, recv: np.ndarray | None, rows_per_rank: list[int]) -> None:
        if recv is not None and send is not recv:
            recv[: rows_per_rank[0]] = send[: rows_per_rank[0]]

    def allgather_rows(self, send: np.ndarray, recv: np.ndarray, rows_per_rank: list[int]) -> None:
        self.gather_rows(send, recv, rows_per_rank)

    def sum_int64(self, buf: np.ndarray, to_all: bool) -> None:
        return None

    def max_all(self, value: float) -> float:
        return value

    def wait_quietly(self) -> None:
        return None

    def first_error(self, message: str | None) -> str | None:
        return message

    def allgather(self, value: object) -> list[object]:
        return [value]

    def share(self, value: object) -> object:
        return value

    def abort(self, code: int) -> None:
        sys.exit(code)

    def describe(self) -> str:
        return "one process"


class MpiTransport:
    """MPI_COMM_WORLD: rank 0 is the server, ranks 1..P-1 host the clients."""

    def __init__(self) -> None:
        import warnings

        with warnings.catch_warnings():  # a world of one under another launcher: make_transport says it
            warnings.filterwarnings("ignore", message="suspicious MPI execution environment")
            from mpi4py import MPI

        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()

    @property
    def is_server(self) -> bool:
        return self.rank == 0

    def clients_of(self, rank: int, num_clients: int, group: int = 1) -> list[int]:
        return client_blocks(num_clients, self.size, group)[rank]

    def wait_quietly(self, max_sleep: float = 0.005) -> None:
        """An Ibarrier tested with growing sleeps: waiting ranks leave the cores to the working ones."""
        request = self.comm.Ibarrier()
        sleep = 1e-4
        while not request.Test():
            time.sleep(sleep)
            sleep = min(sleep * 2, max_sleep)

    def broadcast(self, buf: np.ndarray) -> None:
        """Bcast of a contiguous buffer from rank 0, in place on the others."""
        self.comm.Bcast(_contiguous(buf), root=0)

    def gather_rows(self, send: np.ndarray, recv: np.ndarray | None, rows_per_rank: list[int]) -> None:
        """Gatherv of the first ``rows_per_rank[r]`` rows of each rank's ``send`` into rank 0's ``recv``.

        Rows land in rank order; with clients in contiguous blocks that is client-id order.
        """
        counts, displs, mpi_type = self._layout(send, rows_per_rank)
        recvbuf: Any = [_contiguous(recv), (counts, displs), mpi_type] if self.rank == 0 else None
        self.comm.Gatherv([_contiguous(send), counts[self.rank], mpi_type], recvbuf, root=0)

    def allgather_rows(self, send: np.ndarray, recv: np.ndarray, rows_per_rank: list[int]) -> None:
        """Allgatherv: every rank gets every rank's first ``rows_per_rank[r]`` rows, in rank order."""
        counts, displs, mpi_type = self._layout(send, rows_per_rank)
        self.comm.Allgatherv([_contiguous(send), counts[self.rank], mpi_type],
                             [_contiguous(recv), (counts, displs), mpi_type])

    def _layout(self, send: np.ndarray, rows_per_rank: list[int]) -> tuple[list[int], list[int], Any]:
        width = int(np.prod(send.shape[1:])) if send.ndim > 1 else 1
        counts = [int(n) * width for n in rows_per_rank]
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()
        return counts, displs, self.MPI._typedict[send.dtype.char]

    def sum_int64(self, buf: np.ndarray, to_all: bool) -> None:
        """Integer sum over ranks, in place: Allreduce (``to_all``) or Reduce to rank 0.

        Integer addition is associative, so the total does not depend on how many ranks there
        are or how the terms are split among them (``fdcr_mpi.runtime.reduce_ops`` builds on this).
        """
        if buf.dtype != np.int64:
            raise ValueError("sum_int64 takes an int64 buffer")
        if to_all:
            self.comm.Allreduce(self.MPI.IN_PLACE, _contiguous(buf), op=self.MPI.SUM)
        elif self.rank == 0:
            self.comm.Reduce(self.MPI.IN_PLACE, _contiguous(buf), op=self.MPI.SUM, root=0)
        else:
            self.comm.Reduce(_contiguous(buf), None, op=self.MPI.SUM, root=0)

    def max_all(self, value: float) -> float:
        """The largest ``value`` over all ranks (Allreduce MAX of one float64)."""
        out = np.array([value], dtype=np.float64)
        self.comm.Allreduce(self.MPI.IN_PLACE, out, op=self.MPI.MAX)
        return float(out[0])

    def first_error(self, message: str | None) -> str | None:
        """Collective: the first rank's error message if any rank had one (so all ranks stop together)."""
        messages = self.comm.allgather(message)
        for rank, msg in enumerate(messages):
            if msg is not None:
                return msg if rank == 0 else f"rank {rank}: {msg}"
        return None

    def allgather(self, value: object) -> list[object]:
        """Collective: every rank's small ``value`` (a string, a dict of strings), in rank order."""
        return self.comm.allgather(value)

    def share(self, value: object) -> object:
        """Collective: rank 0's small ``value`` on every rank (what only rank 0 may read, e.g. the
        run file's config on resume)."""
        return self.comm.bcast(value, root=0)

    def abort(self, code: int) -> None:
        """Flush, give the launcher ``ABORT_GRACE`` seconds to forward what this rank wrote, then abort.

        ``MPI_Abort`` makes hydra (and other launchers) kill every rank at once; lines still in the
        stdio pipes are then dropped, so without the pause the failing rank's own report can vanish.
        """
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(ABORT_GRACE)
        self.comm.Abort(code)

    def describe(self) -> str:
        return f"MPI, {self.size} ranks ({self.MPI.Get_library_version().splitlines()[0].strip()})"


def _contiguous(buf: np.ndarray | None) -> Any:
    if buf is None:
        return None
    if not buf.flags.c_contiguous:
        raise ValueError("MPI buffers must be C-contiguous")
    return buf


LAUNCHER_SIZES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS", "SLURM_STEP_NUM_TASKS")


def launcher_size() -> tuple[int, str] | None:
    """(ranks, variable) when the launcher's environment says it started more than one rank:
    Open MPI, PMI (MPICH, Intel MPI, srun --mpi=pmi2), PMIx, hydra, or a SLURM step."""
    for name in LAUNCHER_SIZES:
        value = os.environ.get(name, "")
        if name == "SLURM_STEP_NUM_TASKS" and not os.environ.get("SLURM_STEP_ID"):
            continue
        if value.isdigit() and int(value) > 1:
            return int(value), name
    return None


def launched_under_mpi() -> bool:
    """True when a process manager (mpiexec, srun with PMI) started more than one rank, or
    started this process without saying how many."""
    if launcher_size() is not None:
        return True
    if any(os.environ.get(v, "").isdigit() for v in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")):
        return False  # a launcher that started this one rank alone
    return any(os.environ.get(v) for v in MPI_ENV_VARS)


def make_transport(kind: str = "auto") -> LocalTransport | MpiTransport:
    """``local``, ``mpi``, or ``auto`` (MPI when launched by a process manager with > 1 rank).

    A launcher that started several ranks while MPI sees one world of size 1 means mpi4py loaded
    an MPI library other than the launcher's: every rank would run the whole job alone, so this
    stops with one sentence saying which library was loaded and how to fix it.
    """
    started = launcher_size()
    if kind == "local":
        if started is not None:
            raise UserError(f"--transport local runs the whole job in this one process, but the launcher started "
                            f"{started[0]} ({started[1]}); launch one process without mpiexec/srun, or drop "
                            "--transport local")
        return LocalTransport()
    if kind == "auto" and not launched_under_mpi():
        return LocalTransport()
    try:
        transport = MpiTransport()
    except ImportError:
        raise UserError("this job was launched under MPI but mpi4py is not installed; "
                        "install the extra: pip install 'fdcr_mpi[mpi]'") from None
    if transport.size == 1 and started is not None:
        raise UserError(wrong_mpi_message(transport, *started))
    if transport.size == 1:
        return LocalTransport()
    return transport


def wrong_mpi_message(transport: MpiTransport, ranks: int, variable: str) -> str:
    """One sentence: the launcher started ``ranks`` but MPI_COMM_WORLD has one; what mpi4py loaded."""
    library = transport.MPI.Get_library_version().strip().splitlines()[0].strip()
    libmpi = os.environ.get("MPI4PY_LIBMPI")
    loaded = f"{library}" + (f" from MPI4PY_LIBMPI={libmpi}" if libmpi else "")
    return (f"the launcher started {ranks} ranks ({variable}) but this rank's MPI world has 1: mpi4py loaded "
            f"{loaded}, not the launcher's MPI; launch with that library's own mpiexec, or point mpi4py at the "
            "site's MPI (uninstall the 'mpich' wheel, or set MPI4PY_LIBMPI to the site's libmpi.so; "
            "under SLURM pass the PMI the library speaks, e.g. srun --mpi=pmi2 or --mpi=pmix); see docs/CLUSTER.md")


def fail_job(transport: LocalTransport | MpiTransport, exc: BaseException, code: int = 1) -> None:
    """Report an unexpected error of this rank and end the whole job (no rank is left waiting)."""
    rank = getattr(transport, "rank", 0)
    where = f"rank {rank}" if transport.size > 1 else "fdcr-mpi"
    detail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    sys.stderr.write(f"{detail}\n{where} failed: {type(exc).__name__}: {exc}\n")
    transport.abort(code)
