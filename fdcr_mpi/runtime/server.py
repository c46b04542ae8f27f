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

from fdcr_mpi import metrics, seeding
from fdcr_mpi.defenses.base import Defense, ProxyData, RoundInputs, RoundResult
from fdcr_mpi.experiment import Experiment
from fdcr_mpi.models import build_model
from fdcr_mpi.quarantine import defend_with_quarantine
from fdcr_mpi.runtime.devices import host_buffer
from fdcr_mpi.runtime.transport import client_blocks
from fdcr_mpi.runtime.worker import META, ROUND, STOP, ClientRunner, SendBlocks, gather_blocks

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

    def __init__(self, transport, exp: Experiment, runner: ClientRunner, defense: Defense,
                 device: torch.device, recorder) -> None:
        self.transport, self.exp, self.runner, self.defense = transport, exp, runner, defense
        self.device, self.recorder = device, recorder
        cfg = exp.config
        k, d = exp.num_clients, runner.model.size
        self.recv = SendBlocks(
            weights=host_buffer((k, d), np.float32, device.type == "cuda"),
            fisher=host_buffer((k, d), np.float32, device.type == "cuda") if runner.blocks.fisher is not None else None,
            meta=host_buffer((k, len(META)), np.float64, False),
        )
        self.model = runner.model if runner.client_ids else build_model(
            cfg.model.name, seeding.derive_seed(cfg.seed, seeding.MODEL_INIT), device=device)
        self.trainable = self.model.trainable.cpu()
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
            weight_decay=cfg.train.weight_decay, batch_size=cfg.train.batch_size,
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
        header[:] = (t, ROUND)
        flat = np.ascontiguousarray(weights.detach().cpu().numpy(), dtype=np.float32)
        self.transport.wait_quietly()
        self.transport.broadcast(header)
        self.transport.broadcast(flat)
        lap("broadcast")
        own = self.runner.run_round(weights.to(self.device), t)
        lap("clients")  # the clients hosted here: all of them in one process, none under MPI
        self.transport.wait_quietly()
        lap("wait")  # for the busiest client rank
        gather_blocks(self.transport, own, self.recv, exp.num_clients)
        lap("gather")
        result, quarantined = self.defend(t, weights)
        lap("defend")
        new_weights = result.weights.detach().to(torch.float32).cpu()
        evaluation = self.evaluate(new_weights)
        lap("evaluate")
        seconds["train"], seconds["fisher"] = self.per_rank_seconds()
        row = self.make_row(t, result, quarantined, evaluation)
        self.recorder.record_round(t, row, new_weights, self.defense, seconds, round_start)
        return new_weights

    def defend(self, t: int, weights: torch.Tensor) -> tuple[RoundResult, np.ndarray]:
        """Run the defense on the gathered rows; faulty rows are quarantined for this round."""
        cfg = self.exp.config
        fisher = torch.from_numpy(self.recv.fisher) if self.recv.fisher is not None else None
        inputs = RoundInputs(
            global_weights=weights, client_weights=torch.from_numpy(self.recv.weights), fisher=fisher,
            sizes=torch.from_numpy(self.recv.meta[:, 0].copy()), trainable=self.trainable, lr=cfg.train.lr,
            round=t, total_rounds=cfg.rounds, proxy=self.proxy)
        return defend_with_quarantine(self.defense, inputs)

    def evaluate(self, weights: torch.Tensor) -> dict[str, float]:
        """A, ASR (true label not the target), ASR including target-class images, R, V."""
        sets, bs = self.exp.eval_sets, self.exp.config.eval.batch_size
        self.model.load(weights.to(self.device))
        target = lambda x: torch.full((x.shape[0],), sets.target, dtype=torch.int64)  # noqa: E731
        a = metrics.accuracy(self.model, sets.test_x, sets.test_y, bs)
        asr = metrics.accuracy(self.model, sets.backdoor_x, target(sets.backdoor_x), bs)
        asr_incl = metrics.accuracy(self.model, sets.backdoor_incl_x, target(sets.backdoor_incl_x), bs)
        r = metrics.backdoor_failure_rate(asr)
        return {"A": a, "asr": asr, "asr_incl_target": asr_incl, "R": r, "V": metrics.v_score(a, r)}

    def per_rank_seconds(self) -> tuple[float, float]:
        """(train, fisher) seconds of the busiest rank, from the gathered metadata."""
        meta, blocks = self.recv.meta, client_blocks(self.exp.num_clients, self.transport.size)
        train = max((meta[b, 2].sum() for b in blocks if b), default=0.0)
        fisher = max((meta[b, 3].sum() for b in blocks if b), default=0.0)
        return float(train), float(fisher)

    def make_row(self, t: int, result: RoundResult, quarantined: np.ndarray,
                 evaluation: dict[str, float]) -> dict[str, object]:
        sizes = self.recv.meta[:, 0]
        alpha = sizes / sizes.sum()
        tpr, fpr = metrics.detection_rates(result.removed, self.exp.malicious)
        row: dict[str, object] = {"round": t, **evaluation, "tpr": tpr, "fpr": fpr,
                                  "alpha": alpha, "alpha_hat": np.asarray(result.alpha_hat, np.float64),
                                  "removed": np.asarray(result.removed, bool), "quarantined": quarantined,
                                  "train_loss": self.recv.meta[:, 1].copy()}
        k = self.exp.num_clients
        for name, value in result.diagnostics.items():
            array = np.asarray(value)
            if array.ndim == 0 or (array.ndim == 1 and array.shape[0] == k):
                row[name] = array
        return row
