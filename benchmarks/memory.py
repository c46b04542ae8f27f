"""``python -m benchmarks.memory [--ranks 16] [--before REV]``: peak memory per rank on CIFAR-10-sized data.

Sixteen ranks on one node (``mpiexec -n 16``: the server and 15 client ranks) run one round of
the paper's CIFAR-10 setting on a CIFAR-10-sized data set (torchvision's layout, 50,000 + 10,000
random 32x32x3 images in pickled batches: the sizes are what matters, not the pixels), with no
local epoch so that only the data path and the round's evaluation count. Each rank leaves its
peak resident set (``benchmarks.rank_entry``). The same run is made with the code of ``--before``
(a git revision, checked out in a temporary worktree: by default the revision before the
per-rank data path) and with this checkout, in one sitting. Writes ``memory.json`` and
``memory.md`` into ``--out`` (benchmarks/results by default).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import MPIEXEC, REPO, clean_env, load1, say
from benchmarks.rank_entry import read_peaks

BEFORE = "4ac52c0"  # the last commit whose ranks loaded and preprocessed the whole data set
ITEMS = ["data.dataset=cifar10", "rounds=1", "train.local_epochs=0", "fisher.max_samples=8", "runtime.device=cpu",
         "defense.name=fdcr", "--quiet"]


def fake_cifar(root: Path) -> None:
    """CIFAR-10's files at full size (random pixels and labels)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (10_000, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, 10_000).tolist()}
        with (folder / name).open("wb") as f:
            pickle.dump(batch, f, protocol=4)
    with (folder / "batches.meta").open("wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)


# torchvision's CIFAR10 (which the "before" code reads the files with) checks the md5 sums of the
# real files; this startup hook lets it read the random ones, in both runs alike.
ACCEPT_RANDOM_CIFAR = """
import importlib.abc, importlib.machinery, sys

class _AcceptRandomCifar(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "torchvision.datasets.cifar":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.check_integrity = lambda *args, **kwargs: True

        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, _AcceptRandomCifar())
"""


def peaks(code: Path, data: Path, ranks: int, scratch: Path, timeout: float) -> dict:
    """One run of ``code`` (a checkout) under mpiexec -n ``ranks``: peak MiB of every rank."""
    rss = scratch / "rss"
    command = [str(MPIEXEC), "-n", str(ranks), sys.executable, "-m", "benchmarks.rank_entry", str(rss), "run",
               *ITEMS, f"data.root={data}", "--out", str(scratch / "run")]
    env = clean_env(1)
    hook = scratch / "hook"
    hook.mkdir(parents=True, exist_ok=True)
    (hook / "sitecustomize.py").write_text(ACCEPT_RANDOM_CIFAR)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook), str(code), os.environ.get("PYTHONPATH")]))
    start = time.perf_counter()
    done = subprocess.run(command, cwd=code, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"the run of {code} failed: {done.stderr[-2000:]}")
    by_rank = read_peaks(rss)
    clients = [v for r, v in by_rank.items() if r != 0]
    return {"seconds": round(time.perf_counter() - start, 1), "rank0_mib": round(by_rank[0], 1),
            "client_rank_max_mib": round(max(clients), 1), "client_rank_median_mib": round(statistics.median(clients), 1),
            "node_total_mib": round(sum(by_rank.values()), 1), "by_rank": by_rank}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=16)
    parser.add_argument("--before", default=BEFORE,
                        help="the git revision measured as 'before', or a folder holding that checkout")
    parser.add_argument("--label", help="how to name the 'before' code in the results (default: --before)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--timeout", type=float, default=1200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fdcr-memory-") as tmp:
        tmp = Path(tmp)
        fake_cifar(tmp / "data")
        given = Path(args.before)
        old = given.resolve() if given.is_dir() else tmp / "before"
        if not given.is_dir():
            subprocess.run(["git", "worktree", "add", "--detach", str(old), args.before], cwd=REPO, check=True,
                           capture_output=True)
        try:
            load = load1()
            say(f"memory: {args.ranks} ranks, code of {args.before}")
            before = peaks(old, tmp / "data", args.ranks, tmp / "b", args.timeout)
            say(f"memory: {args.ranks} ranks, this checkout")
            after = peaks(REPO, tmp / "data", args.ranks, tmp / "a", args.timeout)
        finally:
            if not given.is_dir():
                subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=REPO, capture_output=True)
                shutil.rmtree(old, ignore_errors=True)
    result = {"ranks": args.ranks, "before_revision": args.label or args.before, "load": load, "items": ITEMS,
              "cores": os.cpu_count(),
              "before": before, "after": after,
              "client_rank_max_ratio": round(after["client_rank_max_mib"] / before["client_rank_max_mib"], 3),
              "node_total_ratio": round(after["node_total_mib"] / before["node_total_mib"], 3)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "memory.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    b, a = r["before"], r["after"]
    rows = [("rank 0 (server)", "rank0_mib"), ("client rank, largest", "client_rank_max_mib"),
            ("client rank, median", "client_rank_median_mib"), ("the node, all ranks", "node_total_mib")]
    lines = [f"# Peak memory per rank: CIFAR-10-sized data, {r['ranks']} ranks on one node", "",
             "One round of the paper's CIFAR-10 setting (10 clients, SimpleCNN, FDCR) without local epochs, "
             f"under `mpiexec -n {r['ranks']}` on 50,000 + 10,000 random CIFAR-10-sized images in "
             "torchvision's layout; peak resident set of each rank (`ru_maxrss`). Before: the code of "
             f"`{r['before_revision']}` (every rank read the whole data set; every evaluating rank "
             "preprocessed the whole test set twice). After: this checkout (a rank reads the rows of its "
             f"clients and of its evaluation share). Load at start: {r['load']}.", "",
             "| peak resident set | before (MiB) | after (MiB) | after / before |", "|---|---|---|---|"]
    for label, key in rows:
        lines.append(f"| {label} | {b[key]} | {a[key]} | {a[key] / b[key]:.2f} |")
    lines += ["", f"Wall time of the run: {b['seconds']} s before, {a['seconds']} s after.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
