"""G models evaluated from stacked parameters without vmap (fdcr_mpi.client.stacked): the same
values and gradients as the vmap path, bitwise, and the models it declines."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fdcr_mpi.client import stacked
from fdcr_mpi.client.batched import _loss_functions, _stack_images, batched_twin, train_group
from fdcr_mpi.data.datasets import SPECS
from fdcr_mpi.models import Cnn1M, ResNet18, SimpleCNN, build_model
from tests.test_batched import CLIENTS, SEEDS, START, generators, gray, settings

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
G = 3


def stacked_params(module: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """G perturbed copies of the module's parameters, (G, *shape) autograd leaves."""
    gen = torch.Generator().manual_seed(seed)
    return {n: (p.detach() + 0.05 * torch.randn(G, *p.shape, generator=gen)).requires_grad_()
            for n, p in module.named_parameters()}


def batch(channels: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """G image batches as ``train_group`` stacks them, and labels; ``channels=1``: grayscale images
    handed to the model as one channel repeated three times."""
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(size, channels, 32, 32, generator=gen) for _ in range(G)]
    xs = [x.expand(-1, 3, -1, -1) for x in xs]  # data.datasets.model_input
    return _stack_images(xs), torch.randint(0, 10, (G, size), generator=gen)


def seeded(factory: type[nn.Module], seed: int = 0) -> nn.Module:
    """``factory()`` with weights drawn from ``seed`` (the global generator is left as it was): a
    module built at collection time would otherwise take whatever state the global generator has."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


class Odd(nn.Module):
    """Layers and spellings beyond SimpleCNN's: nn.ReLU, F.relu, average pooling, nn.Tanh, a
    bias-free convolution, x.view(x.size(0), -1) and nn.Flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False)
        self.act = nn.ReLU()
        self.pool = nn.AvgPool2d(2)
        self.conv2 = nn.Conv2d(4, 5, 3, padding="same")
        self.flat = nn.Flatten()
        self.fc = nn.Linear(5 * 8 * 8, 16)
        self.tanh = nn.Tanh()
        self.out = nn.Linear(16, 10, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.act(self.conv(x)))
        x = F.relu(self.conv2(x))
        return self.out(self.tanh(self.fc(self.flat(x))))


class ViewFlatten(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 5)
        self.fc = nn.Linear(2 * 28 * 28, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        return self.fc(x.view(x.size(0), -1))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 32 * 32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(x + self.conv(x), 1))  # an addition: no stacked form


class BareParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 10)
        self.scale = nn.Parameter(torch.ones(10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(x, 1)) * self.scale


class ImageOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 10, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)  # (B, 10, 1, 1): not logits of the stacked form


EXAMPLE = torch.randn(2, 3, 32, 32)


def test_the_library_models_without_batchnorm_have_a_stacked_form() -> None:
    for module in (SimpleCNN(), Cnn1M(), Odd(), ViewFlatten()):
        assert stacked.recorded_forward(module, EXAMPLE) is not None


def test_recording_is_not_disturbed_by_nor_disturbs_another_thread_running_a_model() -> None:
    """The rank's worker threads run their models while one records: the recording mode is
    thread-local (torch.fx tracing would patch nn.Module.__call__ for every thread)."""
    busy, errors, stop = SimpleCNN(), [], threading.Event()

    def run() -> None:
        try:
            while not stop.is_set():
                with torch.no_grad():
                    busy(torch.randn(4, 3, 32, 32))
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    worker = threading.Thread(target=run)
    worker.start()
    try:
        module, x = SimpleCNN(), batch(1, 4, 7)[0]
        params = stacked_params(module, 8)
        for _ in range(20):
            forward = stacked.recorded_forward(module, EXAMPLE)
            assert forward is not None and forward(params, x).shape == (G, 4, 10)
    finally:
        stop.set()
        worker.join()
    assert errors == []


@pytest.mark.parametrize("module", [ResNet18(), Residual(), BareParameter(), ImageOut()],
                         ids=["resnet18", "residual", "bare_parameter", "image_out"])
def test_models_without_a_stacked_form_keep_the_vmap_path(module: nn.Module) -> None:
    assert stacked.recorded_forward(module, EXAMPLE) is None
    assert stacked.loss_functions(module, EXAMPLE) is None


@pytest.mark.parametrize("model", ["simple_cnn", "cnn_1m"])
@pytest.mark.parametrize("channels", [1, 3], ids=["grayscale", "rgb"])
def test_losses_and_gradients_equal_the_vmap_path_bitwise(model: str, channels: int) -> None:
    module = build_model(model, 0).module
    params = stacked_params(module, 1)
    x, y = batch(channels, 6, 2)
    weight = torch.rand(G, 6, generator=torch.Generator().manual_seed(3))
    ours, theirs = stacked.loss_functions(module, EXAMPLE), _loss_functions(batched_twin(module))
    leaves = list(params.values())
    for a, b, extra in ((ours[0], theirs[0], ()), (ours[1], theirs[1], (weight,))):
        la, lb = a(params, x, y, *extra), b(params, x, y, *extra)
        assert la.shape == (G,) and torch.equal(la, lb)
        for ga, gb in zip(torch.autograd.grad(la.sum(), leaves), torch.autograd.grad(lb.sum(), leaves)):
            assert torch.equal(ga, gb)


@pytest.mark.parametrize("module", [seeded(Odd), seeded(ViewFlatten), seeded(SimpleCNN)],
                         ids=["odd", "view_flatten", "simple_cnn"])
@pytest.mark.parametrize("channels", [1, 3], ids=["grayscale", "rgb"])
def test_the_stacked_forward_equals_each_model_on_its_batch(module: nn.Module, channels: int) -> None:
    params = stacked_params(module, 4)
    x, _ = batch(channels, 5, 5)
    logits = stacked.recorded_forward(module, EXAMPLE)(params, x)
    loop = torch.stack([functional_call(module, {n: v[i] for n, v in params.items()}, (x[i].contiguous(),))
                        for i in range(G)])
    assert logits.shape == (G, 5, 10)
    torch.testing.assert_close(logits, loop, rtol=1e-4, atol=1e-5)
    grads = torch.autograd.grad(logits.square().sum(), list(params.values()))
    loop_grads = torch.autograd.grad(loop.square().sum(), list(params.values()))
    for a, b in zip(grads, loop_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("grayscale", [False, True])
@pytest.mark.parametrize("drop_last", [True, False])
def test_train_group_gives_the_vmap_paths_result_bitwise(monkeypatch: pytest.MonkeyPatch, grayscale: bool,
                                                         drop_last: bool) -> None:
    """The stacked path is what train_group takes for SimpleCNN; on the vmap path (the one for
    models without a stacked form), every weight and loss is the same, padded batches included."""
    clients = [gray(c) for c in CLIENTS] if grayscale else CLIENTS
    spec = SPECS["fmnist" if grayscale else "cifar10"]
    calls: list[int] = []
    real = stacked.loss_functions
    monkeypatch.setattr(stacked, "loss_functions", lambda m, x: calls.append(1) or real(m, x))
    fast = train_group(build_model("simple_cnn", 0), START, clients, spec, settings(drop_last), generators(SEEDS))
    assert calls == [1] and real(SimpleCNN(), EXAMPLE) is not None
    slow = train_group(build_model("simple_cnn", 0), START, clients, spec, settings(drop_last), generators(SEEDS),
                       vmap_path=True)
    assert calls == [1]
    assert torch.equal(fast[0], slow[0])
    torch.testing.assert_close(fast[1], slow[1], rtol=0, atol=0, equal_nan=True)
    assert float((fast[0][0] - START).abs().max()) > 1e-2
