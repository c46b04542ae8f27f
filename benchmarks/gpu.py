"""``python -m benchmarks.gpu --out DIR``: clients on one GPU, batched against one by one (``make gpu-check``).

Ten Fashion-MNIST-sized clients (5,400 random 1x32x32 images each; the time of a step does not
depend on the pixels) train SimpleCNN with the paper's settings (batch 64, lr 0.01, momentum
0.9) on the GPU: one after another (``client.train_client``, the default path), and as batched
groups of 5 and 10 (``batched.train_group``, ``train.batch_clients``) with 5 models or the whole
group per vmapped computation. Also measured: the empirical Fisher of one client against its
10-epoch training, one paper round (10 clients x 10 epochs + their Fisher) in both modes, the
peak GPU memory of each, and whether two runs give the same bits (deterministic kernels).
Writes ``gpu.json`` and ``gpu.md`` into DIR. Needs CUDA; about a minute on an H200.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from fdcr_mpi.client import (
    ClientData,
    TrainSettings,
    empirical_fisher,
    fisher_samples,
    train_client,
)
from fdcr_mpi.client.batched import train_group
from fdcr_mpi.data.datasets import SPECS
from fdcr_mpi.models import build_model
from fdcr_mpi.runtime import numerics

CLIENTS, SAMPLES = 10, 5400
SPEC = SPECS["fmnist"]


def make_clients(device: torch.device) -> list[ClientData]:
    gen = torch.Generator().manual_seed(0)
    return [ClientData(x=torch.randn(SAMPLES, 1, 32, 32, generator=gen), y=torch.randint(0, 10, (SAMPLES,), generator=gen),
                       poisoned=torch.zeros(SAMPLES, dtype=torch.bool)).to(device) for _ in range(CLIENTS)]


def timed(fn) -> tuple[float, object]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, result


def one_by_one(model, start: torch.Tensor, clients: list[ClientData], settings: TrainSettings) -> torch.Tensor:
    rows = []
    for k, data in enumerate(clients):
        model.load(start)
        train_client(model, data, SPEC, settings, torch.Generator().manual_seed(k))
        rows.append(model.flat.clone())
    return torch.stack(rows)


def grouped(model, start: torch.Tensor, clients: list[ClientData], settings: TrainSettings, group: int,
            chunk: int) -> torch.Tensor:
    rows = []
    for first in range(0, len(clients), group):
        part = clients[first:first + group]
        gens = [torch.Generator().manual_seed(first + i) for i in range(len(part))]
        rows.append(train_group(model, start, part, SPEC, settings, gens, chunk=chunk)[0])
    return torch.cat(rows)


def peak(fn) -> tuple[float, float, object]:
    """(seconds, peak GPU MiB, result) of one call."""
    torch.cuda.reset_peak_memory_stats()
    seconds, result = timed(fn)
    return seconds, torch.cuda.max_memory_allocated() / 2**20, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=2, help="local epochs of the throughput runs")
    args = parser.parse_args()
    numerics.prepare_process()
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    numerics.configure(1, device, deterministic=True, tf32=False)
    clients = make_clients(device)
    model = build_model("simple_cnn", 0, device=device)
    start = model.flat.clone()
    settings = TrainSettings(local_epochs=args.epochs)
    samples = CLIENTS * SAMPLES * args.epochs
    one_by_one(model, start, clients[:2], TrainSettings(local_epochs=1))  # warm-up: kernels, cuDNN plans
    grouped(model, start, clients[:5], TrainSettings(local_epochs=1), 5, 5)
    rows, reference = [], None
    modes = [("one by one", lambda: one_by_one(model, start, clients, settings))]
    for group, chunk in ((5, 5), (10, 5), (10, 10)):
        modes.append((f"batched, groups of {group}, {chunk} models per step",
                      lambda g=group, c=chunk: grouped(model, start, clients, settings, g, c)))
    for label, fn in modes:
        seconds, mib, out = peak(fn)
        again = fn()
        torch.cuda.synchronize()
        if reference is None:
            reference = out
        rows.append({"mode": label, "seconds": round(seconds, 3), "samples_per_s": round(samples / seconds),
                     "peak_mib": round(mib, 1), "deterministic": bool(torch.equal(out, again)),
                     "max_abs_diff_vs_one_by_one": float((out - reference).abs().max())})
    base = rows[0]["samples_per_s"]
    for row in rows:
        row["speedup_vs_one_by_one"] = round(row["samples_per_s"] / base, 2)

    paper = TrainSettings(local_epochs=10)
    data = clients[0]
    model.load(start)
    train_s, _ = timed(lambda: train_client(model, data, SPEC, paper, torch.Generator().manual_seed(0)))
    idx = fisher_samples(data, None, torch.Generator())
    fisher_s, _ = timed(lambda: empirical_fisher(model, data, SPEC, idx))

    def paper_round(batched: bool):
        trained = grouped(model, start, clients, paper, 10, 10) if batched else one_by_one(model, start, clients, paper)
        for k, data_k in enumerate(clients):
            model.load(trained[k])
            empirical_fisher(model, data_k, SPEC, fisher_samples(data_k, None, torch.Generator()))

    round_one, _ = timed(lambda: paper_round(False))
    round_batched, _ = timed(lambda: paper_round(True))
    result = {
        "gpu": torch.cuda.get_device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "clients": CLIENTS, "samples_per_client": SAMPLES,
        "throughput_epochs": args.epochs, "modes": rows,
        "fisher_seconds_one_client": round(fisher_s, 3), "train_seconds_one_client_10_epochs": round(train_s, 3),
        "fisher_over_training": round(fisher_s / train_s, 4),
        "paper_round_seconds": {"one_by_one": round(round_one, 2), "batched_groups_of_10": round(round_batched, 2)},
        "fingerprint": numerics.fingerprint(1, device, deterministic=True, tf32=False),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "gpu.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    lines = [f"# Clients on one GPU: batched against one by one ({r['gpu']})", "",
             f"torch {r['torch']}, CUDA {r['cuda']}; {r['clients']} Fashion-MNIST-sized clients of "
             f"{r['samples_per_client']} images, SimpleCNN, batch 64, {r['throughput_epochs']} local epochs; "
             "deterministic kernels, TF32 off.", "",
             "| mode | seconds | samples/s | x one by one | peak GPU MiB | same bits twice | max diff vs one by one |",
             "|---|---|---|---|---|---|---|"]
    for m in r["modes"]:
        lines.append(f"| {m['mode']} | {m['seconds']} | {m['samples_per_s']} | {m['speedup_vs_one_by_one']} | "
                     f"{m['peak_mib']} | {m['deterministic']} | {m['max_abs_diff_vs_one_by_one']:.2e} |")
    pr = r["paper_round_seconds"]
    lines += ["", f"Paper round (10 clients x 10 epochs + their empirical Fisher): {pr['one_by_one']} s one by one, "
              f"{pr['batched_groups_of_10']} s in one batched group of 10.",
              f"Fisher of one client: {r['fisher_seconds_one_client']} s = {r['fisher_over_training']} of its "
              f"10-epoch training ({r['train_seconds_one_client_10_epochs']} s).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
