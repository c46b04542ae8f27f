"""A client rank's work: run its virtual clients on w_t, fill its send blocks (ARCHITECTURE step 2)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from fdcr_mpi import evaluation, seeding
from fdcr_mpi.client import (
    ClientData,
    batch_mean_sq_fisher,
    empirical_fisher,
    fisher_samples,
    local_train,
)
from fdcr_mpi.config import Config, aggregation_path, parallel_eval
from fdcr_mpi.defenses.base import Defense, RoundResult
from fdcr_mpi.experiment import Experiment
from fdcr_mpi.models import FlatModel, build_model
from fdcr_mpi.participation import RoundPlan
from fdcr_mpi.quarantine import expand_result
from fdcr_mpi.reduction import Reduction
from fdcr_mpi.runtime.devices import host_buffer
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


class ClientRunner:
    """Trains the participating clients hosted on this rank on a model reused between them:
    one after another, or in groups of ``train.batch_clients`` ids as one batched computation.

    The send blocks have a row per client that can take part in a round (at most
    ``clients_per_round``); a round fills rows 0..n-1 with its participants in id order.
    """

    def __init__(self, exp: Experiment, client_ids: list[int], with_fisher: bool,
                 device: torch.device, pinned: bool = False, rank: int = 0) -> None:
        cfg = exp.config
        self.exp, self.client_ids, self.device, self.rank = exp, client_ids, device, rank
        self.model: FlatModel = build_model(cfg.model.name, seeding.derive_seed(cfg.seed, seeding.MODEL_INIT),
                                            device=device)
        n, d = min(len(client_ids), cfg.clients_per_round or len(client_ids)), self.model.size
        self.blocks = SendBlocks(
            weights=host_buffer((n, d), np.float32, pinned),
            fisher=host_buffer((n, d), np.float32, pinned) if with_fisher else None,
            meta=host_buffer((n, len(META)), np.float64, pinned),
        )
        self.data = {k: exp.clients[k] for k in client_ids}

    def run_round(self, global_weights: torch.Tensor, round_: int, selected: np.ndarray | None = None) -> SendBlocks:
        """Train and measure the hosted clients in ``selected`` (all hosted ones when None), from
        ``global_weights``; their rows are 0..n-1 of the send blocks, in client-id order."""
        ids = self.client_ids if selected is None else sorted(set(self.client_ids) & set(selected.tolist()))
        row = 0
        for group in self.groups(ids):
            try:
                trained = self.train_group(group, global_weights, round_) if len(group) > 1 else None
                for i, k in enumerate(group):
                    self.run_client(row, k, global_weights, round_, None if trained is None else trained[i])
                    row += 1
            except Exception as exc:
                who = f"client {group[0]}" if len(group) == 1 else f"one of clients {group[0]}-{group[-1]}"
                raise ClientFailure(f"{who} failed in round {round_}: {type(exc).__name__}: {exc}") from exc
        return self.blocks

    def groups(self, ids: list[int]) -> list[list[int]]:
        """``ids`` split into the fixed batched-training groups [jG, (j+1)G) (G = train.batch_clients)."""
        size = self.exp.config.train.batch_clients
        out: dict[int, list[int]] = {}
        for k in ids:
            out.setdefault(k // size, []).append(k)
        return list(out.values())

    def train_group(self, group: list[int], global_weights: torch.Tensor, round_: int) -> list[TrainedClient]:
        """Local training of several clients as one batched computation (``fdcr_mpi.batched``)."""
        from fdcr_mpi.batched import train_group

        cfg = self.exp.config
        generators = [seeding.client_generator(cfg.seed, k, round_) for k in group]
        start = time.perf_counter()
        weights, losses = train_group(self.model, global_weights, [self.data[k] for k in group], self.exp.spec,
                                      self.exp.train_settings, generators)
        share = (time.perf_counter() - start) / len(group)
        return [TrainedClient(weights[i], losses[i], share, generators[i]) for i in range(len(group))]

    def run_client(self, row: int, k: int, global_weights: torch.Tensor, round_: int,
                   trained: TrainedClient | None = None) -> None:
        """One client: load w_t and train (or load its batched result), Fisher, fill row ``row``."""
        cfg = self.exp.config
        data = self.data[k]
        if trained is None:
            generator = seeding.client_generator(cfg.seed, k, round_)
            self.model.load(global_weights)
            start = time.perf_counter()
            loss = local_train(self.model, data, self.exp.spec, self.exp.train_settings, generator)
            train_seconds = time.perf_counter() - start
        else:
            self.model.load(trained.weights)
            generator, loss, train_seconds = trained.generator, trained.loss, trained.seconds
        start = time.perf_counter()
        attacker = bool(self.exp.malicious[k]) and cfg.attack.kind != "none"
        if self.blocks.fisher is not None:
            self.blocks.fisher[row] = self.reported_fisher(data, attacker, generator).cpu().numpy()
        if attacker and cfg.attack.scale != 1.0:
            boost_update(self.model.flat, global_weights, cfg.attack.scale)
        self.blocks.weights[row] = self.model.flat.detach().cpu().numpy()
        self.blocks.meta[row] = (len(data), loss, train_seconds, time.perf_counter() - start, 1.0)
        inject_fault(cfg.runtime.fault, self.rank, k, round_, self.blocks, row)
        self.blocks.meta[row, FINITE] = float(row_is_usable(self.blocks, row))

    def reported_fisher(self, data: ClientData, attacker: bool, generator: torch.Generator) -> torch.Tensor:
        """The Fisher diagonal the client sends: its own (section 1.2), or an attacker's forgery."""
        cfg = self.exp.config
        if attacker and cfg.attack.fisher == "uniform":
            return torch.ones(self.model.size)
        if attacker and cfg.attack.fisher == "noise":
            fisher = torch.zeros(self.model.size)
            fisher[: self.model.num_params] = torch.randn(self.model.num_params, generator=generator)
            return fisher
        if attacker and cfg.attack.fisher == "mimic":
            data = data.clean_part()
        idx = fisher_samples(data, cfg.fisher.max_samples, generator)
        if cfg.fisher.estimator == "empirical":
            return empirical_fisher(self.model, data, self.exp.spec, idx, cfg.fisher.chunk_size, cfg.fisher.backend)
        return batch_mean_sq_fisher(self.model, data, self.exp.spec, idx, cfg.train.batch_size)


@dataclass
class TrainedClient:
    """A client's batched-training result, handed to ``run_client``."""

    weights: torch.Tensor
    loss: float
    seconds: float
    generator: torch.Generator


def row_is_usable(blocks: SendBlocks, row: int) -> bool:
    """Finite weights and Fisher, and a positive sample count (else the server quarantines it)."""
    ok = bool(np.isfinite(blocks.weights[row]).all()) and blocks.meta[row, SIZE] > 0
    return ok and (blocks.fisher is None or bool(np.isfinite(blocks.fisher[row]).all()))


@torch.no_grad()
def boost_update(weights: torch.Tensor, global_weights: torch.Tensor, scale: float) -> None:
    """Model replacement: w_k <- w_t + scale (w_k - w_t), in place."""
    weights.sub_(global_weights).mul_(scale).add_(global_weights)


def inject_fault(fault, rank: int, client: int, round_: int, blocks: SendBlocks, row: int) -> None:
    """``runtime.fault``: make this rank or client fail on purpose (resilience tests)."""
    if fault.kind == "none" or fault.rank != rank or fault.round != round_:
        return
    if fault.client is not None and fault.client != client:
        return
    if fault.kind == "raise":
        raise RuntimeError(f"injected fault in client {client} at round {round_}")
    if fault.kind == "exit":
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
    weights = host_buffer((runner.model.size,), np.float32, pinned=runner.device.type == "cuda")
    evaluates = parallel_eval(cfg, transport.size)
    if evaluates:  # this rank's share of the evaluation batches, the same every round
        sets = runner.exp.eval_sets
        mine = evaluation.share(evaluation.batches(sets, cfg.eval.batch_size), transport.rank - 1,
                                transport.size - 1)
    while True:
        transport.wait_quietly()
        transport.broadcast(header)
        if header[1] == STOP:
            return
        transport.broadcast(weights)
        t = int(header[0])
        plan = RoundPlan.make(cfg.seed, cfg.data.num_clients, cfg.clients_per_round, t, blocks)
        global_weights = torch.from_numpy(weights)
        runner.run_round(global_weights.to(runner.device), t, plan.selected)
        transport.wait_quietly()
        if path == "gather":
            gather_blocks(transport, runner.blocks, None, plan.rows_per_rank)
        else:
            reduce_round(transport, defense, plan, runner.blocks, global_weights, runner.model.trainable, t, cfg)
        if evaluates:  # Server.evaluate: receive w_{t+1}, count on this rank's batches, sum on rank 0
            transport.wait_quietly()
            transport.broadcast(weights)
            runner.model.load(torch.from_numpy(weights).to(runner.device))
            counts = evaluation.count_hits(runner.model, sets, mine, cfg.eval.batch_size)
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
