"""Models whose parameters are views of one flat float32 vector.

A round moves one contiguous vector per model across process boundaries (ARCHITECTURE.md):
loading w_t is one ``copy_`` into ``FlatModel.flat``; reading w_k is reading it. The vector
holds the trainable parameters first, then the floating-point buffers (BatchNorm running
statistics); ``trainable`` marks which entries are parameters. Integer buffers
(``num_batches_tracked``) stay local and never travel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fdcr_mpi.errors import UserError


class SimpleCNN(nn.Module):
    """docs/SPEC.md section 4: 92,626 parameters, no BatchNorm."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(400, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 84)
        self.fc4 = nn.Linear(84, 256)
        self.classifier = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # relu(max(window)) == max(relu(window)), and so are the gradients, bitwise: pooling
        # first runs the ReLU on a quarter of the elements
        x = torch.relu(self.pool(self.conv1(x)))
        x = torch.relu(self.pool(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        x = torch.relu(self.fc3(x))
        x = self.fc4(x)
        return self.classifier(x)


class _BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18 (3x3 stem, no max-pool), about 11.2M parameters."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers: list[nn.Module] = []
        in_planes = 64
        for planes, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            for s in (stride, 1):
                layers.append(_BasicBlock(in_planes, planes, s))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        # the global average pool as a mean: adaptive pooling has no deterministic CUDA backward
        return self.linear(out.mean(dim=(2, 3)))


class Cnn1M(nn.Module):
    """A wider SimpleCNN of about 1M parameters (1,007,306), no BatchNorm: the model of the
    scale benchmarks (issue 7), where D and K x D matter more than compute."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 5)
        self.conv2 = nn.Conv2d(32, 64, 5)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(1600, 512)
        self.fc2 = nn.Linear(512, 256)
        self.classifier = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # relu(max(window)) == max(relu(window)), and so are the gradients, bitwise: pooling
        # first runs the ReLU on a quarter of the elements
        x = torch.relu(self.pool(self.conv1(x)))
        x = torch.relu(self.pool(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.classifier(x)


MODELS: dict[str, Callable[[int], nn.Module]] = {"simple_cnn": SimpleCNN, "cnn_1m": Cnn1M, "resnet18": ResNet18}


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
        for owner, name, p in named:
            n = p.numel()
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


class FlatSGD:
    """torch.optim.SGD (dampening 0, no Nesterov) as three fused ops on the flat vector.

    d = g + wd * w;  m = d (first step) or mu * m + d;  w = w - lr * m.
    """

    def __init__(self, model: FlatModel, lr: float, momentum: float, weight_decay: float) -> None:
        self.model = model
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.buf: torch.Tensor | None = None

    @torch.no_grad()
    def step(self) -> None:
        w, g = self.model.params, self.model.grad
        d = g.add(w, alpha=self.weight_decay) if self.weight_decay else g.clone()
        if self.momentum:
            if self.buf is None:
                self.buf = d
            else:
                self.buf.mul_(self.momentum).add_(d)
            d = self.buf
        w.add_(d, alpha=-self.lr)
