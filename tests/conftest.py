"""Shared fixtures: the real datasets in ../shared/data (skipped with a reason in a user's clone)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Before any CUDA work in the test process: cuBLAS's fixed workspace, as every fdcr-mpi process
# sets it (runtime.numerics.prepare_process), so GPU tests may turn deterministic kernels on.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FDCR_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The root holding MNIST/raw and FashionMNIST/raw, or a skip saying why it is absent."""
    if not (SHARED_DATA / "FashionMNIST" / "raw").is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA} (only the project's CI has ../shared/data)")
    return SHARED_DATA


# CI replays the same examples every run (reproducible); locally Hypothesis explores anew.
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
