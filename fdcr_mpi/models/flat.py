"""Models whose parameters are views of one flat float32 vector, and the one SGD step.

A round moves one contiguous vector per model across process boundaries (docs/ARCHITECTURE.md):
loading w_t is one ``copy_`` into ``FlatModel.flat``; reading w_k is reading it. The vector
holds the trainable parameters first, then the floating-point buffers (BatchNorm running
statistics); ``trainable`` marks which entries are parameters. Integer buffers
(``num_batches_tracked``) stay local and never travel.

``sgd_step`` is the only SGD update in the package: a client's training (``FlatSGD``), the
server's proxy training and a batched group of clients (on their stacked (G, P) rows) all call it.
"""

from __future__ import annotations

import torch
from torch import nn

from fdcr_mpi.errors import UserError
from fdcr_mpi.models.nets import MODELS


class FlatModel:
    """A module whose floating-point parameters and buffers live in one flat vector.

    ``flat``: (D,) float32, parameters first then float buffers.
    ``grad``: (P,) float32, the gradients of the P trainable entries (``flat[:P]``).
    ``trainable``: (D,) bool, True for the first P entries.
    """

    def __init__(self, module: nn.Module, device: torch.device | str | None = None) -> None:
        """Move ``module``'s parameters and float buffers into one flat vector on ``device`` (their
        own device when None); the module's parameters become views of it."""
        self.module = module
        named = [(m, n, p) for m in module.modules() for n, p in m._parameters.items()
                 if p is not None and p.requires_grad]
        buffers = [(m, n, b) for m in module.modules() for n, b in m._buffers.items() if b is not None]
        floats = [(m, n, b) for m, n, b in buffers if b.is_floating_point()]
        self.num_params = sum(p.numel() for _, _, p in named)
        total = self.num_params + sum(b.numel() for _, _, b in floats)
        if device is None:
            device = named[0][2].device if named else torch.device("cpu")
        self.flat = torch.empty(total, dtype=torch.float32, device=device)
        self.grad = torch.zeros(self.num_params, dtype=torch.float32, device=device)
        offset = 0
        self._owners: list[tuple[nn.Module, int, int]] = []  # (module, start, stop) of each parameter
        for owner, name, p in named:
            n = p.numel()
            self._owners.append((owner, offset, offset + n))
            view = self.flat[offset:offset + n].view_as(p)
            view.copy_(p.detach())
            param = nn.Parameter(view)
            param.grad = self.grad[offset:offset + n].view_as(p)
            owner._parameters[name] = param
            offset += n
        for owner, name, b in buffers:
            if b.is_floating_point():
                n = b.numel()
                view = self.flat[offset:offset + n].view_as(b)
                view.copy_(b)
                owner._buffers[name] = view
                offset += n
            else:  # integer buffers (num_batches_tracked) stay out of the vector, on the same device
                owner._buffers[name] = b.to(device)
        self.trainable = torch.zeros(total, dtype=torch.bool)
        self.trainable[: self.num_params] = True

    @property
    def size(self) -> int:
        """D, the length of the flat vector."""
        return int(self.flat.numel())

    @property
    def params(self) -> torch.Tensor:
        """The trainable part of the flat vector, ``flat[:P]`` (a view)."""
        return self.flat[: self.num_params]

    def span(self, submodule: nn.Module) -> tuple[int, int]:
        """(start, stop): the entries of the flat vector holding ``submodule``'s trainable parameters
        (its own and its children's), which must be one contiguous block."""
        inside = {id(m) for m in submodule.modules()}
        spans = [(a, b) for owner, a, b in self._owners if id(owner) in inside]
        if not spans:
            raise ValueError(f"{type(submodule).__name__} holds no trainable parameter of this model")
        start, stop = spans[0][0], spans[-1][1]
        if sum(b - a for a, b in spans) != stop - start:
            raise ValueError(f"the parameters of {type(submodule).__name__} are not contiguous in the flat vector")
        return start, stop

    def load(self, weights: torch.Tensor) -> None:
        """Set every parameter and float buffer from a (D,) vector in one copy."""
        if weights.numel() != self.size:
            raise ValueError(f"weights have {weights.numel()} entries, the model {self.size}")
        with torch.no_grad():
            self.flat.copy_(weights.reshape(-1))

    def zero_grad(self) -> None:
        self.grad.zero_()


def build_model(name: str, seed: int, num_classes: int = 10,
                device: torch.device | str = "cpu") -> FlatModel:
    """The named model with weights initialised from ``seed`` only (the global RNG is restored).

    Initialisation always runs on the CPU, so the initial weights do not depend on the device;
    the flat vector is then made on ``device``.
    """
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = MODELS[name](num_classes)
    return FlatModel(module, device)


@torch.no_grad()
def sgd_step(w: torch.Tensor, g: torch.Tensor, buf: torch.Tensor | None, lr: float, momentum: float,
             weight_decay: float, first: bool) -> None:
    """torch.optim.SGD's update (dampening 0, no Nesterov), in place on ``w`` and ``buf``:

    d = g + wd * w;  m = d (first step) or mu * m + d;  w = w - lr * m.

    ``g`` is overwritten with d; ``buf`` (the momentum, same shape as ``w``) is unused when
    ``momentum`` is 0. Rows of a (G, P) ``w`` are G models stepping at once.
    """
    if weight_decay:
        g.add_(w, alpha=weight_decay)
    if momentum:
        if first:
            buf.copy_(g)
        else:
            buf.mul_(momentum).add_(g)
        g = buf
    w.add_(g, alpha=-lr)


class FlatSGD:
    """torch.optim.SGD (dampening 0, no Nesterov) on a flat model: ``sgd_step`` on its vector."""

    def __init__(self, model: FlatModel, lr: float, momentum: float, weight_decay: float) -> None:
        self.model = model
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.buf = torch.empty_like(model.params) if momentum else None
        self.first = True

    def step(self) -> None:
        sgd_step(self.model.params, self.model.grad, self.buf, self.lr, self.momentum, self.weight_decay, self.first)
        self.first = False
