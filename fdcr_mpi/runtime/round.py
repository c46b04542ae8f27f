"""One round, SPMD: every rank runs ``run_rounds`` and ``one_round``; the server's branch sits beside
each collective (docs/ARCHITECTURE.md, "One round, as data").

1. Rank 0 broadcasts the header (round, ROUND | STOP) and w_t (and, for an attack with a per-round
   trigger, that round's trigger, computed from w_t: ``attacks.round_trigger``).
2. Every rank trains the participants it hosts (all of them in one process, none on rank 0 under
   MPI) and fills its send blocks (``runtime.clients``).
3. The rows meet the defense, healthy rows only (the clients' own check, meta ``finite``):
   gathered to rank 0 in client order (gather path) or left where they are and reduced exactly
   (reduce path); the defense is the same code on both (``defenses.ops``).
4. w_{t+1} is evaluated on shares of the test batches by the client ranks (or rank 0 alone), and
   the integer counts are summed on rank 0.
5. Rank 0 records the round (``runtime.recorder``).

The header and the rows' layout are in ``runtime.protocol``; the collectives in
``runtime.transport``, the only module that speaks MPI.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from fdcr_mpi import evaluation, metrics
from fdcr_mpi.attacks import Attack
from fdcr_mpi.attacks.collusion import collude
from fdcr_mpi.attacks.round_trigger import RoundTrigger
from fdcr_mpi.config import BaseConfig
from fdcr_mpi.data.experiment import Experiment
from fdcr_mpi.defenses.base import Defense, ProxyData, RoundInputs, RoundResult
from fdcr_mpi.defenses.quarantine import defend, expand_result, kept_model
from fdcr_mpi.models import build_model
from fdcr_mpi.runtime.clients import ClientRunner
from fdcr_mpi.runtime.participation import RoundPlan
from fdcr_mpi.runtime.protocol import (
    FINITE,
    FISHER_SECONDS,
    LOSS,
    META,
    ROUND,
    SIZE,
    STOP,
    TRAIN_SECONDS,
    SendBlocks,
    header,
)
from fdcr_mpi.runtime.reduce_ops import ReducedAcrossRanks
from fdcr_mpi.runtime.transport import Transport
from fdcr_mpi.store.schema import fill

PHASES = ("broadcast", "clients", "wait", "gather", "train", "fisher", "defend", "evaluate", "write", "round")


@dataclass
class RunContext:
    """What one rank knows about the run, built once by the driver (``runtime.driver``)."""

    config: BaseConfig
    transport: Transport
    exp: Experiment
    runner: ClientRunner
    defense: Defense
    blocks: list[list[int]]  # the client ids hosted by every rank
    path: str  # "gather" (rows to the server) or "reduce" (exact reductions across ranks)
    parallel_eval: bool  # the client ranks evaluate shares of the test batches
    trainable: torch.Tensor  # (D,) bool, CPU
    w_buffer: np.ndarray  # (D,) float32 host buffer every model is broadcast through (pinned on a GPU rank)
    proxy: ProxyData | None = None  # the server's proxy set, for the defenses that need one
    recv: SendBlocks | None = None  # the server's (m, D) rows on the gather path
    attack: Attack | None = None  # the server's copy of a colluding attack (attacks.collusion)
    round_trigger: RoundTrigger | None = None  # an attack's per-round trigger (attacks.round_trigger)

    @property
    def is_server(self) -> bool:
        return self.transport.is_server


@dataclass
class RoundRecord:
    """What the server keeps of a round: the new model, the result and the round's numbers."""

    round: int
    weights: torch.Tensor
    result: RoundResult
    plan: RoundPlan
    meta: np.ndarray
    scores: dict[str, float]
    seconds: dict[str, float] = field(default_factory=dict)
    started: float = 0.0


class Laps:
    """The server's phase timings of a round (``PHASES``)."""

    def __init__(self) -> None:
        self.started = self.clock = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = now - self.clock
        self.clock = now


def run_rounds(ctx: RunContext, start: int, weights: torch.Tensor, stop, record) -> torch.Tensor:
    """Rounds ``start`` .. rounds-1 from ``weights`` = w_start on every rank, until the server says
    STOP (after the last round, or when ``stop`` saw a signal); ``record(RoundRecord)`` runs on
    the server after each round. Returns the final weights (the server's; w_start elsewhere)."""
    cfg, head = ctx.config, header()
    t = start
    while True:
        if ctx.is_server:
            done = t >= cfg.rounds or stop.signum is not None
            head[:] = (t, STOP if done else ROUND)
        ctx.transport.wait_quietly()
        ctx.transport.broadcast(head)
        if head[1] == STOP:
            return weights
        outcome = one_round(ctx, int(head[0]), weights)
        if ctx.is_server:
            record(outcome)
            weights = outcome.weights
        t += 1


def one_round(ctx: RunContext, t: int, weights: torch.Tensor) -> RoundRecord | None:
    """Round ``t`` on every rank (w_t: the server's ``weights``); the server's record, None elsewhere."""
    cfg, transport, laps = ctx.config, ctx.transport, Laps()
    plan = RoundPlan.make(cfg.seed, cfg.data.num_clients, cfg.clients_per_round, t, ctx.blocks)
    w_t = ctx.w_buffer
    if ctx.is_server:
        w_t[:] = weights.detach().cpu().numpy()
    if ctx.round_trigger is not None:  # round t's trigger, from w_t on the server, with w_t to every rank
        if ctx.is_server:
            ctx.round_trigger.compute(weights, t)
        transport.wait_quietly()
        transport.broadcast(ctx.round_trigger.buffer)
        ctx.round_trigger.install()
    transport.broadcast(w_t)
    laps("broadcast")
    own = ctx.runner.run_round(torch.from_numpy(w_t).to(ctx.runner.device.device), t, plan.selected)
    laps("clients")  # the clients hosted here: all of them in one process, none on rank 0 under MPI
    transport.wait_quietly()
    laps("wait")  # for the busiest client rank
    result, meta = combine(ctx, plan, own, torch.from_numpy(w_t), t, laps)
    laps("defend")
    new = result.weights.detach().to(torch.float32).cpu().clone() if ctx.is_server else None
    scores = evaluate(ctx, new)
    laps("evaluate")
    if not ctx.is_server:
        return None
    laps.seconds["train"], laps.seconds["fisher"] = busiest_rank_seconds(meta, plan)
    return RoundRecord(t, new, result, plan, meta, scores, laps.seconds, laps.started)


def combine(ctx: RunContext, plan: RoundPlan, own: SendBlocks, w_t: torch.Tensor, t: int,
            laps: Laps) -> tuple[RoundResult | None, np.ndarray]:
    """The participants' rows meet the defense (healthy rows only): (the result over every
    participant and their metadata) on the server, (None, metadata) elsewhere."""
    transport, m = ctx.transport, len(plan.selected)
    if ctx.path == "gather":
        recv = ctx.recv
        for name in ("weights", "fisher", "meta"):
            send = getattr(own, name)
            if send is not None:
                transport.gather_rows(send, getattr(recv, name) if recv else None, plan.rows_per_rank)
        laps("gather")
        if not ctx.is_server:
            return None, own.meta
        healthy = recv.meta[:, FINITE] > 0
        if ctx.attack is not None:  # colluding attackers craft their rows before the defense sees any
            collude(ctx.attack, recv.weights, w_t, ctx.trainable, ctx.exp.malicious[plan.selected], healthy,
                    ctx.config.seed, t, fisher=recv.fisher, sizes=recv.meta[:, SIZE])
        return defend(ctx.defense, round_inputs(ctx, recv, w_t, plan, t), healthy), recv.meta
    laps("gather")  # the reduce path's reductions are the defense's communication ("defend")
    meta = np.empty((m, len(META)), dtype=np.float64)
    transport.allgather_rows(own.meta, meta, plan.rows_per_rank)
    healthy = meta[:, FINITE] > 0
    if not healthy.any():
        return (kept_model(w_t.to(torch.float32), m) if ctx.is_server else None), meta
    result = ctx.defense.aggregate_ops(reduced(ctx, plan, own, meta, healthy, w_t, t))
    return (expand_result(result, np.flatnonzero(healthy), m) if ctx.is_server else None), meta


def round_inputs(ctx: RunContext, recv: SendBlocks, w_t: torch.Tensor, plan: RoundPlan, t: int) -> RoundInputs:
    """The gathered rows as the defense's inputs (every participant; the quarantine filters them)."""
    cfg = ctx.config
    return RoundInputs(
        global_weights=w_t, client_weights=torch.from_numpy(recv.weights),
        fisher=None if recv.fisher is None else torch.from_numpy(recv.fisher),
        sizes=torch.from_numpy(recv.meta[:, SIZE].copy()), trainable=ctx.trainable, lr=cfg.train.lr, round=t,
        total_rounds=cfg.rounds, proxy=ctx.proxy, client_ids=plan.selected, seed=cfg.seed,
        fresh_model=lambda seed: build_model(cfg.model.name, seed).flat)


def reduced(ctx: RunContext, plan: RoundPlan, own: SendBlocks, meta: np.ndarray, healthy: np.ndarray,
            w_t: torch.Tensor, t: int) -> ReducedAcrossRanks:
    """This rank's healthy rows as the reduce path's ``ClientOps``."""
    rank, rows = ctx.transport.rank, plan.rows_per_rank
    n, first = rows[rank], int(sum(rows[:rank]))
    mine = np.flatnonzero(healthy[first:first + n])

    def take(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a[:n] if mine.size == n else a[mine])

    sizes = np.where(healthy, meta[:, SIZE], 0.0)
    alpha_all = sizes / sizes.sum()
    bounds = np.concatenate([[0], np.cumsum(rows)]).astype(int)
    return ReducedAcrossRanks(
        transport=ctx.transport, ids=plan.selected[first:first + n][mine], weights=take(own.weights),
        fisher=None if own.fisher is None else take(own.fisher), alpha=alpha_all[first:first + n][mine],
        alpha_all=alpha_all[healthy], rows_per_rank=[int(healthy[bounds[r]:bounds[r + 1]].sum()) for r in range(len(rows))],
        global_weights=w_t.to(torch.float32).cpu(), trainable=ctx.trainable, lr=ctx.config.train.lr,
        round=t, total_rounds=ctx.config.rounds)


def evaluate(ctx: RunContext, weights: torch.Tensor | None) -> dict[str, float]:
    """A, ASR, R, V (and the paper's R, V) of w_{t+1}: counted by the client ranks on their shares
    of the test batches and summed on the server, or by the server alone; scores on the server."""
    sets, device = ctx.exp.eval_sets, ctx.runner.device.device
    if ctx.parallel_eval:
        w = ctx.w_buffer
        if ctx.is_server:
            w[:] = weights.numpy()
        ctx.transport.wait_quietly()
        ctx.transport.broadcast(w)
        counts = np.zeros(evaluation.COUNTS, dtype=np.int64) if ctx.is_server \
            else ctx.runner.evaluate(torch.from_numpy(w).to(device))  # rank 0 adds nothing
        ctx.transport.wait_quietly()
        ctx.transport.sum_int64(counts, to_all=False)
    elif ctx.is_server:
        counts = ctx.runner.evaluate(weights.to(device))
    return evaluation.scores(counts, sets) if ctx.is_server else {}


def busiest_rank_seconds(meta: np.ndarray, plan: RoundPlan) -> tuple[float, float]:
    """(train, fisher) seconds of the busiest rank, from the participants' metadata."""
    bounds = np.concatenate([[0], np.cumsum(plan.rows_per_rank)]).astype(int)
    spans = [slice(bounds[r], bounds[r + 1]) for r in range(len(plan.rows_per_rank)) if bounds[r + 1] > bounds[r]]
    train = max((meta[s, TRAIN_SECONDS].sum() for s in spans), default=0.0)
    fisher = max((meta[s, FISHER_SECONDS].sum() for s in spans), default=0.0)
    return float(train), float(fisher)


def round_row(exp: Experiment, outcome: RoundRecord) -> dict[str, object]:
    """The round's row of the run file: per-client columns have K entries (non-participants: alpha
    0, NaN diagnostics)."""
    k, plan, meta, result = exp.num_clients, outcome.plan, outcome.meta, outcome.result
    sizes = meta[:, SIZE]
    removed = np.asarray(result.removed, bool)
    quarantined = meta[:, FINITE] == 0
    tpr, fpr = metrics.detection_rates(removed, exp.malicious[plan.selected])
    row: dict[str, object] = {
        "round": outcome.round, **outcome.scores, "tpr": tpr, "fpr": fpr,
        "alpha": plan.spread(sizes / sizes.sum(), k, 0.0),
        "alpha_hat": plan.spread(np.asarray(result.alpha_hat, np.float64), k, 0.0),
        "removed": plan.spread(removed, k, False), "quarantined": plan.spread(quarantined, k, False),
        "train_loss": plan.spread(meta[:, LOSS].copy(), k, np.nan)}
    if exp.config.clients_per_round is not None:
        row["selected"] = plan.spread(np.ones(len(plan.selected), bool), k, False)
    m = len(plan.selected)
    for name, value in result.diagnostics.items():
        array = np.asarray(value)
        if array.ndim == 0:
            row[name] = array
        elif array.ndim == 1 and array.shape[0] == m:
            row[name] = plan.spread(array, k, fill(array.dtype))
    return row
