"""G models of one architecture evaluated at once from stacked parameters, without vmap.

``client.batched`` trains a group of clients as one computation. Its general path is
``torch.func.vmap`` over ``functional_call``; on a CPU much of a step's fixed cost is vmap's own
per-call and per-operator work (about 2 ms of a 10 ms forward of five SimpleCNNs on batches of
64, one thread). This module runs the same computation as plain operators on physically stacked
tensors, for models made of the operations below.

Two layouts carry the G models:

- an image, (B, G*C, H, W): the models' channels side by side, as one grouped convolution
  (``groups = G``) reads and writes them; pooling and element-wise functions act on each
  channel, so they apply to the stacked tensor as it is. An input that repeats one channel
  (grayscale images, ``data.datasets.model_input``) is stored once: a convolution then uses each
  filter summed over its input channels, sum_c w_c * x = (sum_c w_c) * x, and autograd of the
  sum hands every input channel the same gradient;
- a vector, (G, B, F): a linear layer is one batched matmul, x W^T, plus the bias.

``torch.flatten(x, 1)`` (also ``x.flatten(1)``, ``nn.Flatten``, ``x.view(x.size(0), -1)``)
turns an image into a vector, copying each model's (C, H, W) block into C-major order.

The model's forward is recorded once, on one real batch, by a ``TorchFunctionMode``: it is
thread-local, so the other worker threads of a rank can go on running their models (tracing
with ``torch.fx`` would patch ``nn.Module.__call__`` for every thread). Each recorded call is
then replayed in its stacked form. These are the operators that vmap's rules and the batched
twin (``client.batched.batched_twin``) run, so values and gradients are the same, bitwise
(tests/test_stacked.py); what goes is the dispatching. A model with any other operation, a
parameter used outside a convolution or linear layer, or an output that is not (B, K) logits
keeps the vmap path (``recorded_forward`` returns None).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from fdcr_mpi.data.datasets import repeats_one_channel

# operations acting on each element or each channel alone: replayed on the stacked tensor as they are
ELEMENTWISE = {torch.relu, F.relu, torch.Tensor.relu, torch.tanh, torch.Tensor.tanh, torch.sigmoid,
               torch.Tensor.sigmoid, F.gelu, F.silu, F.elu, F.leaky_relu}
PER_CHANNEL = {F.max_pool2d, F.avg_pool2d, torch._C._nn.avg_pool2d, F.adaptive_avg_pool2d}
SHAPE_QUERIES = {"size", "dim", "__get__"}  # x.size(0), x.dim(), x.shape: read, not computed


@dataclass(frozen=True)
class Image:
    """G models' (B, C, H, W) activations as one (B, G*C, H, W) tensor; ``repeated``: one stored
    channel standing for ``channels`` identical ones."""

    t: torch.Tensor
    channels: int
    repeated: bool = False

    def whole(self) -> torch.Tensor:
        """The (B, G*C, H, W) tensor with every channel stored."""
        if not self.repeated:
            return self.t
        b, g, (h, w) = self.t.shape[0], self.t.shape[1], self.t.shape[2:]
        return self.t.unsqueeze(2).expand(b, g, self.channels, h, w).reshape(b, g * self.channels, h, w)


Value = Image | torch.Tensor  # a vector value is a (G, B, F) tensor
Params = dict[str, torch.Tensor]
Step = Callable[[Params, Value], Value]
StackedFn = Callable[[Params, torch.Tensor], torch.Tensor]


def image_input(x: torch.Tensor) -> Image:
    """The (G, B, C, H, W) stacked batch (``client.batched._stack_images``) as an image; a batch
    repeating one channel as a view (channel stride 0) keeps that channel once."""
    repeated = repeats_one_channel(x)
    stored = x.narrow(2, 0, 1) if repeated else x
    return Image(stored.movedim(0, 1).flatten(1, 2), x.shape[2], repeated)


def conv(weight: str, bias: str | None, stride: object, padding: object, dilation: object, out_channels: int) -> Step:
    """A groups=1 convolution of G models: one grouped convolution, bias included."""

    def run(params: Params, x: Image) -> Image:
        w = params[weight]
        if x.repeated:
            w = w.sum(dim=2, keepdim=True)
        b = None if bias is None else params[bias].flatten()
        return Image(F.conv2d(x.t, w.flatten(0, 1), b, stride, padding, dilation, w.shape[0]), out_channels)

    return run


def linear(weight: str, bias: str | None) -> Step:
    """A linear layer of G models on (G, B, F): x W^T (one batched matmul) plus the bias."""

    def run(params: Params, x: torch.Tensor) -> torch.Tensor:
        out = torch.bmm(x, params[weight].transpose(1, 2))
        return out if bias is None else out + params[bias].unsqueeze(1)

    return run


def flatten(params: Params, x: Value) -> torch.Tensor:
    """Per model, (B, C, H, W) -> (B, C*H*W): the (G, B, C*H*W) vector of an image."""
    if isinstance(x, torch.Tensor):
        return x
    t = x.whole()
    g = t.shape[1] // x.channels
    return t.unflatten(1, (g, x.channels)).movedim(1, 0).reshape(g, t.shape[0], -1)


def each(func: Callable[..., torch.Tensor], args: tuple, kwargs: dict) -> Step:
    """``func(x, *args, **kwargs)``, per element or per channel, on the stacked tensor as it is
    (a repeated channel stays repeated)."""

    def run(params: Params, x: Value) -> Value:
        if isinstance(x, torch.Tensor):
            return func(x, *args, **kwargs)
        return Image(func(x.t, *args, **kwargs), x.channels, x.repeated)

    return run


class _Recorder(TorchFunctionMode):
    """Every torch function the forward calls (outermost calls only), with its arguments and result."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Callable, tuple, dict, object]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.calls.append((func, args, kwargs, out))
        return out


def _flattens_from_batch(func: Callable, args: tuple, kwargs: dict, x: torch.Tensor) -> bool:
    """``torch.flatten(x, 1)``, ``x.flatten(1)`` (to the last dimension), or ``x.view(B, -1)`` /
    ``x.reshape(B, -1)`` with B the batch size."""
    if func in (torch.flatten, torch.Tensor.flatten):
        start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
        end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
        return start == 1 and end in (-1, x.dim() - 1)
    if func in (torch.Tensor.view, torch.Tensor.reshape) and not kwargs:
        shape = tuple(args[1]) if len(args) == 2 and isinstance(args[1], (tuple, list, torch.Size)) else args[1:]
        return len(shape) == 2 and shape[0] == x.shape[0] and shape[1] == -1
    return False


def _step(func: Callable, args: tuple, kwargs: dict, given: str, names: dict[int, str]) -> tuple[Step, str] | None:
    """The stacked form of one recorded call on a value of kind ``given`` ("image" or "vector"),
    and the kind of its result; None where it has none. ``names``: id of each parameter -> name."""
    x, rest = args[0], args[1:]
    tensors = [a for a in (*rest, *kwargs.values()) if isinstance(a, torch.Tensor)]
    if func is torch.conv2d and given == "image" and len(args) == 7 and not kwargs and args[6] == 1:
        w, b = args[1], args[2]
        if id(w) in names and (b is None or id(b) in names):
            return conv(names[id(w)], None if b is None else names[id(b)], *args[3:6], w.shape[0]), "image"
        return None
    if func is F.linear and given == "vector" and len(args) == 3 and not kwargs:
        w, b = args[1], args[2]
        if id(w) in names and (b is None or id(b) in names):
            return linear(names[id(w)], None if b is None else names[id(b)]), "vector"
        return None
    if tensors:
        return None  # a parameter (or another tensor) read some other way
    if func in ELEMENTWISE:
        return each(func, rest, kwargs), given
    if func in PER_CHANNEL and given == "image" and not kwargs.get("return_indices", False):
        return each(func, rest, kwargs), "image"
    if _flattens_from_batch(func, args, kwargs, x):
        return flatten, "vector"
    return None


def recorded_forward(module: nn.Module, example: torch.Tensor) -> StackedFn | None:
    """``fn(params, x)``: the logits (G, B, K) of G copies of ``module`` with the stacked
    parameters ``params`` (name -> (G, *shape)) on the stacked image batch ``x`` (G, B, C, H, W)
    (``client.batched._stack_images``); the forward is recorded on ``example``, one model's
    (B, C, H, W) batch. None when ``module`` has an operation without a stacked form here."""
    names = {id(p): name for name, p in module.named_parameters()}
    recorder = _Recorder()
    with torch.no_grad(), recorder:
        logits = module(example)
    kind: dict[int, str] = {id(example): "image"}
    slot: dict[int, int] = {id(example): 0}  # where each value is kept while replaying
    steps: list[tuple[Step, int]] = []
    used: set[str] = set()
    for func, args, kwargs, out in recorder.calls:
        src = args[0] if args else None
        if not isinstance(src, torch.Tensor) or id(src) not in kind:
            return None  # a call on something else than the input's descendants
        if not isinstance(out, torch.Tensor):
            if getattr(func, "__name__", "") in SHAPE_QUERIES:
                continue
            return None
        made = _step(func, args, kwargs, kind[id(src)], names)
        if made is None:
            return None
        used.update(names[id(a)] for a in args[1:] if isinstance(a, torch.Tensor))
        steps.append((made[0], slot[id(src)]))
        slot[id(out)], kind[id(out)] = len(steps), made[1]
    if not isinstance(logits, torch.Tensor) or kind.get(id(logits)) != "vector" or logits.dim() != 2 \
            or used != set(names.values()):
        return None  # not (B, K) logits, or a parameter the stacked form would not train
    result = slot[id(logits)]

    def forward(params: Params, x: torch.Tensor) -> torch.Tensor:
        values: list[Value] = [image_input(x)]
        for step, src in steps:
            values.append(step(params, values[src]))
        return values[result]

    return forward


def loss_functions(module: nn.Module, example: torch.Tensor
                   ) -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]] | None:
    """The two losses ``client.batched`` trains with, from stacked parameters (None where
    ``recorded_forward`` has no stacked form for ``module``): each model's mean cross-entropy on
    its batch (x (G, B, ...), y (G, B)), and the weighted sum for padded batches (weight (G, B));
    both return the (G,) losses."""
    forward = recorded_forward(module, example)
    if forward is None:
        return None

    def nll(params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(forward(params, x), dim=-1)
        return -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)  # (G, B)

    def mean_loss(params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nll(params, x, y).mean(dim=-1)

    def weighted_loss(params: Params, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return (nll(params, x, y) * weight).sum(dim=-1)

    return mean_loss, weighted_loss
