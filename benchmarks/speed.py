"""``python -m benchmarks.speed``: the default path against the old one, and how close a step comes
to the machine's limit (issue "Performance").

In one sitting, on the paper's Fashion-MNIST round (FDCR, 10 clients, all data, 10 local epochs,
one round, ``configs/paper/fmnist.yaml``):

- ``old``: one process, two intra-op threads, one client at a time (``runtime.threads=2
  runtime.client_threads=2 train.batch_clients=1``): the default path before, kept selectable;
- ``one_default``: one process, nothing set (``train.batch_clients: auto``, one thread per client,
  as many groups at once as cores);
- ``mpi3_default``: ``mpiexec -n 3``, nothing set.

Targets: old / one_default >= 2 and old / mpi3_default >= 2.5 (round times). Each run's phases
(training, Fisher, defense, evaluation) come from its run file.

Then, in this process, where a step's time goes and how close it comes to the cores' limit:

- FLOP/s of the batched training step (``client.batched.train_group``, five clients, one thread,
  the client thread count): the model's floating-point operations per sample (forward and backward
  of SimpleCNN on a three-channel 32x32 input, counted by ``torch.utils.flop_counter``; the batched
  step runs the grayscale first convolution on one channel, so it does less than this count) times
  the samples trained, over the time; against a plain 1024 x 1024 float32 matmul on one thread;
- the same for the batched step on the vmap path (``train_group(..., vmap_path=True)``, the path
  of models without a stacked form; the same numbers) and for the one-by-one step
  (``client.train_client``);
- the operators that take the batched step's time (``torch.profiler``, self CPU time), and the
  Fisher's;
- inference (no gradient): an evaluation pass of SimpleCNN and DeepSight's division differences,
  each with the model's pooling (``models.pooling.MaxPool2x2``) and with ``nn.MaxPool2d(2)`` (the
  plain kernel) in its place, one thread; and the evaluation pass's operators.

Writes ``speed.json`` and ``speed.md`` into ``--out``. The box's load is recorded with each figure:
compare ratios from one sitting on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import REPO, median, median_time, say, shared_data_root
from benchmarks.local import client_data
from benchmarks.threads import round_seconds
from fdcr_mpi.client import TrainSettings, empirical_fisher, train_client
from fdcr_mpi.client.batched import train_group
from fdcr_mpi.models import SimpleCNN, build_model
from fdcr_mpi.models.pooling import MaxPool2x2

LAUNCHES = {
    "old": (None, ["runtime.threads=2", "runtime.client_threads=2", "train.batch_clients=1"]),
    "one_default": (None, []),
    "mpi3_default": (3, []),
}
TARGETS = {"one_default": 2.0, "mpi3_default": 2.5}  # old round time / this launch's, at least
GROUP = 5  # clients per batched group in the step measurements (train.batch_clients: auto)


def round_run(ranks: int | None, extra: list[str], root: Path, epochs: int, out: Path, timeout: float) -> dict:
    """One paper round under the launch, this tree's code; its phases from the run file."""
    return round_seconds(REPO, ranks, extra, root, epochs, out, timeout)


def flops_per_sample() -> float:
    """Forward and backward floating-point operations of SimpleCNN per 3x32x32 sample (batch of 64)."""
    from torch.utils.flop_counter import FlopCounterMode

    model, x = SimpleCNN(), torch.randn(64, 3, 32, 32)
    y = torch.randint(0, 10, (64,))
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return counter.get_total_flops() / 64


def matmul_flops(threads: int, n: int = 1024, repeats: int = 7) -> float:
    """FLOP/s of an n x n float32 matmul on ``threads`` threads (the median of ``repeats``)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / median(times)


def step_flops(root: Path | None, samples: int, epochs: int, repeats: int) -> dict:
    """Achieved FLOP/s of the batched and the one-by-one training, one thread, real Fashion-MNIST
    images (augmentation and triggers as in a run), against a matmul on one thread."""
    torch.set_num_threads(1)
    data, spec, source = client_data(samples, root)
    settings = replace(TrainSettings(), local_epochs=epochs)
    per_sample = flops_per_sample()
    trained = samples // settings.batch_size * settings.batch_size * epochs
    model = build_model("simple_cnn", 0)
    start = model.flat.clone()

    def batched(vmap_path: bool = False) -> float:
        gens = [torch.Generator().manual_seed(k) for k in range(GROUP)]
        t = time.perf_counter()
        train_group(model, start, [data] * GROUP, spec, settings, gens, vmap_path=vmap_path)
        return time.perf_counter() - t

    def single() -> float:
        model.load(start)
        t = time.perf_counter()
        train_client(model, data, spec, settings, torch.Generator().manual_seed(0))
        return time.perf_counter() - t

    batched(), batched(True), single()  # warm-up
    t_batched = median([batched() for _ in range(repeats)])
    t_vmap = median([batched(True) for _ in range(repeats)])
    t_single = median([single() for _ in range(repeats)])
    matmul = matmul_flops(1)
    out = {"source": source, "flops_per_sample": per_sample, "samples_per_client": trained, "matmul_1thread": matmul,
           "batched": {"seconds": t_batched, "samples_per_s": GROUP * trained / t_batched,
                       "flops": GROUP * trained * per_sample / t_batched},
           "batched_vmap": {"seconds": t_vmap, "samples_per_s": GROUP * trained / t_vmap,
                            "flops": GROUP * trained * per_sample / t_vmap},
           "single": {"seconds": t_single, "samples_per_s": trained / t_single,
                      "flops": trained * per_sample / t_single}}
    for key in ("batched", "batched_vmap", "single"):
        out[key]["of_matmul"] = out[key]["flops"] / matmul
    out["matmul_2threads"] = matmul_flops(2)
    torch.set_num_threads(1)
    return out


def step_profile(root: Path | None, samples: int, top: int = 12) -> list[dict]:
    """The operators of one epoch of a batched group of five, by self CPU time (one thread)."""
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(1)
    data, spec, _ = client_data(samples, root)
    settings = replace(TrainSettings(), local_epochs=1)
    model = build_model("simple_cnn", 0)
    start = model.flat.clone()
    gens = [torch.Generator().manual_seed(k) for k in range(GROUP)]
    train_group(model, start, [data] * GROUP, spec, settings, gens)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_group(model, start, [data] * GROUP, spec, settings, gens)
    return top_operators(prof, top)


def fisher_profile(root: Path | None, samples: int, top: int = 10) -> list[dict]:
    """The operators of one client's empirical Fisher (Eq. 5, the ``layers`` backend, every sample of a
    client, as a round computes it), by self CPU time (one thread)."""
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(1)
    data, spec, _ = client_data(samples, root)
    model = build_model("simple_cnn", 0)
    idx = torch.arange(len(data))
    empirical_fisher(model, data, spec, idx[:256])  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        empirical_fisher(model, data, spec, idx)
    return top_operators(prof, top)


def with_plain_pooling(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with every ``MaxPool2x2`` replaced by ``nn.MaxPool2d(2)`` (the kernel ``F.max_pool2d``)."""
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if isinstance(child, MaxPool2x2):
                setattr(parent, name, torch.nn.MaxPool2d(2))
    return module


def inference(root: Path | None, images: int = 2000, repeats: int = 3, top: int = 8) -> dict:
    """Seconds of an evaluation pass over ``images`` test-sized images (``metrics.predictions``) and
    of DeepSight's division differences (10 clients, one seed of ``images`` random inputs), with the
    model's pooling and with the plain kernel (median of ``repeats``, one thread); and the
    evaluation pass's operators."""
    from torch.profiler import ProfilerActivity, profile

    from fdcr_mpi.defenses.deepsight import division_differences
    from fdcr_mpi.metrics import predictions
    from fdcr_mpi.seeding import DEFENSE

    torch.set_num_threads(1)
    data, _, source = client_data(images, root)
    gen = torch.Generator().manual_seed(0)
    out: dict = {"source": source, "images": images}
    for key in ("pool2x2", "plain"):
        model = build_model("simple_cnn", 0)
        if key == "plain":
            with_plain_pooling(model.module)
        start = model.flat.clone()
        clients = start + 0.01 * torch.randn(10, start.numel(), generator=gen)
        ddif_args = (model, start, clients, (3, 32, 32), images, 1, 0, (DEFENSE, 0, 0))
        out[key] = {"evaluate_s": median_time(partial(predictions, model, data.x), repeats)[0],
                    "ddif_s": median_time(partial(division_differences, *ddif_args), repeats)[0]}
        if key == "pool2x2":
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                predictions(model, data.x)
            out["profile"] = top_operators(prof, top)
    for figure in ("evaluate_s", "ddif_s"):
        out[f"{figure[:-2]}_plain_over_pool2x2"] = out["plain"][figure] / out["pool2x2"][figure]
    return out


def top_operators(prof, top: int) -> list[dict]:
    """The ``top`` operators of a finished profile by self CPU time, with their share of the total."""
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in events[:top]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--samples", type=int, default=5400, help="one client's size in the step measurements")
    parser.add_argument("--skip-rounds", action="store_true", help="only the in-process step measurements")
    parser.add_argument("--fisher-profile-only", action="store_true",
                        help="add the Fisher's operator profile to the speed.json already in --out")
    parser.add_argument("--inference-only", action="store_true",
                        help="add the inference figures to the speed.json already in --out")
    args = parser.parse_args()
    if args.fisher_profile_only or args.inference_only:
        result = json.loads((args.out / "speed.json").read_text())
        if args.fisher_profile_only:
            result["fisher_profile"] = fisher_profile(shared_data_root(), args.samples)
        if args.inference_only:
            result["inference"] = inference(shared_data_root())
        write(args.out, result)
        return
    root = shared_data_root()
    if root is None and not args.skip_rounds:
        raise SystemExit("benchmarks.speed needs the Fashion-MNIST files (../shared/data or $FDCR_SHARED_DATA)")
    runs = {}
    if not args.skip_rounds:
        with tempfile.TemporaryDirectory(prefix="fdcr-speed-") as tmp:
            for key, (ranks, extra) in LAUNCHES.items():
                say(f"speed: {key}")
                runs[key] = round_run(ranks, extra, root, args.epochs, Path(tmp) / key, args.timeout)
                say(f"  {runs[key].get('round', 'failed')} s")
    say("speed: step FLOP/s")
    steps = step_flops(root, args.samples, 1, 3)
    say("speed: step profile")
    profile_rows = step_profile(root, args.samples)
    say("speed: Fisher profile")
    fisher_rows = fisher_profile(root, args.samples)
    say("speed: inference")
    inference_figures = inference(root)
    ratios = {key: round(runs["old"]["round"] / runs[key]["round"], 3)
              for key in TARGETS if runs.get("old", {}).get("ok") and runs.get(key, {}).get("ok")}
    result = {"epochs": args.epochs, "runs": runs, "ratios": ratios, "steps": steps, "profile": profile_rows,
              "fisher_profile": fisher_rows, "inference": inference_figures,
              "targets": {f"old / {key} >= {bound}": ratios.get(key, 0) >= bound for key, bound in TARGETS.items()}
              if runs else {}}
    write(args.out, result)


def write(out: Path, result: dict) -> None:
    """speed.json and speed.md in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "speed.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    labels = {"old": "1 process, 2 threads, one client at a time (the old default path)",
              "one_default": "1 process, default (batched groups of 5, one thread each)",
              "mpi3_default": "mpiexec -n 3, default"}
    lines = [f"# Paper Fashion-MNIST round ({r['epochs']} local epochs, 10 clients, FDCR): default against the "
             "old path", ""]
    if r["runs"]:
        lines += ["| launch | round (s) | old / this | clients (s) | train (s, summed) | fisher (s, summed) | defend (s) | "
                  "evaluate (s) | load at start |", "|---|---|---|---|---|---|---|---|---|"]
        for key, run in r["runs"].items():
            if not run["ok"]:
                lines.append(f"| {labels[key]} | failed | | | | | | | {run['load']} |")
                continue
            p = run["phases"]
            ratio = r["ratios"].get(key, "")
            lines.append(f"| {labels[key]} | {run['round']:.1f} | {ratio} | {p.get('clients', 0):.1f} | "
                         f"{p.get('train', 0):.1f} | {p.get('fisher', 0):.1f} | {p.get('defend', 0):.1f} | "
                         f"{p.get('evaluate', 0):.1f} | {run['load']} |")
        lines.append("")
        for target, ok in r["targets"].items():
            lines.append(f"- {target}: {'pass' if ok else 'FAIL'}")
        lines.append("")
    s = r["steps"]
    lines += [f"## A training step against the machine's limit ({s['source']}, one thread)", "",
              f"SimpleCNN: {s['flops_per_sample'] / 1e6:.2f} MFLOP per sample (forward and backward, 3x32x32). "
              f"A 1024 x 1024 float32 matmul: {s['matmul_1thread'] / 1e9:.1f} GFLOP/s on one thread, "
              f"{s['matmul_2threads'] / 1e9:.1f} on two.", "",
              "| step | samples/s | GFLOP/s | of the one-thread matmul |", "|---|---|---|---|"]
    for key, label in (("batched", f"batched group of {GROUP} (train_group, stacked form)"),
                       ("batched_vmap", f"batched group of {GROUP} (train_group, vmap path)"),
                       ("single", "one client (train_client)")):
        if key not in s:  # a sitting from before the stacked form
            continue
        lines.append(f"| {label} | {s[key]['samples_per_s']:.0f} | {s[key]['flops'] / 1e9:.2f} | "
                     f"{100 * s[key]['of_matmul']:.1f}% |")
    lines += ["", "## Where the batched step's time goes (one epoch of five clients, self CPU time)", "",
              "| operator | ms | share | calls |", "|---|---|---|---|"]
    for row in r["profile"]:
        lines.append(f"| `{row['op']}` | {row['self_ms']:.0f} | {100 * row['share']:.1f}% | {row['calls']} |")
    if r.get("fisher_profile"):
        lines += ["", "## Where the Fisher's time goes (one client's empirical Fisher, Eq. 5, layers backend, every "
                  "sample; self CPU time)", "", "| operator | ms | share | calls |", "|---|---|---|---|"]
        for row in r["fisher_profile"]:
            lines.append(f"| `{row['op']}` | {row['self_ms']:.0f} | {100 * row['share']:.1f}% | {row['calls']} |")
    if r.get("inference"):
        i = r["inference"]
        lines += ["", f"## Inference: the pooling of models.pooling against the plain kernel ({i['source']}, one thread)",
                  "", "| pass | MaxPool2x2 (s) | nn.MaxPool2d (s) | plain / MaxPool2x2 |", "|---|---|---|---|",
                  f"| evaluation, {i['images']} images (metrics.predictions) | {i['pool2x2']['evaluate_s']:.3f} | "
                  f"{i['plain']['evaluate_s']:.3f} | {i['evaluate_plain_over_pool2x2']:.2f} |",
                  f"| DeepSight division differences, 10 clients, {i['images']} random inputs | "
                  f"{i['pool2x2']['ddif_s']:.3f} | {i['plain']['ddif_s']:.3f} | {i['ddif_plain_over_pool2x2']:.2f} |",
                  "", "Where the evaluation pass's time goes (MaxPool2x2; self CPU time):", "",
                  "| operator | ms | share | calls |", "|---|---|---|---|"]
        for row in i["profile"]:
            lines.append(f"| `{row['op']}` | {row['self_ms']:.0f} | {100 * row['share']:.1f}% | {row['calls']} |")
    if r.get("notes"):
        lines += ["", r["notes"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
