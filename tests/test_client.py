"""Local training and the Fisher diagonal, checked against plain reference loops."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fdcr_mpi.client import (
    ClientData,
    TrainSettings,
    batch_mean_sq_fisher,
    batches,
    empirical_fisher,
    fisher_samples,
    local_train,
)
from fdcr_mpi.data.datasets import SPECS, model_input
from fdcr_mpi.data.poison import trigger_mask
from fdcr_mpi.models import FlatModel, FlatSGD, build_model

SPEC = SPECS["synthetic"]


def make_client(n: int = 40, poisoned: bool = False, seed: int = 0) -> ClientData:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 32, 32, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    mask = torch.zeros(n, dtype=torch.bool)
    if poisoned:
        mask[::2] = True
        y[mask] = 2
    return ClientData(x=x, y=y, poisoned=mask, trigger=trigger_mask("paper") if poisoned else None)


def test_simple_cnn_has_the_papers_parameter_count() -> None:
    assert build_model("simple_cnn", 0).size == 92_626


def test_flat_model_views_share_one_buffer() -> None:
    model = build_model("simple_cnn", 0)
    model.flat.zero_()
    assert all(bool((p == 0).all()) for p in model.module.parameters())
    w = torch.randn(model.size)
    model.load(w)
    flat = torch.cat([p.detach().reshape(-1) for p in model.module.parameters()])
    assert torch.equal(flat, w)


def test_flat_sgd_equals_torch_sgd() -> None:
    model = build_model("simple_cnn", 1)
    reference = copy.deepcopy(model.module)
    ours = FlatSGD(model, lr=0.05, momentum=0.9, weight_decay=1e-3)
    theirs = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        x, y = torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen)
        model.zero_grad()
        F.cross_entropy(model.module(x), y).backward()
        ours.step()
        theirs.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        theirs.step()
    flat = torch.cat([p.detach().reshape(-1) for p in reference.parameters()])
    assert torch.equal(flat, model.flat)


def per_sample_fisher_loop(model: FlatModel, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Reference: one backward per sample, squared, averaged."""
    module = copy.deepcopy(model.module).eval()
    total = [torch.zeros_like(p) for p in module.parameters()]
    for i in range(len(y)):
        module.zero_grad()
        F.cross_entropy(module(x[i:i + 1]), y[i:i + 1]).backward()
        for acc, p in zip(total, module.parameters()):
            acc += p.grad.square()
    return torch.cat([t.reshape(-1) for t in total]) / len(y)


@pytest.mark.parametrize("backend", ["layers", "vmap"])
@pytest.mark.parametrize("poisoned", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, None])
def test_empirical_fisher_matches_a_per_sample_loop(poisoned: bool, chunk: int | None, backend: str) -> None:
    model = build_model("simple_cnn", 3)
    data = make_client(23, poisoned)
    idx = torch.arange(len(data))
    ours = empirical_fisher(model, data, SPEC, idx, chunk, backend)
    reference = per_sample_fisher_loop(model, data.inputs(idx, SPEC, None), data.y)
    assert ours.shape == (model.size,)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-9)


def test_layer_fisher_correlates_a_repeated_channel_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Grayscale inputs (one channel repeated as a view) and the same images as three real
    channels give the same Fisher; only the latter computes three channels' gradients."""
    from fdcr_mpi.client import fisher_layers

    model = build_model("simple_cnn", 3)
    gray = make_client(23)
    rgb = ClientData(x=gray.x.expand(-1, 3, -1, -1).contiguous(), y=gray.y, poisoned=gray.poisoned)
    idx = torch.arange(len(gray))
    channels: list[int] = []
    per_sample = fisher_layers._per_sample_weight_grads

    def spy(layer: torch.nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        channels.append(a.shape[1])
        return per_sample(layer, a, g)

    monkeypatch.setattr(fisher_layers, "_per_sample_weight_grads", spy)
    ours = empirical_fisher(model, gray, SPEC, idx, None, "layers")
    assert channels[0] == 1
    channels.clear()
    theirs = empirical_fisher(model, rgb, SPEC, idx, None, "layers")
    assert channels[0] == 3
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-12)
    conv1 = ours[: 6 * 3 * 25].reshape(6, 3, 25)
    assert torch.equal(conv1[:, 0], conv1[:, 1]) and torch.equal(conv1[:, 0], conv1[:, 2])
    # the one-channel forward of the first convolution is undone afterwards
    assert not any("forward" in vars(m) for m in model.module.modules())


def test_empirical_fisher_sees_the_trigger_of_poisoned_rows() -> None:
    model = build_model("simple_cnn", 3)
    clean, dirty = make_client(20, False), make_client(20, True)
    idx = torch.arange(20)
    assert not torch.equal(dirty.inputs(idx, SPEC, None), clean.inputs(idx, SPEC, None))
    stamped = dirty.inputs(idx, SPEC, None)
    assert bool((stamped[::2][:, :, 0, 0] == 1.0).all())
    assert not torch.allclose(empirical_fisher(model, dirty, SPEC, idx), empirical_fisher(model, clean, SPEC, idx))


def test_batch_mean_sq_fisher_matches_a_reference() -> None:
    model = build_model("simple_cnn", 4)
    data = make_client(30)
    idx = torch.arange(30)
    ours = batch_mean_sq_fisher(model, data, SPEC, idx, batch_size=8)
    module = copy.deepcopy(model.module).eval()
    grads = []
    for rows in [idx[i:i + 8] for i in range(0, 30, 8)]:
        module.zero_grad()
        F.cross_entropy(module(model_input(data.x[rows])), data.y[rows]).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in module.parameters()]))
    reference = torch.stack(grads).mean(0).square()
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-12)


def test_fisher_max_samples_takes_a_seeded_subset() -> None:
    data = make_client(50)
    a = fisher_samples(data, 10, torch.Generator().manual_seed(1))
    b = fisher_samples(data, 10, torch.Generator().manual_seed(1))
    assert a.numel() == 10 and torch.equal(a, b)
    assert fisher_samples(data, None, torch.Generator()).numel() == 50


def test_batches_drop_last() -> None:
    order = torch.arange(10)
    assert [len(b) for b in batches(10, 4, True, order)] == [4, 4]
    assert [len(b) for b in batches(10, 4, False, order)] == [4, 4, 2]


def test_local_training_is_deterministic_and_learns() -> None:
    data = make_client(64)
    settings = TrainSettings(local_epochs=15, lr=0.05, batch_size=16)
    runs = []
    for _ in range(2):
        model = build_model("simple_cnn", 0)
        start = model.flat.clone()
        loss = local_train(model, data, SPEC, settings, torch.Generator().manual_seed(5))
        runs.append((model.flat.clone(), loss))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]
    assert not torch.equal(runs[0][0], start)
    model = build_model("simple_cnn", 0)
    first = local_train(model, data, SPEC, TrainSettings(local_epochs=1, lr=0.05, batch_size=16),
                        torch.Generator().manual_seed(5))
    assert runs[0][1] < first  # the mean loss over 15 epochs is below the first epoch's


def test_layer_fisher_matches_the_loop_with_batchnorm_and_strides() -> None:
    """ResNet-style layers: strided, padded and dilated convolutions, BatchNorm in eval mode,
    no-bias convs."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 5, 3, padding=1), torch.nn.Conv2d(5, 5, 3, padding=2, dilation=2, stride=2),
        torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(20, 10))
    module[1].running_mean.uniform_(-0.5, 0.5)
    module[1].running_var.uniform_(0.5, 2.0)
    model = FlatModel(module)
    data = make_client(13, poisoned=True)
    idx = torch.arange(13)
    ours = empirical_fisher(model, data, SPEC, idx, 5, "layers")
    reference = per_sample_fisher_loop(model, data.inputs(idx, SPEC, None), data.y)
    torch.testing.assert_close(ours[: model.num_params], reference, rtol=1e-4, atol=1e-10)
    assert bool((ours[model.num_params:] == 0).all())  # buffers carry no Fisher


def test_resnet18_flat_vector_holds_batchnorm_statistics_as_non_trainable_entries() -> None:
    model = build_model("resnet18", 0)
    buffers = sum(b.numel() for b in model.module.buffers() if b.is_floating_point())
    assert model.num_params == sum(p.numel() for p in model.module.parameters())
    assert model.size == model.num_params + buffers and int((~model.trainable).sum()) == buffers
    bn = model.module.bn1
    model.flat[model.num_params:] = 7.0
    assert bool((bn.running_var == 7.0).all())  # the buffers are views of the flat vector
