"""Launch ``benchmarks.mpi_comm`` under ``mpiexec -n 3`` and turn its medians into figures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.common import MPIEXEC, Figure, has_mpiexec, load1, run_bounded, say

RANKS = 3


def run_comm(repeats: int, timeout: float, scratch: Path) -> tuple[list[Figure], dict]:
    """Our transport vs bare mpi4py on (D,) and (K, D) float32 buffers, 1 thread per rank."""
    label = "MpiTransport / bare mpi4py"
    if not has_mpiexec():
        note = f"no mpiexec at {MPIEXEC}: communication not measured"
        return [Figure("comm_ratio_bcast", f"{label}, Bcast", None, "x", notes=note)], {"skipped": note}
    out = scratch / "comm.json"
    say(f"communication: mpiexec -n {RANKS}, {repeats} interleaved repeats")
    load = load1()
    outcome = run_bounded([str(MPIEXEC), "-n", str(RANKS), sys.executable, "-m", "benchmarks.mpi_comm",
                           "--out", str(out), "--repeats", str(repeats)], timeout, threads=1)
    if not outcome.ok or not out.exists():
        note = f"mpiexec run failed: {outcome.why()}"
        return [Figure("comm_ratio_bcast", f"{label}, Bcast", None, "x", load=load, notes=note)], {"error": note}
    data = json.loads(out.read_text())
    load = max(load, load1())
    data["load"] = load
    return comm_figures(data, load), data


def comm_figures(data: dict, load: float) -> list[Figure]:
    m, d, k = data["median_seconds"], data["D"], data["K"]
    common = dict(threads="1/rank", load=load)
    reps = f"median of {data['repeats']} interleaved repeats, slowest rank"
    figures = [
        Figure("comm_bcast_ours_ms", f"Broadcast ({d},) float32, MpiTransport.broadcast", m["ours_bcast"] * 1e3,
               "ms", notes=reps, **common),
        Figure("comm_bcast_raw_ms", f"Broadcast ({d},) float32, bare comm.Bcast", m["raw_bcast"] * 1e3, "ms",
               notes=reps, **common),
        Figure("comm_ratio_bcast", "Broadcast, ours / bare", m["ratio_bcast"], "x", notes="no target set", **common),
        Figure("comm_gather_ours_ms", f"Gather ({k}, {d}) float32, MpiTransport.gather_rows", m["ours_gather"] * 1e3,
               "ms", notes=reps, **common),
        Figure("comm_gather_raw_ms", f"Gather ({k}, {d}) float32, bare comm.Gatherv", m["raw_gather"] * 1e3, "ms",
               notes=reps, **common),
        Figure("comm_ratio_gather", "Gather, ours / bare", m["ratio_gather"], "x", notes="no target set", **common),
        Figure("comm_bcast_quiet_ms", "Broadcast after the quiet Ibarrier wait (as in a round)",
               m["ours_bcast_quiet"] * 1e3, "ms", notes="wait_quietly() + broadcast(); the wait sleeps >= 0.1 ms",
               **common),
    ]
    peaks = data["peak_rss_mib"]
    figures.append(Figure("comm_peak_rss", "Peak memory per rank, communication script", max(peaks), "MiB (max rank)",
                          notes=", ".join(f"rank {r}: {v:.0f}" for r, v in enumerate(peaks)), **common))
    return figures
