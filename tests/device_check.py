"""Catch device mixing on a CPU-only machine: run code on the ``meta`` device under a dispatch mode
that fails, as CUDA would, on any operation whose tensors are on different devices.

A tensor on ``meta`` has a shape and no values, so the code under test also fails if it reads a
value back to the host (``float()``, ``.item()``, ``bool()``): a GPU training step must not wait
for the device. The mode is stricter than CUDA in one way: an index tensor on the CPU used to
index a device tensor counts as mixing (it costs a host-to-device copy per call); only 0-dim CPU
tensors read as scalars and explicit copies (``.to``, ``copy_``) may cross devices (a CPU
scalar updated in place by a device value is mixing, as on CUDA).
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

META = torch.device("meta")
_CROSSING = {torch.ops.aten.copy_, torch.ops.aten._to_copy, torch.ops.aten.lift_fresh,
             torch.ops.aten._local_scalar_dense}


class DeviceMixing(TorchDispatchMode):
    """Raises ``AssertionError`` naming the op when its tensor arguments span devices."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket not in _CROSSING:
            written = args[0] if func._schema.name.endswith("_") and args else None  # an in-place op's target
            devices = {t.device for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
                       and (t is written or not (t.dim() == 0 and t.device.type == "cpu"))}
            if len(devices) > 1:
                raise AssertionError(f"{func} mixes devices {sorted(map(str, devices))}")
        return func(*args, **kwargs)
