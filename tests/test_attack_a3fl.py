"""The ``a3fl`` attack (Zhang et al., NeurIPS 2023): the trigger search against an independent
re-computation (plain nn.Module, torch.optim.SGD, slicing instead of masks), its properties (inside
its region and the valid input range, seeded, raising the target's probability), the per-round
trigger installed on every rank's attackers and test rows, the recorded ASR measured with the
round's trigger, resume, and mpiexec -n 3 against one process."""

from __future__ import annotations

import copy
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fdcr_mpi import seeding
from fdcr_mpi.attacks.a3fl import A3fl, initial_pattern, region_mask, search_trigger
from fdcr_mpi.attacks.round_trigger import RoundTrigger
from fdcr_mpi.client import ClientData
from fdcr_mpi.config import load_config
from fdcr_mpi.data.datasets import SPECS
from fdcr_mpi.data.experiment import build_experiment
from fdcr_mpi.data.poison import input_range
from fdcr_mpi.errors import UserError
from fdcr_mpi.models import SimpleCNN, build_model
from fdcr_mpi.runtime.driver import initial_weights
from tests.test_mpi import final_sha, in_process_sha, launch, requires_mpi

SPEC = SPECS["mnist"]
TARGET = 2


def options(**kw) -> A3fl.Options:
    return A3fl.Options(**kw)


def digits_like(n: int, seed: int = 0, augment: bool = False) -> ClientData:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=gen)
    return ClientData(x=torch.randn(n, 1, 32, 32, generator=gen), y=y, poisoned=torch.zeros(n, dtype=torch.bool),
                      true_y=y, augment=augment)


def plain_net(weights: torch.Tensor) -> SimpleCNN:
    """A plain SimpleCNN holding ``weights`` (no FlatModel): the reference's model."""
    net = SimpleCNN(10)
    torch.nn.utils.vector_to_parameters(weights[: sum(p.numel() for p in net.parameters())].clone(), net.parameters())
    return net.eval()


def patched(x: torch.Tensor, patch: torch.Tensor, lo: int = 2, size: int = 5) -> torch.Tensor:
    """x with rows and columns lo..lo+size-1 replaced by ``patch`` (C, size, size), as 3 channels."""
    out = x.clone()
    out[:, :, lo:lo + size, lo:lo + size] = patch
    return out.repeat(1, 3, 1, 1)


def reference_search(weights: torch.Tensor, data: ClientData, opts: A3fl.Options) -> torch.Tensor:
    """The algorithm of attacks/a3fl.py's docstring for one full batch per epoch (no augmentation),
    written independently: the 5x5 patch as a leaf tensor, torch.optim.SGD for the unlearning."""
    net = plain_net(weights)
    lo, hi = (b.view(-1, 1, 1) for b in input_range(SPEC))
    patch = torch.full((1, 5, 5), 0.5)
    target = torch.full((len(data),), TARGET)
    adversary, lam = None, 0.0
    for epoch in range(opts.trigger_epochs):
        if epoch > 0 and epoch % opts.adv_every == 0:
            adversary = copy.deepcopy(net).train()
            sgd = torch.optim.SGD(adversary.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
            for _ in range(opts.adv_epochs):
                sgd.zero_grad()
                F.cross_entropy(adversary(patched(data.x, patch)), data.y).backward()
                sgd.step()
            adversary.eval()
            a = torch.nn.utils.parameters_to_vector(adversary.parameters()).detach().double().numpy()
            b = torch.nn.utils.parameters_to_vector(net.parameters()).detach().double().numpy()
            lam = opts.adv_lambda * float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        leaf = patch.clone().requires_grad_(True)
        loss = F.cross_entropy(net(patched(data.x, leaf)), target)
        if adversary is not None:
            loss = loss + lam * F.cross_entropy(adversary(patched(data.x, leaf)), target)
        (grad,) = torch.autograd.grad(loss, leaf)
        patch = torch.minimum(torch.maximum(patch - opts.trigger_lr * grad.sign(), lo), hi).detach()
    return patch


def ours(weights: torch.Tensor, data: ClientData, opts: A3fl.Options, round_: int = 0,
         batch_size: int | None = None) -> torch.Tensor:
    gen = seeding.torch_generator(0, seeding.TRIGGER, 1, round_)
    return search_trigger(build_model("simple_cnn", 9), build_model("simple_cnn", 8), weights, data, SPEC,
                          region_mask(1, opts.size, opts.offset), opts, TARGET, batch_size or len(data), gen)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def trained() -> tuple[torch.Tensor, ClientData]:
    """A global model trained a little on digits (one client's data), and another client's clean data."""
    from fdcr_mpi.client import TrainSettings, local_train

    config = load_config(None, ["data.dataset=digits", "data.num_clients=2", "attack.kind=none", "data.beta=iid"])
    exp = build_experiment(config, [0, 1])
    model = build_model("simple_cnn", 0)
    local_train(model, exp.clients[0], exp.spec, TrainSettings(local_epochs=8, lr=0.05, batch_size=32),
                torch.Generator().manual_seed(0))
    other = exp.clients[1]
    return model.flat.clone(), ClientData(x=other.x[:64], y=other.y[:64], poisoned=torch.zeros(64, dtype=torch.bool),
                                          true_y=other.y[:64], augment=False)


# ----------------------------------------------------------------------------- the trigger search


def test_the_search_matches_an_independent_computation_with_the_adversarial_model(trained) -> None:
    weights, data = trained
    opts = options(trigger_epochs=4, adv_every=1, adv_epochs=2, adv_lambda=5.0, trigger_lr=0.05)
    delta = ours(weights, data, opts)
    expected = reference_search(weights, data, opts)
    torch.testing.assert_close(delta[:, 2:7, 2:7], expected, rtol=0, atol=1e-5)
    outside = torch.ones(32, 32, dtype=torch.bool)
    outside[2:7, 2:7] = False
    assert not delta[:, outside].any()  # the pattern lives in its region only
    plain = ours(weights, data, options(trigger_epochs=4, adv_lambda=0.0, trigger_lr=0.05))
    torch.testing.assert_close(plain[:, 2:7, 2:7], reference_search(weights, data, options(
        trigger_epochs=4, adv_lambda=0.0, trigger_lr=0.05)), rtol=0, atol=1e-5)
    assert not torch.equal(plain, delta)  # the adversarial term changed the search


def test_the_search_raises_the_target_probability_stays_valid_and_is_seeded(trained) -> None:
    weights, data = trained
    data = ClientData(x=data.x, y=data.y, poisoned=data.poisoned, true_y=data.y, augment=True)  # crops drawn
    opts = options(trigger_epochs=8, adv_epochs=1, adv_every=4, trigger_lr=0.2, size=8, offset=3)
    mask = region_mask(1, 8, 3)
    start, delta = initial_pattern(SPEC, mask), ours(weights, data, opts, batch_size=32)
    net = plain_net(weights)

    @torch.no_grad()
    def target_probability(pattern: torch.Tensor) -> float:
        x = torch.where(mask, pattern, data.x).repeat(1, 3, 1, 1)
        return float(torch.softmax(net(x), dim=1)[:, TARGET].mean())

    assert target_probability(delta) > 1.2 * target_probability(start)
    lo, hi = input_range(SPEC)
    assert float(delta[mask].min()) >= float(lo.min()) - 1e-7 and float(delta[mask].max()) <= float(hi.max()) + 1e-7
    assert not delta[~mask].any()
    assert torch.equal(delta, ours(weights, data, opts, batch_size=32))  # the same draws, the same trigger
    assert not torch.equal(delta, ours(weights, data, opts, round_=1, batch_size=32))  # another round's draws


def test_the_region_and_its_options() -> None:
    attack = A3fl(load_config(None, ["attack.kind=a3fl"]))
    o = attack.options
    assert (o.size, o.offset, o.trigger_lr, o.trigger_epochs, o.adv_epochs, o.adv_every, o.adv_lambda) == \
        (5, 2, 0.01, 200, 5, 1, 0.01)  # the authors' config.yaml
    trigger = attack.test_trigger(SPECS["cifar10"])
    assert trigger.mask.shape == (3, 32, 32) and int(trigger.mask.sum()) == 75
    assert torch.equal(trigger.pattern[trigger.mask], torch.full((75,), 0.5))
    with pytest.raises(UserError, match="a3fl"):
        load_config(None, ["attack.kind=a3fl", "a3fl.offset=30", "a3fl.size=5"])
    rows = np.arange(100, 200)
    capped = A3fl(load_config(None, ["attack.kind=a3fl", "a3fl.samples=10"])).trigger_rows(rows)
    assert len(capped) == 10 and set(capped) <= set(rows) and list(capped) == sorted(capped)


# ----------------------------------------------------------------------------- the round's trigger on every rank

SMALL = ["data.dataset=synthetic", "data.num_clients=5", "attack.malicious_ratio=0.4", "eval.test_samples=200",
         "attack.kind=a3fl", "a3fl.trigger_epochs=2", "a3fl.adv_epochs=1", "a3fl.samples=40"]


def test_the_server_holds_the_lowest_attackers_clean_data_and_every_rank_installs_the_pattern() -> None:
    config = load_config(None, SMALL)
    server = build_experiment(config, [], eval_share=None, server=True)
    rank = build_experiment(config, [0, 3, 4], eval_share=(0, 1))  # clients 3 and 4 attack
    assert list(np.flatnonzero(server.malicious)) == [3, 4] and server.trigger_data is not None
    assert len(server.trigger_data) == 40 and not server.trigger_data.poisoned.any() and rank.trigger_data is None
    clean = build_experiment(load_config(None, [*SMALL[:4], "attack.kind=none"]), [3], server=False).clients[3]
    rows = A3fl(config).trigger_rows(np.arange(len(clean)))
    assert torch.equal(server.trigger_data.x, clean.x[rows]) and torch.equal(server.trigger_data.y, clean.y[rows])

    sender, receiver = RoundTrigger.make(A3fl(config), server, True), RoundTrigger.make(A3fl(config), rank, False)
    sender.compute(initial_weights(config), 0)
    receiver.buffer[:] = sender.buffer  # what the broadcast does
    receiver.install()
    pattern = torch.from_numpy(sender.buffer).view(1, 32, 32)
    assert not torch.equal(pattern, initial_pattern(SPEC, region_mask(1, 5, 2)))
    sets = rank.eval_sets
    torch.testing.assert_close(sets.backdoor_incl_x, patched(sets.backdoor_clean_x, pattern[:, 2:7, 2:7])[:, :1])
    attacker, benign = rank.clients[4], rank.clients[0]
    idx = torch.arange(len(attacker))
    x = attacker.inputs(idx, rank.spec, None)[:, :1]
    rows = attacker.poisoned
    torch.testing.assert_close(x[rows], patched(attacker.x[rows], pattern[:, 2:7, 2:7])[:, :1])
    assert torch.equal(x[~rows], attacker.x[~rows]) and benign.trigger is None


def test_a_rounds_asr_is_measured_with_that_rounds_trigger(trained) -> None:
    """One round from a model that has learnt something (w_0: the ``trained`` one), through
    runtime.round.one_round in one process: its ASR is the count of w_1 on the test rows patched
    with the trigger searched from w_0, not with the initial one."""
    from fdcr_mpi.defenses import create
    from fdcr_mpi.runtime.clients import ClientRunner
    from fdcr_mpi.runtime.driver import run_context
    from fdcr_mpi.runtime.round import one_round
    from fdcr_mpi.runtime.transport import LocalTransport

    config = load_config(None, ["data.dataset=digits", "data.num_clients=4", "attack.malicious_ratio=0.25",
                                "data.beta=iid", "attack.kind=a3fl", "a3fl.trigger_epochs=10", "a3fl.trigger_lr=0.2",
                                "a3fl.size=10", "a3fl.adv_epochs=1", "a3fl.adv_every=5", "a3fl.samples=64",
                                "train.local_epochs=1", "train.lr=0.001", "defense.name=fedavg"])
    w0, _ = trained
    ids = [0, 1, 2, 3]
    exp = build_experiment(config, ids, eval_share=(0, 1), server=True)
    runner = ClientRunner(exp, ids, with_fisher=False, device=torch.device("cpu"))
    ctx = run_context(config, LocalTransport(), exp, runner, create("fedavg"))
    record = one_round(ctx, 0, w0)

    attack = A3fl(config)
    pattern = attack.round_trigger(build_model("simple_cnn", 0), w0, exp.trigger_data, exp.spec, 0)
    net = plain_net(record.weights)
    clean, keep = exp.eval_sets.backdoor_clean_x, exp.eval_sets.test_y != TARGET

    @torch.no_grad()
    def asr(patch: torch.Tensor) -> float:
        predicted = net(patched(clean, patch, lo=2, size=10)).argmax(dim=1)
        return 100.0 * float((predicted[keep] == TARGET).sum()) / int(keep.sum())

    assert record.scores["asr"] == pytest.approx(asr(pattern[:, 2:12, 2:12]), abs=1e-9)
    assert record.scores["asr"] != asr(torch.full((1, 10, 10), 0.5))  # not the initial trigger's
    assert record.scores["A"] > 50  # a model that has learnt: the ASR means something


def test_resume_recomputes_the_trigger(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = [*SMALL, "train.local_epochs=1", "--quiet"]
    whole = in_process_sha(["run", *args, "rounds=2", "--out", str(tmp_path / "whole")], capsys)
    in_process_sha(["run", *args, "rounds=1", "--out", str(tmp_path / "part")], capsys)
    resumed = in_process_sha(["resume", str(tmp_path / "part"), "--rounds", "2", "--quiet"], capsys)
    assert resumed == whole
    with h5py.File(tmp_path / "whole" / "run.h5") as f, h5py.File(tmp_path / "part" / "run.h5") as g:
        np.testing.assert_array_equal(f["rounds/asr"][:], g["rounds/asr"][:])


@requires_mpi
@pytest.mark.slow
def test_a3fl_under_mpiexec_is_the_run_in_one_process(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["run", *SMALL, "data.dataset=digits", "rounds=2", "train.local_epochs=1", "fisher.max_samples=32",
            "--quiet"]
    spread = final_sha(launch([*args, "--out", str(tmp_path / "mpi")], 3, timeout=300))
    alone = in_process_sha([*args, "--out", str(tmp_path / "one")], capsys)
    assert spread == alone
    with h5py.File(tmp_path / "mpi" / "run.h5") as f, h5py.File(tmp_path / "one" / "run.h5") as g:
        np.testing.assert_array_equal(f["rounds/asr"][:], g["rounds/asr"][:])


def test_the_rounds_trigger_reaches_the_device_without_mixing() -> None:
    from fdcr_mpi.client import TrainSettings, train_client
    from tests.device_check import META, DeviceMixing

    config = load_config(None, SMALL)
    server = build_experiment(config, [], eval_share=None, server=True)
    rank = build_experiment(config, [4], eval_share=(0, 1), device=META)
    sender, receiver = RoundTrigger.make(A3fl(config), server, True), RoundTrigger.make(A3fl(config), rank, False)
    sender.compute(initial_weights(config), 0)
    receiver.buffer[:] = sender.buffer
    receiver.install()
    data = rank.clients[4]
    assert data.trigger.pattern.device == META and rank.eval_sets.backdoor_incl_x.device == META
    model = build_model("simple_cnn", 0, device=META)
    with DeviceMixing():
        loss = train_client(model, data, rank.spec, TrainSettings(local_epochs=1, batch_size=8),
                            torch.Generator().manual_seed(0))
    assert loss.device == META
