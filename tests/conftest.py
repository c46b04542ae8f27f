"""Shared fixtures: the real datasets in ../shared/data (skipped with a reason in a user's clone)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
