"""Rank to GPU binding, host staging buffers, CUDA-aware MPI detection.

A client rank uses GPU ``local_rank mod device_count`` when GPUs exist (and the config
allows it); the server evaluates on the same rule. Host buffers that MPI reads or writes
are pinned when a GPU is in use, so device-host copies are DMA transfers.
"""

from __future__ import annotations

import numpy as np
import torch

from fdcr_mpi.errors import UserError


def select_device(preference: str, local_rank: int) -> torch.device:
    """``cpu``, ``cuda`` (required) or ``auto`` (a GPU when one is visible)."""
    if preference == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available() and torch.cuda.device_count() > 0
    if preference == "cuda" and not available:
        raise UserError("runtime.device is 'cuda' but no CUDA GPU is visible to this process")
    if not available:
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def host_buffer(shape: tuple[int, ...], dtype: np.dtype | type, pinned: bool) -> np.ndarray:
    """A C-contiguous host array for MPI, page-locked when ``pinned`` (and CUDA is present)."""
    torch_dtype = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
    pin = pinned and torch.cuda.is_available()
    return torch.empty(shape, dtype=torch_dtype, pin_memory=pin).numpy()


def default_threads(ranks_on_node: int) -> int:
    """Intra-op threads per process: the node's cores shared by its ranks, at least one."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(ranks_on_node, 1))
