"""Several clients of one rank trained at once as one batched computation.

``train_group`` gives each of G clients what ``client.local_train`` gives it when the clients
are trained one after another from the same start, each with its own generator, but runs
every SGD step of the G models as one computation: ``torch.func.vmap`` over
``functional_call`` evaluates the G models on their G batches from stacked parameters, one
``torch.autograd.grad`` gives all G gradients, and the weights and momenta of the group are
two contiguous (G, P) tensors updated by a few fused ops.

Clients have different sizes, hence different numbers of steps. The clients are ordered by
their number of steps (most first), so at batched step s the clients that still take a step
are a prefix of the stacked rows: the step runs on that prefix only, and a client that is done
is never touched. With ``drop_last=False`` a step whose clients have batches of different
sizes pads the shorter ones and weighs each real sample by 1/(its client's batch size), so
every client's loss and gradient are the mean over its real samples.

A step evaluates the active models ``chunk`` (default ``CHUNK`` = 5) at a time: a smaller
computation keeps more of its activations in cache (5 and 10 measured alike on a two-core CPU
once the allocator reuses its buffers, see ``runtime.allocator``; 3 is slower). A client's
result does not depend on the chunk or on the other clients, to float tolerance.

Each client draws from its own generator in the sequential order (one ``randperm`` per epoch,
then one ``ClientData.inputs`` call per batch), so its random stream, and the generator's state
afterwards, are those of ``local_train``.

The computation: for a model made of convolutions, linear layers, pooling, element-wise
activations and a flatten (SimpleCNN, Cnn1M), ``client.stacked`` records the forward once and
replays it on the stacked parameters as plain grouped convolutions and batched matmuls, with no
vmap (a step of five SimpleCNNs on batches of 64: 27 ms against 32 ms on one CPU thread). Any
other model takes ``torch.func.vmap`` through the twin below; both give the same numbers,
bitwise (tests/test_stacked.py).

Speed on the CPU: vmap runs a convolution of G stacked models as one grouped convolution with
the models in the channel dimension, which is fast when the images are channels-last. Left to
itself it then adds the biases separately and moves the models into the batch dimension for
max pooling, copying into the slow channels-first layout after each convolution. The model is
therefore evaluated through a twin (``batched_twin``) whose ``nn.Conv2d`` and ``nn.MaxPool2d``
call two small custom ops with vmap rules that keep the models in the channel dimension: one
grouped convolution with its bias, and pooling of the (B, G*C, H, W) view. They compute the
same numbers as the layers they replace. Gradients come from ordinary autograd through the
vmapped forward rather than from ``torch.func.grad``: under ``grad`` every backward op would
again go through vmap's batch rules (more per-op overhead and the same layout copies).

Grayscale datasets (MNIST, Fashion-MNIST) reach the model as one channel repeated three times
(``model_input``, a view). ``_stack_images`` then stores that channel once, and the first
convolution's vmap rule convolves it with each filter summed over its input channels: the same
function, a third of the work, and autograd of the sum gives each input channel the same filter
gradient, as the three-channel convolution does.

Measured on a two-core CPU with one thread against a bare single-model loop (benchmarks/local.py,
with ``runtime.allocator``'s thresholds): about 1.6x on Fashion-MNIST and about 1.1x on
three-channel images, where the grouped first convolution (3 input channels per model) is no
faster per model than the plain one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap
from torch.nn.modules.utils import _pair

from fdcr_mpi.client import stacked
from fdcr_mpi.client.train import ClientData, TrainSettings, draw_epoch
from fdcr_mpi.data.datasets import DatasetSpec, Shifts, repeats_one_channel
from fdcr_mpi.models import FlatModel, sgd_step

LossFn = Callable[..., torch.Tensor]
CHUNK = 5  # models per vmapped computation (see train_group)


def supports(module: nn.Module) -> bool:
    """Whether ``module`` can be trained batched: no floating-point buffers (no BatchNorm
    running statistics, which training would update), no dropout (whose draws come from the
    global RNG) and every parameter trainable."""
    if any(b.is_floating_point() for b in module.buffers()):
        return False
    if any(isinstance(m, nn.modules.dropout._DropoutNd) for m in module.modules()):
        return False
    return all(p.requires_grad for p in module.parameters())


def steps_per_epoch(n: int, settings: TrainSettings) -> int:
    """The number of batches ``client.batches`` makes of ``n`` samples."""
    if settings.drop_last:
        return n // settings.batch_size
    return -(-n // settings.batch_size)


def train_group(model: FlatModel, start: torch.Tensor, datas: list[ClientData], spec: DatasetSpec,
                settings: TrainSettings, generators: list[torch.Generator], *,
                chunk: int = CHUNK, vmap_path: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Train G clients from the same weights ``start`` (D,) as one batched computation, on
    ``start``'s device.

    Returns the trained flat weights (G, D) float32, row k for ``datas[k]`` (buffer entries, if
    any, copied from ``start``), and each client's mean training loss as a (G,) float64 tensor
    (nan when it took no step), both on the device: what ``local_train(model, datas[k], spec, settings, generators[k])`` gives after
    ``model.load(start)``, to float tolerance, with each generator left in the same state.
    ``model`` supplies the architecture only: its weights are neither read nor changed.
    ``chunk``: how many models one computation evaluates (a speed setting only); ``vmap_path``:
    the vmap path even where ``client.stacked`` has a form for the model (the same numbers;
    benchmarks compare the two).
    """
    module = model.module
    if not supports(module):
        raise ValueError(f"{type(module).__name__} cannot be trained batched (it has float buffers, "
                         "dropout or frozen parameters)")
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    if len(datas) != len(generators):
        raise ValueError(f"{len(datas)} clients but {len(generators)} generators")
    num, p = len(datas), model.num_params
    start = start.detach().reshape(-1).to(device=model.flat.device, dtype=torch.float32)
    if start.numel() != model.size:
        raise ValueError(f"start has {start.numel()} entries, the model {model.size}")
    out = start.expand(num, model.size).clone()
    losses = torch.full((num,), float("nan"), dtype=torch.float64, device=start.device)
    if num == 0:
        return out, losses

    per_epoch = [steps_per_epoch(len(d), settings) for d in datas]
    order = sorted(range(num), key=lambda k: -per_epoch[k])  # stable: ties keep the client order
    total_steps = [per_epoch[k] * settings.local_epochs for k in order]
    device = start.device
    streams = [_draw_stream(len(datas[k]), settings, spec, generators[k], device, datas[k].augment) for k in order]
    for stream, steps in zip(streams, total_steps):
        if steps == 0:  # still draws its per-epoch permutations, as local_train does
            for _ in stream:
                pass
    active = [sum(1 for t in total_steps if t > s) for s in range(total_steps[0])]
    if not active:
        return out, losses

    weights = start[:p].expand(num, p).clone()  # (G, P), row i is client order[i]
    momentum = torch.empty_like(weights) if settings.momentum else None
    grads = torch.empty_like(weights)
    loss_sum = torch.zeros(num, dtype=torch.float64, device=weights.device)
    shapes = [(name, q.shape, q.numel()) for name, q in module.named_parameters()]
    offsets = [sum(n for _, _, n in shapes[:i]) for i in range(len(shapes))]
    leaves: dict[tuple[int, int], tuple[dict[str, torch.Tensor], list[torch.Tensor]]] = {}
    first = datas[order[0]]  # takes the most steps, so it has samples: the stacked form is recorded on two
    example = first.inputs(torch.arange(min(2, len(first)), device=device), spec, None)
    fast = None if vmap_path else stacked.loss_functions(module, example)
    plain, masked = fast or _loss_functions(batched_twin(module).train())

    for s, k in enumerate(active):
        for lo in range(0, k, chunk):
            hi = min(lo + chunk, k)
            if (lo, hi) not in leaves:
                named = _param_leaves(weights[lo:hi], shapes)
                leaves[lo, hi] = named, list(named.values())
            params, leaf_list = leaves[lo, hi]
            xs, ys = [], []
            for i in range(lo, hi):
                idx, shifts = next(streams[i])
                data = datas[order[i]]
                xs.append(data.inputs(idx, spec, shifts))
                ys.append(data.y[idx])
            if all(y.numel() == ys[0].numel() for y in ys):
                loss = plain(params, _stack_images(xs), torch.stack(ys))
            else:
                loss = masked(params, *_padded(xs, ys))
            step_grads = torch.autograd.grad(loss.sum(), leaf_list)
            with torch.no_grad():
                for grad, (_, shape, n), offset in zip(step_grads, shapes, offsets):
                    grads[lo:hi, offset:offset + n].view(hi - lo, *shape).copy_(grad)  # one pass, any layout
                loss_sum[lo:hi] += loss
        sgd_step(weights[:k], grads[:k], None if momentum is None else momentum[:k], settings.lr,
                 settings.momentum, settings.weight_decay, first=s == 0)

    out[order, :p] = weights
    steps = torch.tensor(total_steps, dtype=torch.float64).to(device)
    losses[order] = torch.where(steps > 0, loss_sum / steps.clamp(min=1), losses[order])
    return out, losses


def _draw_stream(n: int, settings: TrainSettings, spec: DatasetSpec, generator: torch.Generator,
                 device: torch.device, augment: bool) -> Iterator[tuple[torch.Tensor, Shifts | None]]:
    """One client's index batches and shifts over all epochs, each epoch drawn when it starts
    (``client.draw_epoch``), as ``local_train`` draws them."""
    for _ in range(settings.local_epochs):
        yield from draw_epoch(n, settings, spec, generator, device, augment)


def _param_leaves(weights: torch.Tensor, shapes: list[tuple[str, torch.Size, int]]) -> dict[str, torch.Tensor]:
    """Each parameter of the k stacked models as a (k, *shape) autograd leaf sharing the memory
    of the (k, P) rows ``weights``, so in-place updates of the rows are seen by the next step."""
    k, leaves, offset = weights.shape[0], {}, 0
    for name, shape, n in shapes:
        leaves[name] = weights[:, offset:offset + n].view(k, *shape).detach().requires_grad_(True)
        offset += n
    return leaves


def _loss_functions(module: nn.Module) -> tuple[LossFn, LossFn]:
    """Each model's loss on its batch, vmapped over stacked parameters and batches: the plain
    mean loss, and a weighted one for padded batches (weights 1/size on real samples, 0 on
    the padding). Both return the (k,) losses."""

    def mean_loss(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(module, params, (x,)), y)

    def weighted_loss(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                      weight: torch.Tensor) -> torch.Tensor:
        logits = functional_call(module, params, (x,))
        return (F.cross_entropy(logits, y, reduction="none") * weight).sum()

    return vmap(mean_loss), vmap(weighted_loss)


def _stack_images(xs: list[torch.Tensor], size: int | None = None) -> torch.Tensor:
    """k image batches (b_i, C, H, W) as one (k, size, C, H, W) tensor, zero beyond each b_i,
    stored as (size, H, W, k, C) so that the grouped convolution's (size, k*C, H, W) view of it
    is channels-last. Batches that all repeat one channel (grayscale) store that channel once and
    come back as a view repeating it, which the convolution's vmap rule recognises."""
    _, c, h, w = xs[0].shape
    size = size or xs[0].shape[0]
    stored = 1 if all(repeats_one_channel(x) for x in xs) else c
    make = torch.empty if all(x.shape[0] == size for x in xs) else torch.zeros
    out = make((size, h, w, len(xs), stored), dtype=xs[0].dtype, device=xs[0].device)
    for i, x in enumerate(xs):
        out[: x.shape[0], :, :, i].copy_(x[:, :stored].permute(0, 2, 3, 1))
    return out.permute(3, 0, 4, 1, 2).expand(len(xs), size, c, h, w)



def _padded(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batches of different sizes as (k, B, ...) inputs and (k, B) labels padded with zeros, and
    (k, B) sample weights: 1/size on each client's real samples, 0 on the padding."""
    k, size = len(xs), max(y.numel() for y in ys)
    y = ys[0].new_zeros((k, size))
    weight = torch.zeros((k, size), dtype=xs[0].dtype, device=xs[0].device)
    for i, yi in enumerate(ys):
        y[i, : yi.numel()] = yi
        weight[i, : yi.numel()] = 1.0 / yi.numel()
    return _stack_images(xs, size), y, weight


# --- layers whose vmap keeps the stacked models in the channel dimension -------------------


def _into_channels(t: torch.Tensor, bdim: int | None, size: int) -> torch.Tensor:
    """(..., G at bdim, ..., C, H, W) as (..., G*C, H, W); an unbatched tensor is repeated G times."""
    if bdim is None:
        t = t.unsqueeze(-4).expand(*t.shape[:-3], size, *t.shape[-3:])
    else:
        t = t.movedim(bdim, -4)
    return t.flatten(-4, -3)


def _stacked(t: torch.Tensor, bdim: int | None, size: int) -> torch.Tensor:
    """(G, ...) with the models first, then flattened into the first dimension (G*n, ...)."""
    t = t.expand(size, *t.shape) if bdim is None else t.movedim(bdim, 0)
    return t.flatten(0, 1)


def _conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: list[int],
            padding: list[int], dilation: list[int], groups: int) -> torch.Tensor:
    """``F.conv2d``; the custom op's vmap rule runs one grouped convolution (bias included) over
    the stacked models."""
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def _conv2d_setup(ctx, inputs, output) -> None:
    x, weight, bias, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(x, weight)
    ctx.args = (None if bias is None else list(bias.shape), stride, padding, dilation, groups)


def _conv2d_grad(ctx, grad: torch.Tensor):
    x, weight = ctx.saved_tensors
    bias_sizes, stride, padding, dilation, groups = ctx.args
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias_sizes is not None and ctx.needs_input_grad[2]]
    gx, gw, gb = torch.ops.aten.convolution_backward(grad, x, weight, bias_sizes, stride, padding, dilation,
                                                     False, [0, 0], groups, mask)
    return gx, gw, gb, None, None, None, None


def _conv2d_vmap(info, in_dims, x, weight, bias, stride, padding, dilation, groups):
    g = info.batch_size
    x_dim, w_dim, b_dim = in_dims[:3]
    if w_dim is None and b_dim is None and x_dim is not None and x.dim() == 5:
        # shared weights: the models are more samples
        out = F.conv2d(x.movedim(x_dim, 0).flatten(0, 1), weight, bias, stride, padding, dilation, groups)
        return out.unflatten(0, (g, -1)), 0
    w = _stacked(weight, w_dim, g)
    b = None if bias is None else _stacked(bias, b_dim, g)
    if groups == 1 and x_dim is not None and x_dim < x.dim() - 3 and repeats_one_channel(x):
        # one channel repeated (a grayscale image): sum_c w_c * x = (sum_c w_c) * x, computed
        # on that one channel; autograd of the sum hands every w_c the same gradient
        x, w = x.narrow(-3, 0, 1), w.sum(dim=1, keepdim=True)
    out = F.conv2d(_into_channels(x, x_dim, g), w, b, stride, padding, dilation, groups * g)
    out = out.unflatten(-3, (g, -1))
    return out, out.dim() - 4


def _max_pool2d(x: torch.Tensor, kernel_size: list[int], stride: list[int], padding: list[int],
                dilation: list[int], ceil_mode: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``F.max_pool2d`` with its indices (kept for the backward, which then need not pool again);
    the custom op's vmap rule pools the (..., G*C, H, W) view of the stacked models."""
    return torch.ops.aten.max_pool2d_with_indices(x, kernel_size, stride, padding, dilation, ceil_mode)


def _max_pool2d_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0], output[1])
    ctx.args = inputs[1:]


def _max_pool2d_grad(ctx, grad: torch.Tensor, _grad_indices: torch.Tensor | None):
    x, idx = ctx.saved_tensors
    gx = torch.ops.aten.max_pool2d_with_indices_backward(grad, x, *ctx.args, idx)
    return gx, None, None, None, None, None


def _max_pool2d_vmap(info, in_dims, x, kernel_size, stride, padding, dilation, ceil_mode):
    g = info.batch_size
    out, idx = _max_pool2d(_into_channels(x, in_dims[0], g), kernel_size, stride, padding, dilation, ceil_mode)
    out, idx = out.unflatten(-3, (g, -1)), idx.unflatten(-3, (g, -1))
    return (out, idx), (out.dim() - 4, idx.dim() - 4)


def _register_ops() -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]] | None:
    """The two ops as custom ops (torch >= 2.5), or None where torch cannot register vmap rules."""
    if not (hasattr(torch.library, "custom_op") and hasattr(torch.library, "register_vmap")):
        return None
    conv = torch.library.custom_op("fdcr_mpi::conv2d", _conv2d, mutates_args=())
    conv.register_fake(_conv2d)  # shapes for meta and fake tensors: the plain op computes them
    conv.register_autograd(_conv2d_grad, setup_context=_conv2d_setup)
    conv.register_vmap(_conv2d_vmap)
    pool = torch.library.custom_op("fdcr_mpi::max_pool2d", _max_pool2d, mutates_args=())
    pool.register_fake(_max_pool2d)
    pool.register_autograd(_max_pool2d_grad, setup_context=_max_pool2d_setup)
    pool.register_vmap(_max_pool2d_vmap)
    return conv, pool


_OPS = _register_ops()


class _TwinConv2d(nn.Module):
    """An ``nn.Conv2d`` (zero padding) computed by ``_conv2d``, with the same parameters."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.weight = conv.weight
        self.bias = conv.bias
        self.args = (list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert _OPS is not None
        return _OPS[0](x, self.weight, self.bias, *self.args)


class _TwinMaxPool2d(nn.Module):
    """An ``nn.MaxPool2d`` (without ``return_indices``) computed by ``_max_pool2d``."""

    def __init__(self, pool: nn.MaxPool2d) -> None:
        super().__init__()
        stride = pool.stride if pool.stride is not None else pool.kernel_size
        self.args = (list(_pair(pool.kernel_size)), list(_pair(stride)), list(_pair(pool.padding)),
                     list(_pair(pool.dilation)), bool(pool.ceil_mode))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert _OPS is not None
        return _OPS[1](x, *self.args)[0]


def batched_twin(module: nn.Module) -> nn.Module:
    """A copy of ``module`` computing the same function with the same parameter names, whose
    ``nn.Conv2d`` (zero padding, numeric padding) and ``nn.MaxPool2d`` (no indices) layers keep
    vmap's stacked models in the channel dimension (a plain copy where torch is older than 2.5)."""
    twin = copy.deepcopy(module)
    if _OPS is None:
        return twin
    for parent in list(twin.modules()):
        for name, child in parent.named_children():
            if (type(child) is nn.Conv2d and child.padding_mode == "zeros"
                    and not isinstance(child.padding, str)):
                setattr(parent, name, _TwinConv2d(child))
            elif isinstance(child, nn.MaxPool2d) and not child.return_indices:
                setattr(parent, name, _TwinMaxPool2d(child))
    return twin
