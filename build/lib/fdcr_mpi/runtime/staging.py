"""Host buffers that MPI reads and writes, and timing that does not stall a GPU.

A client rank on a GPU fills its rows of weights and Fisher values by asynchronous device-to-host
copies into page-locked (pinned) host memory, so the copy of one client overlaps the training of
the next, and waits once, before the gather (``Device.synchronize``). The buffers are plain numpy
arrays of the exact size, registered with CUDA (``cudaHostRegister``) when the rank computes on a
GPU; torch's own pinned allocator would round each up to a power of two. Ranks that never copy
to or from a GPU (the server, CPU ranks) use ordinary memory.

MPI itself reads and writes these host buffers: the server holds every row in host memory (the
defenses run on its CPU), so a CUDA-aware MPI, which could read device memory directly, would
save only the one host-to-device copy of w_t per round on a client rank; the transport does not
use it (docs/CLUSTER.md).
"""

from __future__ import annotations

import mmap
import time
import weakref
from dataclasses import dataclass

import numpy as np
import torch


def host_buffer(shape: tuple[int, ...], dtype: np.dtype | type, pinned: bool) -> np.ndarray:
    """A C-contiguous host array, page-locked for DMA when ``pinned`` and CUDA is present."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if not (pinned and torch.cuda.is_available()) or nbytes == 0:
        return np.empty(shape, dtype=dtype)
    memory = mmap.mmap(-1, nbytes)  # page-aligned anonymous memory of exactly the pages needed
    array = np.frombuffer(memory, dtype=dtype).reshape(shape)
    pointer = array.ctypes.data
    error = int(torch.cuda.cudart().cudaHostRegister(pointer, nbytes, 0))
    if error != 0:  # pinning is an optimisation: without it the copies are synchronous
        return array
    weakref.finalize(array, _unregister, pointer)
    return array


def _unregister(pointer: int) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(pointer)
    except RuntimeError:  # the process is ending and CUDA with it
        pass


def is_pinned(array: np.ndarray) -> bool:
    """Whether the host array is page-locked (registered with CUDA)."""
    return torch.cuda.is_available() and torch.from_numpy(array).is_pinned()


@dataclass(frozen=True)
class Mark:
    """A point in time: the host clock on a CPU, a recorded CUDA event on a GPU."""

    host: float
    event: object | None = None


class Device:
    """The rank's compute device: copies into host rows, marks in time, one wait per round."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def mark(self) -> Mark:
        """Now, as the device sees it: a CUDA event in the stream's order, timed once it has run."""
        if not self.cuda:
            return Mark(time.perf_counter())
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return Mark(time.perf_counter(), event)

    @staticmethod
    def seconds(start: Mark, stop: Mark) -> float:
        """The time between two marks (after ``synchronize`` when they are CUDA events)."""
        if start.event is None or stop.event is None:
            return stop.host - start.host
        return start.event.elapsed_time(stop.event) / 1000.0  # type: ignore[attr-defined]

    def to_host(self, row: np.ndarray, values: torch.Tensor) -> None:
        """Copy the device vector ``values`` into the host row ``row``: asynchronous into pinned
        memory (valid after ``synchronize``), a plain copy otherwise."""
        target = torch.from_numpy(row)
        target.copy_(values.detach().reshape(-1), non_blocking=self.cuda and target.is_pinned())

    def synchronize(self) -> None:
        """Wait until every queued computation and copy of this rank has finished."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
