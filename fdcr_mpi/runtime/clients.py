"""A rank's clients: train them on w_t, fill the rank's send blocks (docs/ARCHITECTURE.md, "One round, as data", step 2).

The clients of a rank are trained one group at a time (a group is one client, or
``train.batch_clients`` ids trained as one batched computation), on the rank's device; then each
client's rows are filled (its Fisher vector, its weights). On a CPU rank with more than one
worker (``runtime.threads`` / ``runtime.client_threads``, see ``runtime.placement``) the groups
are spread over worker threads, each with its own model, and a client's filling is queued as
soon as its group has trained, for whichever worker is free: a worker whose group was quick
fills the clients of a slower one. Every client's arithmetic uses the same fixed intra-op
threads however many workers there are, and its rows land at fixed positions, so the result
does not depend on the scheduling. A malicious
client's attack (``attacks``) acts through its hooks: the Fisher vector it reports and the
weights it sends.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np
import torch

from fdcr_mpi import attacks, evaluation, seeding
from fdcr_mpi.client import (
    ClientData,
    batch_mean_sq_fisher,
    empirical_fisher,
    fisher_samples,
    train_client,
)
from fdcr_mpi.client.fisher_released import released_fisher
from fdcr_mpi.data.experiment import Experiment
from fdcr_mpi.models import FlatModel, build_model
from fdcr_mpi.runtime.faults import inject_fault
from fdcr_mpi.runtime.protocol import FINITE, META, SendBlocks, row_is_usable
from fdcr_mpi.runtime.staging import Device, Mark, host_buffer


class ClientFailure(RuntimeError):
    """A client's training or Fisher computation raised; the message names the client and round."""


@dataclass
class Outcome:
    """A client's round as the device left it: its mean loss (a device scalar) and its marks."""

    loss: torch.Tensor
    trained: tuple[Mark, Mark]
    measured: tuple[Mark, Mark]
    train_share: float | None = None  # a batched group's seconds per client, when batched


@dataclass
class Trained:
    """A client once its group has trained: its row, id, weights (D,) and generator (the Fisher
    draws from it next), its mean loss and training marks."""

    row: int
    k: int
    weights: torch.Tensor
    generator: torch.Generator
    loss: torch.Tensor
    marks: tuple[Mark, Mark]
    train_share: float | None


class ClientRunner:
    """Trains the participating clients hosted on this rank: one group after another, or on
    ``workers`` threads at once (CPU), each thread with its own model.

    The send blocks have a row per client that can take part in a round (at most
    ``clients_per_round``); a round fills rows 0..n-1 with its participants in id order.
    """

    def __init__(self, exp: Experiment, client_ids: list[int], with_fisher: bool,
                 device: torch.device, workers: int = 1, rank: int = 0) -> None:
        cfg = exp.config
        self.exp, self.client_ids, self.rank = exp, client_ids, rank
        self.device = Device(device)
        seed = seeding.derive_seed(cfg.seed, seeding.MODEL_INIT)
        self.models = [build_model(cfg.model.name, seed, device=device) for _ in range(max(1, workers))]
        self.model: FlatModel = self.models[0]
        n, d = min(len(client_ids), cfg.clients_per_round or len(client_ids)), self.model.size
        pinned = self.device.cuda
        self.blocks = SendBlocks(
            weights=host_buffer((n, d), np.float32, pinned),
            fisher=host_buffer((n, d), np.float32, pinned) if with_fisher else None,
            meta=np.zeros((n, len(META)), dtype=np.float64),
        )
        self.data = {k: exp.clients[k] for k in client_ids}
        self.attack = attacks.create(cfg)
        self.pool = ThreadPoolExecutor(len(self.models), thread_name_prefix="fdcr-client") \
            if len(self.models) > 1 else None
        self.free: queue.SimpleQueue[FlatModel] = queue.SimpleQueue()
        for model in self.models:
            self.free.put(model)

    @property
    def workers(self) -> int:
        return len(self.models)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def _on_free_model(self, work: Callable, job):
        """``work(model, job)`` on a free model; an exception is returned in place of the result."""
        model = self.free.get()
        try:
            return work(model, job)
        except Exception as exc:  # noqa: BLE001 - reported in job order by the caller
            return exc
        finally:
            self.free.put(model)

    def each(self, jobs: list, work: Callable) -> list:
        """``work(model, job)`` for every job, on the worker threads (each job gets a free model);
        the results in job order. An exception is returned in place of its job's result."""
        if self.pool is None:
            return [self._on_free_model(work, job) for job in jobs]
        return list(self.pool.map(lambda job: self._on_free_model(work, job), jobs))

    def each_then(self, jobs: list, work: Callable, then: Callable) -> list:
        """``work(model, job)`` for every job, giving a list of items, then ``then(model, item)`` for
        each item, on the worker threads; an item's ``then`` is queued as soon as its job's ``work``
        has ended, ahead of the jobs not yet started, so a worker done early takes the items of a
        slower job and at most one job per worker holds its items at a time. Per job, in job order:
        the list of its items' results (an exception in place of one that raised), or the exception
        its ``work`` raised."""
        if self.pool is None:
            return [items if isinstance(items, Exception) else [self._on_free_model(then, i) for i in items]
                    for items in (self._on_free_model(work, job) for job in jobs)]
        waiting = iter(enumerate(jobs))
        running: dict = {}
        follow: list = [None] * len(jobs)

        def start_next() -> None:
            for j, job in waiting:
                running[self.pool.submit(self._on_free_model, work, job)] = j
                return

        for _ in self.models:
            start_next()
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for done in finished:
                items, j = done.result(), running.pop(done)
                follow[j] = items if isinstance(items, Exception) else \
                    [self.pool.submit(self._on_free_model, then, item) for item in items]
                start_next()
        return [f if isinstance(f, Exception) else [item.result() for item in f] for f in follow]

    def run_round(self, global_weights: torch.Tensor, round_: int, selected: np.ndarray | None = None) -> SendBlocks:
        """Train and measure the hosted clients in ``selected`` (all hosted ones when None), from
        ``global_weights`` (on the rank's device); their rows are 0..n-1 of the send blocks, in
        client-id order."""
        ids = self.client_ids if selected is None else sorted(set(self.client_ids) & set(selected.tolist()))
        groups, row = [], 0
        for group in self.groups(ids):
            groups.append((row, group))
            row += len(group)
        results = self.each_then(groups, lambda model, job: self.train_group(model, *job, global_weights, round_),
                                 lambda model, trained: self.fill(model, trained, global_weights))
        self.device.synchronize()  # every row's copy has landed; the losses and marks are final
        for (first, group), result in zip(groups, results):
            failed = result if isinstance(result, Exception) else next(
                ((k, r) for k, r in zip(group, result) if isinstance(r, Exception)), None)
            if failed is not None:  # the group's training raised, or one client's filling
                who = f"client {group[0]}" if len(group) == 1 else f"one of clients {group[0]}-{group[-1]}"
                if isinstance(failed, tuple):
                    who, failed = f"client {failed[0]}", failed[1]
                raise ClientFailure(f"{who} failed in round {round_}: {type(failed).__name__}: {failed}") from failed
            for i, (k, outcome) in enumerate(zip(group, result)):
                self.record(first + i, k, round_, outcome)
        return self.blocks

    def groups(self, ids: list[int]) -> list[list[int]]:
        """``ids`` split into the fixed batched-training groups [jG, (j+1)G) (G = train.batch_clients)."""
        size = self.exp.config.train.batch_clients
        out: dict[int, list[int]] = {}
        for k in ids:
            out.setdefault(k // size, []).append(k)
        return list(out.values())

    def train_group(self, model: FlatModel, first: int, group: list[int], global_weights: torch.Tensor,
                    round_: int) -> list[Trained]:
        """A group's clients trained on ``model`` (one by one, or batched), their rows from ``first``.

        An attacker whose attack ``trains_differently`` (``Attack.train``) is trained alone, on
        ``model``; the group's other members are still trained as one batched computation."""
        cfg = self.exp.config
        generators = [seeding.client_generator(cfg.seed, k, round_) for k in group]
        alone = [len(group) == 1 or self.trains_alone(k) for k in group]
        together = [i for i, a in enumerate(alone) if not a]
        batched: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if together:
            from fdcr_mpi.client.batched import train_group

            begin = self.device.mark()
            weights, losses = train_group(model, global_weights, [self.data[group[i]] for i in together],
                                          self.exp.spec, self.exp.train_settings, [generators[i] for i in together])
            end = self.device.mark()
            batched = {i: (weights[j], losses[j]) for j, i in enumerate(together)}
        out = []
        for i, k in enumerate(group):
            if alone[i]:
                model.load(global_weights)
                begin_k = self.device.mark()
                loss = self.train_alone(model, k, generators[i], global_weights)
                out.append(Trained(first + i, k, model.flat.clone(), generators[i], loss, (begin_k, self.device.mark()),
                                   None))
            else:
                weights_k, loss = batched[i]
                out.append(Trained(first + i, k, weights_k, generators[i], loss, (begin, end), 1.0 / len(together)))
        return out

    def fill(self, model: FlatModel, trained: Trained, global_weights: torch.Tensor) -> Outcome:
        """A trained client's rows filled on ``model`` (``fill_rows``), and its outcome."""
        model.load(trained.weights)
        begin = self.device.mark()
        self.fill_rows(model, trained.row, trained.k, global_weights, trained.generator)
        return Outcome(trained.loss, trained.marks, (begin, self.device.mark()), trained.train_share)

    def trains_alone(self, k: int) -> bool:
        """Whether client ``k`` is an attacker whose attack has a training of its own (``Attack.train``)."""
        return bool(self.exp.malicious[k]) and self.attack.trains_differently

    def train_alone(self, model: FlatModel, k: int, generator: torch.Generator,
                    global_weights: torch.Tensor) -> torch.Tensor:
        """Client ``k`` trained by itself on ``model`` (loaded with w_t): ``client.train_client``, or its
        attack's ``train``; the mean loss as a device scalar."""
        data, spec, settings = self.data[k], self.exp.spec, self.exp.train_settings
        if self.trains_alone(k):
            return self.attack.train(model, data, spec, settings, generator, global_weights)
        return train_client(model, data, spec, settings, generator)

    def fill_rows(self, model: FlatModel, row: int, k: int, global_weights: torch.Tensor,
                  generator: torch.Generator) -> None:
        """Client ``k``'s reported Fisher and its weights (an attacker's changed by its attack) into
        row ``row``."""
        attacker = bool(self.exp.malicious[k])
        if self.blocks.fisher is not None:
            self.device.to_host(self.blocks.fisher[row], self.reported_fisher(model, self.data[k], attacker, generator))
        if attacker:
            self.attack.send(model.flat, global_weights)
        self.device.to_host(self.blocks.weights[row], model.flat)

    def record(self, row: int, k: int, round_: int, outcome: Outcome) -> None:
        """The client's metadata row, once its computations have finished; faults injected here."""
        train_seconds = Device.seconds(*outcome.trained) * (outcome.train_share or 1.0)
        self.blocks.meta[row] = (len(self.data[k]), float(outcome.loss), train_seconds,
                                 Device.seconds(*outcome.measured), 1.0)
        inject_fault(self.exp.config.runtime.fault, self.rank, k, round_, self.blocks, row)
        self.blocks.meta[row, FINITE] = float(row_is_usable(self.blocks, row))

    def reported_fisher(self, model: FlatModel, data: ClientData, attacker: bool,
                        generator: torch.Generator) -> torch.Tensor:
        """The Fisher diagonal the client sends: its own (docs/SPEC.md section 1.2), or what its
        attack reports instead (``Attack.fisher``, computed on ``Attack.honest_data``)."""
        cfg = self.exp.config
        if attacker:
            forged = self.attack.fisher(model, data, generator)
            if forged is not None:
                return forged
            data = self.attack.honest_data(data)
        idx = fisher_samples(data, cfg.fisher.max_samples, generator)
        if cfg.fisher.estimator == "empirical":
            return empirical_fisher(model, data, self.exp.spec, idx, cfg.fisher.chunk_size, cfg.fisher.backend)
        if cfg.fisher.estimator == "released":
            return released_fisher(model, data, self.exp.spec, idx, cfg.train.batch_size, generator)
        return batch_mean_sq_fisher(model, data, self.exp.spec, idx, cfg.train.batch_size)

    def evaluate(self, weights: torch.Tensor) -> np.ndarray:
        """The evaluation counts of ``weights`` on this rank's share of the batches, split again
        among the workers (each counts a contiguous run on its own model)."""
        sets, work = self.exp.eval_sets, self.exp.eval_work
        parts = [evaluation.share(work, i, self.workers) for i in range(self.workers)]

        def count(model: FlatModel, part: list) -> torch.Tensor:
            model.load(weights)
            return evaluation.count_hits(model, sets, part)

        results = self.each([p for p in parts if p], count)
        for result in results:
            if isinstance(result, Exception):
                raise result
        total = np.zeros(evaluation.COUNTS, dtype=np.int64)
        for counts in results:
            total += counts.cpu().numpy()
        return total


