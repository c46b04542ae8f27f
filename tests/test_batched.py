"""Batched-client training (fdcr_mpi.client.batched) against sequential ``local_train`` per client."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

from fdcr_mpi.client import ClientData, TrainSettings, local_train
from fdcr_mpi.client.batched import batched_twin, supports, train_group
from fdcr_mpi.data.datasets import SPECS
from fdcr_mpi.data.poison import trigger_mask
from fdcr_mpi.models import ResNet18, SimpleCNN, build_model

SPEC = SPECS["cifar10"]  # augments with random crops and horizontal flips
TOL = {"rtol": 1e-4, "atol": 1e-5}


def settings(drop_last: bool) -> TrainSettings:
    return TrainSettings(local_epochs=2, lr=0.05, momentum=0.9, weight_decay=1e-3, batch_size=8,
                         drop_last=drop_last)


def make_client(n: int, seed: int, attacker: bool = False) -> ClientData:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    poisoned = torch.zeros(n, dtype=torch.bool)
    if not attacker:
        return ClientData(x=x, y=y, poisoned=poisoned)
    true_y = y.clone()
    poisoned[::3] = True
    y[poisoned] = 2
    return ClientData(x=x, y=y, poisoned=poisoned, trigger=trigger_mask("paper"), true_y=true_y)


# An attacker with 4 steps per epoch (35 samples, batch 8: 4 full batches and one of 3), a
# benign client with 2 (20: 2 full and one of 4), and one with none under drop_last (5).
CLIENTS = [make_client(35, 1, attacker=True), make_client(20, 2), make_client(5, 3)]
SEEDS = [11, 12, 13]


def generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def sequential(datas: list[ClientData], seeds: list[int], drop_last: bool,
               start: torch.Tensor) -> tuple[torch.Tensor, list[float], list[torch.Generator]]:
    """The reference: ``local_train`` on each client in turn, each from ``start``."""
    model = build_model("simple_cnn", 0)
    rows, losses, gens = [], [], generators(seeds)
    for data, gen in zip(datas, gens):
        model.load(start)
        losses.append(local_train(model, data, SPEC, settings(drop_last), gen))
        rows.append(model.flat.clone())
    return torch.stack(rows), losses, gens


def batched(datas: list[ClientData], seeds: list[int], drop_last: bool,
            start: torch.Tensor) -> tuple[torch.Tensor, list[float], list[torch.Generator]]:
    gens = generators(seeds)
    out, losses = train_group(build_model("simple_cnn", 5), start, datas, SPEC, settings(drop_last), gens)
    return out, losses.tolist(), gens


START = build_model("simple_cnn", 0).flat.clone()


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module", params=[True, False], ids=["drop_last", "keep_last"])
def both(request: pytest.FixtureRequest) -> dict:
    drop_last = request.param
    return {"drop_last": drop_last, "seq": sequential(CLIENTS, SEEDS, drop_last, START),
            "bat": batched(CLIENTS, SEEDS, drop_last, START)}


def test_weights_equal_sequential_local_train(both: dict) -> None:
    (seq, _, _), (out, _, _) = both["seq"], both["bat"]
    assert out.shape == (3, START.numel()) and out.dtype == torch.float32
    torch.testing.assert_close(out, seq, **TOL)
    for k in (0, 1):  # the clients that trained moved well beyond the tolerance
        assert float((out[k] - START).abs().max()) > 1e-2
    if both["drop_last"]:  # no step: exactly the start
        assert torch.equal(out[2], START)
    else:
        assert float((out[2] - START).abs().max()) > 1e-3


def test_losses_equal_sequential_local_train(both: dict) -> None:
    (_, seq, _), (_, ours, _) = both["seq"], both["bat"]
    assert len(ours) == 3
    for a, b in zip(ours, seq):
        if math.isnan(b):
            assert math.isnan(a)
        else:
            assert a == pytest.approx(b, rel=1e-5)
    assert math.isnan(ours[2]) == both["drop_last"]


def test_each_generator_is_left_as_local_train_leaves_it(both: dict) -> None:
    (_, _, seq), (_, _, ours) = both["seq"], both["bat"]
    for a, b in zip(ours, seq):
        assert torch.equal(a.get_state(), b.get_state())


def test_same_inputs_give_bitwise_equal_results() -> None:
    first, second = batched(CLIENTS, SEEDS, False, START), batched(CLIENTS, SEEDS, False, START)
    assert torch.equal(first[0], second[0])
    assert first[1][:2] == second[1][:2]


@pytest.mark.parametrize("drop_last", [True, False])
def test_a_clients_result_does_not_depend_on_its_group(drop_last: bool) -> None:
    big, small, idle = CLIENTS
    alone = batched([small], [12], drop_last, START)
    grouped = batched([big, small, idle], [11, 12, 13], drop_last, START)
    reordered = batched([small, big], [12, 11], drop_last, START)
    # the small client is done after 4 (drop_last) or 6 steps while the big one takes 8 or 10
    torch.testing.assert_close(grouped[0][1], alone[0][0], **TOL)
    torch.testing.assert_close(reordered[0][0], alone[0][0], **TOL)
    assert grouped[1][1] == pytest.approx(alone[1][0], rel=1e-5)
    # and the big one is not perturbed by the others
    torch.testing.assert_close(reordered[0][1], grouped[0][0], **TOL)


@pytest.mark.parametrize("chunk", [1, 2])
def test_models_evaluated_in_chunks_give_the_same_result(chunk: int) -> None:
    whole = batched(CLIENTS, SEEDS, False, START)
    gens = generators(SEEDS)
    out, losses = train_group(build_model("simple_cnn", 0), START, CLIENTS, SPEC, settings(False), gens,
                              chunk=chunk)
    torch.testing.assert_close(out, whole[0], **TOL)
    assert losses.tolist() == pytest.approx(whole[1], rel=1e-5)
    for a, b in zip(gens, whole[2]):
        assert torch.equal(a.get_state(), b.get_state())


def test_a_zero_step_client_keeps_the_start_and_draws_its_permutations() -> None:
    out, losses, gens = batched([CLIENTS[2]], [13], True, START)
    assert torch.equal(out[0], START) and math.isnan(losses[0])
    reference = torch.Generator().manual_seed(13)
    for _ in range(settings(True).local_epochs):
        torch.randperm(len(CLIENTS[2]), generator=reference)
    assert torch.equal(gens[0].get_state(), reference.get_state())


def test_an_empty_group() -> None:
    out, losses = train_group(build_model("simple_cnn", 0), START, [], SPEC, settings(True), [])
    assert out.shape == (0, START.numel()) and losses.tolist() == []


def test_supports_models_without_float_buffers_only() -> None:
    assert supports(SimpleCNN())
    assert not supports(ResNet18())
    model = build_model("resnet18", 0)
    with pytest.raises(ValueError, match="batched"):
        train_group(model, model.flat, CLIENTS[:1], SPEC, settings(True), generators([1]))


def test_the_twin_computes_the_same_function_and_gradients() -> None:
    module = SimpleCNN()
    twin = batched_twin(module)
    assert [n for n, _ in twin.named_parameters()] == [n for n, _ in module.named_parameters()]
    x, y = torch.randn(5, 3, 32, 32), torch.randint(0, 10, (5,))
    params = {n: p.detach().clone().requires_grad_() for n, p in module.named_parameters()}
    ours = F.cross_entropy(functional_call(twin, params, (x,)), y)
    theirs = F.cross_entropy(module(x), y)
    torch.testing.assert_close(ours, theirs)
    ours.backward()
    theirs.backward()
    for name, p in module.named_parameters():
        torch.testing.assert_close(params[name].grad, p.grad)


def test_the_twin_under_vmap_equals_a_loop_over_models_and_inputs() -> None:
    module = SimpleCNN()
    twin = batched_twin(module)
    gen = torch.Generator().manual_seed(0)
    stacked = {n: p.detach() + 0.01 * torch.randn(3, *p.shape, generator=gen) for n, p in module.named_parameters()}
    shared = {n: p.detach() for n, p in module.named_parameters()}
    xs = torch.randn(3, 4, 3, 32, 32, generator=gen)
    loop = torch.stack([functional_call(module, {n: v[i] for n, v in stacked.items()}, (xs[i],)) for i in range(3)])
    torch.testing.assert_close(vmap(lambda p, x: functional_call(twin, p, (x,)))(stacked, xs), loop, **TOL)
    one_input = vmap(lambda p: functional_call(twin, p, (xs[0],)))(stacked)
    torch.testing.assert_close(one_input, torch.stack([
        functional_call(module, {n: v[i] for n, v in stacked.items()}, (xs[0],)) for i in range(3)]), **TOL)
    shared_weights = vmap(lambda x: functional_call(twin, shared, (x,)))(xs)
    torch.testing.assert_close(shared_weights, torch.stack([module(x) for x in xs]), **TOL)


def gray(data: ClientData) -> ClientData:
    """The client's images as one-channel (grayscale) batches, the layout of MNIST and FMNIST."""
    return ClientData(x=data.x[:, :1].contiguous(), y=data.y, poisoned=data.poisoned, trigger=data.trigger,
                      true_y=data.true_y)


@pytest.mark.parametrize("drop_last", [True, False])
def test_grayscale_clients_equal_sequential_local_train(drop_last: bool) -> None:
    """Grayscale inputs take the one-channel first convolution (summed filters), padded batches
    and a triggered attacker included; the result is still each client's local_train."""
    clients, spec = [gray(c) for c in CLIENTS], SPECS["fmnist"]
    model = build_model("simple_cnn", 0)
    seq, seq_losses = [], []
    for data, gen in zip(clients, generators(SEEDS)):
        model.load(START)
        seq_losses.append(local_train(model, data, spec, settings(drop_last), gen))
        seq.append(model.flat.clone())
    out, losses = train_group(build_model("simple_cnn", 0), START, clients, spec, settings(drop_last),
                              generators(SEEDS))
    torch.testing.assert_close(out, torch.stack(seq), **TOL)
    assert float((out[0] - START).abs().max()) > 1e-2
    assert losses.tolist()[:2] == pytest.approx(seq_losses[:2], rel=1e-5)


def test_the_twin_on_a_repeated_channel_convolves_one_channel(monkeypatch: pytest.MonkeyPatch) -> None:
    module = SimpleCNN()
    twin = batched_twin(module)
    gen = torch.Generator().manual_seed(1)
    stacked = {n: (p.detach() + 0.01 * torch.randn(3, *p.shape, generator=gen)).requires_grad_()
               for n, p in module.named_parameters()}
    one = torch.randn(3, 4, 1, 32, 32, generator=gen)
    repeated = one.expand(3, 4, 3, 32, 32)  # a view: channel stride 0
    copied = repeated.contiguous()  # the same numbers, three real channels
    forward = vmap(lambda p, x: functional_call(twin, p, (x,)))
    seen: list[tuple[int, int]] = []
    conv2d = F.conv2d

    def spy(x: torch.Tensor, weight: torch.Tensor, *args):
        seen.append((x.shape[1], weight.shape[1]))
        return conv2d(x, weight, *args)

    monkeypatch.setattr(F, "conv2d", spy)
    fast = forward(stacked, repeated)
    (g_fast,) = torch.autograd.grad(fast.sum(), [stacked["conv1.weight"]])
    assert seen[0] == (3, 1)  # first convolution: the 3 models' one channel, filters summed
    seen.clear()
    slow = forward(stacked, copied)
    (g_slow,) = torch.autograd.grad(slow.sum(), [stacked["conv1.weight"]])
    assert seen[0] == (9, 3)
    torch.testing.assert_close(fast, slow, **TOL)
    torch.testing.assert_close(g_fast, g_slow, **TOL)
    assert torch.equal(g_fast[:, :, 0], g_fast[:, :, 1]) and torch.equal(g_fast[:, :, 0], g_fast[:, :, 2])
