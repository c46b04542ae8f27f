"""2 x 2 max pooling with stride 2, faster than ``F.max_pool2d`` on a CPU and with its numbers.

``F.max_pool2d(x, 2)`` on a channels-first CPU tensor runs a scalar loop per window: in an
evaluation forward of SimpleCNN (batches of 500, one thread) the two poolings took more time than
the two convolutions, and in a training step of one client a quarter of the step. Two faster forms
(benchmarks/results/speed.md):

- Where no gradient is recorded (evaluation, DeepSight's division differences), the window
  (a, b; c, d) at rows 2i, 2i+1 and columns 2j, 2j+1 is four strided views of x, and

      y = max(max(a, b), max(c, d))

  is the kernel's value: a maximum rounds nothing, and a NaN anywhere in the window gives NaN in
  both. One difference is in the bits: where the maximum of a window is a zero held with both
  signs, the kernel returns the first of them and ``torch.maximum`` either; a layer that adds a
  bias to a sum over its inputs, as the convolution after each pooling of SimpleCNN and Cnn1M
  does, then gives bitwise the same output unless that output is itself an exact zero. (Autograd
  of ``torch.maximum`` would split the gradient of a tie between its inputs, so this form never
  records one. An exact copy of the kernel's choices, with comparisons and selections, was slower
  than the kernel.)
- Where autograd records the gradient (training one client, the Fisher), the pooling kernel runs
  on a channels-last copy of x: it keeps, as the channels-first one does, the first maximum of each
  window (or its last NaN), so its values and indices are bitwise the same, and the gradient is the
  kernel's own backward on those indices (``max_pool2d_with_indices_backward``), as autograd of
  ``F.max_pool2d`` computes it. The copy costs less than the channels-first loop saves.

Under ``torch.func`` transforms (vmap, and the ``grad`` of the Fisher's vmap backend) and under a
``TorchFunctionMode`` (a recording, ``client.stacked``, which must see the one call it knows),
``max_pool2x2`` is ``F.max_pool2d``; so it is off the CPU, where a GPU's kernel is one launch.
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


WINDOW = ([2, 2], [2, 2], [0, 0], [1, 1], False)  # kernel, stride, padding, dilation, ceil_mode


class _ChannelsLastPool(torch.autograd.Function):
    """``F.max_pool2d(x, 2)`` of a (B, C, H, W) tensor through the channels-last kernel, with the
    channels-first kernel's values, indices and gradient (see the module's docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y, indices = torch.ops.aten.max_pool2d_with_indices(x.contiguous(memory_format=torch.channels_last),
                                                            *WINDOW)
        layout = torch.channels_last if channels_last(x) else torch.contiguous_format
        indices = indices.contiguous(memory_format=layout)
        ctx.save_for_backward(x, indices)
        return y.contiguous(memory_format=layout)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        x, indices = ctx.saved_tensors
        return torch.ops.aten.max_pool2d_with_indices_backward(grad, x, *WINDOW, indices)


def channels_last(x: torch.Tensor) -> bool:
    """Whether the kernel would lay its output out channels-last (x is stored so, and not also
    channels-first contiguous)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _plain_op_needed() -> bool:
    """Whether a torch function mode watches the calls or a torch.func transform is on (asked
    before ``max_pool2x2`` touches x, so that a recording sees no call but ``F.max_pool2d``)."""
    mode = getattr(torch._C, "_is_torch_function_mode_enabled", None)
    functorch = getattr(torch._C, "_are_functorch_transforms_active", None)
    return mode is None or bool(mode()) or functorch is None or bool(functorch())


def max_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2)``: on a CPU (B, C, H, W) tensor with even H and W, by ``window_max``
    where no gradient is recorded and by ``_ChannelsLastPool`` where one is."""
    if _plain_op_needed() or x.device.type != "cpu" or x.dim() != 4 or x.shape[-1] % 2 or x.shape[-2] % 2:
        return F.max_pool2d(x, 2)
    if torch.is_grad_enabled() and x.requires_grad:
        return _ChannelsLastPool.apply(x)
    return window_max(x)


class MaxPool2x2(nn.MaxPool2d):
    """``nn.MaxPool2d(2)`` computed by ``max_pool2x2``."""

    def __init__(self) -> None:
        super().__init__(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return max_pool2x2(x)
