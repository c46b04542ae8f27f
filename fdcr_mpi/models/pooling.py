"""2 x 2 max pooling with stride 2 for inference, as the maxima of four strided views.

``F.max_pool2d(x, 2)`` on a channels-first CPU tensor runs a scalar loop per window: in an
evaluation forward of SimpleCNN (batches of 500, one thread) the two poolings took more time than
the two convolutions. The window (a, b; c, d) at rows 2i, 2i+1 and columns 2j, 2j+1 is four strided
views of x, and

    y = max(max(a, b), max(c, d))

is the pooling kernel's value: a maximum rounds nothing, and a NaN anywhere in the window gives NaN
in both. One difference is in the bits: where the maximum of a window is a zero held with both
signs, the kernel returns the first of them and ``torch.maximum`` either; a layer that adds a bias
to a sum over its inputs, as the convolution after each pooling of SimpleCNN and Cnn1M does, then
gives bitwise the same output unless that output is itself an exact zero. It is several times
faster (benchmarks/results/speed.md); an exact copy of the kernel's choices (with comparisons and
selections instead of maxima) was slower than the kernel.

Only the values are the same: autograd of ``torch.maximum`` splits the gradient of a tie between
its two inputs, where the kernel hands it to the first maximum of the window. So ``max_pool2x2``
takes this form only where no gradient is recorded (evaluation, DeepSight's division differences);
training, the Fisher and any ``torch.func`` transform keep ``F.max_pool2d``. So does a forward under
a ``TorchFunctionMode``, so that a recording (``client.stacked``) sees the one call it knows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def window_max(x: torch.Tensor) -> torch.Tensor:
    """y = max(max(a, b), max(c, d)) over the 2 x 2 windows of x (..., 2H, 2W): (..., H, W)."""
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    return torch.maximum(torch.maximum(a, b), torch.maximum(c, d))


def _plain_op_needed(x: torch.Tensor) -> bool:
    """Whether a torch function mode watches the calls (asked first, before any call on x it
    would see), a torch.func transform is on, or autograd records a gradient through x."""
    mode = getattr(torch._C, "_is_torch_function_mode_enabled", None)
    functorch = getattr(torch._C, "_are_functorch_transforms_active", None)
    if mode is None or mode() or functorch is None or functorch():
        return True
    return torch.is_grad_enabled() and x.requires_grad


def max_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2)``, by ``window_max`` for a CPU tensor with even H and W through which no
    gradient is recorded (a GPU's pooling kernel is one launch where this takes three)."""
    if _plain_op_needed(x) or x.device.type != "cpu" or x.dim() < 3 or x.shape[-1] % 2 or x.shape[-2] % 2:
        return F.max_pool2d(x, 2)
    return window_max(x)


class MaxPool2x2(nn.MaxPool2d):
    """``nn.MaxPool2d(2)`` computed by ``max_pool2x2``."""

    def __init__(self) -> None:
        super().__init__(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return max_pool2x2(x)
