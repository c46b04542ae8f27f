"""An experiment's fixed parts, built identically on every rank from the config and the seed.

Every rank loads the raw dataset and draws the same split, partition and attacker list
(they depend on the seed only); it then preprocesses only the clients it hosts, and the
server only the test, backdoor and proxy sets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from fdcr_mpi import seeding
from fdcr_mpi.client import ClientData, TrainSettings
from fdcr_mpi.config import BaseConfig
from fdcr_mpi.data.datasets import DatasetSpec, RawSplit, load_raw, preprocess
from fdcr_mpi.data.partition import (
    choose_malicious,
    dirichlet_partition,
    proxy_indices,
    train_val_split,
)
from fdcr_mpi.data.poison import apply_trigger, dba_masks, poison_mask, trigger_mask
from fdcr_mpi.errors import UserError


@dataclass
class EvalSets:
    """The server's data: clean test set, backdoor test sets and the proxy set (preprocessed)."""

    test_x: torch.Tensor
    test_y: torch.Tensor
    backdoor_incl_x: torch.Tensor  # every triggered test image (the released code's ASR)
    target: int
    proxy_x: torch.Tensor | None = None
    proxy_y: torch.Tensor | None = None

    @property
    def backdoor_rows(self) -> torch.Tensor:
        """Which triggered test images count for the ASR: those whose true label is not the target."""
        return self.test_y != self.target

    @property
    def backdoor_x(self) -> torch.Tensor:
        """The triggered test images whose true label is not the target (a copy)."""
        return self.backdoor_incl_x[self.backdoor_rows]


@dataclass
class Experiment:
    """What every rank knows (ground truth included: it is used by metrics only)."""

    config: BaseConfig
    spec: DatasetSpec
    partition: list[np.ndarray]
    malicious: np.ndarray
    clients: dict[int, ClientData] = field(default_factory=dict)
    eval_sets: EvalSets | None = None

    @property
    def num_clients(self) -> int:
        return len(self.partition)

    @property
    def sizes(self) -> np.ndarray:
        return np.array([len(p) for p in self.partition], dtype=np.int64)

    @property
    def train_settings(self) -> TrainSettings:
        return TrainSettings(**self.config.train.model_dump(exclude={"batch_clients"}))


def client_trigger(config: BaseConfig, malicious: np.ndarray, client: int) -> torch.Tensor:
    """The trigger client ``client`` stamps: the full pattern, or its DBA part."""
    pattern = config.trigger.pattern
    if config.attack.kind != "dba":
        return trigger_mask(pattern)
    attackers = np.flatnonzero(malicious)
    parts = dba_masks(pattern, len(attackers))
    return parts[int(np.searchsorted(attackers, client))]


def build_client(config: BaseConfig, raw: RawSplit, spec: DatasetSpec, indices: np.ndarray,
                 malicious: np.ndarray, client: int) -> ClientData:
    """Client ``client``'s data; an attacker relabels a fixed seeded half and carries a trigger."""
    x = preprocess(raw.x[indices], spec)
    true_y = torch.as_tensor(raw.y[indices], dtype=torch.int64)
    y = true_y.clone()
    poisoned = torch.zeros(len(indices), dtype=torch.bool)
    trigger = None
    if malicious[client] and config.attack.kind != "none":
        rng = seeding.numpy_rng(config.seed, seeding.POISON, client)
        poisoned = torch.as_tensor(poison_mask(len(indices), config.attack.poison_rate, rng))
        y[poisoned] = config.attack.target_label
        trigger = client_trigger(config, malicious, client)
    return ClientData(x=x, y=y, poisoned=poisoned, trigger=trigger, trigger_value=config.trigger.value,
                      true_y=true_y)


def build_eval_sets(config: BaseConfig, train: RawSplit, test: RawSplit, spec: DatasetSpec,
                    val_idx: np.ndarray, with_proxy: bool) -> EvalSets:
    """Test set, backdoor test sets (full trigger) and, when asked, the 256-sample proxy set."""
    rows = np.arange(len(test.y))
    if config.eval.test_samples is not None and config.eval.test_samples < rows.size:
        rows = np.sort(seeding.numpy_rng(config.seed, seeding.SPLIT, 2).permutation(rows.size)[: config.eval.test_samples])
    test_x = preprocess(test.x[rows], spec)
    test_y = torch.as_tensor(test.y[rows], dtype=torch.int64)
    mask = trigger_mask(config.trigger.pattern)[: spec.channels]
    triggered = apply_trigger(test_x, mask, config.trigger.value)
    target = config.attack.target_label
    sets = EvalSets(test_x=test_x, test_y=test_y, backdoor_incl_x=triggered, target=target)
    if with_proxy:
        proxy = proxy_indices(val_idx, seeding.numpy_rng(config.seed, seeding.PROXY), config.data.proxy_size)
        sets.proxy_x = preprocess(train.x[proxy], spec)
        sets.proxy_y = torch.as_tensor(train.y[proxy], dtype=torch.int64)
    return sets


def check_batch_size(config: BaseConfig, partition: list[np.ndarray]) -> None:
    """A UserError when no client holds one full batch: with ``drop_last`` nobody would train."""
    largest = max((len(p) for p in partition), default=0)
    train = config.train
    if train.drop_last and train.local_epochs > 0 and train.batch_size > largest:
        raise UserError(f"train.batch_size {train.batch_size} is larger than every client's training set (the "
                        f"largest has {largest} samples), so with train.drop_last=true no client would train; "
                        "lower train.batch_size or set train.drop_last=false")


def build_experiment(config: BaseConfig, client_ids: list[int], server: bool,
                     with_proxy: bool = False, evaluates: bool = False) -> Experiment:
    """The experiment as seen by a rank hosting ``client_ids``, with the evaluation sets if it is
    the ``server`` or ``evaluates`` (the proxy set only on the server, ``with_proxy``)."""
    data = config.data
    train, test, spec = load_raw(data.dataset, data.root, data.download, seed=config.seed)
    train_idx, val_idx = train_val_split(len(train.y), seeding.numpy_rng(config.seed, seeding.SPLIT),
                                         data.val_fraction)
    if data.train_samples is not None and data.train_samples < len(train_idx):
        subset = seeding.numpy_rng(config.seed, seeding.SPLIT, 1).permutation(len(train_idx))
        train_idx = np.sort(train_idx[subset[: data.train_samples]])
    parts = dirichlet_partition(train.y[train_idx], data.num_clients, data.beta,
                                seeding.numpy_rng(config.seed, seeding.PARTITION), data.min_client_size)
    partition = [train_idx[p] for p in parts]
    check_batch_size(config, partition)
    ratio = config.attack.malicious_ratio if config.attack.kind != "none" else 0.0
    malicious = choose_malicious(data.num_clients, ratio, config.attack.malicious_ids,
                                 seeding.numpy_rng(config.seed, seeding.ATTACKERS))
    exp = Experiment(config=config, spec=spec, partition=partition, malicious=malicious)
    for k in client_ids:
        exp.clients[k] = build_client(config, train, spec, partition[k], malicious, k)
    if server or evaluates:
        exp.eval_sets = build_eval_sets(config, train, test, spec, val_idx, server and with_proxy)
    return exp
