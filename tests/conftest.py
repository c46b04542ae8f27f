"""Shared fixtures: the real datasets in ../shared/data (skipped with a reason in a user's clone), one
intra-op thread for a module."""

from __future__ import annotations

import os
from collections.abc import Iterator
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


# --- tiers: tests that start processes are marked automatically ------------------------------
#
# `make test-fast` runs the tests that stay in this process (-m "not process and not slow");
# `make test` runs everything. A test starts processes when its function, a fixture it uses, or
# any function they reach through their module's globals refers to subprocess, os.fork or
# multiprocessing (mpiexec, srun and fdcr-mpi runs all go through subprocess).

import inspect  # noqa: E402
import types  # noqa: E402

_STARTERS = {"subprocess", "Popen", "fork", "forkpty", "multiprocessing", "check_call", "check_output"}


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module, as a client computes (small steps only lose time to a
    second thread on a busy machine); the previous count afterwards."""
    import torch  # here: after CUBLAS_WORKSPACE_CONFIG above

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def _starts_processes(fn: object, seen: dict[int, bool]) -> bool:
    """Whether ``fn`` (a function) refers, directly or through functions of its module, to a way of
    starting a process."""
    fn = inspect.unwrap(fn) if callable(fn) else fn
    code = getattr(fn, "__code__", None)
    if code is None:
        return False
    key = id(code)
    if key in seen:
        return seen[key]
    seen[key] = False  # cycles: assume not until shown
    names = _names(code)
    found = bool(names & _STARTERS)
    if not found:
        scope = getattr(fn, "__globals__", {})
        found = any(_starts_processes(scope[name], seen) for name in names
                    if name in scope and inspect.isfunction(scope[name]) and not name.startswith("__"))
    seen[key] = found
    return found


def pytest_collection_modifyitems(config, items) -> None:
    seen: dict[int, bool] = {}
    fixtures = config.pluginmanager.get_plugin("funcmanage")
    for item in items:
        functions = [getattr(item, "function", None)]
        info = getattr(item, "_fixtureinfo", None)
        if info is not None and fixtures is not None:
            for name in info.names_closure:
                functions += [d.func for d in info.name2fixturedefs.get(name, ())]
        if any(f is not None and _starts_processes(f, seen) for f in functions):
            item.add_marker(pytest.mark.process)


# --- CI: a skip for want of something CI has is a failure -----------------------------------
#
# .ci/run sets FDCR_CI=1: there the shared data, mpiexec, SLURM and a mountable tmpfs exist, so
# a test that skips for want of them hides a broken setup. Only the GPU tests may skip in CI.

CI_MAY_SKIP = ("CUDA", "GPU")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("FDCR_CI") == "1" and report.skipped and not hasattr(report, "wasxfail"):
        reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
        if not any(word in reason for word in CI_MAY_SKIP):
            report.outcome = "failed"
            report.longrepr = f"skipped in CI (FDCR_CI=1), where it must run: {reason}"
