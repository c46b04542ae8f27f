"""The numerics a run depends on beyond its config: set once per process, recorded, checked on resume.

A float result depends on the config and on how the arithmetic is done: the intra-op threads of
a computation, the device and its kernels, the torch version, the CPU's vector instructions,
and on a GPU the deterministic-algorithm and TF32 settings. ``configure`` fixes the settings
every process uses (``runtime.client_threads`` intra-op threads, one BLAS thread, deterministic
CUDA kernels with TF32 off unless ``runtime.tf32``); ``fingerprint`` records what the run's
numbers depend on. The run file keeps the fingerprint of the run's creation (``RunFile``), and
``resume`` on a machine whose fingerprint differs stops with one sentence naming the
difference, unless told to continue (``--allow-numerics-change``, recorded in the run file).
"""

from __future__ import annotations

import os
import platform

import torch

# cuBLAS needs a fixed workspace to pick deterministic kernels; it must be set before the
# first cuBLAS handle exists, hence at process start (``prepare_process``).
CUBLAS_WORKSPACE = ":4096:8"

# The fields whose change changes the numbers (the others are recorded for the reader).
DECISIVE = ("client_threads", "device", "gpu", "torch", "cpu_capability", "deterministic", "tf32")
SERVER_FIELDS = ("client_threads", "torch", "cpu_capability")  # what the server's CPU arithmetic depends on


def prepare_process() -> None:
    """Before any CUDA work: a fixed cuBLAS workspace (deterministic GEMMs), unless the user set one."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)


def configure(client_threads: int, device: torch.device, *, deterministic: bool, tf32: bool) -> None:
    """This process's numerics: ``client_threads`` intra-op threads (for every client and the
    server alike), one BLAS thread for numpy, and on CUDA deterministic kernels, TF32 as asked."""
    torch.set_num_threads(client_threads)
    _limit_blas(client_threads)
    if device.type == "cuda":
        set_tf32(tf32)
        torch.backends.cudnn.benchmark = False  # autotuning picks kernels by timing: not reproducible
        torch.backends.cudnn.deterministic = deterministic
        torch.use_deterministic_algorithms(deterministic)


def set_tf32(enabled: bool) -> None:
    """TF32 for float32 matrix products and convolutions on the GPU, on or off."""
    precision = "tf32" if enabled else "ieee"
    if hasattr(torch.backends, "fp32_precision"):  # torch >= 2.9
        for backend in (torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn.rnn):
            backend.fp32_precision = precision
    else:  # pragma: no cover - older torch
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def _limit_blas(threads: int) -> None:
    """numpy's BLAS (used by some defenses) with ``threads`` threads: its sums must not depend on the node."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn brings threadpoolctl
        return
    threadpool_limits(limits=threads, user_api="blas")


def fingerprint(client_threads: int, device: torch.device, *, deterministic: bool, tf32: bool) -> dict[str, str]:
    """What this process's numbers depend on, as strings (stored in the run file)."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return {
        "client_threads": str(client_threads),
        "device": device.type,
        "gpu": gpu,
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "deterministic": str(deterministic if device.type == "cuda" else True).lower(),
        "tf32": str(tf32 and device.type == "cuda").lower(),
        "cuda": (torch.version.cuda or "") if device.type == "cuda" else "",
        "cudnn": str(torch.backends.cudnn.version() or "") if device.type == "cuda" else "",
        "machine": platform.machine(),
    }


def differences(recorded: dict[str, str], current: dict[str, str], keys: tuple[str, ...] = DECISIVE) -> list[str]:
    """'device cpu -> cuda', ... for every field of ``keys`` that differs (empty: same numerics)."""
    return [f"{key} {recorded.get(key) or '-'} -> {current.get(key) or '-'}"
            for key in keys if recorded.get(key) != current.get(key)]


def merge(prints: list[dict[str, str]], client_ranks: list[bool]) -> dict[str, str]:
    """The run's fingerprint from every rank's: the client ranks' (which must agree on every
    decisive field), checked against the server's CPU fields (rank 0 runs the defenses).

    Raises ``ValueError`` naming the first rank that would compute differently: results would
    then depend on which rank hosts which client.
    """
    clients = [p for p, is_client in zip(prints, client_ranks) if is_client] or prints[:1]
    run = dict(clients[0])
    for rank, (other, is_client) in enumerate(zip(prints, client_ranks)):
        diff = differences(run, other, DECISIVE if is_client else SERVER_FIELDS)
        if diff:
            raise ValueError(f"rank {rank} computes differently from the first client rank ({', '.join(diff)})")
    return run
