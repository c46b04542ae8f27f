"""Communication under ``mpiexec -n 3``: ``MpiTransport`` against bare mpi4py on the same buffers.

Run by ``benchmarks.run`` as ``mpiexec -n 3 python -m benchmarks.mpi_comm --out FILE``. Times
``MpiTransport.broadcast`` vs ``comm.Bcast`` of a (D,) float32 vector and
``MpiTransport.gather_rows`` vs ``comm.Gatherv`` of the (K, D) float32 client rows (D = 92,626,
K = 10, the rows dealt to the client ranks as in a run). The cases are interleaved; each timing
is the slowest rank's, after a barrier; the medians go to FILE (JSON) with every rank's peak
resident memory (ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections.abc import Callable

import numpy as np

from fdcr_mpi.runtime.transport import MpiTransport, client_blocks

D, K = 92_626, 10


def peak_rss_mib() -> float:
    """This process's peak resident set size in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cases(transport: MpiTransport) -> dict[str, Callable[[], None]]:
    """The four operations, on buffers allocated once."""
    comm, mpi = transport.comm, transport.MPI
    rank, size = transport.rank, transport.size
    vector = np.random.default_rng(0).random(D, dtype=np.float32) if rank == 0 else np.empty(D, np.float32)
    mine = client_blocks(K, size)[rank]
    rows = np.full((len(mine), D), rank, dtype=np.float32)
    recv = np.empty((K, D), dtype=np.float32) if rank == 0 else None
    counts = [len(b) * D for b in client_blocks(K, size)]
    displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
    raw_recv = [recv, (counts, displs), mpi.FLOAT] if rank == 0 else None
    return {
        "ours_bcast": lambda: transport.broadcast(vector),
        "raw_bcast": lambda: comm.Bcast(vector, root=0),
        "ours_gather": lambda: transport.gather_rows(rows, recv, [len(b) for b in client_blocks(K, size)]),
        "raw_gather": lambda: comm.Gatherv([rows, mpi.FLOAT], raw_recv, root=0),
        "ours_bcast_quiet": lambda: (transport.wait_quietly(), transport.broadcast(vector)),
    }


def time_once(transport: MpiTransport, op: Callable[[], None]) -> float:
    """Seconds of ``op`` on the slowest rank, all ranks starting together."""
    transport.comm.Barrier()
    start = time.perf_counter()
    op()
    elapsed = time.perf_counter() - start
    return transport.comm.allreduce(elapsed, op=transport.MPI.MAX)


def measure(transport: MpiTransport, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Interleaved timings of every case: ``warmup`` untimed then ``repeats`` timed rounds."""
    ops = cases(transport)
    samples: dict[str, list[float]] = {name: [] for name in ops}
    for r in range(warmup + repeats):
        names = list(ops) if r % 2 == 0 else list(reversed(ops))
        for name in names:
            seconds = time_once(transport, ops[name])
            if r >= warmup:
                samples[name].append(seconds)
    return samples


def summarise(samples: dict[str, list[float]]) -> dict[str, float]:
    medians = {name: float(np.median(values)) for name, values in samples.items()}
    medians["ratio_bcast"] = medians["ours_bcast"] / medians["raw_bcast"]
    medians["ratio_gather"] = medians["ours_gather"] / medians["raw_gather"]
    return medians


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file written by rank 0")
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args(argv)
    transport = MpiTransport()
    samples = measure(transport, args.repeats, args.warmup)
    rss = transport.comm.gather(peak_rss_mib(), root=0)
    if transport.rank == 0:
        result = {"ranks": transport.size, "D": D, "K": K, "repeats": args.repeats, "warmup": args.warmup,
                  "library": transport.describe(), "median_seconds": summarise(samples),
                  "samples": samples, "peak_rss_mib": rss}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
