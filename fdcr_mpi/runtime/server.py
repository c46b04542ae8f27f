"""The round loop on rank 0 (ARCHITECTURE.md, "One round, as data").

Broadcast w_t; (in one-process mode, train every client here); gather the clients' rows in
client-id order; quarantine non-finite rows; run the defense; evaluate; append the round's
row to the run file; write the checkpoint; print one line.
"""

from __future__ import annotations

import hashlib
import signal
import time
from dataclasses import dataclass

import numpy as np
import torch

from fdcr_mpi import evaluation, metrics, seeding
from fdcr_mpi.config import aggregation_path, parallel_eval, participants
from fdcr_mpi.defenses.base import Defense, ProxyData, RoundInputs, RoundResult
from fdcr_mpi.experiment import Experiment
from fdcr_mpi.models import build_model
from fdcr_mpi.participation import RoundPlan
from fdcr_mpi.quarantine import defend_with_quarantine
from fdcr_mpi.runtime.transport import client_blocks
from fdcr_mpi.runtime.worker import (
    FINITE,
    FISHER_SECONDS,
    LOSS,
    META,
    ROUND,
    SIZE,
    STOP,
    TRAIN_SECONDS,
    ClientRunner,
    SendBlocks,
    gather_blocks,
    reduce_round,
)

PHASES = ("broadcast", "clients", "wait", "gather", "train", "fisher", "defend", "evaluate", "write", "round")


def weights_sha256(weights: np.ndarray | torch.Tensor) -> str:
    """sha256 of the flat float32 weights as little-endian bytes (the run's fingerprint)."""
    array = weights.detach().cpu().numpy() if isinstance(weights, torch.Tensor) else weights
    return hashlib.sha256(np.ascontiguousarray(array, dtype="<f4").tobytes()).hexdigest()


@dataclass
class StopFlag:
    """Set by SIGTERM/SIGUSR1 (SLURM preemption or time limit): stop after the current round."""

    signum: int | None = None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = signum


class Server:
    """Rank 0: drives the rounds and owns every file of the run."""

    def __init__(self, transport, exp: Experiment, runner: ClientRunner, defense: Defense, recorder) -> None:
        self.transport, self.exp, self.runner, self.defense = transport, exp, runner, defense
        self.device, self.recorder = runner.device.device, recorder  # the clients' device (one process)
        cfg = exp.config
        m, d = participants(cfg), runner.model.size
        self.path = aggregation_path(cfg)
        self.blocks = client_blocks(exp.num_clients, transport.size, cfg.train.batch_clients)
        self.recv = SendBlocks(  # the gather path's (m, D) rows in host memory, where the defense runs
            weights=np.empty((m, d), np.float32),
            fisher=np.empty((m, d), np.float32) if runner.blocks.fisher is not None else None,
            meta=np.empty((m, len(META)), np.float64),
        ) if self.path == "gather" else None
        self.trainable = runner.model.trainable.cpu()
        self.proxy = self._proxy() if defense.needs_proxy else None
        self.stop = StopFlag()

    def initial_weights(self) -> torch.Tensor:
        cfg = self.exp.config
        return build_model(cfg.model.name, seeding.derive_seed(cfg.seed, seeding.MODEL_INIT)).flat.clone()

    def _proxy(self) -> ProxyData:
        cfg, sets = self.exp.config, self.exp.eval_sets
        from fdcr_mpi.data.datasets import model_input

        return ProxyData(
            x=model_input(sets.proxy_x).contiguous(), y=sets.proxy_y,
            make_model=lambda: build_model(cfg.model.name, 0), lr=cfg.train.lr, momentum=cfg.train.momentum,
            weight_decay=cfg.train.weight_decay, batch_size=cfg.train.batch_size, local_epochs=cfg.train.local_epochs,
            seed=seeding.derive_seed(cfg.seed, seeding.DEFENSE))

    def run(self, start_round: int, weights: torch.Tensor) -> torch.Tensor:
        """Rounds ``start_round`` .. rounds-1 from ``weights`` = w_start; returns the final weights."""
        cfg = self.exp.config
        header = np.zeros(2, dtype=np.int64)
        for t in range(start_round, cfg.rounds):
            if self.stop.signum is not None:
                break
            weights = self.round(t, weights, header)
        header[:] = (cfg.rounds, STOP)
        self.transport.wait_quietly()
        self.transport.broadcast(header)
        return weights

    def round(self, t: int, weights: torch.Tensor, header: np.ndarray) -> torch.Tensor:
        exp = self.exp
        seconds: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            seconds[name] = now - clock
            clock = now

        round_start = clock
        cfg = exp.config
        plan = RoundPlan.make(cfg.seed, exp.num_clients, cfg.clients_per_round, t, self.blocks)
        header[:] = (t, ROUND)
        flat = np.ascontiguousarray(weights.detach().cpu().numpy(), dtype=np.float32)
        self.transport.wait_quietly()
        self.transport.broadcast(header)
        self.transport.broadcast(flat)
        lap("broadcast")
        own = self.runner.run_round(weights.to(self.device), t, plan.selected)
        lap("clients")  # the clients hosted here: all of them in one process, none under MPI
        self.transport.wait_quietly()
        lap("wait")  # for the busiest client rank
        if self.path == "gather":
            gather_blocks(self.transport, own, self.recv, plan.rows_per_rank)
            lap("gather")
            meta = self.recv.meta
            result, quarantined = self.defend(t, weights, plan)
        else:  # the reductions are the defense's communication: counted under "defend"
            lap("gather")
            result, meta = reduce_round(self.transport, self.defense, plan, own,
                                        weights.to(torch.float32).cpu(), self.trainable, t, cfg)
            quarantined = meta[:, FINITE] == 0
        lap("defend")
        new_weights = result.weights.detach().to(torch.float32).cpu()
        scores = self.evaluate(new_weights)
        lap("evaluate")
        seconds["train"], seconds["fisher"] = self.per_rank_seconds(meta, plan)
        row = self.make_row(t, result, quarantined, scores, meta, plan)
        self.recorder.record_round(t, row, new_weights, self.defense, seconds, round_start)
        return new_weights

    def defend(self, t: int, weights: torch.Tensor, plan: RoundPlan) -> tuple[RoundResult, np.ndarray]:
        """Run the defense on the gathered rows; faulty rows are quarantined for this round."""
        cfg = self.exp.config
        fisher = torch.from_numpy(self.recv.fisher) if self.recv.fisher is not None else None
        inputs = RoundInputs(
            global_weights=weights, client_weights=torch.from_numpy(self.recv.weights), fisher=fisher,
            sizes=torch.from_numpy(self.recv.meta[:, SIZE].copy()), trainable=self.trainable, lr=cfg.train.lr,
            round=t, total_rounds=cfg.rounds, proxy=self.proxy, client_ids=plan.selected, seed=cfg.seed,
            fresh_model=lambda seed: build_model(cfg.model.name, seed).flat)
        return defend_with_quarantine(self.defense, inputs)

    def evaluate(self, weights: torch.Tensor) -> dict[str, float]:
        """A, ASR (true label not the target), ASR including target-class images, R, V of the
        round's model: here, or on the client ranks, which rank 0 sends it to (``evaluation``)."""
        cfg, sets = self.exp.config, self.exp.eval_sets
        if parallel_eval(cfg, self.transport.size):
            self.transport.wait_quietly()
            self.transport.broadcast(np.ascontiguousarray(weights.numpy(), dtype=np.float32))
            counts = np.zeros(evaluation.COUNTS, dtype=np.int64)  # rank 0 adds nothing
            self.transport.wait_quietly()
            self.transport.sum_int64(counts, to_all=False)
        else:
            counts = self.runner.evaluate(weights.to(self.device))
        return evaluation.scores(counts, sets)

    @staticmethod
    def per_rank_seconds(meta: np.ndarray, plan: RoundPlan) -> tuple[float, float]:
        """(train, fisher) seconds of the busiest rank, from the participants' metadata."""
        bounds = np.concatenate([[0], np.cumsum(plan.rows_per_rank)]).astype(int)
        spans = [slice(bounds[r], bounds[r + 1]) for r in range(len(plan.rows_per_rank)) if bounds[r + 1] > bounds[r]]
        train = max((meta[s, TRAIN_SECONDS].sum() for s in spans), default=0.0)
        fisher = max((meta[s, FISHER_SECONDS].sum() for s in spans), default=0.0)
        return float(train), float(fisher)

    def make_row(self, t: int, result: RoundResult, quarantined: np.ndarray, scores: dict[str, float],
                 meta: np.ndarray, plan: RoundPlan) -> dict[str, object]:
        """The round's row: per-client columns have K entries (non-participants: alpha 0, NaN)."""
        k = self.exp.num_clients
        sizes = meta[:, SIZE]
        removed = np.asarray(result.removed, bool)
        tpr, fpr = metrics.detection_rates(removed, self.exp.malicious[plan.selected])
        row: dict[str, object] = {
            "round": t, **scores, "tpr": tpr, "fpr": fpr,
            "alpha": plan.spread(sizes / sizes.sum(), k, 0.0),
            "alpha_hat": plan.spread(np.asarray(result.alpha_hat, np.float64), k, 0.0),
            "removed": plan.spread(removed, k, False), "quarantined": plan.spread(quarantined, k, False),
            "train_loss": plan.spread(meta[:, LOSS].copy(), k, np.nan)}
        if self.exp.config.clients_per_round is not None:
            row["selected"] = plan.spread(np.ones(len(plan.selected), bool), k, False)
        m = len(plan.selected)
        for name, value in result.diagnostics.items():
            array = np.asarray(value)
            if array.ndim == 0:
                row[name] = array
            elif array.ndim == 1 and array.shape[0] == m:
                row[name] = plan.spread(array, k, np.nan if array.dtype.kind == "f" else -1)
        return row
