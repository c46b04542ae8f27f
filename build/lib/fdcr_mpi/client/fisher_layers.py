"""The empirical Fisher of Eq. 5 from one backward pass per chunk, layer by layer.

For a sample i, the gradient of a layer's weight is a closed form of the layer's input a_i
and the gradient g_i of the loss at the layer's output, so sum_i (grad_i)^2 needs no
per-sample gradient tensor of the whole model:

- Linear:    grad_i W = g_i a_i^T                      ->  sum_i grad_i W^2 = (g^2)^T (a^2)
- Conv2d:    grad_i W = a_i (*) g_i (a correlation; one grouped convolution over the
             samples)  ->  squared, summed over i; an input repeating one channel, as
             grayscale images reach the model, is correlated once (every input channel has
             the same per-sample gradient)
- BatchNorm (eval mode, an affine map per channel): grad_i gamma = sum_p g_i xhat_i, grad_i beta = sum_p g_i

The loss is summed over the chunk (not averaged), so g_i is the gradient of sample i's own
loss. The result equals ``torch.func.vmap(grad(...))`` per-sample gradients squared and
summed (checked by the tests), at a fraction of the memory traffic. Models with other
parametrised layers fall back to the vmap path (``fdcr_mpi.client.empirical_fisher``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from fdcr_mpi.data.datasets import repeats_one_channel

SUPPORTED = (nn.Linear, nn.Conv2d, nn.BatchNorm2d)


def supports(module: nn.Module) -> bool:
    """True when every module that owns parameters is a Linear, Conv2d (groups 1, zero padding
    given as numbers) or BatchNorm2d."""
    for m in module.modules():
        if any(True for _ in m.parameters(recurse=False)) and not isinstance(m, SUPPORTED):
            return False
        if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str)):
            return False
    return True


def _conv_sq(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    repeated = repeats_one_channel(a)  # one channel repeated (grayscale): use it once
    per_sample = _per_sample_weight_grads(layer, a[:, :1] if repeated else a, g)  # (B, O, C', kh, kw)
    sq = per_sample.square().sum(0)
    # every input channel of a repeated input has the same per-sample gradient
    out = [sq.expand(layer.weight.shape).contiguous() if repeated else sq]
    if layer.bias is not None:
        out.append(g.sum(dim=(2, 3)).square().sum(0))
    return out


def _per_sample_weight_grads(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """grad_i W (B, O, C, kh, kw) of a groups=1 convolution, for the C channels of its input ``a``.

    grad_i W[o, c, k] = sum_p a_i[c, stride p + dilation k] g_i[o, p] is itself a convolution of
    a_i with g_i as the kernel (kernel dilation = the layer's stride, output stride = its
    dilation): one grouped convolution with the B samples as groups. On a CPU core it takes a
    third to a half of the time of unfolding the inputs and multiplying (G_i U_i^T).
    """
    b, c = a.shape[:2]
    o, kh, kw = g.shape[1], *layer.kernel_size
    out = F.conv2d(a.transpose(0, 1), g.reshape(b * o, 1, *g.shape[2:]), stride=layer.dilation,
                   padding=layer.padding, dilation=layer.stride, groups=b)  # (C, B*O, >=kh, >=kw)
    return out[:, :, :kh, :kw].reshape(c, b, o, kh, kw).permute(1, 2, 0, 3, 4)


def _linear_sq(layer: nn.Linear, a: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    a, g = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
    out = [g.square().t() @ a.square()]
    if layer.bias is not None:
        out.append(g.square().sum(0))
    return out


def _bn_sq(layer: nn.BatchNorm2d, a: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    shape = (1, -1, 1, 1)
    xhat = (a - layer.running_mean.view(shape)) / torch.sqrt(layer.running_var.view(shape) + layer.eps)
    out = []
    if layer.weight is not None:
        out.append((g * xhat).sum(dim=(2, 3)).square().sum(0))
    if layer.bias is not None:
        out.append(g.sum(dim=(2, 3)).square().sum(0))
    return out


SQUARED = {nn.Linear: _linear_sq, nn.Conv2d: _conv_sq, nn.BatchNorm2d: _bn_sq}


@contextlib.contextmanager
def _repeated_channel_once(convs: list[nn.Conv2d]) -> Iterator[None]:
    """While open, each of ``convs`` given an input that repeats one channel convolves that
    channel once with its filters summed over their input channels: the same output up to float
    rounding, a third of the work. Its hooks still see the repeated input."""

    def forward(layer: nn.Conv2d, plain: Callable[[torch.Tensor], torch.Tensor]):
        def run(x: torch.Tensor) -> torch.Tensor:
            if repeats_one_channel(x):
                return layer._conv_forward(x[:, :1], layer.weight.sum(dim=1, keepdim=True), layer.bias)
            return plain(x)
        return run

    for layer in convs:
        layer.forward = forward(layer, layer.forward)
    try:
        yield
    finally:
        for layer in convs:
            del layer.forward  # the class's forward again


def sum_squared_grads(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """sum_i (d loss_i / d theta)^2 for every parameter, by name, from one forward and one backward."""
    layers = {name: m for name, m in module.named_modules() if isinstance(m, SUPPORTED)
              and any(True for _ in m.parameters(recurse=False))}
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(m: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            inputs[name], outputs[name] = args[0].detach(), out
        return hook

    handles = [m.register_forward_hook(keep(name)) for name, m in layers.items()]
    convs = [m for m in layers.values() if isinstance(m, nn.Conv2d)]
    try:
        with torch.enable_grad(), _repeated_channel_once(convs):
            loss = F.cross_entropy(module(x), y, reduction="sum")
            names = list(layers)
            grads = torch.autograd.grad(loss, [outputs[n] for n in names])
    finally:
        for h in handles:
            h.remove()
    result: dict[str, torch.Tensor] = {}
    for name, g in zip(names, grads):
        layer = layers[name]
        squares = SQUARED[type(layer)](layer, inputs[name], g.detach())
        own = [p for p, _ in zip(("weight", "bias"), range(2)) if getattr(layer, p, None) is not None]
        for pname, sq in zip(own, squares):
            result[f"{name}.{pname}" if name else pname] = sq
    return result
