"""In-process benchmarks of one client: training throughput against a bare PyTorch loop, the
batched-client mode (``fdcr_mpi.client.batched.train_group``, G clients as one computation)
against the same bare loop, and the empirical Fisher's cost against the client's 10-epoch
local training.

All run on one client's data: the first ``n`` Fashion-MNIST training images when the real
files are present, else random tensors of the same shape (the cost of a CNN step on the CPU
does not depend on the pixel values).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import Figure, load1, median, say, timed
from fdcr_mpi.client import ClientData, TrainSettings, empirical_fisher, local_train
from fdcr_mpi.client.batched import CHUNK, train_group
from fdcr_mpi.data.datasets import SPECS, DatasetSpec, load_raw, model_input, preprocess
from fdcr_mpi.models import FlatModel, SimpleCNN, build_model

BACKENDS = ("layers", "vmap")
PAPER_EPOCHS = 10
BATCHED_TARGET = 1.5  # issue "Performance": batched-client samples/s >= 1.5 x the bare loop's


@dataclass(frozen=True)
class LocalSizes:
    """How much work the in-process benchmarks do."""

    samples: int  # one client's size (Fashion-MNIST's 54,000 training images / 10 clients)
    throughput_epochs: int  # epochs per timed throughput sample
    repeats: int  # timed (ours, bare) pairs
    fisher_repeats: int  # timed (10-epoch training, Fisher per backend) rounds
    threads: tuple[int, ...]
    groups: tuple[int, ...] = (5, 10)  # clients per batched group (train_group)
    batched_repeats: int = 5  # timed (bare, each group) rounds


def client_data(n: int, root: Path | None) -> tuple[ClientData, DatasetSpec, str]:
    """One benign client of ``n`` samples: real Fashion-MNIST images if ``root`` has them."""
    if root is not None:
        train, _, spec = load_raw("fmnist", root)
        x = preprocess(train.x[:n], spec)
        y = torch.as_tensor(train.y[:n], dtype=torch.int64)
        source = f"Fashion-MNIST (first {n} training images)"
    else:
        spec = SPECS["fmnist"]
        gen = torch.Generator().manual_seed(0)
        x = torch.randn((n, 1, 32, 32), generator=gen)
        y = torch.randint(0, 10, (n,), generator=gen)
        source = f"random tensors ({n} samples; Fashion-MNIST files not found)"
    return ClientData(x=x, y=y, poisoned=torch.zeros(n, dtype=torch.bool)), spec, source


class BareLoop:
    """The reference: SimpleCNN, torch.optim.SGD, batches indexed from pre-made tensors, no augmentation."""

    def __init__(self, data: ClientData, settings: TrainSettings) -> None:
        torch.manual_seed(0)
        self.model = SimpleCNN()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=settings.lr, momentum=settings.momentum,
                                         weight_decay=settings.weight_decay)
        self.x = model_input(data.x).contiguous()  # (n, 3, 32, 32), made once
        self.y = data.y
        self.batch = settings.batch_size
        self.generator = torch.Generator().manual_seed(1)

    def train(self, epochs: int) -> int:
        """``epochs`` epochs with drop_last; returns the number of samples trained on."""
        self.model.train()
        n = self.y.numel()
        stop = n // self.batch * self.batch
        for _ in range(epochs):
            order = torch.randperm(n, generator=self.generator)
            for i in range(0, stop, self.batch):
                idx = order[i:i + self.batch]
                self.optimizer.zero_grad()
                F.cross_entropy(self.model(self.x[idx]), self.y[idx]).backward()
                self.optimizer.step()
        return stop * epochs


class OursLoop:
    """fdcr_mpi's client training: ``local_train`` on a FlatModel, with tensor augmentation."""

    def __init__(self, data: ClientData, spec: DatasetSpec, settings: TrainSettings) -> None:
        self.model: FlatModel = build_model("simple_cnn", 0)
        self.data, self.spec, self.settings = data, spec, settings
        self.generator = torch.Generator().manual_seed(1)

    def train(self, epochs: int) -> int:
        settings = TrainSettings(**{**self.settings.__dict__, "local_epochs": epochs})
        local_train(self.model, self.data, self.spec, settings, self.generator)
        n = len(self.data)
        return n // settings.batch_size * settings.batch_size * epochs


class BatchedLoop:
    """fdcr_mpi's batched-client mode: ``train_group`` on ``group`` clients, each the benchmark's
    client (same data, its own generator: its own order and augmentation), from one start."""

    def __init__(self, data: ClientData, spec: DatasetSpec, settings: TrainSettings, group: int) -> None:
        self.model: FlatModel = build_model("simple_cnn", 0)
        self.start = self.model.flat.clone()
        self.datas, self.spec, self.settings = [data] * group, spec, settings
        self.generators = [torch.Generator().manual_seed(1 + k) for k in range(group)]

    def train(self, epochs: int) -> int:
        """``epochs`` epochs of every client; returns the number of samples trained on."""
        settings = replace(self.settings, local_epochs=epochs)
        train_group(self.model, self.start, self.datas, self.spec, settings, self.generators)
        n = len(self.datas[0])
        return len(self.datas) * (n // settings.batch_size * settings.batch_size) * epochs


def throughput(data: ClientData, spec: DatasetSpec, threads: int, sizes: LocalSizes) -> dict:
    """Samples per second of ours and of the bare loop, timed in alternating pairs."""
    torch.set_num_threads(threads)
    settings = TrainSettings()
    ours, bare = OursLoop(data, spec, settings), BareLoop(data, settings)
    ours.train(1), bare.train(1)  # warm-up
    t_ours, t_bare = [], []
    for r in range(sizes.repeats):
        pair = (ours, bare) if r % 2 == 0 else (bare, ours)
        times = {id(loop): timed(lambda loop=loop: loop.train(sizes.throughput_epochs)) for loop in pair}
        t_ours.append(times[id(ours)])
        t_bare.append(times[id(bare)])
    samples = len(data) // settings.batch_size * settings.batch_size * sizes.throughput_epochs
    return {"threads": threads, "samples_per_timing": samples, "seconds_ours": t_ours, "seconds_bare": t_bare,
            "ours_samples_per_s": samples / median(t_ours), "bare_samples_per_s": samples / median(t_bare),
            "ratio": median([b / o for o, b in zip(t_ours, t_bare)])}


def batched_throughput(data: ClientData, spec: DatasetSpec, threads: int, sizes: LocalSizes) -> dict:
    """Samples per second of ``train_group`` on G clients and of the bare loop, timed in rounds
    that run the bare loop and every group once, in a rotating order."""
    torch.set_num_threads(threads)
    settings = TrainSettings()
    bare = BareLoop(data, settings)
    loops = {"bare": bare, **{f"g{g}": BatchedLoop(data, spec, settings, g) for g in sizes.groups}}
    # the same images as three real channels: the first convolution cannot take its one-channel
    # shortcut for grayscale inputs, as for RGB datasets (CIFAR-10)
    rgb = replace(data, x=data.x.expand(-1, 3, -1, -1).contiguous())
    loops[f"g{sizes.groups[0]}_rgb"] = BatchedLoop(rgb, spec, settings, sizes.groups[0])
    samples = {name: loop.train(1) for name, loop in loops.items()}  # warm-up; samples per epoch
    seconds: dict[str, list[float]] = {name: [] for name in loops}
    names = list(loops)
    for r in range(sizes.batched_repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            seconds[name].append(timed(lambda loop=loops[name]: loop.train(sizes.throughput_epochs)))
    epochs = sizes.throughput_epochs
    result: dict = {"threads": threads, "groups": list(sizes.groups), "seconds": seconds,
                    "samples_per_timing": {name: s * epochs for name, s in samples.items()},
                    "bare_samples_per_s": samples["bare"] * epochs / median(seconds["bare"])}
    for name in names[1:]:
        rate = [samples[name] * epochs / t for t in seconds[name]]
        ratios = [samples[name] / samples["bare"] * b / t for t, b in zip(seconds[name], seconds["bare"])]
        result[f"{name}_samples_per_s"] = median(rate)
        result[f"{name}_ratio"] = median(ratios)
    return result


def fisher_cost(data: ClientData, spec: DatasetSpec, threads: int, sizes: LocalSizes) -> dict:
    """Seconds of a 10-epoch local training and of the Fisher over all samples, per backend."""
    torch.set_num_threads(threads)
    ours = OursLoop(data, spec, TrainSettings())
    idx = torch.arange(len(data))
    ours.train(1)
    for backend in BACKENDS:  # warm-up (vmap compiles its transforms on first use)
        empirical_fisher(ours.model, data, spec, idx[:256], backend=backend)
    train, fisher = [], {b: [] for b in BACKENDS}
    for _ in range(sizes.fisher_repeats):
        ours.model.load(build_model("simple_cnn", 0).flat)
        train.append(timed(lambda: ours.train(PAPER_EPOCHS)))
        for backend in BACKENDS:
            fisher[backend].append(timed(lambda b=backend: empirical_fisher(ours.model, data, spec, idx, backend=b)))
    result = {"threads": threads, "samples": len(data), "epochs": PAPER_EPOCHS, "seconds_train": train,
              "seconds_fisher": fisher, "train_median": median(train)}
    for backend in BACKENDS:
        result[f"fisher_{backend}_median"] = median(fisher[backend])
        result[f"fraction_{backend}"] = median([f / t for f, t in zip(fisher[backend], train)])
    return result


def run_local(sizes: LocalSizes, root: Path | None) -> tuple[list[Figure], dict]:
    """Both in-process benchmarks at every thread count of ``sizes``."""
    previous = torch.get_num_threads()
    data, spec, source = client_data(sizes.samples, root)
    figures: list[Figure] = []
    details: dict = {"data": source, "throughput": [], "batched": [], "fisher": []}
    try:
        for threads in sizes.threads:
            say(f"local training throughput vs bare loop, {threads} thread(s)")
            load = load1()
            tp = throughput(data, spec, threads, sizes)
            load = max(load, load1())
            details["throughput"].append({**tp, "load": load})
            figures += throughput_figures(tp, load, source)
            say(f"batched-client training (groups {', '.join(map(str, sizes.groups))}) vs bare loop, "
                f"{threads} thread(s)")
            load = load1()
            bt = batched_throughput(data, spec, threads, sizes)
            load = max(load, load1())
            details["batched"].append({**bt, "load": load})
            figures += batched_figures(bt, load, source)
            say(f"Fisher cost vs 10-epoch training, {threads} thread(s)")
            load = load1()
            fc = fisher_cost(data, spec, threads, sizes)
            load = max(load, load1())
            details["fisher"].append({**fc, "load": load})
            figures += fisher_figures(fc, load, source)
    finally:
        torch.set_num_threads(previous)
    return figures, details


def throughput_figures(tp: dict, load: float, source: str) -> list[Figure]:
    t = tp["threads"]
    note = (f"{source}; batch 64, median of {len(tp['seconds_ours'])} alternating pairs of "
            f"{tp['samples_per_timing']} samples")
    return [
        Figure(f"train_throughput_ours_t{t}", "Local training, ours (local_train)", tp["ours_samples_per_s"],
               "samples/s", threads=str(t), load=load, notes=note),
        Figure(f"train_throughput_bare_t{t}", "Local training, bare PyTorch loop", tp["bare_samples_per_s"],
               "samples/s", threads=str(t), load=load, notes="SimpleCNN, torch.optim.SGD, pre-made tensors, no augmentation"),
        Figure(f"train_throughput_ratio_t{t}", "Training throughput ours / bare", tp["ratio"], "x", ">=", 0.95,
               threads=str(t), load=load, notes="median of per-pair ratios"),
    ]


def batched_figures(bt: dict, load: float, source: str) -> list[Figure]:
    t = bt["threads"]
    reps = len(bt["seconds"]["bare"])
    figures = []
    for g in bt["groups"]:
        for name, what, target in ((f"g{g}", "grayscale", BATCHED_TARGET), (f"g{g}_rgb", "3-channel", None)):
            if f"{name}_ratio" not in bt:
                continue
            note = (f"{source}, {what}; {g} clients of {bt['samples_per_timing']['bare']} samples each "
                    f"(same data, own generators), batch 64, tensor augmentation, {CHUNK} clients at a time (the "
                    f"stacked form, client/stacked.py); median of {reps} rounds")
            label = f"Batched-client training, {g} clients, {what} (train_group)"
            figures.append(Figure(f"batched_throughput_{name}_t{t}", label, bt[f"{name}_samples_per_s"],
                                  "samples/s", threads=str(t), load=load, notes=note))
            figures.append(Figure(f"batched_ratio_{name}_t{t}",
                                  f"Batched-client training, {g} clients, {what} / bare loop",
                                  bt[f"{name}_ratio"], "x", ">=" if target else None, target, threads=str(t),
                                  load=load, notes="median of per-round ratios of samples/s; bare loop timed in "
                                  "the same rounds" + ("" if target else "; no shortcut for the first "
                                                       "convolution (RGB data), reported without a target")))
    return figures


def fisher_figures(fc: dict, load: float, source: str) -> list[Figure]:
    t, n = fc["threads"], fc["samples"]
    reps = len(fc["seconds_train"])
    figures = [Figure(f"train_10_epochs_seconds_t{t}", f"One client's 10-epoch training ({n} samples)",
                      fc["train_median"], "s", threads=str(t), load=load, notes=f"{source}; median of {reps}")]
    for backend in ("layers", "vmap"):
        figures.append(Figure(f"fisher_seconds_{backend}_t{t}", f"Empirical Fisher over {n} samples, {backend}",
                              fc[f"fisher_{backend}_median"], "s", threads=str(t), load=load,
                              notes=f"median of {reps}"))
        figures.append(Figure(f"fisher_fraction_{backend}_t{t}",
                              f"Fisher / 10-epoch training, backend {backend}", fc[f"fraction_{backend}"], "x",
                              "<=", 0.25, threads=str(t), load=load,
                              notes="the runs' default backend" if backend == "layers" else "alternative backend"))
    return figures
