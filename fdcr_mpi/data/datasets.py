"""Raw datasets as uint8 arrays, vectorised preprocessing, and batched training augmentation.

Images are kept in memory as uint8 (N, H, W) or (N, H, W, 3), turned once into normalised
float32 (N, C, 32, 32) by ``preprocess``, augmented per batch by ``augment`` (all draws from
a given ``torch.Generator``), and repeated to three channels by ``model_input``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fdcr_mpi.compat import import_torchvision
from fdcr_mpi.errors import UserError
from fdcr_mpi.seeding import numpy_rng

SIZE = 32  # every dataset is served as 32x32
PAD = 4  # random-crop padding
_GRAY_MEAN, _GRAY_STD = (0.1307,), (0.3081,)
_SYNTHETIC_KEY = 1001  # seeding key of the synthetic dataset, apart from seeding's purposes
_DIGITS_SPLIT_SEED = 0  # the digits train/test split never depends on the run seed
_CHUNK = 8192  # samples per preprocessing chunk


@dataclass(frozen=True)
class DatasetSpec:
    """How a dataset is stored (``channels`` held in memory) and normalised."""

    name: str
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool
    num_classes: int = 10


SPECS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec("cifar10", 3, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2615), True),
    "mnist": DatasetSpec("mnist", 1, _GRAY_MEAN, _GRAY_STD, False),
    "fmnist": DatasetSpec("fmnist", 1, _GRAY_MEAN, _GRAY_STD, False),
    "usps": DatasetSpec("usps", 1, _GRAY_MEAN, _GRAY_STD, False),
    "digits": DatasetSpec("digits", 1, _GRAY_MEAN, _GRAY_STD, False),
    "synthetic": DatasetSpec("synthetic", 1, _GRAY_MEAN, _GRAY_STD, False),
}


@dataclass
class RawSplit:
    """One split: images ``x`` uint8 (N, H, W) or (N, H, W, 3), labels ``y`` int64 (N,)."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class _Source:
    """Where torchvision keeps a dataset under the data root."""

    title: str  # the name users know
    cls_name: str  # the torchvision.datasets class
    folder: str  # folder under the root ("" for files directly in it)
    files: tuple[str, ...]  # files in that folder that must exist
    idx: bool = False  # files are in the (uncompressed) IDX format of MNIST


_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_SOURCES: dict[str, _Source] = {
    "mnist": _Source("MNIST", "MNIST", "MNIST/raw", _MNIST_FILES, idx=True),
    "fmnist": _Source("Fashion-MNIST", "FashionMNIST", "FashionMNIST/raw", _MNIST_FILES, idx=True),
    "cifar10": _Source(
        "CIFAR-10",
        "CIFAR10",
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta"),
    ),
    "usps": _Source("USPS", "USPS", "", ("usps.bz2", "usps.t.bz2")),
}
_HINT = "pass --data-root, set FDCR_DATA, or set data.download=true when online"


def resolve_root(root: str | Path | None) -> Path:
    """The data root: ``root``, else the FDCR_DATA environment variable, else ./data."""
    if root is None or str(root) == "":
        root = os.environ.get("FDCR_DATA") or "./data"
    return Path(root).expanduser()


def load_raw(
    name: str, root: str | Path | None, download: bool = False, seed: int = 0, mirror: str | None = None
) -> tuple[RawSplit, RawSplit, DatasetSpec]:
    """The (train, test, spec) of dataset ``name``; any problem with the files is a UserError.

    ``seed`` only matters for ``synthetic``; ``digits`` and ``synthetic`` need no files.
    """
    if name not in SPECS:
        raise UserError(f"unknown dataset '{name}'; choose one of: {', '.join(SPECS)}")
    spec = SPECS[name]
    if name == "digits":
        train, test = _load_digits()
    elif name == "synthetic":
        train, test = _make_synthetic(seed)
    else:
        try:
            train, test = _load_torchvision(name, resolve_root(root), download, mirror)
        except PermissionError as exc:
            raise UserError(f"cannot read the {_SOURCES[name].title} data: permission denied on "
                            f"{exc.filename or resolve_root(root)}") from None
    for split in (train, test):
        _validate(split, spec, _SOURCES[name].title if name in _SOURCES else name)
    return train, test, spec


# --- torchvision datasets -------------------------------------------------------------------


def _missing(src: _Source, root: Path) -> list[Path]:
    """The required files of ``src`` absent under ``root``."""
    folder = root / src.folder
    return [folder / f for f in src.files if not (folder / f).is_file()]


def _not_found(src: _Source, root: Path, missing: list[Path]) -> UserError:
    """The one-sentence error for files that are not there."""
    folder = root / src.folder
    where = f"expected {folder}" if src.folder and not folder.is_dir() else f"missing {missing[0]}"
    return UserError(f"{src.title} was not found under {root} ({where}); {_HINT}")


def fetch(name: str, root: str | Path | None, mirror: str | None = None) -> None:
    """Fetch dataset ``name`` into ``root`` through torchvision unless its files are there (one
    rank per file system calls this, before the others read; see ``runtime.driver``). ``mirror``:
    a URL (``https://``, ``file://``) of a folder holding the files torchvision downloads, for
    sites that keep their own copy (a cluster without internet access)."""
    if name not in _SOURCES:
        return
    src, root = _SOURCES[name], resolve_root(root)
    if not _missing(src, root):
        return
    cls = getattr(import_torchvision().datasets, src.cls_name)
    if mirror and _local_folder(mirror) is not None:
        _place_archives(cls, _local_folder(mirror), root)  # torchvision then verifies and extracts them
    elif mirror:
        cls = _mirrored(cls, mirror.rstrip("/") + "/")
    try:
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except Exception as exc:  # torchvision raises many kinds: URLError, RuntimeError, OSError, ...
        raise UserError(
            f"downloading {src.title} into {root} failed ({_first_line(exc)}); check the "
            f"network connection, or place the files under {root / src.folder}"
        ) from exc


def _local_folder(mirror: str) -> Path | None:
    """The folder of a ``file://`` URL or a plain path; None for a network URL."""
    if mirror.startswith("file://"):
        return Path(mirror.removeprefix("file://"))
    return None if "://" in mirror else Path(mirror).expanduser()


def _place_archives(cls: type, folder: Path, root: Path) -> None:
    """Copy the archives torchvision would download from a local mirror ``folder`` to where it
    looks for them (it checks their md5 sums and extracts them as if it had downloaded them)."""
    import shutil

    if hasattr(cls, "resources"):  # MNIST, Fashion-MNIST: root/<class>/raw/<file>.gz
        target, names = root / cls.__name__ / "raw", [name for name, _ in cls.resources]
    else:  # CIFAR-10: root/cifar-10-python.tar.gz
        target, names = root, [cls.filename]
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (folder / name).is_file() and not (target / name).exists():
            shutil.copyfile(folder / name, target / name)


def _mirrored(cls: type, mirror: str) -> type:
    """A subclass of a torchvision dataset class that downloads its files from ``mirror``."""
    if hasattr(cls, "mirrors"):  # MNIST, Fashion-MNIST: one URL per file under each mirror
        return type(cls.__name__, (cls,), {"mirrors": [mirror]})
    if hasattr(cls, "url") and hasattr(cls, "filename"):  # CIFAR-10: one archive
        return type(cls.__name__, (cls,), {"url": mirror + cls.filename})
    return cls


def _load_torchvision(name: str, root: Path, download: bool, mirror: str | None = None) -> tuple[RawSplit, RawSplit]:
    """Both splits of a torchvision dataset, with every failure turned into a UserError.

    The files are torchvision's (downloaded by it when asked); the images of MNIST and
    Fashion-MNIST are memory-mapped and CIFAR-10's read from their pickled batches only when a
    rank takes rows, so a rank holds the rows of its clients and of its evaluation share, not
    the whole data set.
    """
    src = _SOURCES[name]
    if download:
        fetch(name, root, mirror)
    missing = _missing(src, root)
    if missing:
        raise _not_found(src, root, missing)
    folder = root / src.folder
    try:
        if src.idx:
            for f in src.files:
                _check_idx(src, folder / f)
            return (RawSplit(_idx_array(folder / src.files[0]), _idx_array(folder / src.files[1]).astype(np.int64)),
                    RawSplit(_idx_array(folder / src.files[2]), _idx_array(folder / src.files[3]).astype(np.int64)))
        if src.cls_name == "CIFAR10":
            return (PickledImages.split([folder / f for f in src.files[:5]]),
                    PickledImages.split([folder / src.files[5]]))
        cls = getattr(import_torchvision().datasets, src.cls_name)
        splits = [cls(str(root), train=train, download=False) for train in (True, False)]
        return _to_raw(splits[0]), _to_raw(splits[1])
    except (UserError, PermissionError):
        raise
    except Exception as exc:  # torchvision and pickle raise many kinds: RuntimeError, OSError, ...
        raise _corrupted(src, root, exc) from exc


def _idx_array(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format, checked by ``_check_idx``) as a read-only uint8 memory map."""
    with path.open("rb") as f:
        head = f.read(4)
        shape = tuple(int.from_bytes(f.read(4), "big") for _ in range(head[3]))
    return np.memmap(path, dtype=np.uint8, mode="r", offset=4 + 4 * len(shape), shape=shape)


class PickledImages:
    """CIFAR-10's images in its pickled batches, unpickled only when rows are taken (a batch at a
    time), as (n, 32, 32, 3) uint8 like torchvision's ``CIFAR10.data``."""

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, files: list[Path], counts: list[int]) -> None:
        self.files, self.counts = files, counts
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.shape = (int(self.starts[-1]), 32, 32, 3)

    @classmethod
    def split(cls, files: list[Path]) -> RawSplit:
        """The images (lazy) and labels of the batches ``files``."""
        labels = [np.asarray(_unpickle(f)["labels"], dtype=np.int64) for f in files]
        return RawSplit(cls(files, [len(y) for y in labels]), np.concatenate(labels))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: np.ndarray | slice) -> np.ndarray:
        rows = np.arange(len(self))[rows] if isinstance(rows, slice) else np.asarray(rows, dtype=np.int64)
        out = np.empty((rows.size, 32, 32, 3), dtype=np.uint8)
        batch_of = np.searchsorted(self.starts, rows, side="right") - 1
        for b in np.unique(batch_of):
            take = batch_of == b
            data = np.asarray(_unpickle(self.files[b])["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            out[take] = data[rows[take] - self.starts[b]].transpose(0, 2, 3, 1)
        return out


def _unpickle(path: Path) -> dict:
    """One CIFAR batch (torchvision's ``CIFAR10`` reads them the same way)."""
    import pickle

    with path.open("rb") as f:
        return pickle.load(f, encoding="latin1")


def _check_idx(src: _Source, path: Path) -> None:
    """Raise a UserError naming ``path`` when its size does not match its IDX header."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(4)
        nd = head[3] if len(head) == 4 else 0
        dims = f.read(4 * nd)
    ok = len(head) == 4 and head[:3] == b"\x00\x00\x08" and 1 <= nd <= 3 and len(dims) == 4 * nd
    if ok:
        shape = [int.from_bytes(dims[4 * i : 4 * i + 4], "big") for i in range(nd)]
        expected = 4 + 4 * nd + int(np.prod(shape))
        ok = size == expected
    if not ok:
        raise UserError(
            f"the {src.title} file {path} is truncated or corrupted ({size} bytes that do not "
            f"match its IDX header); delete it and download it again"
        )


def _corrupted(src: _Source, root: Path, exc: BaseException) -> UserError:
    """The one-sentence error for files that are there but cannot be read."""
    return UserError(
        f"the {src.title} files under {root / src.folder} are corrupted or truncated "
        f"({type(exc).__name__}: {_first_line(exc)}); delete them and download them again"
    )


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message, without a trailing colon."""
    text = str(exc).strip().splitlines()
    return text[0].rstrip(":") if text else type(exc).__name__


def _to_raw(ds: object) -> RawSplit:
    """``.data`` and ``.targets`` of a torchvision dataset as numpy arrays (no PIL)."""
    x, y = ds.data, ds.targets  # type: ignore[attr-defined]
    x = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    y = y.numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    return RawSplit(np.ascontiguousarray(x, dtype=np.uint8), y.astype(np.int64))


def _validate(split: RawSplit, spec: DatasetSpec, title: str) -> None:
    """Raise a UserError when a loaded split does not look like images with valid labels."""
    x, y = split.x, split.y
    shape_ok = x.ndim == 3 if spec.channels == 1 else (x.ndim == 4 and x.shape[-1] == spec.channels)
    problem = ""
    if x.dtype != np.uint8 or not shape_ok:
        problem = f"images of shape {x.shape} and type {x.dtype}"
    elif y.ndim != 1 or len(y) != len(x):
        problem = f"{len(x)} images but {y.size} labels"
    elif len(y) and (y.min() < 0 or y.max() >= spec.num_classes):
        problem = f"labels outside 0..{spec.num_classes - 1}"
    if problem:
        raise UserError(
            f"the {title} data are corrupted ({problem}); delete them and download them again"
        )


# --- datasets without files -----------------------------------------------------------------


def _load_digits() -> tuple[RawSplit, RawSplit]:
    """scikit-learn's bundled 8x8 digits, scaled to 0..255, split 1437/360 by a fixed permutation.

    Read from the file scikit-learn ships (``sklearn/datasets/data/digits.csv.gz``: 64 pixel
    values 0..16 and the label per row), as ``load_digits`` reads it, without importing scikit-learn
    (a second of every process's start)."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise UserError("the built-in digits data set comes with scikit-learn, which is not installed")
    rows = np.loadtxt(Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz", delimiter=",")
    x = np.rint(rows[:, :-1].reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)
    y = rows[:, -1].astype(np.int64)
    perm = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(len(y))
    n_test = 360
    train, test = perm[n_test:], perm[:n_test]
    return RawSplit(x[train], y[train]), RawSplit(x[test], y[test])


def _make_synthetic(
    seed: int, n_train: int = 2000, n_test: int = 500, side: int = 28
) -> tuple[RawSplit, RawSplit]:
    """A small learnable 10-class set: a per-class blocky pattern plus Gaussian noise."""
    rng = numpy_rng(seed, _SYNTHETIC_KEY)
    cells = rng.random((10, 7, 7)) < 0.4  # one 7x7 on/off pattern per class
    protos = np.kron(cells, np.ones((side // 7, side // 7))) * 200.0 + 25.0

    def split(n: int) -> RawSplit:
        y = rng.permutation(np.arange(n) % 10).astype(np.int64)
        x = protos[y] + rng.normal(0.0, 40.0, size=(n, side, side))
        return RawSplit(np.clip(np.rint(x), 0, 255).astype(np.uint8), y)

    return split(n_train), split(n_test)


# --- tensors --------------------------------------------------------------------------------


def _stats(
    spec: DatasetSpec, channels: int, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std shaped (1, C, 1, 1); a one-channel spec broadcasts over ``channels``."""
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=device)
    std = torch.tensor(spec.std, dtype=torch.float32, device=device)
    if len(spec.mean) == 1:
        mean, std = mean.expand(channels), std.expand(channels)
    if mean.numel() != channels:
        raise ValueError(f"{spec.name} normalises {mean.numel()} channels, got {channels}")
    return mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)


def preprocess(x: np.ndarray, spec: DatasetSpec) -> torch.Tensor:
    """uint8 images -> normalised float32 (n, spec.channels, 32, 32), resized bilinearly if needed."""
    t = torch.from_numpy(np.ascontiguousarray(x))
    t = t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2)
    if t.shape[1] != spec.channels:
        raise ValueError(
            f"{spec.name} stores {spec.channels} channel(s), got images of shape {x.shape}"
        )
    mean, std = _stats(spec, spec.channels)
    out = torch.empty((t.shape[0], spec.channels, SIZE, SIZE), dtype=torch.float32)
    for start in range(0, t.shape[0], _CHUNK):
        chunk = t[start : start + _CHUNK].to(torch.float32).div_(255.0)
        if chunk.shape[-2:] != (SIZE, SIZE):
            chunk = F.interpolate(
                chunk, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=False
            )
        out[start : start + _CHUNK] = (chunk - mean) / std
    return out


@dataclass(frozen=True)
class Shifts:
    """One batch's augmentation draws: crop offsets ``top``, ``left`` in 0..2*PAD and, for
    datasets that flip, which samples are flipped (``flip``, else None)."""

    top: torch.Tensor
    left: torch.Tensor
    flip: torch.Tensor | None = None

    @classmethod
    def draw(cls, batch: int, spec: DatasetSpec, generator: torch.Generator) -> Shifts:
        """Draws, in order from ``generator``: row offsets (B,), column offsets (B,), and for
        ``hflip`` specs one uniform per sample (flip where < 0.5)."""
        top = torch.randint(0, 2 * PAD + 1, (batch,), generator=generator)
        left = torch.randint(0, 2 * PAD + 1, (batch,), generator=generator)
        flip = torch.rand(batch, generator=generator) < 0.5 if spec.hflip else None
        return cls(top, left, flip)

    def to(self, device: torch.device | str) -> Shifts:
        return Shifts(self.top.to(device), self.left.to(device), None if self.flip is None else self.flip.to(device))

    def __getitem__(self, rows: slice) -> Shifts:
        return Shifts(self.top[rows], self.left[rows], None if self.flip is None else self.flip[rows])


def augment(x: torch.Tensor, spec: DatasetSpec, generator: torch.Generator) -> torch.Tensor:
    """Random crop 32 with padding 4 (black padding), then a random horizontal flip if
    ``spec.hflip``, drawn from ``generator`` (``Shifts.draw``)."""
    return shift(x, spec, Shifts.draw(x.shape[0], spec, generator).to(x.device))


def shift(x: torch.Tensor, spec: DatasetSpec, shifts: Shifts) -> torch.Tensor:
    """The crops (and flips) ``shifts`` of the batch ``x`` (B, C, H, W), on ``x``'s device: the
    padding is black (the normalised value of 0), as a crop of a zero-padded image."""
    b, c, h, w = x.shape
    mean, std = _stats(spec, c, x.device)
    padded = (-mean / std).to(x.dtype).expand(b, c, h + 2 * PAD, w + 2 * PAD).clone()
    padded[:, :, PAD : PAD + h, PAD : PAD + w] = x
    # every (top, left) crop of every image as a view (B, C, 2*PAD+1, 2*PAD+1, H, W); picking one
    # per image copies whole rows (three times faster than an element-wise gather, the same values)
    crops = padded.unfold(2, h, 1).unfold(3, w, 1)
    out = crops[torch.arange(b, device=x.device), :, shifts.top, shifts.left]
    if shifts.flip is not None:
        out = torch.where(shifts.flip[:, None, None, None], out.flip(-1), out)
    return out


def model_input(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, 32, 32) -> (B, 3, 32, 32) by repeating the channel; three channels unchanged."""
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def repeats_one_channel(x: torch.Tensor) -> bool:
    """Whether the (..., C, H, W) tensor ``x`` is one channel repeated C > 1 times as a view
    (its channel stride is 0), as ``model_input`` hands a grayscale image to the model."""
    return x.dim() >= 3 and x.shape[-3] > 1 and x.stride(-3) == 0
