"""Compatibility shims for third-party packages."""

from __future__ import annotations

import functools
import importlib
import sys
from types import ModuleType

import torch

_MISSING_OP = "operator torchvision::nms does not exist"


@functools.cache
def _torchvision_schemas() -> torch.library.Library:
    """Define the schemas torchvision registers at import; the returned Library must stay alive."""
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return lib


def _forget_torchvision() -> None:
    """Drop partially imported ``torchvision`` modules so that the next import starts afresh."""
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]


def import_torchvision() -> ModuleType:
    """The torchvision module, even when its C++ ops do not match our torch build.

    A torchvision wheel built for another torch (here a CUDA build with a CPU torch) fails
    with "operator torchvision::nms does not exist"; only then are the two schemas that its
    Python side registers fakes for defined here and the import retried. Nothing of ours
    calls torchvision's C++ ops.
    """
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as exc:
        if _MISSING_OP not in str(exc):
            raise
    _forget_torchvision()
    _torchvision_schemas()
    return importlib.import_module("torchvision")
