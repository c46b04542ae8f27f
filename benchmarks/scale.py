"""Scale in K: server memory and round overhead for K = 10, 100, 1000 and 10,000 clients (issues #7, 18).

fdcr on a model of about 1M parameters (``cnn_1m``) under ``mpiexec -n 3``, one thread per
rank, the same training data in every run (a Fashion-MNIST subset split IID, so K = 1000 still
gives every client samples), one local epoch of batches of 16, the Fisher on 16 samples per
client. K = 10 takes the gather path (the default below ``REDUCE_FROM`` participants), K = 100
the reduce path, and again the gather path to show what that costs the server; K = 1000 runs
with 100 clients per round (partial participation) on the reduce path, and so does K = 10,000 (on
the whole 54,000-image pool, about 5 samples a client, batches of 4: ``ScaleRun.extra``).

Figures: the server's (rank 0) peak resident memory, its ratios K=1000 / K=10 and K=10,000 / K=10
(target <= 2 each), the
round overhead (round seconds less the busiest rank's training seconds) per run, and how it
grows: the exponent b of overhead ~ K^b from K = 10 to K = 100, every client taking part
(target <= 1: no faster than linear).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import Figure, has_mpiexec, say
from benchmarks.rounds import LAUNCHES, cli_run, run_load


@dataclass(frozen=True)
class ScaleRun:
    clients: int
    per_round: int | None
    path: str
    extra: tuple[str, ...] = ()  # overrides of this run only (later items win)

    @property
    def key(self) -> str:
        return f"k{self.clients}" + (f"_m{self.per_round}" if self.per_round else "") + f"_{self.path}"

    @property
    def label(self) -> str:
        part = f", {self.per_round} per round" if self.per_round else ""
        return f"K={self.clients}{part}, {self.path} path"


@dataclass(frozen=True)
class ScaleSizes:
    train_samples: int
    rounds: int
    runs: tuple[ScaleRun, ...]
    timeout: float


def run_scale(sizes: ScaleSizes, root: Path | None, scratch: Path) -> tuple[list[Figure], dict]:
    if root is None or not has_mpiexec():
        note = "needs the Fashion-MNIST files and mpiexec: not measured"
        return [Figure("k1000_server_memory_ratio", "Server peak memory, K=1000 / K=10", None, "x", "<=", 2.0,
                       notes=note)], {"skipped": note}
    launch = next(launch for launch in LAUNCHES if launch.key == "mpi3_t1")
    base = ["data.dataset=fmnist", f"data.root={root}", "data.beta=iid", f"data.train_samples={sizes.train_samples}",
            "model.name=cnn_1m", "defense.name=fdcr", "train.local_epochs=1", "train.batch_size=16",
            f"rounds={sizes.rounds}", "fisher.max_samples=16", "eval.test_samples=1000"]
    details: dict = {"items": base, "runs": {}}
    for run in sizes.runs:
        say(f"scale: {run.label}")
        items = [*base, f"data.num_clients={run.clients}", f"defense.path={run.path}"]
        items += [f"clients_per_round={run.per_round}"] if run.per_round else []
        items += list(run.extra)
        details["runs"][run.key] = cli_run(items, launch, scratch / f"scale_{run.key}", sizes.timeout)
        details["runs"][run.key]["label"] = run.label
    return scale_figures(sizes, details["runs"]), details


def extra_note(sizes: ScaleSizes, key: str) -> str:
    """'; then ...': the overrides of the run ``key``'s own (``ScaleRun.extra``), if any."""
    extra = next((r.extra for r in sizes.runs if r.key == key), ())
    return f"; then {', '.join(extra)}" if extra else ""


def overhead_seconds(run: dict) -> float:
    return run["phases"]["round"] - run["phases"]["train"]


def scale_figures(sizes: ScaleSizes, runs: dict[str, dict]) -> list[Figure]:
    figures: list[Figure] = []
    setting = f"fdcr, cnn_1m, mpiexec -n 3, {sizes.train_samples} Fashion-MNIST samples IID, 1 epoch"
    for key, run in runs.items():
        label = run["label"]
        if not run["ok"]:
            figures.append(Figure(f"scale_server_rss_{key}", f"Server peak memory, {label}", None, "MiB",
                                  notes=f"run failed: {run['error']}"))
            continue
        peaks = run["peak_rss_mib"]
        figures.append(Figure(f"scale_server_rss_{key}", f"Server (rank 0) peak memory, {label}", peaks.get(0),
                              "MiB", threads="1/rank", load=run_load(run),
                              notes=f"{setting}{extra_note(sizes, key)}; client ranks: "
                              + ", ".join(f"{m:.0f}" for r, m in peaks.items() if r)))
        figures.append(Figure(f"scale_overhead_{key}", f"Round overhead, {label}", overhead_seconds(run), "s",
                              threads="1/rank", load=run_load(run),
                              notes=f"round {run['phases']['round']:.2f} s less the busiest rank's training "
                                    f"{run['phases']['train']:.2f} s (Fisher {run['phases']['fisher']:.2f} s "
                                    f"counts as overhead); median over rounds after the first"))
    full = sorted((r for r in sizes.runs if r.per_round is None and runs.get(r.key, {}).get("ok")),
                  key=lambda r: r.clients)
    low = full[0] if full else None
    for target in (1000, 10000):
        high = next((r for r in sizes.runs if r.clients == target and r.path != "gather"
                     and runs.get(r.key, {}).get("ok")), None)
        memory = None
        if low is not None and high is not None:
            memory = runs[high.key]["peak_rss_mib"][0] / runs[low.key]["peak_rss_mib"][0]
        if high is not None or target == 1000:
            figures.append(Figure(f"k{target}_server_memory_ratio",
                                  f"Server peak memory, {high.label if high else f'K={target}'} / "
                                  f"{low.label if low else '?'}", memory, "x", "<=", 2.0, threads="1/rank",
                                  notes=setting + ("; K=10,000: the whole pool, batches of 4" if target == 10000 else "")))
    growth, span = None, "no two full-participation runs"
    pair = [r for r in full if r.path != "gather" or r is low]
    if len(pair) >= 2:
        a, b = pair[0], pair[-1]
        span = f"K={a.clients}..{b.clients}, every client taking part"
        ratio = overhead_seconds(runs[b.key]) / overhead_seconds(runs[a.key])
        growth = math.log(ratio) / math.log(b.clients / a.clients) if ratio > 0 else None
    figures.append(Figure("overhead_growth_in_k", f"Overhead growth exponent b (overhead ~ K^b), {span}",
                          growth, "", "<=", 1.0, threads="1/rank", notes="1 = linear in K"))
    return figures


def main() -> None:
    """``python -m benchmarks.scale``: the full plan's scale runs alone, into scale.json and scale.md."""
    import argparse
    import tempfile

    from benchmarks.common import REPO, shared_data_root
    from benchmarks.run import FULL

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--clients", type=int, nargs="*", help="only the runs of these K")
    args = parser.parse_args()
    sizes = FULL.scale
    if args.clients:
        sizes = ScaleSizes(sizes.train_samples, sizes.rounds, tuple(r for r in sizes.runs if r.clients in args.clients),
                           sizes.timeout)
    with tempfile.TemporaryDirectory(prefix="fdcr-scale-") as scratch:
        figures, details = run_scale(sizes, shared_data_root(), Path(scratch))
    write_scale(args.out, figures, details)


def write_scale(out: Path, figures: list[Figure], details: dict) -> None:
    """scale.json and scale.md in ``out``."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps({"figures": [f.to_dict() for f in figures], "details": details},
                                                    indent=1) + "\n")
    lines = ["# Scale in K (fdcr, cnn_1m, mpiexec -n 3, one thread per rank)", "",
             "| figure | value | unit | target | pass | load | notes |", "|---|---|---|---|---|---|---|"]
    for f in figures:
        value = "—" if f.value is None else f"{f.value:.3g}"
        target = f"{f.op} {f.bound}" if f.op else ""
        lines.append(f"| {f.label} | {value} | {f.unit} | {target} | {f.passed if f.passed is not None else 'n/a'} | "
                     f"{f.load if f.load is not None else ''} | {f.notes} |")
    (out / "scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
