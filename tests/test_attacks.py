"""Attacks beyond the paper's pixel trigger: model replacement, forged Fisher vectors, DBA, clean runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fdcr_mpi import attacks
from fdcr_mpi.config import load_config
from fdcr_mpi.data.experiment import build_experiment
from fdcr_mpi.data.poison import trigger_mask
from fdcr_mpi.runtime.clients import ClientRunner

BASE = ["data.dataset=synthetic", "rounds=1", "train.local_epochs=1",
        "fisher.max_samples=64", "attack.malicious_ratio=0.2", "data.num_clients=5"]


def run_round(overrides: list[str], clients: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(w_t, client weights, client Fisher) of round 0 for ``clients``."""
    config = load_config(None, [*BASE, *overrides])
    exp = build_experiment(config, clients, server=False)
    runner = ClientRunner(exp, clients, with_fisher=True, device=torch.device("cpu"))
    w0 = runner.model.flat.clone()
    blocks = runner.run_round(w0, 0)
    return w0.numpy(), blocks.weights.copy(), blocks.fisher.copy()


def test_model_replacement_scales_the_attackers_update_only() -> None:
    attacker, benign = 4, 0  # ratio 0.2 of 5 clients, "last": client 4 attacks
    _, plain_w, _ = run_round([], [benign, attacker])
    w0, boosted_w, _ = run_round(["attack.scale=5"], [benign, attacker])
    np.testing.assert_array_equal(boosted_w[0], plain_w[0])  # the benign client is untouched
    np.testing.assert_allclose(boosted_w[1] - w0, 5 * (plain_w[1] - w0), rtol=1e-4, atol=1e-6)


def test_model_replacement_is_w_t_plus_scaled_step() -> None:
    w_t, w_k = torch.tensor([1.0, 2.0]), torch.tensor([2.0, 0.0])
    attacks.create(load_config(None, ["attack.scale=3"])).update(w_k, w_t)
    assert torch.equal(w_k, torch.tensor([4.0, -4.0]))


def test_uniform_fisher_is_reported_by_attackers_only() -> None:
    _, _, fisher = run_round(["attack.fisher=uniform"], [0, 4])
    assert np.all(fisher[1] == 1.0)
    assert not np.all(fisher[0] == fisher[0][0])


def test_mimic_fisher_is_the_fisher_of_the_clean_half() -> None:
    _, _, honest = run_round([], [4])
    _, _, mimic = run_round(["attack.fisher=mimic"], [4])
    assert not np.allclose(honest, mimic)
    config = load_config(None, BASE)
    exp = build_experiment(config, [4], server=False)
    clean = exp.clients[4].clean_part()
    assert len(clean) == int((~exp.clients[4].poisoned).sum()) and clean.trigger is None
    assert bool((clean.y == exp.clients[4].true_y[~exp.clients[4].poisoned]).all())


def test_dba_gives_each_attacker_a_part_and_the_parts_cover_the_trigger() -> None:
    config = load_config(None, [*BASE, "attack.kind=dba", "attack.malicious_ratio=0.4"])
    exp = build_experiment(config, [0, 1, 2, 3, 4], eval_share=(0, 1), server=True)
    parts = [exp.clients[k].trigger for k in (3, 4)]
    assert exp.clients[0].trigger is None
    assert not bool((parts[0] & parts[1]).any())
    assert torch.equal(parts[0] | parts[1], trigger_mask("paper"))
    # The server tests with the full trigger.
    assert exp.eval_sets.backdoor_incl_x.shape[0] == exp.eval_sets.size
    assert bool((exp.eval_sets.backdoor_incl_x[:, 0, 0, 0] == config.trigger.value).all())


def test_attack_kind_none_poisons_nobody() -> None:
    config = load_config(None, [*BASE, "attack.kind=none"])
    exp = build_experiment(config, list(range(5)), server=False)
    assert not exp.malicious.any()
    assert all(not bool(c.poisoned.any()) and c.trigger is None for c in exp.clients.values())


@pytest.mark.parametrize("pattern", ["paper", "solid"])
def test_attackers_relabel_a_fixed_half_to_the_target(pattern: str) -> None:
    config = load_config(None, [*BASE, f"trigger.pattern={pattern}"])
    exp = build_experiment(config, [4], server=False)
    client = exp.clients[4]
    assert int(client.poisoned.sum()) == round(0.5 * len(client))
    assert bool((client.y[client.poisoned] == 2).all())
    assert torch.equal(client.trigger, trigger_mask(pattern))


def generator_after_training(config, exp, client: int) -> tuple[torch.Generator, object]:
    """Client ``client``'s round-0 generator advanced past its local training, as the worker
    leaves it before the Fisher step, and the trained model."""
    from fdcr_mpi.client import local_train
    from fdcr_mpi.models import build_model
    from fdcr_mpi.seeding import MODEL_INIT, client_generator, derive_seed

    model = build_model(config.model.name, derive_seed(config.seed, MODEL_INIT))
    generator = client_generator(config.seed, client, 0)
    local_train(model, exp.clients[client], exp.spec, exp.train_settings, generator)
    return generator, model


def test_noise_fisher_is_the_attackers_own_n01_draw_and_fdcr_then_separates_them() -> None:
    """attack.fisher=noise: an attacker reports N(0, 1) drawn from its round generator right after
    training (the released server's substitution, done by the attackers, not by a defense that
    reads the ground truth); benign clients report their honest Fisher; FDCR removes the attackers."""
    clients = [0, 1, 2, 3, 4]
    overrides = ["attack.malicious_ratio=0.4", "data.dataset=digits", "data.beta=iid",  # attackers 3 and 4,
                 "train.batch_size=32"]  # equal shares: the updates' sizes do not decide
    w0, honest_w, honest = run_round(overrides, clients)
    _, noise_w, noise = run_round([*overrides, "attack.fisher=noise"], clients)
    np.testing.assert_array_equal(noise_w, honest_w)  # the forgery changes nothing else
    np.testing.assert_array_equal(noise[:3], honest[:3])  # benign clients: unchanged
    config = load_config(None, [*BASE, *overrides, "attack.fisher=noise"])
    exp = build_experiment(config, clients, server=False)
    for row, k in ((3, 3), (4, 4)):
        generator, model = generator_after_training(config, exp, k)
        expected = torch.randn(model.num_params, generator=generator).numpy()
        np.testing.assert_array_equal(noise[row][: model.num_params], expected)
        assert (noise[row][model.num_params:] == 0).all()
    from fdcr_mpi.defenses import aggregate

    sizes = exp.sizes.astype(np.float64)
    with_noise = aggregate("fdcr", w0, noise_w, noise, sizes, lr=config.train.lr)
    np.testing.assert_array_equal(with_noise.removed, [False, False, False, True, True])
    v = with_noise.diagnostics["discrepancy"]
    assert v[3:].min() > 1.5 * v[:3].max()
