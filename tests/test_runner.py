"""A rank's worker threads (fdcr_mpi.runtime.clients.ClientRunner): a client's filling starts as
soon as its group has trained, on whichever worker is free, and the rows do not depend on it."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from fdcr_mpi.config import load_config
from fdcr_mpi.data.experiment import build_experiment
from fdcr_mpi.runtime.clients import ClientFailure, ClientRunner

BASE = ["data.dataset=synthetic", "rounds=1", "train.local_epochs=1", "fisher.max_samples=64",
        "attack.malicious_ratio=0.2", "data.num_clients=6", "train.batch_clients=3"]


def runner(workers: int) -> ClientRunner:
    config = load_config(None, BASE)
    clients = list(range(6))
    return ClientRunner(build_experiment(config, clients, server=False), clients, with_fisher=True,
                        device=torch.device("cpu"), workers=workers)


def test_a_free_worker_takes_the_follow_ups_of_a_slow_job() -> None:
    """Job 0 ends its first step only once job 1's follow-up has run: with a barrier between the
    steps (or one worker per job throughout) it would wait in vain."""
    pool = runner(2)
    quick_followed = threading.Event()
    seen: list[tuple[str, str]] = []

    def work(model, job: str) -> list[str]:
        if job == "slow":
            assert quick_followed.wait(timeout=60), "the quick job's follow-up never ran"
            return ["slow-a", "slow-b", "slow-c"]
        return ["quick-a"]

    def then(model, item: str) -> str:
        seen.append((item, threading.current_thread().name))
        if item == "quick-a":
            quick_followed.set()
        if item == "slow-c":
            raise ValueError("boom")
        return item.upper()

    out = pool.each_then(["slow", "quick"], work, then)
    assert out[1] == ["QUICK-A"]
    assert out[0][:2] == ["SLOW-A", "SLOW-B"] and isinstance(out[0][2], ValueError)
    assert seen[0][0] == "quick-a"
    assert {name for _, name in seen} <= {t for t in (f"fdcr-client_{i}" for i in range(2))}
    failed = pool.each_then(["slow"], lambda m, j: 1 / 0, then)
    assert isinstance(failed[0], ZeroDivisionError)
    pool.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_each_then_without_and_with_workers_keeps_the_job_order(workers: int) -> None:
    pool = runner(workers)
    out = pool.each_then([3, 1, 2], lambda m, n: list(range(n)), lambda m, i: i * 10)
    assert out == [[0, 10, 20], [0], [0, 10]]
    pool.close()


def test_the_rows_do_not_depend_on_the_workers() -> None:
    """Two groups of three (an attacker among them): one worker, or two sharing the fillings."""
    blocks = []
    for workers in (1, 2):
        pool = runner(workers)
        blocks.append(pool.run_round(pool.model.flat.clone(), 0))
        pool.close()
    np.testing.assert_array_equal(blocks[0].weights, blocks[1].weights)
    np.testing.assert_array_equal(blocks[0].fisher, blocks[1].fisher)
    np.testing.assert_array_equal(blocks[0].meta[:, 0], blocks[1].meta[:, 0])
    assert np.abs(blocks[0].weights[0] - blocks[0].weights[3]).max() > 0


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failure_names_the_client_or_the_group(monkeypatch: pytest.MonkeyPatch, workers: int) -> None:
    pool = runner(workers)
    real_fill = pool.fill_rows

    def fill_rows(model, row, k, *args):
        if k == 4:
            raise FloatingPointError("nan in the Fisher")
        return real_fill(model, row, k, *args)

    monkeypatch.setattr(pool, "fill_rows", fill_rows)
    with pytest.raises(ClientFailure, match=r"^client 4 failed in round 0: FloatingPointError: nan in the Fisher"):
        pool.run_round(pool.model.flat.clone(), 0)
    monkeypatch.setattr(pool, "train_alone", lambda *a: 1 / 0)
    monkeypatch.setattr("fdcr_mpi.client.batched.train_group", lambda *a, **k: 1 / 0)
    with pytest.raises(ClientFailure, match=r"^one of clients 0-2 failed in round 0: ZeroDivisionError"):
        pool.run_round(pool.model.flat.clone(), 0)
    pool.close()
