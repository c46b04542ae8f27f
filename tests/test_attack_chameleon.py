"""The ``chameleon`` attack (Dai and Li, ICML 2023, issue 16): its contrastive loss against a plain
loop, its learning-rate schedule against torch's MultiStepLR, the two stages (the head untouched by
the first, the extractor by the second), the backdoor it plants, its determinism, its config
section, and a run under mpiexec -n 3."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fdcr_mpi import attacks
from fdcr_mpi.attacks import base
from fdcr_mpi.attacks.badnets import BadNets
from fdcr_mpi.attacks.chameleon import Chameleon, chameleon_loss, learning_rate
from fdcr_mpi.client import ClientData, TrainSettings, train_client
from fdcr_mpi.config import config_hash, load_config
from fdcr_mpi.data.datasets import SPECS
from fdcr_mpi.errors import UserError
from fdcr_mpi.models import FlatModel, build_model
from fdcr_mpi.models.nets import head_of
from tests.device_check import META, DeviceMixing
from tests.test_mpi import final_sha, in_process_sha, launch, requires_mpi

TARGET = 2
SETTINGS = TrainSettings(local_epochs=1, lr=0.01, batch_size=16)


def chameleon(*overrides: str) -> Chameleon:
    attack = attacks.create(load_config(None, ["attack.kind=chameleon", f"attack.target_label={TARGET}", *overrides]))
    assert isinstance(attack, Chameleon)
    return attack


# ----------------------------------------------------------------------------- the contrastive loss


def plain_loss(z: np.ndarray, labels: np.ndarray, poisoned: np.ndarray, true: np.ndarray, tau: float,
               tau_base: float, w_fac: float, w_int: float) -> float:
    """The loss of the authors' SupConLoss (utils/losses.py) written as sums over pairs, float64."""
    b = len(z)
    total = 0.0

    def s(i: int, j: int) -> float:
        interferer = poisoned[i] != poisoned[j] and true[i] == true[j] != TARGET
        return (w_int if interferer else 1.0) * float(z[i] @ z[j]) / tau

    for i in range(b):
        log_denominator = math.log(sum(math.exp(s(i, a)) for a in range(b) if a != i))
        positives = [p for p in range(b) if p != i and labels[p] == labels[i]]
        if not positives:
            continue  # an anchor alone in its class adds 0 (but counts in the mean)
        weight = w_fac if labels[i] == TARGET else 1.0
        total += -(tau / tau_base) * weight * sum(s(i, p) - log_denominator for p in positives) / len(positives)
    return total / b


def tiny_batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """10 normalised features: poisoned rows of classes 0 and 1 (relabelled 2), their clean
    interferers, target-class images, and a class-7 image with no positive."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(10, 6))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    true = np.array([0, 1, 0, 0, 1, 2, 2, 5, 7, 2])
    poisoned = np.array([True, True, False, False, False, False, False, False, False, True])
    labels = np.where(poisoned, TARGET, true)
    return z, labels, poisoned, true


@pytest.mark.parametrize(("tau", "tau_base", "w_fac", "w_int"),
                         [(0.07, 0.07, 6.0, 1.0), (0.2, 0.07, 3.0, 0.5), (0.5, 0.5, 1.0, 2.0)])
def test_the_contrastive_loss_is_the_plain_sum_over_pairs(tau: float, tau_base: float, w_fac: float,
                                                          w_int: float) -> None:
    z, labels, poisoned, true = tiny_batch()
    got = chameleon_loss(torch.from_numpy(z), torch.from_numpy(labels), torch.from_numpy(poisoned),
                         torch.from_numpy(true), TARGET, tau, tau_base, w_fac, w_int)
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(plain_loss(z, labels, poisoned, true, tau, tau_base, w_fac, w_int), rel=1e-10)


def test_the_loss_pulls_poisoned_features_to_the_target_class_and_weighs_it() -> None:
    z, labels, poisoned, true = tiny_batch(1)
    args = (torch.from_numpy(labels), torch.from_numpy(poisoned), torch.from_numpy(true), TARGET)
    moved = z.copy()
    moved[0] = z[5]  # a poisoned image's features onto a target image's: lower loss
    assert float(chameleon_loss(torch.from_numpy(moved), *args)) < float(chameleon_loss(torch.from_numpy(z), *args))
    heavier = float(chameleon_loss(torch.from_numpy(z), *args, facilitator_weight=6.0))
    assert heavier != pytest.approx(float(chameleon_loss(torch.from_numpy(z), *args, facilitator_weight=1.0)))


def test_a_batch_of_one_gives_a_zero_loss_and_a_finite_gradient() -> None:
    z = torch.nn.functional.normalize(torch.randn(1, 4), dim=1).requires_grad_()
    loss = chameleon_loss(z, torch.tensor([2]), torch.tensor([True]), torch.tensor([0]), TARGET)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.isfinite(z.grad).all()


def test_the_learning_rate_is_multisteplr_stepped_at_the_start_of_each_epoch() -> None:
    for lr, milestones, gamma in [(0.005, (3, 5, 7, 9), 0.1), (0.001, (3, 5), 0.005)]:
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(milestones), gamma=gamma)
        for epoch in range(1, 11):
            opt.step()
            scheduler.step()  # the authors' training.py: scheduler.step() before each epoch's batches
            assert learning_rate(lr, milestones, gamma, epoch) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)


# ----------------------------------------------------------------------------- the two stages


def attacker_data(n: int = 48, seed: int = 0, channels: int = 1) -> ClientData:
    """An attacker's data as BadNets builds it: half the rows poisoned, relabelled to the target."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, 32, 32, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    poisoned = torch.zeros(n, dtype=torch.bool)
    poisoned[::2] = True
    relabelled = y.clone()
    relabelled[poisoned] = TARGET
    mask = torch.zeros(3, 32, 32, dtype=torch.bool)
    mask[:, :4, :4] = True
    return ClientData(x=x, y=relabelled, poisoned=poisoned, trigger=mask, true_y=y)


def trained(*overrides: str, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(w_t, the attacker's trained weights, the head's first entry) on fmnist-like data."""
    model = build_model("simple_cnn", 0)
    w_t = model.flat.clone()
    chameleon(*overrides).train(model, attacker_data(), SPECS["fmnist"], SETTINGS, torch.Generator().manual_seed(seed),
                                w_t)
    return w_t, model.flat.clone(), model.span(head_of(model.module))[0]


def test_stage_one_trains_the_extractor_only_and_stage_two_the_head_only() -> None:
    w_t, first, start = trained("chameleon.contrastive_epochs=2", "chameleon.head_epochs=0")
    _, both, _ = trained("chameleon.contrastive_epochs=2", "chameleon.head_epochs=2")
    assert start == 92626 - (256 * 10 + 10)  # SimpleCNN's classifier: the last 2,570 entries
    assert torch.equal(first[start:], w_t[start:])  # stage 1: the head keeps w_t's bits
    assert not torch.equal(first[:start], w_t[:start])
    assert torch.equal(both[:start], first[:start])  # stage 2: the extractor keeps stage 1's bits
    assert not torch.equal(both[start:], first[start:])


def test_the_stages_draw_from_the_clients_generator_only() -> None:
    state = torch.random.get_rng_state()
    _, once, _ = trained("chameleon.contrastive_epochs=1", "chameleon.head_epochs=1")
    _, again, _ = trained("chameleon.contrastive_epochs=1", "chameleon.head_epochs=1")
    _, other, _ = trained("chameleon.contrastive_epochs=1", "chameleon.head_epochs=1", seed=4)
    assert torch.equal(once, again) and not torch.equal(once, other)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is never drawn from


def test_pgd_every_projects_after_every_step_of_both_stages(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = base.project_onto_ball

    def counted(weights, center, radius):
        real(weights, center, radius)
        calls.append(float(torch.linalg.vector_norm((weights - center).double())))

    monkeypatch.setattr(base, "project_onto_ball", counted)
    w_t, w, _ = trained("chameleon.contrastive_epochs=2", "chameleon.head_epochs=1", "attack.pgd_radius=0.02",
                        "attack.pgd_every=1")
    assert len(calls) == 3 * (48 // 16) + 1  # every step of both stages, then once at the end
    assert max(calls) <= 0.02 * (1 + 1e-6)


def test_chameleon_trains_on_the_device() -> None:
    model = build_model("simple_cnn", 0, device=META)
    attack = chameleon("chameleon.contrastive_epochs=1", "chameleon.head_epochs=1", "attack.pgd_radius=1.0",
                       "attack.pgd_every=2")
    with DeviceMixing():
        loss = attack.train(model, attacker_data().to(META), SPECS["fmnist"], SETTINGS, torch.Generator().manual_seed(0),
                            model.flat.clone())
    assert loss.device == META and model.flat.device == META


# ----------------------------------------------------------------------------- the backdoor it plants


class TinyMlp(nn.Module):
    """A model whose extractor sees the trigger's pixels directly (the SimpleCNN of a short unit test
    barely responds to a corner it never needed): features = relu(body(x)), head = the last Linear."""

    head_name = "head"

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3 * 32 * 32, 32)
        self.head = nn.Linear(32, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def clustered(n: int, poisoned_share: float, gen: torch.Generator, templates: torch.Tensor) -> ClientData:
    """Images of 10 noisy class templates; ``poisoned_share`` of them carry a 4x4 trigger (value 3) and the target."""
    y = torch.arange(n) % 10
    x = templates[y] + torch.randn(n, 1, 32, 32, generator=gen)
    poisoned = torch.randperm(n, generator=gen) < int(n * poisoned_share)
    mask = torch.zeros(3, 32, 32, dtype=torch.bool)
    mask[:, :4, :4] = True
    relabelled = torch.where(poisoned, TARGET, y)
    return ClientData(x=x, y=relabelled, poisoned=poisoned, trigger=mask, trigger_value=3.0, true_y=y, augment=False)


def test_chameleon_plants_a_trigger_backdoor_a_benign_client_does_not() -> None:
    gen = torch.Generator().manual_seed(0)
    templates = torch.randn(10, 1, 32, 32, generator=gen)
    attacker, benign, test = (clustered(160, share, gen, templates) for share in (0.3, 0.0, 1.0))
    settings = TrainSettings(local_epochs=2, lr=0.01, batch_size=32)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        start = FlatModel(TinyMlp())
    train_client(start, benign, None, settings, torch.Generator().manual_seed(1))  # a global model that classifies
    w_t = start.flat.clone()

    def to_target(model: FlatModel) -> tuple[float, float]:
        """(triggered, clean) share of the non-target test images classified as the target."""
        rows = torch.nonzero(test.true_y != TARGET).flatten()
        with torch.no_grad():
            triggered = model.module(test.inputs(rows, None, None)).argmax(1)
            clean = model.module(test.x[rows].expand(-1, 3, -1, -1)).argmax(1)
        return float((triggered == TARGET).float().mean()), float((clean == TARGET).float().mean())

    attacked = FlatModel(TinyMlp())
    attacked.load(w_t)
    chameleon().train(attacked, attacker, None, settings, torch.Generator().manual_seed(2), w_t)  # the paper's defaults
    honest = FlatModel(TinyMlp())
    honest.load(w_t)
    train_client(honest, benign, None, settings, torch.Generator().manual_seed(2))
    (attacked_triggered, attacked_clean), (honest_triggered, _) = to_target(attacked), to_target(honest)
    assert attacked_triggered > 0.6 and honest_triggered < 0.1  # 0.91 and 0.0 when written
    assert attacked_clean < 0.2  # the trigger, not the class, sends an image to the target (0.07)


# ----------------------------------------------------------------------------- data and config


def test_chameleon_poisons_its_data_as_badnets() -> None:
    data = ClientData(x=torch.randn(40, 1, 32, 32), y=torch.arange(40) % 10, poisoned=torch.zeros(40, dtype=torch.bool))
    malicious = np.array([False] * 7 + [True] * 3)
    ours = chameleon().poison(data, SPECS["fmnist"], 9, malicious)
    theirs = BadNets(load_config(None, [f"attack.target_label={TARGET}"])).poison(data, SPECS["fmnist"], 9, malicious)
    assert torch.equal(ours.y, theirs.y) and torch.equal(ours.poisoned, theirs.poisoned)
    assert torch.equal(ours.trigger, theirs.trigger) and ours.trigger_value == theirs.trigger_value


def test_chameleon_config_section_and_model_split() -> None:
    options = chameleon().options
    assert (options.temperature, options.facilitator_weight, options.interferer_weight) == (0.07, 6.0, 1.0)
    assert (options.contrastive_epochs, options.contrastive_lr, options.contrastive_milestones) == (10, 0.005, (3, 5, 7, 9))
    assert (options.head_epochs, options.head_lr, options.head_milestones, options.head_gamma) == (3, 0.001, (3, 5), 0.005)
    assert chameleon().trains_differently
    used = load_config(None, ["attack.kind=chameleon"])
    assert config_hash(load_config(None, ["attack.kind=chameleon", "chameleon.head_epochs=1"])) != config_hash(used)
    with pytest.warns(UserWarning, match="chameleon.head_epochs set, but the attack is badnets"):
        assert config_hash(load_config(None, ["chameleon.head_epochs=1"])) == config_hash(load_config(None))
    with pytest.raises(UserError, match="chameleon.temperature"):
        load_config(None, ["attack.kind=chameleon", "chameleon.temperature=0"])
    for name in ("simple_cnn", "cnn_1m", "resnet18"):  # every model's head is its last block of parameters
        model = build_model(name, 0)
        assert model.span(head_of(model.module))[1] == model.num_params
    headless = FlatModel(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)))
    with pytest.raises(UserError, match="features and a head"):
        chameleon().train(headless, attacker_data(), None, SETTINGS, torch.Generator(), headless.flat.clone())


# ----------------------------------------------------------------------------- end to end

SMALL = ["data.dataset=digits", "rounds=2", "train.local_epochs=1", "fisher.max_samples=32", "defense.name=fedavg",
         "train.batch_clients=2"]


@requires_mpi
@pytest.mark.slow
def test_chameleon_runs_two_rounds_under_mpiexec_as_in_one_process(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    args = ["run", *SMALL, "attack.kind=chameleon", "chameleon.contrastive_epochs=2", "chameleon.head_epochs=1", "--quiet"]
    spread = final_sha(launch([*args, "--out", str(tmp_path / "mpi")], 3, timeout=300))
    alone = in_process_sha([*args, "--out", str(tmp_path / "one")], capsys)
    assert spread == alone, "one process and mpiexec -n 3 differ"
    plain = in_process_sha(["run", *SMALL, "--quiet", "--out", str(tmp_path / "badnets")], capsys)
    assert alone != plain, "chameleon trained as badnets"
