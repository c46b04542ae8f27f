"""Every client computation stays on the rank's device (runtime.placement, runtime.staging).

On a CPU-only machine the clients' training, Fisher (every estimator and backend), batched
groups, forged Fisher vectors and evaluation run with the model and data on the ``meta``
device under ``DeviceMixing``: an operation mixing a CPU tensor with a device tensor fails, and
so does reading a value back (a GPU step must not wait for the host). On a machine with CUDA
the same computations run on the GPU and are compared with the CPU; those tests skip elsewhere
(and ``make gpu-check`` runs them on a GPU machine).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fdcr_mpi import evaluation
from fdcr_mpi.client import (
    ClientData,
    TrainSettings,
    batch_mean_sq_fisher,
    empirical_fisher,
    fisher_samples,
    train_client,
)
from fdcr_mpi.client.batched import train_group
from fdcr_mpi.config import load_config
from fdcr_mpi.data.datasets import SPECS
from fdcr_mpi.data.experiment import build_experiment
from fdcr_mpi.data.poison import trigger_mask
from fdcr_mpi.evaluation import EvalSets, Span
from fdcr_mpi.models import build_model
from fdcr_mpi.runtime import numerics
from fdcr_mpi.runtime.clients import ClientRunner
from fdcr_mpi.runtime.staging import Device, host_buffer, is_pinned
from tests.device_check import META, DeviceMixing

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA GPU on this machine (make gpu-check runs these)")
SETTINGS = TrainSettings(local_epochs=2, lr=0.05, batch_size=8)


def make_client(n: int, attacker: bool, channels: int = 1, seed: int = 0) -> ClientData:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, 32, 32, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    poisoned = torch.zeros(n, dtype=torch.bool)
    if attacker:
        poisoned[::2] = True
    true_y = y.clone()
    y[poisoned] = 2
    return ClientData(x=x, y=y, poisoned=poisoned, trigger=trigger_mask("paper") if attacker else None,
                      true_y=true_y)


CLIENTS = [make_client(37, True, seed=1), make_client(20, False, seed=2), make_client(5, False, seed=3)]


@pytest.fixture(params=["fmnist", "cifar10"])
def spec_name(request) -> str:
    """A grayscale dataset (the repeated-channel shortcuts) and an RGB one with flips."""
    return request.param


def clients_for(spec_name: str, device: torch.device) -> list[ClientData]:
    channels = SPECS[spec_name].channels
    return [make_client(c.x.shape[0], c.trigger is not None, channels, seed=i).to(device)
            for i, c in enumerate(CLIENTS)]


# --- the meta device: no mixing, no read-back ---------------------------------------------


def test_the_check_catches_mixing_and_read_back() -> None:
    model = build_model("simple_cnn", 0, device=META)
    with DeviceMixing(), pytest.raises(AssertionError, match="mixes devices"):
        torch.zeros(model.size).add_(model.flat)  # a CPU accumulator of a device tensor
    with DeviceMixing(), pytest.raises(AssertionError, match="mixes devices"):
        model.flat[torch.arange(3)]  # a CPU index into a device tensor: a copy every call
    with DeviceMixing(), pytest.raises(AssertionError, match="mixes devices"):
        torch.zeros((), dtype=torch.float64).add_(model.flat.sum())  # a CPU loss accumulator
    with pytest.raises((RuntimeError, NotImplementedError)):
        float(model.flat.sum())  # a value read back: a GPU step would wait here


def test_training_stays_on_the_device(spec_name: str) -> None:
    model = build_model("simple_cnn", 0, device=META)
    data = clients_for(spec_name, META)[0]
    with DeviceMixing():
        loss = train_client(model, data, SPECS[spec_name], SETTINGS, torch.Generator().manual_seed(0))
    assert loss.device == META and loss.dtype == torch.float64 and model.flat.device == META


@pytest.mark.parametrize(("estimator", "backend"), [("empirical", "layers"), ("empirical", "vmap"),
                                                    ("batch_mean_sq", None)])
def test_fisher_stays_on_the_device(spec_name: str, estimator: str, backend: str | None) -> None:
    model = build_model("simple_cnn", 0, device=META)
    data = clients_for(spec_name, META)[0]
    with DeviceMixing():
        idx = fisher_samples(data, 16, torch.Generator().manual_seed(0))
        if estimator == "empirical":
            fisher = empirical_fisher(model, data, SPECS[spec_name], idx, 8, backend)
        else:
            fisher = batch_mean_sq_fisher(model, data, SPECS[spec_name], idx, 8)
    assert fisher.device == META and fisher.shape == (model.size,)


@pytest.mark.parametrize("drop_last", [True, False])
def test_a_batched_group_stays_on_the_device(spec_name: str, drop_last: bool) -> None:
    model = build_model("simple_cnn", 0, device=META)
    settings = TrainSettings(local_epochs=2, lr=0.05, batch_size=8, drop_last=drop_last)
    with DeviceMixing():
        out, losses = train_group(model, model.flat, clients_for(spec_name, META), SPECS[spec_name], settings,
                                  [torch.Generator().manual_seed(i) for i in range(3)])
    assert out.device == META and losses.device == META and out.shape == (3, model.size)


@pytest.mark.parametrize("forgery", ["honest", "uniform", "noise"])
def test_reported_fisher_stays_on_the_device(forgery: str) -> None:
    config = load_config(None, ["data.dataset=synthetic", "rounds=1", "fisher.max_samples=8",
                                f"attack.fisher={forgery}", "attack.malicious_ratio=0.3"])
    exp = build_experiment(config, [9], device=META)  # client 9 is an attacker (the last 30%)
    runner = ClientRunner(exp, [9], with_fisher=True, device=META)
    with DeviceMixing():
        fisher = runner.reported_fisher(runner.model, exp.clients[9], True, torch.Generator().manual_seed(0))
    assert fisher.device == META and fisher.shape == (runner.model.size,)


def test_evaluation_counts_stay_on_the_device() -> None:
    x = torch.randn(50, 1, 32, 32)
    sets = EvalSets(test_x=x[10:50], test_y=torch.randint(0, 10, (50,)), backdoor_incl_x=x[:20], target=2,
                    clean=Span(10, 50), triggered=Span(0, 20)).to(META)
    model = build_model("simple_cnn", 0, device=META)
    work = [evaluation.Batch(False, 10, 50), evaluation.Batch(True, 0, 20)]
    with DeviceMixing():
        counts = evaluation.count_hits(model, sets, work)
    assert counts.device == META and counts.shape == (evaluation.COUNTS,)


def test_client_data_and_eval_rows_are_built_on_the_device() -> None:
    config = load_config(None, ["data.dataset=synthetic", "rounds=1", "data.proxy_size=64"])
    exp = build_experiment(config, [0, 9], eval_share=(1, 3), server=True, with_proxy=True, device=META)
    for data in exp.clients.values():
        assert {t.device for t in (data.x, data.y, data.poisoned)} == {META}
    assert exp.clients[9].trigger.device == META
    sets = exp.eval_sets
    assert {sets.test_x.device, sets.test_y.device, sets.backdoor_incl_x.device} == {META}
    assert sets.proxy_x.device.type == "cpu"  # the proxy set is the server's, on its CPU


# --- staging -------------------------------------------------------------------------------


def test_host_buffers_are_exact_and_plain_without_a_gpu() -> None:
    rows = host_buffer((3, 1001), np.float32, pinned=True)
    assert rows.shape == (3, 1001) and rows.flags.c_contiguous and rows.dtype == np.float32
    assert is_pinned(rows) == CUDA
    device = Device(torch.device("cpu"))
    device.to_host(rows[1], torch.arange(1001, dtype=torch.float32))
    device.synchronize()
    assert rows[1, 1000] == 1000.0


# --- on a GPU --------------------------------------------------------------------------------


@requires_cuda
def test_pinned_rows_receive_asynchronous_copies() -> None:
    rows = host_buffer((4, 92_626), np.float32, pinned=True)
    assert is_pinned(rows) and rows.nbytes == 4 * 92_626 * 4
    device = Device(torch.device("cuda", 0))
    values = [torch.full((92_626,), float(i), device="cuda") for i in range(4)]
    for i, v in enumerate(values):
        device.to_host(rows[i], v * 2)
    device.synchronize()
    assert [float(r[0]) for r in rows] == [0.0, 2.0, 4.0, 6.0] and float(rows[3, -1]) == 6.0


@pytest.fixture
def gpu_numerics():
    """The runtime's GPU settings (deterministic kernels, TF32 off) for one test, then back."""
    cuda = torch.device("cuda", 0)
    numerics.prepare_process()
    numerics.configure(1, cuda, deterministic=True, tf32=False)
    yield cuda
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic = False


@requires_cuda
def test_gpu_training_fisher_and_groups_are_deterministic_and_match_the_cpu(gpu_numerics) -> None:
    cuda = gpu_numerics
    spec = SPECS["cifar10"]
    results = {}
    for device in (torch.device("cpu"), cuda, cuda):
        model = build_model("simple_cnn", 0, device=device)
        data = clients_for("cifar10", device)
        loss = train_client(model, data[0], spec, SETTINGS, torch.Generator().manual_seed(0))
        fisher = empirical_fisher(model, data[0], spec, fisher_samples(data[0], None, torch.Generator()))
        out, losses = train_group(model, model.flat, data, spec, SETTINGS, [torch.Generator().manual_seed(i)
                                                                           for i in range(3)])
        runs = results.setdefault(device.type, [])
        runs.append([t.detach().cpu() for t in (model.flat, loss, fisher, out, losses)])
    gpu_a, gpu_b = results["cuda"]
    for a, b in zip(gpu_a, gpu_b):  # deterministic kernels: the same bits twice (a client without a step: nan)
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    for cpu, gpu in zip(results["cpu"][0], gpu_a):  # another device: the same numbers to float tolerance
        torch.testing.assert_close(gpu.double(), cpu.double(), rtol=2e-3, atol=2e-4, equal_nan=True)


@requires_cuda
def test_gpu_evaluation_counts_match_the_cpu() -> None:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(600, 1, 32, 32, generator=gen), torch.randint(0, 10, (600,), generator=gen)
    sets = EvalSets(test_x=x, test_y=y, backdoor_incl_x=x.clone(), target=2, clean=Span(0, 600),
                    triggered=Span(0, 600))
    work = evaluation.batches(600, 256)
    cpu = evaluation.count_hits(build_model("simple_cnn", 1), sets, work).numpy()
    gpu = evaluation.count_hits(build_model("simple_cnn", 1, device="cuda"), sets.to("cuda"), work).cpu().numpy()
    assert np.abs(cpu - gpu).max() <= 2  # a prediction may flip on a near tie, no more


def test_the_released_fisher_stays_on_the_device(spec_name: str) -> None:
    from fdcr_mpi.client.fisher_released import released_fisher

    model = build_model("simple_cnn", 0, device=META)
    data = clients_for(spec_name, META)[0]
    with DeviceMixing():
        idx = fisher_samples(data, None, torch.Generator().manual_seed(0))
        fisher = released_fisher(model, data, SPECS[spec_name], idx, 8, torch.Generator().manual_seed(1))
    assert fisher.device == META
