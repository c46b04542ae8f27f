"""The data layer: loaders, preprocessing, augmentation, partitions, triggers and poisoning."""

from __future__ import annotations

import bz2
import shutil
import sys
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fdcr_mpi import compat
from fdcr_mpi.compat import import_torchvision
from fdcr_mpi.data import (
    SPECS,
    apply_trigger,
    augment,
    backdoor_test_set,
    choose_malicious,
    dba_masks,
    dirichlet_partition,
    load_raw,
    model_input,
    poison_mask,
    preprocess,
    proxy_indices,
    train_val_split,
    trigger_mask,
)
from fdcr_mpi.errors import UserError

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def one_sentence(exc: pytest.ExceptionInfo[UserError]) -> str:
    """The error text, checked to be a single line."""
    text = str(exc.value)
    assert "\n" not in text and text
    return text


# --- compat ---------------------------------------------------------------------------------


def test_import_torchvision_gives_datasets() -> None:
    tv = import_torchvision()
    assert tv is import_torchvision()
    assert hasattr(tv.datasets, "MNIST") and hasattr(tv.datasets, "CIFAR10")


def test_import_torchvision_retries_only_on_missing_nms(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    sentinel = object()

    def flaky(name: str) -> object:
        calls.append(name)
        if len(calls) == 1:
            raise RuntimeError("operator torchvision::nms does not exist")
        return sentinel

    fake_modules = {"torchvision": 1, "torchvision.ops": 2, "numpy": 3}
    monkeypatch.setattr(sys, "modules", fake_modules)
    monkeypatch.setattr(compat.importlib, "import_module", flaky)
    assert compat.import_torchvision() is sentinel
    assert calls == ["torchvision", "torchvision"]
    assert fake_modules == {"numpy": 3}


def test_import_torchvision_propagates_other_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(name: str) -> object:
        raise RuntimeError("something else")

    monkeypatch.setattr(compat.importlib, "import_module", broken)
    with pytest.raises(RuntimeError, match="something else"):
        compat.import_torchvision()


# --- loading --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mnist", "fmnist"])
def test_real_dataset_shapes(shared_data: Path, name: str) -> None:
    train, test, spec = load_raw(name, shared_data)
    assert train.x.shape == (60000, 28, 28) and test.x.shape == (10000, 28, 28)
    assert train.x.dtype == np.uint8 and train.y.dtype == np.int64
    assert train.y.shape == (60000,) and test.y.shape == (10000,)
    assert set(np.unique(train.y)) == set(range(10))
    assert spec is SPECS[name] and spec.channels == 1


def test_missing_root_is_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(UserError) as exc:
        load_raw("fmnist", tmp_path / "nowhere")
    text = one_sentence(exc)
    assert "Fashion-MNIST was not found under" in text
    assert str(tmp_path / "nowhere" / "FashionMNIST" / "raw") in text
    assert "--data-root" in text and "FDCR_DATA" in text


def test_root_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FDCR_DATA", str(tmp_path / "envroot"))
    with pytest.raises(UserError, match="envroot"):
        load_raw("mnist", None)
    with pytest.raises(UserError, match="cifar-10-batches-py"):
        load_raw("cifar10", None)


def test_unknown_dataset() -> None:
    with pytest.raises(UserError, match="unknown dataset 'svhn'"):
        load_raw("svhn", None)


def _copy_raw(shared_data: Path, root: Path, name: str = "FashionMNIST") -> Path:
    raw = root / name / "raw"
    raw.mkdir(parents=True)
    for f in MNIST_FILES:
        shutil.copyfile(shared_data / name / "raw" / f, raw / f)
    return raw


def test_truncated_file_names_it(shared_data: Path, tmp_path: Path) -> None:
    raw = _copy_raw(shared_data, tmp_path)
    bad = raw / "train-images-idx3-ubyte"
    with bad.open("r+b") as f:
        f.truncate(1_000_016)
    with pytest.raises(UserError) as exc:
        load_raw("fmnist", tmp_path)
    text = one_sentence(exc)
    assert str(bad) in text and "truncated or corrupted" in text


def test_corrupted_labels(shared_data: Path, tmp_path: Path) -> None:
    raw = _copy_raw(shared_data, tmp_path, "MNIST")
    labels = raw / "t10k-labels-idx1-ubyte"
    data = bytearray(labels.read_bytes())
    data[100] = 200  # a label byte out of 0..9
    labels.write_bytes(bytes(data))
    with pytest.raises(UserError) as exc:
        load_raw("mnist", tmp_path)
    assert "MNIST" in one_sentence(exc) and "labels outside" in str(exc.value)


def test_corrupted_cifar_is_user_error(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (folder / name).write_bytes(b"not a pickle")
    with pytest.raises(UserError) as exc:
        load_raw("cifar10", tmp_path)
    text = one_sentence(exc)
    assert "CIFAR-10" in text and "corrupted" in text and str(folder) in text


def test_failed_download_is_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import_torchvision()
    import torchvision.datasets.mnist as tv_mnist

    def offline(*args: object, **kwargs: object) -> None:
        raise URLError("no network")

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", offline)
    monkeypatch.setattr(tv_mnist.MNIST, "mirrors", ["http://invalid.example/"])
    with pytest.raises(UserError) as exc:
        load_raw("mnist", tmp_path, download=True)
    text = one_sentence(exc)
    assert "downloading MNIST" in text and str(tmp_path) in text


def test_usps_from_bz2(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name, n in (("usps.bz2", 7), ("usps.t.bz2", 3)):
        lines = []
        for i in range(n):
            values = rng.uniform(-1, 1, 256)
            pixels = " ".join(f"{j + 1}:{v:.4f}" for j, v in enumerate(values))
            lines.append(f"{i % 10 + 1} {pixels}\n")
        with bz2.open(tmp_path / name, "wt") as f:
            f.writelines(lines)
    train, test, spec = load_raw("usps", tmp_path)
    assert train.x.shape == (7, 16, 16) and test.x.shape == (3, 16, 16)
    np.testing.assert_array_equal(train.y, np.arange(7) % 10)
    assert preprocess(train.x, spec).shape == (7, 1, 32, 32)


def test_digits_fixed_split() -> None:
    train, test, spec = load_raw("digits", None, seed=1)
    again, _, _ = load_raw("digits", None, seed=99)
    assert train.x.shape == (1437, 8, 8) and test.x.shape == (360, 8, 8)
    assert train.x.dtype == np.uint8 and train.x.max() == 255
    np.testing.assert_array_equal(train.x, again.x)
    assert set(np.unique(test.y)) == set(range(10))


def test_synthetic_deterministic_and_learnable() -> None:
    train, test, spec = load_raw("synthetic", None, seed=3)
    same, _, _ = load_raw("synthetic", None, seed=3)
    other, _, _ = load_raw("synthetic", None, seed=4)
    assert train.x.shape == (2000, 28, 28) and test.x.shape == (500, 28, 28)
    np.testing.assert_array_equal(train.x, same.x)
    assert not np.array_equal(train.x, other.x)
    x, xt = preprocess(train.x, spec).flatten(1), preprocess(test.x, spec).flatten(1)
    y, yt = torch.from_numpy(train.y), torch.from_numpy(test.y)
    torch.manual_seed(0)
    model = torch.nn.Linear(x.shape[1], 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(20):
        batch = slice(64 * step, 64 * step + 64)
        opt.zero_grad()
        F.cross_entropy(model(x[batch]), y[batch]).backward()
        opt.step()
    accuracy = (model(xt).argmax(1) == yt).float().mean().item()
    assert accuracy > 0.5


# --- preprocessing and augmentation ---------------------------------------------------------


def test_preprocess_gray_values_and_resize() -> None:
    spec = SPECS["mnist"]
    x = np.zeros((3, 28, 28), dtype=np.uint8)
    x[1] = 255
    x[2, :, 14:] = 255
    out = preprocess(x, spec)
    assert out.shape == (3, 1, 32, 32) and out.dtype == torch.float32
    black, white = -0.1307 / 0.3081, (1 - 0.1307) / 0.3081
    torch.testing.assert_close(out[0], torch.full((1, 32, 32), black))
    torch.testing.assert_close(out[1], torch.full((1, 32, 32), white))
    assert out[2, 0, :, 0].eq(out[2, 0, 0, 0]).all() and out[2, 0, 0, 0] == pytest.approx(black)
    assert out[2, 0, 0, -1] == pytest.approx(white)
    ref = F.interpolate(torch.from_numpy(x[2:]).float()[:, None] / 255, size=32, mode="bilinear")
    torch.testing.assert_close(out[2:], (ref - 0.1307) / 0.3081)


def test_preprocess_cifar_channels() -> None:
    spec = SPECS["cifar10"]
    x = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    x[..., 0], x[..., 1], x[..., 2] = 255, 0, 51
    out = preprocess(x, spec)
    assert out.shape == (2, 3, 32, 32)
    expected = [(1 - 0.4914) / 0.2470, -0.4822 / 0.2435, (0.2 - 0.4465) / 0.2615]
    for c, value in enumerate(expected):
        assert out[:, c].sub(value).abs().max() < 1e-5


def _reference_augment(x: torch.Tensor, spec_name: str, seed: int) -> torch.Tensor:
    """Per-sample crop/flip from the same draws, padding zeros BEFORE normalisation."""
    spec = SPECS[spec_name]
    gen = torch.Generator().manual_seed(seed)
    b = x.shape[0]
    top = torch.randint(0, 9, (b,), generator=gen)
    left = torch.randint(0, 9, (b,), generator=gen)
    flip = torch.rand(b, generator=gen) < 0.5 if spec.hflip else torch.zeros(b, dtype=torch.bool)
    mean = torch.tensor(spec.mean).view(-1, 1, 1)
    std = torch.tensor(spec.std).view(-1, 1, 1)
    out = []
    for i in range(b):
        raw = F.pad(x[i] * std + mean, (4, 4, 4, 4), value=0.0)
        crop = raw[:, top[i] : top[i] + 32, left[i] : left[i] + 32]
        if flip[i]:
            crop = crop.flip(-1)
        out.append((crop - mean) / std)
    return torch.stack(out)


@pytest.mark.parametrize(("name", "channels"), [("cifar10", 3), ("mnist", 1)])
def test_augment_matches_reference(name: str, channels: int) -> None:
    x = torch.randn(16, channels, 32, 32, generator=torch.Generator().manual_seed(0))
    out = augment(x, SPECS[name], torch.Generator().manual_seed(7))
    assert out.shape == x.shape
    torch.testing.assert_close(out, _reference_augment(x, name, 7), atol=1e-5, rtol=0)


def test_augment_deterministic_and_seeded() -> None:
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    spec = SPECS["cifar10"]
    a = augment(x, spec, torch.Generator().manual_seed(5))
    b = augment(x, spec, torch.Generator().manual_seed(5))
    c = augment(x, spec, torch.Generator().manual_seed(6))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.equal(a, c)


def test_augment_padding_and_flip_policy() -> None:
    spec = SPECS["mnist"]
    x = torch.full((64, 1, 32, 32), 5.0)
    out = augment(x, spec, torch.Generator().manual_seed(0))
    pad = -0.1307 / 0.3081
    is_pad = (out - pad).abs() < 1e-6
    assert (is_pad | (out == 5.0)).all() and is_pad.any()
    # no flip for mnist: a left-right asymmetric image keeps its orientation
    ramp = torch.arange(32.0).expand(64, 1, 32, 32)
    shifted = augment(ramp, spec, torch.Generator().manual_seed(0))
    inside = shifted[:, :, 16, 8:24]
    assert (inside.diff(dim=-1) == 1).all()
    flipped = augment(
        ramp.expand(64, 3, 32, 32), SPECS["cifar10"], torch.Generator().manual_seed(0)
    )
    inside = flipped[:, 0, 16, 8:24].diff(dim=-1)
    assert (inside == -1).all(dim=-1).any() and (inside == 1).all(dim=-1).any()


def test_model_input() -> None:
    x = torch.randn(4, 1, 32, 32)
    out = model_input(x)
    assert out.shape == (4, 3, 32, 32)
    assert all(torch.equal(out[:, c], x[:, 0]) for c in range(3))
    y = torch.randn(4, 3, 32, 32)
    assert model_input(y) is y


# --- partitions -----------------------------------------------------------------------------


def _labels(n: int = 5000, classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, n)


def _reference_partition(labels: np.ndarray, k: int, beta: float, seed: int) -> list[np.ndarray]:
    """The released code's loop, written from docs/SPEC.md section 3 with a numpy Generator."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    while True:
        batches: list[list[int]] = [[] for _ in range(k)]
        for cls in range(10):
            idx = np.where(labels == cls)[0]
            rng.shuffle(idx)
            p = rng.dirichlet(np.repeat(beta, k))
            p = np.array([q * (len(b) < n / k) for q, b in zip(p, batches)])
            p = p / p.sum()
            cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
            batches = [b + part.tolist() for b, part in zip(batches, np.split(idx, cuts))]
        if min(len(b) for b in batches) >= 10:
            return [np.sort(np.array(b)) for b in batches]


def test_dirichlet_partition_properties() -> None:
    labels = _labels()
    parts = dirichlet_partition(labels, 10, 0.5, np.random.default_rng(1))
    assert len(parts) == 10
    assert all(p.dtype == np.int64 and (np.diff(p) > 0).all() for p in parts)
    joined = np.concatenate(parts)
    assert len(joined) == len(labels) and set(joined) == set(range(len(labels)))
    assert min(len(p) for p in parts) >= 10
    again = dirichlet_partition(labels, 10, 0.5, np.random.default_rng(1))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = dirichlet_partition(labels, 10, 0.5, np.random.default_rng(2))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


@pytest.mark.parametrize(("beta", "seed"), [(0.5, 0), (0.1, 3), (1.0, 4)])
def test_dirichlet_partition_matches_reference(beta: float, seed: int) -> None:
    labels = _labels(2000)
    ours = dirichlet_partition(labels, 20, beta, np.random.default_rng(seed))
    ref = _reference_partition(labels, 20, beta, seed)
    assert all(np.array_equal(a, b) for a, b in zip(ours, ref))


def _mean_label_entropy(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    entropies = []
    for p in parts:
        freq = np.bincount(labels[p], minlength=10) / len(p)
        freq = freq[freq > 0]
        entropies.append(-(freq * np.log(freq)).sum())
    return float(np.mean(entropies))


def test_smaller_beta_more_skew_and_iid_equal() -> None:
    labels = _labels()
    skewed = dirichlet_partition(labels, 10, 0.1, np.random.default_rng(0))
    mild = dirichlet_partition(labels, 10, 10.0, np.random.default_rng(0))
    iid = dirichlet_partition(labels, 10, "iid", np.random.default_rng(0))
    assert _mean_label_entropy(labels, skewed) < _mean_label_entropy(labels, mild) - 0.5
    assert _mean_label_entropy(labels, iid) > np.log(10) - 0.05
    sizes = [len(p) for p in iid]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == len(labels)
    assert len(np.unique(np.concatenate(iid))) == len(labels)


def test_partition_errors() -> None:
    with pytest.raises(UserError) as exc:
        dirichlet_partition(_labels(50), 10, 0.5, np.random.default_rng(0))
    assert "more clients than samples" in one_sentence(exc)
    with pytest.raises(UserError, match="tries"):
        dirichlet_partition(_labels(100), 10, 0.01, np.random.default_rng(0), max_tries=5)
    for bad in (0, -1.0, "abc"):
        with pytest.raises(UserError, match="beta"):
            dirichlet_partition(_labels(100), 2, bad, np.random.default_rng(0))


def test_train_val_and_proxy() -> None:
    train, val = train_val_split(1000, np.random.default_rng(0))
    assert len(train) == 900 and len(val) == 100
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(range(1000))
    train2, val2 = train_val_split(1000, np.random.default_rng(0))
    assert np.array_equal(val, val2) and np.array_equal(train, train2)
    proxy = proxy_indices(np.arange(5000), np.random.default_rng(0))
    assert len(proxy) == 256 and len(np.unique(proxy)) == 256 and proxy.max() < 5000
    sub = proxy_indices(val, np.random.default_rng(0), size=50)
    assert set(sub) <= set(val)
    with pytest.raises(UserError) as exc:
        proxy_indices(val, np.random.default_rng(0))
    assert "100" in one_sentence(exc)


def test_choose_malicious() -> None:
    last = choose_malicious(10, 0.3, "last", np.random.default_rng(0))
    assert last.dtype == bool and list(np.flatnonzero(last)) == [7, 8, 9]
    rand = choose_malicious(10, 0.3, "random", np.random.default_rng(0))
    assert rand.sum() == 3
    assert np.array_equal(rand, choose_malicious(10, 0.3, "random", np.random.default_rng(0)))
    assert choose_malicious(100, 0.29, "last", np.random.default_rng(0)).sum() == 29
    assert not choose_malicious(10, 0.0, "last", np.random.default_rng(0)).any()
    with pytest.raises(UserError) as exc:
        choose_malicious(10, 0.05, "last", np.random.default_rng(0))
    assert "gives no attacker among 10 clients" in one_sentence(exc)
    with pytest.raises(UserError, match="malicious_ids"):
        choose_malicious(10, 0.2, "first", np.random.default_rng(0))


# --- triggers and poisoning -----------------------------------------------------------------


def _coords(mask: torch.Tensor) -> set[tuple[int, int]]:
    return {(int(r), int(c)) for r, c in torch.nonzero(mask[0])}


def test_trigger_patterns() -> None:
    paper = trigger_mask("paper")
    assert paper.shape == (3, 32, 32) and paper.dtype == torch.bool
    expected = {(r, c) for r in (0, 2) for c in (0, 1, 2, 4, 5, 6)}
    for ch in range(3):
        assert paper[ch].sum() == 12 and _coords(paper[ch : ch + 1]) == expected
    solid = trigger_mask("solid", channels=1)
    assert solid.shape == (1, 32, 32) and solid.sum() == 12
    assert _coords(solid) == {(r, c) for r in (0, 1) for c in range(6)}
    with pytest.raises(UserError, match="trigger.pattern"):
        trigger_mask("star")


@pytest.mark.parametrize(
    ("pattern", "parts"), [("paper", 4), ("paper", 3), ("solid", 2), ("paper", 1)]
)
def test_dba_masks_partition_trigger(pattern: str, parts: int) -> None:
    masks = dba_masks(pattern, parts)
    assert len(masks) == parts and all(m.any() for m in masks)
    total = torch.stack(masks).sum(0)
    assert total.max() == 1
    assert torch.equal(total.bool(), trigger_mask(pattern))


def test_dba_paper_four_parts_are_row_segments() -> None:
    masks = dba_masks("paper", 4)
    assert [_coords(m) for m in masks] == [
        {(0, 0), (0, 1), (0, 2)},
        {(0, 4), (0, 5), (0, 6)},
        {(2, 0), (2, 1), (2, 2)},
        {(2, 4), (2, 5), (2, 6)},
    ]
    with pytest.raises(UserError, match="attackers"):
        dba_masks("paper", 13)


def test_apply_trigger_out_of_place() -> None:
    x = torch.randn(5, 3, 32, 32)
    before = x.clone()
    mask = trigger_mask()
    out = apply_trigger(x, mask, 1.0)
    assert torch.equal(x, before)
    assert (out[:, mask] == 1.0).all()
    assert torch.equal(out[:, ~mask], x[:, ~mask])


def test_poison_mask() -> None:
    mask = poison_mask(101, 0.5, np.random.default_rng(0))
    assert mask.dtype == bool and mask.shape == (101,) and mask.sum() == round(0.5 * 101)
    assert np.array_equal(mask, poison_mask(101, 0.5, np.random.default_rng(0)))
    assert not np.array_equal(mask, poison_mask(101, 0.5, np.random.default_rng(1)))
    assert poison_mask(40, 0.3, np.random.default_rng(0)).sum() == 12
    assert not poison_mask(10, 0.0, np.random.default_rng(0)).any()


def test_backdoor_test_set() -> None:
    x = torch.randn(20, 3, 32, 32)
    y = torch.arange(20) % 5
    mask = trigger_mask()
    xs, ys = backdoor_test_set(x, y, mask, 1.0, target=2)
    assert xs.shape == (16, 3, 32, 32) and ys.dtype == torch.int64 and (ys == 2).all()
    torch.testing.assert_close(xs, apply_trigger(x[y != 2], mask, 1.0))
    xa, ya = backdoor_test_set(x, y, mask, 1.0, target=2, include_target=True)
    assert xa.shape[0] == 20 and (ya == 2).all()


# --- a rank reads only the rows it needs ------------------------------------------------------


def test_mnist_images_are_memory_mapped_and_equal_torchvisions(shared_data: Path) -> None:
    train, test, _ = load_raw("fmnist", shared_data)
    assert isinstance(train.x, np.memmap) and isinstance(test.x, np.memmap)  # nothing read until taken
    reference = import_torchvision().datasets.FashionMNIST(str(shared_data), train=True, download=False)
    rows = np.array([0, 7, 59_999, 31_337])
    np.testing.assert_array_equal(train.x[rows], reference.data.numpy()[rows])
    np.testing.assert_array_equal(train.y, reference.targets.numpy())


def _fake_cifar(root: Path, per_batch: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10's layout with random batches of ``per_batch`` images; returns all train (x HWC, y)."""
    import pickle

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    xs, ys = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        with (folder / name).open("wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
        if name != "test_batch":
            xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys += labels
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))
    return np.concatenate(xs), np.asarray(ys)


def test_cifar_rows_are_read_from_their_own_batches(tmp_path: Path) -> None:
    x, y = _fake_cifar(tmp_path)
    train, test, spec = load_raw("cifar10", tmp_path)
    assert train.x.shape == (35, 32, 32, 3) and len(test.y) == 7 and spec.channels == 3
    np.testing.assert_array_equal(train.y, y)
    rows = np.array([0, 6, 7, 20, 34])  # across the first, second, third and last batch
    np.testing.assert_array_equal(train.x[rows], x[rows])
    np.testing.assert_array_equal(train.x[3:9], x[3:9])
    assert preprocess(train.x[rows], spec).shape == (5, 3, 32, 32)


def test_a_rank_holds_its_clients_rows_and_its_evaluation_share(shared_data: Path) -> None:
    from fdcr_mpi.config import load_config
    from fdcr_mpi.data.experiment import build_experiment

    config = load_config(None, ["data.dataset=fmnist", f"data.root={shared_data}", "eval.batch_size=1000"])
    exp = build_experiment(config, [3, 4], eval_share=(2, 4))
    train, test, spec = load_raw("fmnist", shared_data)
    for k in (3, 4):  # the same tensors as preprocessing every image of the client directly
        torch.testing.assert_close(exp.clients[k].x, preprocess(np.asarray(train.x)[exp.partition[k]], spec),
                                   rtol=0, atol=0)
    sets = exp.eval_sets
    assert len(exp.eval_work) == 5 and sets.size == 10_000  # 20 batches, a quarter of them
    assert sets.test_x.shape[0] + sets.backdoor_incl_x.shape[0] == 5_000
    assert sets.proxy_x is None
