"""The released FDCR code's client and data side, as named options (fdcr_mpi.client.fisher_released,
fdcr_mpi.data.released), against independent computations; and the preset that sets them all."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fdcr_mpi import seeding
from fdcr_mpi.client import ClientData, draw_epoch
from fdcr_mpi.client.fisher_released import batch_label_mix_log_likelihood, released_fisher
from fdcr_mpi.config import load_config
from fdcr_mpi.data.datasets import SPECS, Shifts, augment, preprocess
from fdcr_mpi.data.experiment import build_experiment
from fdcr_mpi.data.released import augment_once, bernoulli_mask, normalized_spec
from fdcr_mpi.models import build_model
from tests.test_attacks import BASE, generator_after_training, run_round

REPO = Path(__file__).resolve().parents[1]


def client_data(n: int, seed: int = 0) -> ClientData:
    gen = torch.Generator().manual_seed(seed)
    return ClientData(x=torch.randn(n, 1, 32, 32, generator=gen), y=torch.randint(0, 10, (n,), generator=gen),
                      poisoned=torch.zeros(n, dtype=torch.bool))


def released_by_hand(model, data: ClientData, batch_size: int, generator: torch.Generator) -> np.ndarray:
    """The released code's loop: per batch, log_softmax(out)[:, labels].mean() backward, gradients
    summed, divided by the number of batches, squared (same batches and crops: same generator)."""
    spec = SPECS["fmnist"]
    order = torch.randperm(len(data), generator=generator)
    grads = [torch.zeros_like(p) for p in model.module.parameters()]
    batches = 0
    for start in range(0, len(data) - batch_size + 1, batch_size):
        rows = order[start:start + batch_size]
        x = data.inputs(rows, spec, Shifts.draw(rows.numel(), spec, generator) if data.augment else None)
        log_likelihoods = F.log_softmax(model.module(x), dim=1)[:, data.y[rows]]  # (B, B)
        assert log_likelihoods.shape == (batch_size, batch_size)
        total = torch.autograd.grad(log_likelihoods.mean(), list(model.module.parameters()))
        grads = [g + t for g, t in zip(grads, total)]
        batches += 1
    return torch.cat([(g / max(batches, 1)).reshape(-1) ** 2 for g in grads]).double().numpy()


def test_released_fisher_matches_the_released_loop() -> None:
    model, data = build_model("simple_cnn", 3), client_data(70)
    ours = released_fisher(model, data, SPECS["fmnist"], torch.arange(70), 16, torch.Generator().manual_seed(5))
    hand = released_by_hand(model, data, 16, torch.Generator().manual_seed(5))
    assert ours.shape == (model.size,) and ours.dtype == torch.float32
    np.testing.assert_allclose(ours[: model.num_params].double().numpy(), hand, rtol=1e-4, atol=1e-12)
    assert hand.max() > 0


def test_the_indexing_scores_every_image_against_the_batchs_label_mix() -> None:
    logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([2, 2, 0, 7, 2, 9])
    indexed = F.log_softmax(logits, dim=1)[:, labels].mean()
    assert batch_label_mix_log_likelihood(logits, labels) == pytest.approx(float(indexed), abs=1e-6)
    own_labels = F.log_softmax(logits, dim=1).gather(1, labels[:, None]).mean()  # what Eq. 5 would use
    assert abs(float(indexed) - float(own_labels)) > 0.1


def test_released_fisher_without_a_full_batch_is_zero() -> None:
    model = build_model("simple_cnn", 0)
    f = released_fisher(model, client_data(10), SPECS["fmnist"], torch.arange(10), 16, torch.Generator())
    assert not f.any()


def test_bernoulli_poisoning_flips_a_coin_per_sample() -> None:
    masks = [bernoulli_mask(1000, 0.5, np.random.default_rng(s)) for s in range(20)]
    counts = np.array([m.sum() for m in masks])
    assert len(set(counts)) > 5 and abs(counts.mean() - 500) < 20  # not exactly round(rate n)
    np.testing.assert_array_equal(masks[3], np.random.default_rng(3).random(1000) < 0.5)
    config = load_config(None, [*BASE, "attack.poisoning=bernoulli"])
    attacker = build_experiment(config, [4], server=False).clients[4]
    rng = seeding.numpy_rng(config.seed, seeding.POISON, 4)
    np.testing.assert_array_equal(attacker.poisoned.numpy(), rng.random(len(attacker)) < 0.5)
    assert bool((attacker.y[attacker.poisoned] == 2).all())


def test_frozen_augmentation_is_drawn_once_for_attackers_only() -> None:
    config = load_config(None, [*BASE, "attack.augmentation=frozen"])
    fresh = build_experiment(load_config(None, BASE), [0, 4], server=False)
    frozen = build_experiment(config, [0, 4], server=False)
    spec = frozen.spec
    expected = augment(fresh.clients[4].x, spec, seeding.torch_generator(config.seed, seeding.AUGMENT, 4))
    torch.testing.assert_close(frozen.clients[4].x, expected, rtol=0, atol=0)
    assert not frozen.clients[4].augment and frozen.clients[0].augment
    torch.testing.assert_close(frozen.clients[0].x, fresh.clients[0].x, rtol=0, atol=0)
    gen, reference = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    attacker = frozen.clients[4]
    epoch = draw_epoch(len(attacker), frozen.train_settings, spec, gen, torch.device("cpu"), attacker.augment)
    assert epoch.batches and all(s is None for s in epoch.shifts)  # no new crop, no draw beyond the shuffle
    torch.randperm(len(attacker), generator=reference)
    assert torch.equal(gen.get_state(), reference.get_state())
    assert torch.equal(augment_once(torch.zeros(0, 1, 32, 32), spec, gen), torch.zeros(0, 1, 32, 32))


def test_released_normalization_changes_cifar10_only() -> None:
    cifar = normalized_spec(SPECS["cifar10"], "released")
    assert cifar.std == (0.2023, 0.1994, 0.2010) and cifar.mean == SPECS["cifar10"].mean
    assert normalized_spec(SPECS["cifar10"], "spec") == SPECS["cifar10"]
    assert normalized_spec(SPECS["fmnist"], "released") == SPECS["fmnist"]
    pixels = np.full((1, 32, 32, 3), 200, np.uint8)
    x = preprocess(pixels, cifar)
    np.testing.assert_allclose(x[0, :, 0, 0].numpy(), (200 / 255 - np.array(cifar.mean)) / np.array(cifar.std),
                               rtol=1e-6)


def test_the_released_preset_sets_every_released_option() -> None:
    config = load_config(REPO / "configs" / "paper" / "released_fdcr.yaml")
    assert (config.fdcr.variant, config.fisher.estimator, config.attack.poisoning, config.attack.augmentation,
            config.data.normalization, config.attack.fisher) == (
        "released", "released", "bernoulli", "frozen", "released", "noise")
    assert (config.data.dataset, config.data.beta, config.attack.malicious_ratio) == ("fmnist", 0.5, 0.3)


def test_the_worker_reports_the_released_fisher() -> None:
    _, _, reported = run_round(["fisher.estimator=released"], [0])
    config = load_config(None, [*BASE, "fisher.estimator=released"])
    exp = build_experiment(config, [0], server=False)
    generator, model = generator_after_training(config, exp, 0)
    from fdcr_mpi.client import fisher_samples

    idx = fisher_samples(exp.clients[0], config.fisher.max_samples, generator)
    expected = released_fisher(model, exp.clients[0], exp.spec, idx, config.train.batch_size, generator)
    np.testing.assert_allclose(reported[0], expected.numpy(), rtol=1e-5, atol=1e-12)
