"""The ``blended`` attack (Chen et al. 2017, blended injection) and the ``Trigger`` type: each blend
against an independent numpy computation, the same poisoned rows as BadNets, the triggered test set
carrying the blend, batched training as one by one, and BadNets' stamp unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fdcr_mpi import seeding
from fdcr_mpi.attacks.badnets import BadNets
from fdcr_mpi.attacks.blended import Blended, key_pattern
from fdcr_mpi.client import ClientData, TrainSettings, local_train
from fdcr_mpi.client.batched import train_group
from fdcr_mpi.config import config_hash, load_config
from fdcr_mpi.data.datasets import SPECS, Shifts, shift
from fdcr_mpi.data.experiment import build_experiment
from fdcr_mpi.data.poison import Trigger, trigger_mask
from fdcr_mpi.errors import UserError
from fdcr_mpi.models import build_model

ATTACKERS = np.array([False] * 7 + [True] * 3)
SMALL = ["data.dataset=synthetic", "data.num_clients=5", "attack.malicious_ratio=0.4", "eval.test_samples=300"]


def pixels_of(pattern: torch.Tensor, spec) -> np.ndarray:
    """A normalised (C, H, W) pattern back in pixel space, in numpy: p * std_c + mean_c."""
    mean = np.asarray(spec.mean, np.float64).reshape(-1, 1, 1)
    std = np.asarray(spec.std, np.float64).reshape(-1, 1, 1)
    return pattern.numpy().astype(np.float64) * std + mean


def blend(x: torch.Tensor, pattern: torch.Tensor, alpha: float) -> np.ndarray:
    return (1 - alpha) * x.numpy().astype(np.float64) + alpha * pattern.numpy().astype(np.float64)


# ----------------------------------------------------------------------------- the Trigger type


def test_a_blend_is_the_convex_combination_on_the_chosen_rows_only() -> None:
    gen = torch.Generator().manual_seed(0)
    x, pattern = torch.randn(4, 1, 32, 32, generator=gen), torch.randn(1, 32, 32, generator=gen)
    rows = torch.tensor([True, False, True, False])
    before = x.clone()
    out = Trigger(pattern=pattern, alpha=0.3).apply(x, rows).numpy()
    expected = np.where(rows.numpy()[:, None, None, None], blend(x, pattern, 0.3), x.numpy())
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(x, before)  # out of place
    everywhere = Trigger(pattern=pattern, alpha=0.3).apply(x).numpy()
    np.testing.assert_allclose(everywhere, blend(x, pattern, 0.3), rtol=1e-6, atol=1e-6)


def test_a_patch_pastes_the_pattern_inside_its_mask_and_a_stamp_is_badnets_masked_fill() -> None:
    gen = torch.Generator().manual_seed(1)
    x, pattern = torch.randn(3, 3, 32, 32, generator=gen), torch.randn(3, 32, 32, generator=gen)
    mask = torch.zeros(3, 32, 32, dtype=torch.bool)
    mask[:, 2:7, 2:7] = True
    patched = Trigger(mask=mask, pattern=pattern).apply(x).numpy()
    inside = np.zeros((32, 32), bool)
    inside[2:7, 2:7] = True
    np.testing.assert_array_equal(patched[:, :, inside], np.broadcast_to(pattern.numpy()[:, inside], (3, 3, 25)))
    np.testing.assert_array_equal(patched[:, :, ~inside], x.numpy()[:, :, ~inside])
    rows = torch.tensor([False, True, True])
    stamp = trigger_mask("paper")
    ours = Trigger.of(stamp, 1.5).apply(x, rows)
    assert torch.equal(ours, x.masked_fill(rows.view(-1, 1, 1, 1) & stamp, 1.5))  # the former code, bit for bit
    given = Trigger(mask=stamp)
    assert Trigger.of(given, 9.0) is given  # a Trigger is used as it is; a bool mask is a stamp of the value


# ----------------------------------------------------------------------------- the key pattern


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_the_key_is_uniform_pixels_normalised_like_the_data_and_seeded(dataset: str) -> None:
    spec = SPECS[dataset]
    pattern = key_pattern(3, spec)
    assert pattern.shape == (spec.channels, 32, 32) and pattern.dtype == torch.float32
    pixels = pixels_of(pattern, spec)
    assert pixels.min() >= -1e-6 and pixels.max() < 1 + 1e-6
    assert abs(pixels.mean() - 0.5) < 0.05 and abs(pixels.var() - 1 / 12) < 0.01  # U[0, 1): mean 1/2, var 1/12
    assert torch.equal(pattern, key_pattern(3, spec)) and not torch.equal(pattern, key_pattern(4, spec))
    raw = torch.rand((spec.channels, 32, 32), generator=seeding.torch_generator(3, seeding.TRIGGER, 0))
    np.testing.assert_allclose(pixels, raw.numpy(), atol=1e-6)  # drawn from the run's TRIGGER stream


# ----------------------------------------------------------------------------- the attack


def clean_data(n: int = 40) -> ClientData:
    gen = torch.Generator().manual_seed(5)
    y = torch.randint(0, 10, (n,), generator=gen)
    return ClientData(x=torch.randn(n, 1, 32, 32, generator=gen), y=y, poisoned=torch.zeros(n, dtype=torch.bool),
                      true_y=y)


def test_blended_poisons_badnets_rows_and_blends_exactly_those_inputs() -> None:
    config = load_config(None, ["attack.kind=blended", "blended.alpha=0.25", "seed=7"])
    spec, data = SPECS["mnist"], clean_data()
    ours = Blended(config).poison(data, spec, 8, ATTACKERS)
    reference = BadNets(config).poison(data, spec, 8, ATTACKERS)
    assert torch.equal(ours.poisoned, reference.poisoned) and torch.equal(ours.y, reference.y)
    assert int(ours.poisoned.sum()) == 20 and bool((ours.y[ours.poisoned] == 2).all())
    idx = torch.arange(len(data))
    shifts = Shifts.draw(len(idx), spec, torch.Generator().manual_seed(0))
    augmented = shift(data.x, spec, shifts)  # the trigger acts after augmentation
    x = ours.inputs(idx, spec, shifts)[:, :1]
    key = key_pattern(7, spec)
    poisoned = ours.poisoned.numpy()
    np.testing.assert_allclose(x[poisoned].numpy(), blend(augmented[poisoned], key, 0.25), rtol=1e-5, atol=1e-6)
    assert torch.equal(x[~ours.poisoned], augmented[~ours.poisoned])


def test_the_triggered_test_set_carries_the_blend_and_badnets_keeps_its_stamp() -> None:
    blended = load_config(None, [*SMALL, "attack.kind=blended", "seed=2"])
    exp = build_experiment(blended, [], eval_share=(0, 1), server=True)
    sets = exp.eval_sets
    assert sets.triggered.start == sets.clean.start and sets.triggered.stop == sets.clean.stop  # one share: every row
    np.testing.assert_allclose(sets.backdoor_incl_x.numpy(), blend(sets.test_x, key_pattern(2, exp.spec), 0.2),
                               rtol=1e-5, atol=1e-6)
    assert sets.backdoor_clean_x is None  # a fixed trigger: built once
    stamped = build_experiment(load_config(None, [*SMALL, "seed=2"]), [], eval_share=(0, 1), server=True).eval_sets
    mask = trigger_mask("paper")[:1].expand_as(stamped.test_x)
    assert torch.equal(stamped.backdoor_incl_x[mask], torch.ones(int(mask.sum())))
    assert torch.equal(stamped.backdoor_incl_x[~mask], stamped.test_x[~mask])


def test_blended_trains_alike_batched_and_one_by_one() -> None:
    config = load_config(None, ["attack.kind=blended"])
    spec = SPECS["mnist"]
    datas = [Blended(config).poison(clean_data(37), spec, 8, ATTACKERS), clean_data(21)]
    settings = TrainSettings(local_epochs=2, lr=0.05, batch_size=8, drop_last=False)
    start = build_model("simple_cnn", 0).flat.clone()
    model = build_model("simple_cnn", 0)
    rows = []
    for data, seed in zip(datas, (11, 12)):
        model.load(start)
        local_train(model, data, spec, settings, torch.Generator().manual_seed(seed))
        rows.append(model.flat.clone())
    together, _ = train_group(build_model("simple_cnn", 1), start, datas, spec, settings,
                              [torch.Generator().manual_seed(s) for s in (11, 12)])
    torch.testing.assert_close(together, torch.stack(rows), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(rows[0], start)


def test_the_blended_section_is_validated_and_hashed_only_when_used() -> None:
    assert Blended(load_config(None, ["attack.kind=blended"])).options.alpha == 0.2
    for bad in ("blended.alpha=0", "blended.alpha=1.5"):
        with pytest.raises(UserError, match="blended.alpha"):
            load_config(None, ["attack.kind=blended", bad])
    assert config_hash(load_config(None, ["attack.kind=blended", "blended.alpha=0.1"])) != \
        config_hash(load_config(None, ["attack.kind=blended"]))
    with pytest.warns(UserWarning, match="blended.alpha set, but the attack is badnets"):
        unused = load_config(None, ["blended.alpha=0.1"])
    assert config_hash(unused) == config_hash(load_config(None))


def test_blended_training_and_its_test_rows_stay_on_the_device() -> None:
    from fdcr_mpi.client import train_client
    from tests.device_check import META, DeviceMixing

    config = load_config(None, [*SMALL, "attack.kind=blended"])
    exp = build_experiment(config, [4], eval_share=(0, 1), server=True, device=META)  # client 4 attacks
    data = exp.clients[4]
    assert isinstance(data.trigger, Trigger) and data.trigger.device == META
    assert exp.eval_sets.backdoor_incl_x.device == META
    model = build_model("simple_cnn", 0, device=META)
    with DeviceMixing():
        loss = train_client(model, data, exp.spec, TrainSettings(local_epochs=1, batch_size=8),
                            torch.Generator().manual_seed(0))
    assert loss.device == META
