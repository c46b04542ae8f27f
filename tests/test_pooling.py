"""models.pooling: 2 x 2 max pooling with F.max_pool2d's numbers: the inference form's values, the
training form's values, indices and gradients bitwise, and the plain op under torch.func and
recordings; one client's training and its Fisher are bitwise those of nn.MaxPool2d."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vmap
from torch.overrides import TorchFunctionMode

from fdcr_mpi.models import build_model
from fdcr_mpi.models.pooling import MaxPool2x2, max_pool2x2, window_max


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def tied(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Values from {0, 1, 2}: most windows hold a tie, as the flat background of an image does."""
    return torch.randint(0, 3, shape, generator=torch.Generator().manual_seed(seed)).float()


def signed_zeros(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    zeros = torch.zeros(shape)
    return torch.where(torch.rand(shape, generator=gen) > 0.5, zeros, -zeros)


def signed_zeros_in(shape: tuple[int, ...]) -> torch.Tensor:
    """Zeros of both signs, with tied windows of other values in every third row."""
    x = signed_zeros(shape, seed=10)
    x[:, :, ::3] = tied((shape[0], shape[1], (shape[2] + 2) // 3, shape[3]), seed=11)
    return x


def with_nans(x: torch.Tensor) -> torch.Tensor:
    """x with NaN in some windows: alone, and twice in one window (the kernel keeps the last)."""
    x = x.clone()
    x.view(-1)[::997] = float("nan")
    x[0, 0, 2:4, 2:4] = torch.tensor([[1.0, float("nan")], [float("nan"), 2.0]])
    return x


CASES = [
    tied((8, 6, 28, 28)),
    torch.randn(4, 16, 10, 10, generator=torch.Generator().manual_seed(1)),
    torch.randn(4, 6, 28, 28, generator=torch.Generator().manual_seed(2)).contiguous(memory_format=torch.channels_last),
    torch.randn(4, 12, 8, 8, generator=torch.Generator().manual_seed(3))[:, ::2],
    torch.full((2, 3, 4, 4), float("-inf")),
]
IDS = ["ties", "normal", "channels_last", "strided", "minus_inf"]


@pytest.mark.parametrize("x", CASES, ids=IDS)
def test_window_max_is_the_kernel_bitwise(x: torch.Tensor) -> None:
    assert torch.equal(bits(window_max(x)), bits(F.max_pool2d(x, 2)))
    with torch.no_grad():
        assert torch.equal(bits(max_pool2x2(x)), bits(F.max_pool2d(x, 2)))


@pytest.mark.parametrize("x", [*CASES, signed_zeros_in((8, 6, 12, 12)), with_nans(tied((4, 6, 28, 28), seed=13))],
                         ids=[*IDS, "signed_zeros", "nan"])
def test_the_training_form_has_the_kernels_values_layout_and_gradient_bitwise(x: torch.Tensor) -> None:
    g = torch.randn(x.shape[0], x.shape[1], x.shape[2] // 2, x.shape[3] // 2,
                    generator=torch.Generator().manual_seed(14))
    g.view(-1)[::5] = -0.0
    mine, plain = x.detach().clone(), x.detach().clone()
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        mine, plain = (t.contiguous(memory_format=torch.channels_last) for t in (mine, plain))
    mine.requires_grad_()
    plain.requires_grad_()
    ours, kernel = max_pool2x2(mine), F.max_pool2d(plain, 2)
    assert ours.grad_fn is not None and "ChannelsLastPool" in type(ours.grad_fn).__name__
    assert torch.equal(bits(ours.detach()), bits(kernel.detach())) and ours.stride() == kernel.stride()
    ours.backward(g)
    kernel.backward(g)
    assert torch.equal(bits(mine.grad), bits(plain.grad))


def test_zeros_of_both_signs_give_zero_and_a_biased_layer_after_them_the_same_bits() -> None:
    """The one difference in the bits: the sign of a zero maximum. A convolution with a bias after
    the pooling (as in SimpleCNN) does not see it."""
    x = signed_zeros_in((16, 6, 28, 28))
    assert torch.equal(window_max(x), F.max_pool2d(x, 2))  # -0.0 == 0.0
    conv = torch.nn.Conv2d(6, 16, 5)
    with torch.no_grad():
        ours, kernel = conv(torch.relu(window_max(x))), conv(torch.relu(F.max_pool2d(x, 2)))
    assert torch.equal(bits(ours), bits(kernel))


def test_nan_anywhere_in_a_window_gives_nan() -> None:
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(4))
    x[0, 1, 3, 2] = float("nan")
    x[1, 2, 0, 0] = float("nan")
    got, want = window_max(x), F.max_pool2d(x, 2)
    assert torch.equal(got.isnan(), want.isnan()) and int(got.isnan().sum()) == 2
    assert torch.equal(got.nan_to_num(), want.nan_to_num())


def test_odd_sizes_floor_like_the_kernel() -> None:
    x = torch.randn(2, 3, 7, 9, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(max_pool2x2(x), F.max_pool2d(x, 2))
    assert max_pool2x2(x).shape == (2, 3, 3, 4)


def test_gradients_of_ties_go_to_the_first_maximum_as_in_the_kernel() -> None:
    """With autograd recording, max_pool2x2 is the kernel: ``torch.maximum`` would split each tie."""
    x = tied((8, 6, 28, 28), seed=6)
    g = torch.randn(8, 6, 14, 14, generator=torch.Generator().manual_seed(7))
    mine, plain = x.clone().requires_grad_(), x.clone().requires_grad_()
    max_pool2x2(mine).backward(g)
    F.max_pool2d(plain, 2).backward(g)
    assert torch.equal(mine.grad, plain.grad)
    split = x.clone().requires_grad_()
    window_max(split).backward(g)
    assert not torch.equal(split.grad, plain.grad)  # the ties make the difference visible


def test_per_sample_gradients_under_torch_func_are_the_kernels() -> None:
    x = tied((5, 6, 12, 12), seed=8)

    def loss(pool, z: torch.Tensor) -> torch.Tensor:
        return (pool(z * 1.5) * torch.arange(36.0).view(6, 6)).sum()

    got = vmap(grad(lambda z: loss(max_pool2x2, z)))(x)
    want = vmap(grad(lambda z: loss(lambda t: F.max_pool2d(t, 2), z)))(x)
    assert torch.equal(got, want)


def test_a_recording_mode_sees_one_max_pool2d_call() -> None:
    class Calls(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.funcs: list = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.funcs.append(func)
            return func(*args, **(kwargs or {}))

    calls, x = Calls(), torch.ones(1, 2, 4, 4)
    with torch.no_grad(), calls:
        MaxPool2x2()(x)
    assert calls.funcs == [F.max_pool2d]


def test_other_devices_keep_their_pooling_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Off the CPU (here the meta device, as a GPU would be) the pooling kernel runs, not the views."""
    from fdcr_mpi.models import pooling

    def no_views(x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("window_max off the CPU")

    monkeypatch.setattr(pooling, "window_max", no_views)
    with torch.no_grad():
        out = max_pool2x2(torch.empty(2, 6, 28, 28, device="meta"))
        with pytest.raises(AssertionError, match="off the CPU"):
            max_pool2x2(torch.zeros(2, 6, 28, 28))  # the CPU takes the views
    assert out.device.type == "meta" and out.shape == (2, 6, 14, 14)


def test_simple_cnn_evaluates_bitwise_as_with_nn_maxpool2d() -> None:
    model = build_model("simple_cnn", 0).module.eval()
    x = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    x[:, :, :8] = 0.0  # a flat band: tied windows after the first convolution
    model.conv1.bias.data[:3] = 0.0  # and zeros of both signs there for three of its channels
    x[:, :, :8] = signed_zeros((64, 3, 8, 32), seed=12)
    with torch.no_grad():
        fast = model(x)
        model.pool = torch.nn.MaxPool2d(2)
        plain = model(x)
    assert isinstance(build_model("simple_cnn", 0).module.pool, MaxPool2x2)
    assert torch.equal(fast, plain)


@pytest.mark.parametrize("model_name", ["simple_cnn", "cnn_1m"])
def test_one_clients_training_and_fisher_are_bitwise_those_of_nn_maxpool2d(model_name: str) -> None:
    """Local training (two SGD steps with momentum, augmentation) and the empirical Fisher of Eq. 5
    (layers backend) of a model with MaxPool2x2 and of the same model with nn.MaxPool2d."""
    from dataclasses import replace

    from fdcr_mpi.client import TrainSettings, empirical_fisher, train_client
    from fdcr_mpi.client.train import ClientData
    from fdcr_mpi.data.datasets import SPECS

    gen = torch.Generator().manual_seed(15)
    x = torch.randn(40, 1, 32, 32, generator=gen)
    x[:, :, :6] = 0.0  # a flat border: tied windows
    data = ClientData(x=x, y=torch.randint(0, 10, (40,), generator=gen), poisoned=torch.zeros(40, dtype=torch.bool))
    spec, settings = SPECS["fmnist"], replace(TrainSettings(), local_epochs=1, batch_size=16)
    results = []
    for plain in (False, True):
        model = build_model(model_name, 0)
        if plain:
            model.module.pool = torch.nn.MaxPool2d(2)
        loss = train_client(model, data, spec, settings, torch.Generator().manual_seed(16))
        results.append((float(loss), model.flat.clone(), empirical_fisher(model, data, spec, torch.arange(40))))
    (loss_ours, w_ours, f_ours), (loss_plain, w_plain, f_plain) = results
    assert not torch.equal(w_ours, build_model(model_name, 0).flat)  # it trained
    assert loss_ours == loss_plain
    assert torch.equal(bits(w_ours), bits(w_plain)) and torch.equal(bits(f_ours), bits(f_plain))
