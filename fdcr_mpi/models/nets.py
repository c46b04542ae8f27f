"""The networks: SimpleCNN (the paper's), a 1M-parameter CNN, a CIFAR-style ResNet-18.

Each splits into a feature extractor and a head, its last ``nn.Linear`` (the attribute named by
``head_name``): ``forward(x) = head(features(x))``, the same operations as a single forward. Attacks
that train the two apart (``attacks.chameleon``) use ``features`` and ``head_of``; the head's
parameters are the last block of the trainable entries of the flat vector (``FlatModel.span``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fdcr_mpi.models.pooling import MaxPool2x2


def pooled_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The two conv -> max-pool -> ReLU stages of SimpleCNN and Cnn1M, flattened.

    relu(max(window)) == max(relu(window)), and so are the gradients, bitwise: pooling first
    runs the ReLU on a quarter of the elements."""
    x = torch.relu(net.pool(net.conv1(x)))
    x = torch.relu(net.pool(net.conv2(x)))
    return torch.flatten(x, 1)


class SimpleCNN(nn.Module):
    """docs/SPEC.md section 4: 92,626 parameters, no BatchNorm. Head: ``classifier`` (256 -> classes)."""

    head_name = "classifier"

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.pool = MaxPool2x2()
        self.fc1 = nn.Linear(400, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 84)
        self.fc4 = nn.Linear(84, 256)
        self.classifier = nn.Linear(256, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The head's input, (B, 256): fc4's output (no ReLU before the classifier)."""
        x = torch.relu(self.fc1(pooled_features(self, x)))
        x = torch.relu(self.fc2(x))
        x = torch.relu(self.fc3(x))
        return self.fc4(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


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
    """CIFAR-style ResNet-18 (3x3 stem, no max-pool), about 11.2M parameters. Head: ``linear`` (512 -> classes)."""

    head_name = "linear"

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

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The head's input, (B, 512): the global average pool of the last block."""
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        # the global average pool as a mean: adaptive pooling has no deterministic CUDA backward
        return out.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x))


class Cnn1M(nn.Module):
    """A wider SimpleCNN of about 1M parameters (1,007,306), no BatchNorm: the model of the
    scale benchmarks (issue 7), where D and K x D matter more than compute. Head: ``classifier``."""

    head_name = "classifier"

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 5)
        self.conv2 = nn.Conv2d(32, 64, 5)
        self.pool = MaxPool2x2()
        self.fc1 = nn.Linear(1600, 512)
        self.fc2 = nn.Linear(512, 256)
        self.classifier = nn.Linear(256, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The head's input, (B, 256): fc2's output after its ReLU."""
        x = torch.relu(self.fc1(pooled_features(self, x)))
        return torch.relu(self.fc2(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def head_of(module: nn.Module) -> nn.Linear:
    """The model's head, its last ``nn.Linear`` (the attribute ``head_name``); a model without one
    (a plugin's) is a ValueError."""
    name = getattr(module, "head_name", None)
    head = getattr(module, name, None) if isinstance(name, str) else None
    if not isinstance(head, nn.Linear) or not callable(getattr(module, "features", None)):
        raise ValueError(f"{type(module).__name__} has no features / head split (a head_name naming its last "
                         "nn.Linear and a features method)")
    return head


MODELS: dict[str, Callable[[int], nn.Module]] = {"simple_cnn": SimpleCNN, "cnn_1m": Cnn1M, "resnet18": ResNet18}
