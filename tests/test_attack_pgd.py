"""PGD during an attacker's local training (``attack.pgd_every``, issue 16): the projection after every
n-th SGD step against an independent loop, instrumented step by step, its difference from the
projection of the sent update alone, the config, and an attacker leaving its batched group."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fdcr_mpi import attacks, seeding
from fdcr_mpi.attacks import base
from fdcr_mpi.client import ClientData, TrainSettings, batched, train_client
from fdcr_mpi.config import config_hash, load_config
from fdcr_mpi.data.experiment import build_experiment
from fdcr_mpi.errors import UserError
from fdcr_mpi.models import build_model
from fdcr_mpi.models.nets import SimpleCNN
from fdcr_mpi.runtime.clients import ClientRunner
from tests.device_check import META, DeviceMixing
from tests.test_mpi import final_sha, in_process_sha, launch, requires_mpi

REAL_TRAIN_GROUP = batched.train_group

SETTINGS = TrainSettings(local_epochs=2, lr=0.05, momentum=0.9, weight_decay=1e-3, batch_size=8)
RADIUS = 0.05


def attack_with(*overrides: str) -> attacks.Attack:
    return attacks.create(load_config(None, ["attack.kind=badnets", *overrides]))


def unaugmented_client(n: int = 36, seed: int = 0) -> ClientData:
    """Three-channel data stored as augmented once (no draws but the permutations): 2 epochs of 4 steps."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    return ClientData(x=x, y=y, poisoned=torch.zeros(n, dtype=torch.bool), augment=False)


def distance(w: torch.Tensor, w_t: torch.Tensor) -> float:
    return float(np.linalg.norm(w.double().numpy() - w_t.double().numpy()))


# ----------------------------------------------------------------------------- the projection


def test_the_projection_gives_the_bits_of_send_and_leaves_a_point_inside_untouched() -> None:
    rng = np.random.default_rng(0)
    center = torch.from_numpy(rng.normal(size=1000).astype(np.float32))
    far = center + torch.from_numpy(rng.normal(size=1000).astype(np.float32))
    near = center + 1e-4 * torch.from_numpy(rng.normal(size=1000).astype(np.float32))
    sent = far.clone()
    attack_with("attack.pgd_radius=0.5").send(sent, center)
    projected = far.clone()
    base.project_onto_ball(projected, center, 0.5)
    assert torch.equal(projected, sent)
    delta = far.double().numpy() - center.double().numpy()
    expected = center.double().numpy() + delta * 0.5 / np.linalg.norm(delta)
    np.testing.assert_allclose(projected.double().numpy(), expected, rtol=0, atol=1e-6)
    assert distance(projected, center) == pytest.approx(0.5, rel=1e-6)
    inside = near.clone()
    base.project_onto_ball(inside, center, 0.5)
    assert torch.equal(inside, near)
    at_center = center.clone()  # ||w - c|| = 0: no division by zero leaks a nan
    base.project_onto_ball(at_center, center, 0.5)
    assert torch.equal(at_center, center)


# ----------------------------------------------------------------------------- during training


def independent_pgd(data: ClientData, w_t: torch.Tensor, radius: float, every: int) -> tuple[np.ndarray, int]:
    """The attacker's training written plainly: torch.optim.SGD on an nn.Module, the same batches (the
    generator's permutation per epoch, drop_last), the projection in numpy float64 after every
    ``every``-th step and at the end. Returns (final weights, number of steps)."""
    net = SimpleCNN()
    params = list(net.parameters())
    torch.nn.utils.vector_to_parameters(w_t.clone(), params)
    opt = torch.optim.SGD(params, lr=SETTINGS.lr, momentum=SETTINGS.momentum, weight_decay=SETTINGS.weight_decay)
    center = w_t.double().numpy()

    def project() -> None:
        w = torch.nn.utils.parameters_to_vector(params).detach().double().numpy()
        scale = min(1.0, radius / np.linalg.norm(w - center))
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(torch.from_numpy(center + (w - center) * scale).float(), params)

    gen = seeding.client_generator(7, 3, 1)
    step, n, b = 0, len(data), SETTINGS.batch_size
    for _ in range(SETTINGS.local_epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n - n % b, b):
            idx = order[start:start + b]
            opt.zero_grad()
            F.cross_entropy(net(data.x[idx]), data.y[idx]).backward()
            opt.step()
            step += 1
            if step % every == 0:
                project()
    project()
    return torch.nn.utils.parameters_to_vector(params).detach().double().numpy(), step


@pytest.mark.parametrize("every", [1, 3])
def test_pgd_every_n_steps_is_the_independent_projected_loop(every: int) -> None:
    data = unaugmented_client()
    model = build_model("simple_cnn", 0)
    w_t = model.flat.clone()
    attack = attack_with(f"attack.pgd_radius={RADIUS}", f"attack.pgd_every={every}")
    assert attack.trains_differently
    loss = attack.train(model, data, None, SETTINGS, seeding.client_generator(7, 3, 1), w_t)
    expected, steps = independent_pgd(data, w_t, RADIUS, every)
    assert steps == 8 and steps % 3 != 0  # with every=3 the end projection matters too
    assert torch.isfinite(loss)
    np.testing.assert_allclose(model.flat.double().numpy(), expected, rtol=0, atol=2e-6)
    assert distance(model.flat, w_t) <= RADIUS * (1 + 1e-6)


def test_every_step_stays_inside_the_ball(monkeypatch: pytest.MonkeyPatch) -> None:
    """Instrumented: ||w - w_t|| read after the hook of every SGD step of the attacker's training."""
    seen: list[tuple[int, float]] = []
    real = base.train_client

    def instrumented(model, data, spec, settings, generator, after_step=None):
        def hook(step: int) -> None:
            after_step(step)
            seen.append((step, distance(model.flat, w_t)))
        return real(model, data, spec, settings, generator, after_step=hook)

    monkeypatch.setattr(base, "train_client", instrumented)
    model = build_model("simple_cnn", 0)
    w_t = model.flat.clone()
    attack_with(f"attack.pgd_radius={RADIUS}", "attack.pgd_every=1").train(
        model, unaugmented_client(), None, SETTINGS, seeding.client_generator(7, 3, 1), w_t)
    assert [s for s, _ in seen] == list(range(1, 9))
    assert max(d for _, d in seen) <= RADIUS * (1 + 1e-6)
    assert min(d for _, d in seen[2:]) > 0.9 * RADIUS  # the steps do push out: the projection acts


def test_projecting_every_step_differs_from_projecting_the_sent_update_once() -> None:
    data, gen = unaugmented_client(), lambda: seeding.client_generator(7, 3, 1)
    once = build_model("simple_cnn", 0)
    w_t = once.flat.clone()
    train_client(once, data, None, SETTINGS, gen())
    free = distance(once.flat, w_t)
    attack_with(f"attack.pgd_radius={RADIUS}").send(once.flat, w_t)
    every = build_model("simple_cnn", 0)
    attack = attack_with(f"attack.pgd_radius={RADIUS}", "attack.pgd_every=1")
    attack.train(every, data, None, SETTINGS, gen(), w_t)
    attack.send(every.flat, w_t)
    assert free > 3 * RADIUS  # unprojected training leaves the ball far behind
    assert distance(once.flat, w_t) == pytest.approx(RADIUS, rel=1e-5)
    assert distance(every.flat, w_t) <= RADIUS * (1 + 1e-6)
    assert distance(every.flat, once.flat) > 0.1 * RADIUS


def test_without_pgd_every_an_attacker_trains_as_any_client() -> None:
    assert not attack_with(f"attack.pgd_radius={RADIUS}").trains_differently
    assert attack_with(f"attack.pgd_radius={RADIUS}").step_hook(build_model("simple_cnn", 0), torch.zeros(1)) is None


def test_pgd_training_stays_on_the_device() -> None:
    model = build_model("simple_cnn", 0, device=META)
    data = unaugmented_client().to(META)
    attack = attack_with(f"attack.pgd_radius={RADIUS}", "attack.pgd_every=2")
    with DeviceMixing():
        loss = attack.train(model, data, None, SETTINGS, torch.Generator().manual_seed(0), model.flat.clone())
    assert loss.device == META and model.flat.device == META


# ----------------------------------------------------------------------------- config


def test_pgd_every_needs_a_radius_and_stays_out_of_older_hashes() -> None:
    with pytest.raises(UserError, match="attack.pgd_every"):
        load_config(None, ["attack.pgd_every=2"])
    with pytest.raises(UserError, match="attack.pgd_every"):
        load_config(None, ["attack.pgd_radius=1.0", "attack.pgd_every=0"])
    radius = load_config(None, ["attack.pgd_radius=1.0"])
    assert config_hash(load_config(None, ["attack.pgd_radius=1.0", "attack.pgd_every=null"])) == config_hash(radius)
    assert config_hash(load_config(None, ["attack.pgd_radius=1.0", "attack.pgd_every=1"])) != config_hash(radius)


# ----------------------------------------------------------------------------- in a batched group

GROUPED = ["data.dataset=synthetic", "rounds=1", "train.local_epochs=2", "fisher.max_samples=16",
           "data.num_clients=4", "attack.malicious_ratio=0.25", "train.batch_clients=2",
           "attack.pgd_radius=0.01", "defense.name=fedavg"]


def round_rows(overrides: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[np.ndarray, np.ndarray, list, object]:
    """(w_0, the 4 clients' sent rows, the client lists handed to train_group, the experiment)."""
    groups: list[int] = []
    real = REAL_TRAIN_GROUP

    def spy(model, start, datas, *args, **kwargs):
        groups.append(len(datas))
        return real(model, start, datas, *args, **kwargs)

    monkeypatch.setattr(batched, "train_group", spy)
    exp = build_experiment(load_config(None, [*GROUPED, *overrides]), [0, 1, 2, 3], server=False)
    runner = ClientRunner(exp, [0, 1, 2, 3], with_fisher=False, device=torch.device("cpu"))
    w0 = runner.model.flat.clone()
    rows = runner.run_round(w0, 0).weights.copy()
    return w0.numpy(), rows, groups, exp


def test_an_attacker_with_pgd_every_leaves_its_batched_group(monkeypatch: pytest.MonkeyPatch) -> None:
    w0, plain, plain_groups, _ = round_rows([], monkeypatch)
    _, rows, groups, exp = round_rows(["attack.pgd_every=1"], monkeypatch)
    assert exp.malicious.tolist() == [False, False, False, True]
    assert plain_groups == [2, 2] and groups == [2, 1]  # client 3 trains alone, client 2 still batched
    np.testing.assert_array_equal(rows[:2], plain[:2])  # a group without the attacker: the same bits
    attack = attacks.create(exp.config)  # the attacker, trained by itself from w_0 with its generator
    model = build_model("simple_cnn", seeding.derive_seed(exp.config.seed, seeding.MODEL_INIT))
    w_t = torch.from_numpy(w0)
    model.load(w_t)
    attack.train(model, exp.clients[3], exp.spec, exp.train_settings, seeding.client_generator(exp.config.seed, 3, 0),
                 w_t)
    attack.send(model.flat, w_t)
    np.testing.assert_array_equal(rows[3], model.flat.numpy())
    assert np.linalg.norm(rows[3].astype(np.float64) - w0) <= 0.01 * (1 + 1e-6)
    benign = build_model("simple_cnn", 0)
    benign.load(w_t)
    train_client(benign, exp.clients[2], exp.spec, exp.train_settings, seeding.client_generator(exp.config.seed, 2, 0))
    np.testing.assert_allclose(rows[2], benign.flat.numpy(), rtol=0, atol=1e-5)  # batched alone: float tolerance


# ----------------------------------------------------------------------------- end to end

SMALL = ["data.dataset=digits", "rounds=2", "train.local_epochs=1", "fisher.max_samples=32", "defense.name=fedavg",
         "train.batch_clients=2", "attack.pgd_radius=0.002"]


@requires_mpi
@pytest.mark.slow
def test_pgd_every_step_runs_two_rounds_under_mpiexec_as_in_one_process(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    args = ["run", *SMALL, "attack.pgd_every=1", "--quiet"]
    spread = final_sha(launch([*args, "--out", str(tmp_path / "mpi")], 3, timeout=300))
    alone = in_process_sha([*args, "--out", str(tmp_path / "one")], capsys)
    assert spread == alone, "one process and mpiexec -n 3 differ"
    once = in_process_sha(["run", *SMALL, "--quiet", "--out", str(tmp_path / "once")], capsys)
    assert alone != once, "projecting every step changed nothing"
