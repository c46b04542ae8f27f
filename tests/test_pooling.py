"""models.pooling: the inference form of 2 x 2 max pooling equals F.max_pool2d bitwise, and
anything that differentiates keeps the plain op."""

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


@pytest.mark.parametrize("x", [
    tied((8, 6, 28, 28)),
    torch.randn(4, 16, 10, 10, generator=torch.Generator().manual_seed(1)),
    torch.randn(4, 6, 28, 28, generator=torch.Generator().manual_seed(2)).contiguous(memory_format=torch.channels_last),
    torch.randn(4, 12, 8, 8, generator=torch.Generator().manual_seed(3))[:, ::2],
    torch.full((2, 3, 4, 4), float("-inf")),
], ids=["ties", "normal", "channels_last", "strided", "minus_inf"])
def test_window_max_is_the_kernel_bitwise(x: torch.Tensor) -> None:
    assert torch.equal(bits(window_max(x)), bits(F.max_pool2d(x, 2)))
    with torch.no_grad():
        assert torch.equal(bits(max_pool2x2(x)), bits(F.max_pool2d(x, 2)))


def signed_zeros(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    zeros = torch.zeros(shape)
    return torch.where(torch.rand(shape, generator=gen) > 0.5, zeros, -zeros)


def test_zeros_of_both_signs_give_zero_and_a_biased_layer_after_them_the_same_bits() -> None:
    """The one difference in the bits: the sign of a zero maximum. A convolution with a bias after
    the pooling (as in SimpleCNN) does not see it."""
    x = signed_zeros((16, 6, 28, 28), seed=10)
    x[:, :, ::3] = tied((16, 6, 10, 28), seed=11)[:, :, :10]  # some windows with other values
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
