"""A client rank's work: run its virtual clients on w_t, fill its send blocks (ARCHITECTURE step 2).

The clients of a rank are trained one group at a time (a group is one client, or
``train.batch_clients`` ids trained as one batched computation), on the rank's device. On a CPU
rank with more than one worker (``runtime.threads`` / ``runtime.client_threads``, see
``runtime.placement``) the groups are spread over worker threads, each with its own model; every
client's arithmetic uses the same fixed intra-op threads however many workers there are, and
its rows land at fixed positions, so the result does not depend on the scheduling.
"""

from __future__ import annotations

import os
import queue
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from fdcr_mpi import evaluation, seeding
from fdcr_mpi.client import (
    ClientData,
    batch_mean_sq_fisher,
    empirical_fisher,
    fisher_samples,
    train_client,
)
from fdcr_mpi.config import Config, aggregation_path, parallel_eval
from fdcr_mpi.defenses.base import Defense, RoundResult
from fdcr_mpi.experiment import Experiment
from fdcr_mpi.fisher_released import released_fisher
from fdcr_mpi.models import FlatModel, build_model
from fdcr_mpi.participation import RoundPlan
from fdcr_mpi.quarantine import expand_result
from fdcr_mpi.reduction import Reduction
from fdcr_mpi.runtime.staging import Device, Mark, host_buffer
from fdcr_mpi.runtime.transport import client_blocks

# Columns of the per-client metadata row sent with the weights; "finite" is 1 when the row
# is usable (finite weights and Fisher, samples > 0), else 0 (the client is quarantined).
META = ("size", "train_loss", "train_seconds", "fisher_seconds", "finite")
SIZE, LOSS, TRAIN_SECONDS, FISHER_SECONDS, FINITE = range(len(META))
STOP, ROUND = 0, 1


class ClientFailure(RuntimeError):
    """A client's training or Fisher computation raised; the message names the client and round."""


@dataclass
class SendBlocks:
    """This rank's rows, in the order of its client ids: weights, Fisher (or None) and metadata."""

    weights: np.ndarray  # (n_local, D) float32
    fisher: np.ndarray | None  # (n_local, D) float32
    meta: np.ndarray  # (n_local, len(META)) float64


@dataclass
class Outcome:
    """A client's round as the device left it: its mean loss (a device scalar) and its marks."""

    loss: torch.Tensor
    trained: tuple[Mark, Mark]
    measured: tuple[Mark, Mark]
    train_share: float | None = None  # a batched group's seconds per client, when batched


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

    def each(self, jobs: list, work) -> list:
        """``work(model, job)`` for every job, on the worker threads (each job gets a free model);
        the results in job order. An exception is returned in place of its job's result."""
        def run(job):
            model = self.free.get()
            try:
                return work(model, job)
            except Exception as exc:  # noqa: BLE001 - reported in job order by the caller
                return exc
            finally:
                self.free.put(model)

        if self.pool is None:
            return [run(job) for job in jobs]
        return list(self.pool.map(run, jobs))

    def run_round(self, global_weights: torch.Tensor, round_: int, selected: np.ndarray | None = None) -> SendBlocks:
        """Train and measure the hosted clients in ``selected`` (all hosted ones when None), from
        ``global_weights`` (on the rank's device); their rows are 0..n-1 of the send blocks, in
        client-id order."""
        ids = self.client_ids if selected is None else sorted(set(self.client_ids) & set(selected.tolist()))
        groups, row = [], 0
        for group in self.groups(ids):
            groups.append((row, group))
            row += len(group)
        results = self.each(groups, lambda model, job: self.run_group(model, *job, global_weights, round_))
        self.device.synchronize()  # every row's copy has landed; the losses and marks are final
        for (first, group), result in zip(groups, results):
            if isinstance(result, Exception):
                who = f"client {group[0]}" if len(group) == 1 else f"one of clients {group[0]}-{group[-1]}"
                raise ClientFailure(f"{who} failed in round {round_}: {type(result).__name__}: {result}") from result
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

    def run_group(self, model: FlatModel, first: int, group: list[int], global_weights: torch.Tensor,
                  round_: int) -> list[Outcome]:
        """A group's clients on ``model``: trained (one by one, or batched), measured, rows filled."""
        cfg = self.exp.config
        generators = [seeding.client_generator(cfg.seed, k, round_) for k in group]
        if len(group) == 1:
            model.load(global_weights)
            begin = self.device.mark()
            loss = train_client(model, self.data[group[0]], self.exp.spec, self.exp.train_settings, generators[0])
            trained = [(model.flat, loss, (begin, self.device.mark()))]
        else:
            from fdcr_mpi.batched import train_group

            begin = self.device.mark()
            weights, losses = train_group(model, global_weights, [self.data[k] for k in group], self.exp.spec,
                                          self.exp.train_settings, generators)
            end = self.device.mark()
            trained = [(weights[i], losses[i], (begin, end)) for i in range(len(group))]
        outcomes = []
        for i, (k, (weights, loss, marks)) in enumerate(zip(group, trained)):
            if len(group) > 1:
                model.load(weights)
            begin = self.device.mark()
            self.fill_rows(model, first + i, k, global_weights, generators[i])
            outcome = Outcome(loss, marks, (begin, self.device.mark()))
            if len(group) > 1:
                outcome.train_share = 1.0 / len(group)
            outcomes.append(outcome)
        return outcomes

    def fill_rows(self, model: FlatModel, row: int, k: int, global_weights: torch.Tensor,
                  generator: torch.Generator) -> None:
        """Client ``k``'s reported Fisher and its (possibly boosted) weights into row ``row``."""
        cfg = self.exp.config
        attacker = bool(self.exp.malicious[k]) and cfg.attack.kind != "none"
        if self.blocks.fisher is not None:
            self.device.to_host(self.blocks.fisher[row], self.reported_fisher(model, self.data[k], attacker, generator))
        if attacker and cfg.attack.scale != 1.0:
            boost_update(model.flat, global_weights, cfg.attack.scale)
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
        """The Fisher diagonal the client sends: its own (section 1.2), or an attacker's forgery."""
        cfg = self.exp.config
        device = model.flat.device
        if attacker and cfg.attack.fisher == "uniform":
            return torch.ones(model.size, device=device)
        if attacker and cfg.attack.fisher == "noise":
            fisher = torch.zeros(model.size, device=device)
            fisher[: model.num_params] = torch.randn(model.num_params, generator=generator).to(device)
            return fisher
        if attacker and cfg.attack.fisher == "mimic":
            data = data.clean_part()
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


def row_is_usable(blocks: SendBlocks, row: int) -> bool:
    """Finite weights and Fisher, and a positive sample count (else the server quarantines it)."""
    ok = bool(np.isfinite(blocks.weights[row]).all()) and blocks.meta[row, SIZE] > 0
    return ok and (blocks.fisher is None or bool(np.isfinite(blocks.fisher[row]).all()))


@torch.no_grad()
def boost_update(weights: torch.Tensor, global_weights: torch.Tensor, scale: float) -> None:
    """Model replacement: w_k <- w_t + scale (w_k - w_t), in place."""
    weights.sub_(global_weights).mul_(scale).add_(global_weights)


class InjectedFault(RuntimeError):
    """The failure that ``runtime.fault`` asked for (a resilience test, not a bug)."""


def inject_fault(fault, rank: int, client: int, round_: int, blocks: SendBlocks, row: int) -> None:
    """``runtime.fault``: make this rank or client fail on purpose (resilience tests).

    ``exit`` ends the process at once (``os._exit(13)``) on a client rank under MPI, as a rank
    that dies does; in one process it raises ``InjectedFault`` so that the run is marked failed.
    """
    if fault.kind == "none" or fault.rank != rank or fault.round != round_:
        return
    if fault.client is not None and fault.client != client:
        return
    if fault.kind == "raise":
        raise InjectedFault(f"injected fault in client {client} at round {round_}")
    if fault.kind == "exit":
        if rank == 0:
            raise InjectedFault(f"injected exit of client {client} at round {round_}")
        os._exit(13)
    if fault.kind in ("nan", "inf"):
        blocks.weights[row, ::7] = np.nan if fault.kind == "nan" else np.inf
    if fault.kind == "short":
        blocks.meta[row, SIZE] = 0


def worker_loop(transport, runner: ClientRunner, defense: Defense) -> None:
    """Client rank: wait for a header, receive w_t, train, send rows (and evaluate w_{t+1} on its
    share of the test batches); until the server says stop."""
    cfg = runner.exp.config
    blocks = client_blocks(cfg.data.num_clients, transport.size, cfg.train.batch_clients)
    path = aggregation_path(cfg)
    header = np.zeros(2, dtype=np.int64)
    weights = host_buffer((runner.model.size,), np.float32, pinned=runner.device.cuda)
    host_weights = torch.from_numpy(weights)
    while True:
        transport.wait_quietly()
        transport.broadcast(header)
        if header[1] == STOP:
            return
        transport.broadcast(weights)
        t = int(header[0])
        plan = RoundPlan.make(cfg.seed, cfg.data.num_clients, cfg.clients_per_round, t, blocks)
        runner.run_round(host_weights.to(runner.device.device), t, plan.selected)
        transport.wait_quietly()
        if path == "gather":
            gather_blocks(transport, runner.blocks, None, plan.rows_per_rank)
        else:
            reduce_round(transport, defense, plan, runner.blocks, host_weights, runner.model.trainable, t, cfg)
        if parallel_eval(cfg, transport.size):  # Server.evaluate: w_{t+1}, counted on this rank's share
            transport.wait_quietly()
            transport.broadcast(weights)
            counts = runner.evaluate(host_weights.to(runner.device.device))
            transport.wait_quietly()
            transport.sum_int64(counts, to_all=False)


def gather_blocks(transport, blocks: SendBlocks, recv: SendBlocks | None, rows_per_rank: list[int]) -> None:
    """The Gatherv of weights, Fisher and metadata (ARCHITECTURE step 3) into rank 0's ``recv``."""
    transport.gather_rows(blocks.weights, recv.weights if recv else None, rows_per_rank)
    if blocks.fisher is not None:
        transport.gather_rows(blocks.fisher, recv.fisher if recv else None, rows_per_rank)
    transport.gather_rows(blocks.meta, recv.meta if recv else None, rows_per_rank)


def reduce_round(transport, defense: Defense, plan: RoundPlan, blocks: SendBlocks, global_weights: torch.Tensor,
                 trainable: torch.Tensor, round_: int, cfg: Config) -> tuple[RoundResult | None, np.ndarray]:
    """The reduce path on every rank: share the metadata, run the defense's reductions over the
    healthy rows. Returns (the result over all participants, the participants' metadata) on
    rank 0, (None, metadata) elsewhere; quarantined rows are those with meta ``finite`` 0."""
    n, m = plan.rows_per_rank[transport.rank], len(plan.selected)
    meta = np.empty((m, len(META)), dtype=np.float64)
    transport.allgather_rows(blocks.meta, meta, plan.rows_per_rank)
    healthy = meta[:, FINITE] > 0
    first = int(sum(plan.rows_per_rank[: transport.rank]))
    mine = np.flatnonzero(healthy[first:first + n])
    take = (lambda a: torch.from_numpy(a[:n])) if mine.size == n else (lambda a: torch.from_numpy(a[mine]))  # noqa: E731
    sizes = np.where(healthy, meta[:, SIZE], 0.0)
    alpha_all = sizes / sizes.sum() if healthy.any() else sizes
    ctx = Reduction(
        transport=transport, ids=plan.selected[first:first + n][mine], weights=take(blocks.weights),
        fisher=None if blocks.fisher is None else take(blocks.fisher), alpha=alpha_all[first:first + n][mine],
        alpha_all=alpha_all[healthy], rows_per_rank=healthy_per_rank(healthy, plan.rows_per_rank),
        global_weights=global_weights.to(torch.float32).cpu(), trainable=trainable.cpu(), lr=cfg.train.lr,
        round=round_, total_rounds=cfg.rounds)
    if not healthy.any():  # every participant is quarantined: keep w_t
        result = RoundResult(weights=ctx.global_weights.clone(), alpha_hat=np.zeros(0), removed=np.zeros(0, bool))
    else:
        result = defense.aggregate_reduced(ctx)
    if transport.rank != 0:
        return None, meta
    return expand_result(result, np.flatnonzero(healthy), m), meta


def healthy_per_rank(healthy: np.ndarray, rows_per_rank: list[int]) -> list[int]:
    """How many of each rank's rows are healthy."""
    bounds = np.concatenate([[0], np.cumsum(rows_per_rank)]).astype(int)
    return [int(healthy[bounds[r]:bounds[r + 1]].sum()) for r in range(len(rows_per_rank))]
