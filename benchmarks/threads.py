"""``python -m benchmarks.threads``: the paper's Fashion-MNIST round with default threads, against before.

Results depend on the config alone because every client computes with a fixed number of
intra-op threads (``runtime.client_threads``, 1) and spare cores train other clients at once.
This measures, in one sitting, one round of the paper's Fashion-MNIST setting (10 clients, FDCR,
10 local epochs, all data) in four launches:

- ``one_default``: one process, no thread setting (the new default: as many clients at once as
  cores, each on one thread);
- ``one_old_t2``: one process computing each client with 2 intra-op threads, one client at a time
  (``runtime.threads=2 runtime.client_threads=2``): the arithmetic of the previous default on a
  2-core machine;
- ``mpi3_default``: ``mpiexec -n 3``, no thread setting;
- ``mpi3_before``: ``mpiexec -n 3`` with the code of ``--before`` (a temporary git worktree), the
  previous default launch.

Targets: one_old_t2 / one_default round time >= 0.95, and mpi3_default no slower than
mpi3_before (time ratio <= 1.05: rounds vary by a few percent between runs here). Writes
``threads.json`` and ``threads.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py

from benchmarks.common import MPIEXEC, REPO, load1, say, shared_data_root

BEFORE = "4ac52c0"
LAUNCHES = {
    "one_default": (None, []),
    "one_old_t2": (None, ["runtime.threads=2", "runtime.client_threads=2"]),
    "mpi3_default": (3, []),
    "mpi3_before": (3, []),
}


def env_for(code: Path) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "PMIX_", "OMPI_", "SLURM_", "HYDRA_", "MPI_", "OMP_", "MKL_"))}
    env["PYTHONPATH"] = str(code)
    return env


def round_seconds(code: Path, ranks: int | None, extra: list[str], root: Path, epochs: int, out: Path,
                  timeout: float) -> dict:
    items = ["run", "configs/paper/fmnist.yaml", "rounds=1", f"data.root={root}", f"train.local_epochs={epochs}",
             *extra, "--out", str(out), "--restart", "--quiet"]
    program = [sys.executable, "-m", "fdcr_mpi", *items]
    command = program if ranks is None else [str(MPIEXEC), "-n", str(ranks), *program]
    load = load1()
    start = time.perf_counter()
    done = subprocess.run(command, cwd=code, env=env_for(code), capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return {"ok": False, "error": done.stderr[-1500:], "load": load}
    with h5py.File(out / "run.h5", "r") as f:
        seconds = {name.removeprefix("seconds_"): float(f[f"rounds/{name}"][0]) for name in f["rounds"]
                   if name.startswith("seconds_")}
    return {"ok": True, "round": seconds["round"], "phases": seconds, "wall": round(wall, 1), "load": load,
            "load_end": load1()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=BEFORE)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()
    root = shared_data_root()
    if root is None:
        raise SystemExit("benchmarks.threads needs the Fashion-MNIST files (../shared/data or $FDCR_DATA)")
    runs = {}
    with tempfile.TemporaryDirectory(prefix="fdcr-threads-") as tmp:
        tmp = Path(tmp)
        old = tmp / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(old), args.before], cwd=REPO, check=True,
                       capture_output=True)
        try:
            for key, (ranks, extra) in LAUNCHES.items():
                code = old if key.endswith("_before") else REPO
                say(f"threads: {key}")
                runs[key] = round_seconds(code, ranks, extra, root, args.epochs, tmp / key, args.timeout)
                say(f"  {runs[key].get('round', 'failed')} s")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=REPO, capture_output=True)

    def ratio(slow: str, fast: str) -> float | None:
        if runs[slow]["ok"] and runs[fast]["ok"]:
            return round(runs[slow]["round"] / runs[fast]["round"], 3)
        return None

    result = {"epochs": args.epochs, "before_revision": args.before, "runs": runs,
              "one_old_t2_over_one_default": ratio("one_old_t2", "one_default"),
              "mpi3_default_over_mpi3_before": ratio("mpi3_default", "mpi3_before")}
    result["targets"] = {
        "one_default at least 0.95 x the old two-thread setting": (result["one_old_t2_over_one_default"] or 0) >= 0.95,
        "mpiexec -n 3 no slower than before (<= 1.05)": (result["mpi3_default_over_mpi3_before"] or 9) <= 1.05}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "threads.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "threads.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    labels = {"one_default": "1 process, default threads (clients in parallel, 1 thread each)",
              "one_old_t2": "1 process, one client at a time on 2 threads (the old default's arithmetic)",
              "mpi3_default": "mpiexec -n 3, default threads",
              "mpi3_before": f"mpiexec -n 3, code of {r['before_revision']} (before)"}
    lines = [f"# Paper Fashion-MNIST round: default threads ({r['epochs']} local epochs, 10 clients, FDCR)", "",
             "| launch | round (s) | train (s) | fisher (s) | load at start |", "|---|---|---|---|---|"]
    for key, run in r["runs"].items():
        if run["ok"]:
            p = run["phases"]
            lines.append(f"| {labels[key]} | {run['round']:.1f} | {p.get('train', 0):.1f} | {p.get('fisher', 0):.1f} | "
                         f"{run['load']} |")
        else:
            lines.append(f"| {labels[key]} | failed | | | {run['load']} |")
    lines += ["", f"- old two-thread setting / new default (round time): {r['one_old_t2_over_one_default']} "
              "(target >= 0.95)",
              f"- mpiexec -n 3, now / before (round time): {r['mpi3_default_over_mpi3_before']} (target <= 1.05)", ""]
    for target, ok in r["targets"].items():
        lines.append(f"- {target}: {'pass' if ok else 'FAIL'}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
