"""runtime.malloc: glibc's thresholds, so that large activations come from the reused heap."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys

import pytest

from fdcr_mpi.config import load_config
from fdcr_mpi.errors import UserError


def _has_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


requires_glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or not _has_mallinfo2(),
                                    reason="needs glibc 2.33 or later (mallinfo2)")

# In a fresh interpreter: set up the process as a run does, then allocate a 24 MiB tensor and
# report how many bytes the allocator's mmapped blocks (hblkhd) and heap arena grew by.
PROBE = r"""
import ctypes, json, sys
import torch
from fdcr_mpi.config import load_config
from fdcr_mpi.runtime.driver import prepare_process

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
prepare_process(load_config(None, [f"runtime.malloc={sys.argv[1]}"]))
before = libc.mallinfo2()
x = torch.ones(6 * 2**20)  # 24 MiB
after = libc.mallinfo2()
print(json.dumps({"mmapped": after.hblkhd - before.hblkhd, "heap": after.arena - before.arena,
                  "sum": float(x.sum())}))
"""


def probe(malloc: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, malloc], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@requires_glibc
def test_tuned_runs_serve_large_tensors_from_the_heap() -> None:
    tuned, default = probe("tuned"), probe("default")
    assert tuned["sum"] == default["sum"] == 6 * 2**20
    # glibc's default: a fresh mmap for the 24 MiB block (and munmap when it is freed)
    assert default["mmapped"] >= 24 * 2**20
    # tuned: no mmap, the block comes from the heap, which stays for the next step
    assert tuned["mmapped"] == 0 and tuned["heap"] >= 16 * 2**20  # (the heap had some room)


def test_malloc_setting_is_checked() -> None:
    assert load_config(None, []).runtime.malloc == "tuned"
    with pytest.raises(UserError, match="runtime.malloc"):
        load_config(None, ["runtime.malloc=jemalloc"])
