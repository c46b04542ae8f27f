"""An experiment's fixed parts, built identically on every rank from the config and the seed.

Every rank loads the raw dataset and draws the same split, partition and attacker list
(they depend on the seed only); it then preprocesses only the clients it hosts, and the
server only the test, backdoor and proxy sets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from fdcr_mpi import attacks, evaluation, seeding
from fdcr_mpi.attacks import Attack
from fdcr_mpi.client.train import ClientData, TrainSettings
from fdcr_mpi.config import BaseConfig
from fdcr_mpi.data import released
from fdcr_mpi.data.datasets import DatasetSpec, RawSplit, load_raw, preprocess
from fdcr_mpi.data.partition import (
    choose_malicious,
    dirichlet_partition,
    proxy_indices,
    train_val_split,
)
from fdcr_mpi.errors import UserError
from fdcr_mpi.evaluation import Batch, EvalSets


@dataclass
class Experiment:
    """What every rank knows (ground truth included: it is used by metrics only)."""

    config: BaseConfig
    spec: DatasetSpec
    partition: list[np.ndarray]
    malicious: np.ndarray
    clients: dict[int, ClientData] = field(default_factory=dict)
    eval_sets: EvalSets | None = None
    eval_work: list[Batch] = field(default_factory=list)  # the evaluation batches this rank counts
    trigger_data: ClientData | None = None  # the server's: clean data of the lowest-id attacker (per-round trigger)

    @property
    def num_clients(self) -> int:
        return len(self.partition)

    @property
    def sizes(self) -> np.ndarray:
        return np.array([len(p) for p in self.partition], dtype=np.int64)

    @property
    def train_settings(self) -> TrainSettings:
        return TrainSettings(**self.config.train.model_dump(exclude={"batch_clients"}))


class TakenRows:
    """The images of some rows of a split, read from the files once: a rank reads the rows of its
    clients (and of its evaluation share), never the whole data set."""

    def __init__(self, split: RawSplit, rows: list[np.ndarray]) -> None:
        self.rows = np.unique(np.concatenate(rows)) if rows else np.zeros(0, dtype=np.int64)
        self.x = split.x[self.rows]
        self.y = split.y

    def take(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(images, labels) of ``rows`` (which must be among the rows read)."""
        return self.x[np.searchsorted(self.rows, rows)], self.y[rows]


def build_client(config: BaseConfig, images: np.ndarray, labels: np.ndarray, spec: DatasetSpec,
                 malicious: np.ndarray, client: int, attack: Attack) -> ClientData:
    """Client ``client``'s data from its raw ``images`` and ``labels``; a malicious client's are
    then poisoned by its ``attack`` (``Attack.poison``)."""
    y = torch.as_tensor(labels, dtype=torch.int64)
    data = ClientData(x=preprocess(images, spec), y=y, poisoned=torch.zeros(len(labels), dtype=torch.bool),
                      trigger_value=config.trigger.value, true_y=y)
    return attack.poison(data, spec, client, malicious) if malicious[client] else data


def build_eval_sets(config: BaseConfig, test: RawSplit, spec: DatasetSpec, work: list[Batch],
                    proxy: tuple[np.ndarray, np.ndarray] | None, attack: Attack | None = None) -> EvalSets:
    """The rows of the test set and of the triggered test set that the batches ``work`` cover,
    the labels of the whole test set and the ``proxy`` (images, labels), if any. The triggered rows
    carry the ``attack``'s ``test_trigger`` (the run's attack when None); with a per-round trigger
    their clean images are kept too, to carry each round's (``EvalSets.retrigger``)."""
    attack = attacks.create(config) if attack is None else attack
    rows = test_rows(config, len(test.y))
    clean, triggered = evaluation.rows(work)
    held = TakenRows(test, [rows[clean.start:clean.stop], rows[triggered.start:triggered.stop]])
    untriggered = preprocess(held.take(rows[triggered.start:triggered.stop])[0], spec)
    sets = EvalSets(
        test_x=preprocess(held.take(rows[clean.start:clean.stop])[0], spec),
        test_y=torch.as_tensor(test.y[rows], dtype=torch.int64),
        backdoor_incl_x=attack.test_trigger(spec).apply(untriggered),
        target=config.attack.target_label, clean=clean, triggered=triggered,
        backdoor_clean_x=untriggered if attack.per_round_trigger else None)
    if proxy is not None:
        sets.proxy_x = preprocess(proxy[0], spec)
        sets.proxy_y = torch.as_tensor(proxy[1], dtype=torch.int64)
    return sets


def trigger_rows(attack: Attack, partition: list[np.ndarray], malicious: np.ndarray) -> np.ndarray | None:
    """The training rows the server computes a per-round trigger on (``Attack.per_round_trigger``):
    the lowest-id attacker's (or the attack's subset of them); None without such an attack."""
    if not attack.per_round_trigger or not malicious.any():
        return None
    return attack.trigger_rows(partition[int(np.flatnonzero(malicious)[0])])


def test_rows(config: BaseConfig, size: int) -> np.ndarray:
    """The test images evaluated: all ``size``, or a seeded subset of ``eval.test_samples``."""
    rows = np.arange(size)
    if config.eval.test_samples is not None and config.eval.test_samples < rows.size:
        rows = np.sort(seeding.numpy_rng(config.seed, seeding.SPLIT, 2).permutation(rows.size)[: config.eval.test_samples])
    return rows


def check_batch_size(config: BaseConfig, partition: list[np.ndarray]) -> None:
    """A UserError when no client holds one full batch: with ``drop_last`` nobody would train."""
    largest = max((len(p) for p in partition), default=0)
    train = config.train
    if train.drop_last and train.local_epochs > 0 and train.batch_size > largest:
        raise UserError(f"train.batch_size {train.batch_size} is larger than every client's training set (the "
                        f"largest has {largest} samples), so with train.drop_last=true no client would train; "
                        "lower train.batch_size or set train.drop_last=false")


def build_experiment(config: BaseConfig, client_ids: list[int], *, eval_share: tuple[int, int] | None = None,
                     server: bool = False, with_proxy: bool = False, device: torch.device | str = "cpu") -> Experiment:
    """The experiment as seen by a rank hosting ``client_ids`` (their data on ``device``), counting
    the ``eval_share`` = (index, parts)-th share of the evaluation batches (none when None; its
    rows on ``device``). The ``server`` holds the test labels (for the totals) and, when
    ``with_proxy``, the proxy set (on the CPU)."""
    data = config.data
    train, test, spec = load_raw(data.dataset, data.root, data.download, seed=config.seed, mirror=data.mirror)
    spec = released.normalized_spec(spec, data.normalization)
    train_idx, val_idx = train_val_split(len(train.y), seeding.numpy_rng(config.seed, seeding.SPLIT),
                                         data.val_fraction)
    if data.train_samples is not None and data.train_samples < len(train_idx):
        subset = seeding.numpy_rng(config.seed, seeding.SPLIT, 1).permutation(len(train_idx))
        train_idx = np.sort(train_idx[subset[: data.train_samples]])
    parts = dirichlet_partition(train.y[train_idx], data.num_clients, data.beta,
                                seeding.numpy_rng(config.seed, seeding.PARTITION), data.min_client_size)
    partition = [train_idx[p] for p in parts]
    check_batch_size(config, partition)
    attack = attacks.create(config)
    ratio = config.attack.malicious_ratio if attack.has_attackers else 0.0
    malicious = choose_malicious(data.num_clients, ratio, config.attack.malicious_ids,
                                 seeding.numpy_rng(config.seed, seeding.ATTACKERS))
    exp = Experiment(config=config, spec=spec, partition=partition, malicious=malicious)
    proxy = proxy_indices(val_idx, seeding.numpy_rng(config.seed, seeding.PROXY), config.data.proxy_size) \
        if server and with_proxy else None
    searched = trigger_rows(attack, partition, malicious) if server else None
    held = TakenRows(train, [partition[k] for k in client_ids] + ([proxy] if proxy is not None else [])
                     + ([searched] if searched is not None else []))
    for k in client_ids:
        exp.clients[k] = build_client(config, *held.take(partition[k]), spec, malicious, k, attack).to(device)
    if searched is not None:  # on the server's CPU, clean, with the true labels
        exp.trigger_data = build_client(config, *held.take(searched), spec, np.zeros_like(malicious), 0, attack)
    if eval_share is not None or server:
        size = len(test_rows(config, len(test.y)))
        exp.eval_work = evaluation.share(evaluation.batches(size, config.eval.batch_size), *eval_share) \
            if eval_share is not None else []
        exp.eval_sets = build_eval_sets(config, test, spec, exp.eval_work,
                                        held.take(proxy) if proxy is not None else None, attack).to(device)
    return exp
