"""A client rank's work: run its virtual clients on w_t, fill its send blocks (ARCHITECTURE step 2)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from fdcr_mpi import seeding
from fdcr_mpi.client import (
    ClientData,
    batch_mean_sq_fisher,
    empirical_fisher,
    fisher_samples,
    local_train,
)
from fdcr_mpi.experiment import Experiment
from fdcr_mpi.models import FlatModel, build_model
from fdcr_mpi.runtime.devices import host_buffer

# Columns of the per-client metadata row sent with the weights.
META = ("size", "train_loss", "train_seconds", "fisher_seconds")
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
    """Trains the clients hosted on this rank, one after another, on a model reused between them."""

    def __init__(self, exp: Experiment, client_ids: list[int], with_fisher: bool,
                 device: torch.device, pinned: bool = False, rank: int = 0) -> None:
        cfg = exp.config
        self.exp, self.client_ids, self.device, self.rank = exp, client_ids, device, rank
        self.model: FlatModel = build_model(cfg.model.name, seeding.derive_seed(cfg.seed, seeding.MODEL_INIT),
                                            device=device)
        n, d = len(client_ids), self.model.size
        self.blocks = SendBlocks(
            weights=host_buffer((n, d), np.float32, pinned),
            fisher=host_buffer((n, d), np.float32, pinned) if with_fisher else None,
            meta=host_buffer((n, len(META)), np.float64, pinned),
        )
        self.data = {k: exp.clients[k] for k in client_ids}

    def run_round(self, global_weights: torch.Tensor, round_: int) -> SendBlocks:
        """Train and measure every hosted client starting from ``global_weights``."""
        for row, k in enumerate(self.client_ids):
            try:
                self.run_client(row, k, global_weights, round_)
            except Exception as exc:
                raise ClientFailure(f"client {k} failed in round {round_}: {type(exc).__name__}: {exc}") from exc
        return self.blocks

    def run_client(self, row: int, k: int, global_weights: torch.Tensor, round_: int) -> None:
        """One client: load w_t, train, Fisher, fill row ``row`` of the send blocks."""
        cfg = self.exp.config
        data = self.data[k]
        generator = seeding.client_generator(cfg.seed, k, round_)
        self.model.load(global_weights)
        start = time.perf_counter()
        loss = local_train(self.model, data, self.exp.spec, self.exp.train_settings, generator)
        trained = time.perf_counter()
        attacker = bool(self.exp.malicious[k]) and cfg.attack.kind != "none"
        if self.blocks.fisher is not None:
            self.blocks.fisher[row] = self.reported_fisher(data, attacker, generator).cpu().numpy()
        if attacker and cfg.attack.scale != 1.0:
            boost_update(self.model.flat, global_weights, cfg.attack.scale)
        self.blocks.weights[row] = self.model.flat.detach().cpu().numpy()
        done = time.perf_counter()
        self.blocks.meta[row] = (len(data), loss, trained - start, done - trained)
        inject_fault(cfg.runtime.fault, self.rank, k, round_, self.blocks, row)


    def reported_fisher(self, data: ClientData, attacker: bool, generator: torch.Generator) -> torch.Tensor:
        """The Fisher diagonal the client sends: its own (section 1.2), or an attacker's forgery."""
        cfg = self.exp.config
        if attacker and cfg.attack.fisher == "uniform":
            return torch.ones(self.model.size)
        if attacker and cfg.attack.fisher == "mimic":
            data = data.clean_part()
        idx = fisher_samples(data, cfg.fisher.max_samples, generator)
        if cfg.fisher.estimator == "empirical":
            return empirical_fisher(self.model, data, self.exp.spec, idx, cfg.fisher.chunk_size, cfg.fisher.backend)
        return batch_mean_sq_fisher(self.model, data, self.exp.spec, idx, cfg.train.batch_size)


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
        blocks.meta[row, 0] = 0


def worker_loop(transport, runner: ClientRunner, num_clients: int) -> None:
    """Client rank: wait for a header, receive w_t, train, send rows; until the server says stop."""
    header = np.zeros(2, dtype=np.int64)
    weights = host_buffer((runner.model.size,), np.float32, pinned=runner.device.type == "cuda")
    while True:
        transport.wait_quietly()
        transport.broadcast(header)
        if header[1] == STOP:
            return
        transport.broadcast(weights)
        blocks = runner.run_round(torch.from_numpy(weights).to(runner.device), int(header[0]))
        send_rows(transport, blocks, num_clients)


def send_rows(transport, blocks: SendBlocks, num_clients: int) -> None:
    """A client rank's side of step 3: wait quietly for every rank, then the gathers."""
    transport.wait_quietly()
    gather_blocks(transport, blocks, None, num_clients)


def gather_blocks(transport, blocks: SendBlocks, recv: SendBlocks | None, num_clients: int) -> None:
    """The Gatherv of weights, Fisher and metadata (ARCHITECTURE step 3); ``recv``: rank 0's (K, ...) blocks."""
    transport.gather_rows(blocks.weights, recv.weights if recv else None, num_clients)
    if blocks.fisher is not None:
        transport.gather_rows(blocks.fisher, recv.fisher if recv else None, num_clients)
    transport.gather_rows(blocks.meta, recv.meta if recv else None, num_clients)
