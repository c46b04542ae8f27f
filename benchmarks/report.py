"""The results files: ``results.json`` (everything) and ``RESULTS.md`` (the short table)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from benchmarks.common import Figure
from benchmarks.rounds import PHASES


def not_measured() -> list[Figure]:
    """Rows the issue asks for that this harness cannot measure on this machine."""
    import torch

    if torch.cuda.is_available():
        why = "a GPU is present, but the GPU section (client ranks sharing a GPU, pinned vs pageable staging, " \
              "CUDA-aware MPI) is not built yet"
    else:
        why = "not measured: no GPU on this machine"
    return [Figure("gpu_rounds", "GPU: rounds with client ranks sharing one GPU", None, "s", notes=why)]


def write_results(out: Path, meta: dict, figures: list[Figure], details: dict) -> tuple[Path, Path]:
    """Write both files into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "results.json", out / "RESULTS.md"
    payload = {"meta": meta, "figures": [f.to_dict() for f in figures], "details": details}
    json_path.write_text(json.dumps(payload, indent=1, default=_plain) + "\n")
    md_path.write_text(markdown(meta, figures, details))
    return json_path, md_path


def _plain(value: object) -> object:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def fmt(value: float | None) -> str:
    """Three significant digits, or a dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if value == 0 or abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def target_text(figure: Figure) -> str:
    if figure.op is None:
        return "—"
    return f"{'≥' if figure.op == '>=' else '≤'} {fmt(figure.bound)}"


def pass_text(figure: Figure) -> str:
    if figure.value is None:
        return "not measured"
    return {True: "pass", False: "FAIL", None: "n/a"}[figure.passed]


def markdown(meta: dict, figures: list[Figure], details: dict) -> str:
    """The short Markdown report."""
    lines = [
        "# fdcr_mpi benchmarks",
        "",
        f"Mode: **{meta['mode']}**, {meta['started']} to {meta['finished']} ({meta['seconds']:.0f} s). "
        f"Machine: {meta['cpus']} CPU core(s), torch {meta['torch']} (CPU), {meta.get('mpi') or 'no MPI'}. "
        f"Load average (1/5/15 min) at start {meta['load_start']}, at end {meta['load_end']}. "
        "Each row gives the 1-minute load when it was measured and its thread count; "
        "compare ratios taken in one run, not absolute numbers across runs.",
        "",
        threads_line(meta.get("threads", {})),
        "",
        "| Figure | Value | Unit | Target | Result | Threads | Load | Notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in figures:
        lines.append(f"| {f.label} | {fmt(f.value)} | {f.unit} | {target_text(f)} | {pass_text(f)} | "
                     f"{f.threads or '—'} | {fmt(f.load)} | {f.notes} |")
    lines += phase_table(details.get("rounds", {}), details.get("paper", {}))
    lines += ["", "## Notes", ""] + [f"- {note}" for note in meta.get("notes", [])]
    return "\n".join(lines) + "\n"


def threads_line(threads: dict) -> str:
    """Which thread counts each section used."""
    if not threads:
        return ""
    return (f"Threads: in-process benchmarks {threads.get('local')}, whole runs {threads.get('runs')} "
            f"(one_tN = one process with runtime.threads=N, mpi3_t1 = mpiexec -n 3 with 1 thread per rank), "
            f"paper round {threads.get('paper')}; OMP_NUM_THREADS matches runtime.threads in every subprocess.")


def phase_table(rounds: dict, paper: dict) -> list[str]:
    """Per-phase seconds (median over the measured rounds) of every whole run."""
    rows = []
    for defense, runs in rounds.get("runs", {}).items():
        for run in runs.values():
            if run.get("ok"):
                rows.append((f"{defense}, {rounds['data']}, {rounds['local_epochs']} ep", run))
    for paper_run in paper.get("runs", {}).values():
        run = paper_run["run"]
        if not run.get("ok"):
            continue
        samples = paper.get("train_samples") or "all"
        rows.append((f"paper fmnist round, {paper['epochs_measured']} ep, {samples} samples", run))
        if str(paper_run.get("how", "")).startswith("EXTRAPOLATED"):
            estimate = {**run, "phases": paper_run["estimate"], "overhead_fraction": None}
            rows.append(("paper fmnist round, 10 ep, all data, EXTRAPOLATED", estimate))
    if not rows:
        return []
    lines = ["", "## Seconds per phase of a round", "",
             "`train`/`fisher` are the busiest rank's sums; `clients` is the clients trained on rank 0 "
             "(all of them in one process, none under MPI); `wait` is rank 0 waiting for the busiest "
             "client rank; `gather` the Gatherv of the rows.", "",
             "| Run | Launch | " + " | ".join(PHASES) + " | overhead |",
             "|---|---|" + "---|" * (len(PHASES) + 1)]
    for name, run in rows:
        cells = " | ".join(fmt(run["phases"].get(p)) for p in PHASES)
        lines.append(f"| {name} | {run['label']} | {cells} | {fmt(run.get('overhead_fraction'))} |")
    return lines
