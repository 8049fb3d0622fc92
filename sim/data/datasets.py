"""Image datasets as uint8 tensors: one registry of names, one reader per on-disk layout.

`load_split(name, root, split)` returns an `ImageSet` at the dataset's native resolution; resizing
to `DatasetInfo.image_size` and normalisation happen in `sim.data.views`. Splits: "ssl" is the set used
for self-supervised training (the labeled train set, except STL-10's 100k `unlabeled` images);
"train" and "test" are the labeled sets of the linear probe. Missing files raise `DatasetMissing`
at once: there is never a silent fallback to another dataset. A file that cannot be read (truncated,
garbage) raises `DatasetCorrupt`, naming the file and how to get it again; so does a label outside the
dataset's classes, which would otherwise pass unseen until the probe, after the whole training.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import pickle
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sim.data.synthetic import make_synthetic


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    channels: int  # 1 or 3
    image_size: int  # side of the square views fed to the encoder
    num_classes: int
    mean: tuple[float, ...]  # per channel, in [0, 1] pixel units
    std: tuple[float, ...]
    crop_scale: tuple[float, float]  # RandomResizedCrop scale range for SSL views


DATASETS: dict[str, DatasetInfo] = {
    # Fashion-MNIST statistics: every pixel of the 60,000 native 28x28 train images, /255, float64,
    # population std (numpy .mean()/.std() over the flattened train-images-idx3-ubyte.gz).
    # image_size 32, not 28, so the VGG-6 pooling kernels 4-4-4-2-2-1 divide the side.
    "fashion_mnist": DatasetInfo("fashion_mnist", 1, 32, 10, (0.2860,), (0.3530,), (0.25, 1.0)),
    "cifar10": DatasetInfo(
        "cifar10", 3, 32, 10,
        (125.3 / 255, 123.0 / 255, 113.9 / 255), (63.0 / 255, 62.1 / 255, 66.7 / 255), (0.25, 1.0),
    ),
    "stl10": DatasetInfo(
        "stl10", 3, 96, 10, (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713), (0.08, 1.0)
    ),
    "tiny_imagenet": DatasetInfo(
        "tiny_imagenet", 3, 64, 200, (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262), (0.08, 1.0)
    ),
    # Synthetic statistics: measured like Fashion-MNIST's, on the generated train split (5,000 images).
    "synthetic": DatasetInfo(
        "synthetic", 3, 32, 10, (0.4991, 0.4991, 0.4991), (0.2218, 0.2202, 0.2206), (0.25, 1.0)
    ),
    "synthetic_gray": DatasetInfo("synthetic_gray", 1, 32, 10, (0.4991,), (0.2043,), (0.25, 1.0)),
    # STL-10's shapes (96 px, colour, its crop scales) for memory and speed at the paper's largest
    # input without the files; the same gratings drawn at 96 px (statistics those of 32 px).
    "synthetic_96": DatasetInfo(
        "synthetic_96", 3, 96, 10, (0.4991, 0.4991, 0.4991), (0.2218, 0.2202, 0.2206), (0.08, 1.0)
    ),
}

SPLITS = ("ssl", "train", "test")


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name]


class DatasetMissing(FileNotFoundError):
    """A dataset's files are not where they were searched for; the message says how to get them."""


class DatasetCorrupt(ValueError):
    """A dataset file that cannot be read (truncated, garbage): names the file and how to get it again."""


_GET_AGAIN = {
    "fashion_mnist": "sudo apt-get install --reinstall dataset-fashion-mnist, or download the four IDX files again",
    "cifar10": "download cifar-10-python.tar.gz again (https://www.cs.toronto.edu/~kriz/cifar.html), or copy the "
               ".npy shards again",
    "stl10": "download stl10_binary.tar.gz again (https://cs.stanford.edu/~acoates/stl10/)",
    "tiny_imagenet": "download tiny-imagenet-200.zip again and unzip it",
}


@contextlib.contextmanager
def _reading(name: str, path: Path) -> Iterator[None]:
    """Whatever goes wrong while reading `path` becomes a DatasetCorrupt that names the file."""
    try:
        yield
    except (DatasetMissing, DatasetCorrupt):
        raise
    except (EOFError, OSError, ValueError, RuntimeError, KeyError, IndexError, pickle.UnpicklingError,
            zlib.error) as error:
        detail = (str(error).splitlines() or [""])[0][:200]
        raise DatasetCorrupt(f"dataset {name!r}: {path} is corrupt or truncated ({type(error).__name__}: "
                             f"{detail}). Get it again: {_GET_AGAIN[name]}") from None


def _labels(name: str, path: Path, values: np.ndarray, first: int = 0) -> torch.Tensor:
    """The int64 (N,) labels 0..num_classes-1 of label file `path`, whose classes count from `first`
    (STL-10's from 1); a value outside them raises DatasetCorrupt naming the file, the value and its row."""
    classes = dataset_info(name).num_classes
    labels = np.asarray(values).astype(np.int64) - first  # (N,)
    bad = np.flatnonzero((labels < 0) | (labels >= classes))
    if len(bad):
        raise DatasetCorrupt(f"dataset {name!r}: {path} holds label {labels[bad[0]] + first} at row {bad[0]} "
                             f"({len(bad):,} of its {len(labels):,} labels are outside {first}..{classes - 1 + first}, "
                             f"the {classes} classes): it is damaged or of another dataset. Get it again: "
                             f"{_GET_AGAIN[name]}")
    return torch.from_numpy(labels)


@dataclass
class ImageSet:
    """Images and labels of one split.

    `images` is (N, C, H, W) uint8. For STL-10 it is a strided view of a `numpy.memmap` of the
    binary file (its last two axes swapped, since the file is column-major): indexing reads only
    the rows asked for, but whole-set operations (`images.float()`, pickling the set to another
    process) read the full file. Use `batch` to get contiguous rows.
    """

    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64; -1 for unlabeled images

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or self.images.dtype != torch.uint8:
            raise ValueError(f"images must be (N, C, H, W) uint8, got {tuple(self.images.shape)} "
                             f"{self.images.dtype}")
        if self.labels.shape != (self.images.shape[0],) or self.labels.dtype != torch.int64:
            raise ValueError(f"labels must be ({self.images.shape[0]},) int64, got "
                             f"{tuple(self.labels.shape)} {self.labels.dtype}")

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows `index` as a contiguous uint8 (b, C, H, W) tensor and their int64 (b,) labels."""
        index = index.to(torch.int64)
        return self.images[index].contiguous(), self.labels[index]


def load_split(name: str, root: str | None, split: str, download: bool = False) -> ImageSet:
    """Read split "ssl", "train" or "test" of dataset `name` from `root` (None: the default place)."""
    info = dataset_info(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for {name}; choose one of {list(SPLITS)}")
    if info.name.startswith("synthetic"):  # procedural: no files, root ignored
        images, labels = make_synthetic(split, info.channels, info.image_size)
        return ImageSet(images, labels)
    folder = Path(root).expanduser() if root is not None else None
    return _READERS[name](folder, split, download)


# ---------------------------------------------------------------- helpers shared by the readers
def _missing(name: str, searched: list[Path], wanted: str, fix: str) -> DatasetMissing:
    paths = "\n".join(f"  - {p}" for p in searched) or "  (nothing: data.root is not set)"
    return DatasetMissing(f"dataset {name!r}: {wanted} not found. Searched:\n{paths}\nTo fix: {fix}")


def _search(root: Path | None, subdirs: list[str],
            has: Callable[[Path], bool]) -> tuple[Path | None, list[Path]]:
    """First of `root`, `root/<subdir>`... for which `has` holds, and every folder tried."""
    tried = [] if root is None else [root] + [root / s for s in subdirs]
    return next((f for f in tried if has(f)), None), tried


def _download(name: str, root: Path | None, fetch: Callable[[str], object]) -> None:
    """Let torchvision fetch dataset `name` into data.root; a failed download says what to do."""
    if root is None:
        raise DatasetMissing(f"dataset {name!r}: data.download = true needs data.root, the folder "
                             "to download into; set data.root")
    try:
        root.mkdir(parents=True, exist_ok=True)
        fetch(str(root))
    except Exception as error:  # noqa: BLE001 - urllib, http and torchvision each raise their own kind
        detail = (str(error).splitlines() or [""])[0][:200]
        raise DatasetMissing(f"dataset {name!r}: downloading into {root} failed ({type(error).__name__}: {detail}); "
                             "check the connection, or put the files there yourself and set "
                             "data.download = false") from None


def _decode_jpegs(blobs: list[torch.Tensor]) -> torch.Tensor:
    """Decode JPEG byte tensors of one size to RGB (N, 3, H, W) uint8 (grayscale files too)."""
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg

    # torchvision 0.29 deprecates its JPEG decoder in favour of TorchCodec; it is pinned below 0.30.
    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities",
                            category=DeprecationWarning)
    first = decode_jpeg(blobs[0], mode=ImageReadMode.RGB)
    out = torch.empty((len(blobs), *first.shape), dtype=torch.uint8)  # (N, 3, H, W)
    chunk = 4096  # decode in chunks so the list of decoded images never doubles peak memory
    for start in range(0, len(blobs), chunk):
        decoded = decode_jpeg(blobs[start:start + chunk], mode=ImageReadMode.RGB)
        out[start:start + len(decoded)] = torch.stack(decoded)
    return out


# ---------------------------------------------------------------- Fashion-MNIST (IDX files)
_FMNIST_DEFAULT = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
_FMNIST_STEMS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _idx_path(folder: Path, stem: str) -> Path | None:
    return next((p for p in (folder / f"{stem}.gz", folder / stem) if p.is_file()), None)


def _read_idx(path: Path) -> np.ndarray:
    with _reading("fashion_mnist", path):
        return _parse_idx(path)


def _parse_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    # IDX header: two zero bytes, type code 0x08 (uint8), the number of dimensions, then each
    # dimension as a big-endian int32.
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not a uint8 IDX file (header {raw[:4].hex()}); replace it")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(bytearray(raw), np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(shape):
        raise ValueError(f"{path} holds {data.size} values, its header says {shape}: the file is "
                         "truncated; download it again")
    return data.reshape(shape)


def _read_fashion_mnist(root: Path | None, split: str, download: bool) -> ImageSet:
    stems = _FMNIST_STEMS["test" if split == "test" else "train"]
    def has(f: Path) -> bool:
        return all(_idx_path(f, s) is not None for s in stems)

    subdirs = ["FashionMNIST/raw"] if root is not None else []  # torchvision's layout
    folder, tried = _search(root or _FMNIST_DEFAULT, subdirs, has)
    if folder is None and download:
        from torchvision.datasets import FashionMNIST

        _download("fashion_mnist", root, lambda where: FashionMNIST(where, train=split != "test", download=True))
        folder, tried = _search(root, subdirs, has)
    if folder is None:
        raise _missing("fashion_mnist", tried, f"{stems[0]}(.gz) and {stems[1]}(.gz)",
                       "sudo apt-get install dataset-fashion-mnist (installs into "
                       f"{_FMNIST_DEFAULT}), or set data.root to a folder holding the four IDX "
                       "files, or set data.download = true with data.root")
    images_file, labels_file = (_idx_path(folder, stem) for stem in stems)
    images, labels = _read_idx(images_file), _read_idx(labels_file)  # (N, 28, 28), (N,)
    if len(labels) != len(images):
        raise DatasetCorrupt(f"dataset 'fashion_mnist': {labels_file} holds {len(labels):,} labels for the "
                             f"{len(images):,} images of {images_file}. Get both again: {_GET_AGAIN['fashion_mnist']}")
    return ImageSet(torch.from_numpy(images).unsqueeze(1), _labels("fashion_mnist", labels_file, labels))


# ---------------------------------------------------------------- CIFAR-10 (pickles or JPEG shards)
def _read_cifar10(root: Path | None, split: str, download: bool) -> ImageSet:
    part = "test" if split == "test" else "train"
    def has(f: Path) -> bool:
        return (f / "data_batch_1").is_file() or (f / f"{part}_jpeg.npy").is_file()

    subdirs = ["cifar-10-batches-py", "cifar10"]
    folder, tried = _search(root, subdirs, has)
    if folder is None and download:
        from torchvision.datasets import CIFAR10

        _download("cifar10", root, lambda where: CIFAR10(where, train=part == "train", download=True))
        folder, tried = _search(root, subdirs, has)
    if folder is None:
        raise _missing("cifar10", tried, f"cifar-10-batches-py/ (data_batch_1..5, test_batch) or "
                       f"{part}_jpeg.npy shards", "set data.root to the folder holding "
                       "cifar-10-batches-py/ (from https://www.cs.toronto.edu/~kriz/cifar.html) or "
                       "a .npy JPEG shard folder, or set data.download = true with data.root")
    if (folder / f"{part}_jpeg.npy").is_file():
        return _read_cifar_shards(folder, part)
    names = ["test_batch"] if part == "test" else [f"data_batch_{i}" for i in range(1, 6)]
    images, labels = [], []
    for file in names:
        if not (folder / file).is_file():
            raise _missing("cifar10", [folder / file], file, "re-download cifar-10-python.tar.gz")
        with _reading("cifar10", folder / file), open(folder / file, "rb") as f:
            batch = pickle.load(f, encoding="bytes")  # the official format; trust only real copies
            images.append(np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32))
            labels.append(_labels("cifar10", folder / file, np.asarray(batch[b"labels"])))
    return ImageSet(torch.from_numpy(np.concatenate(images)), torch.cat(labels))


def _read_cifar_shards(folder: Path, part: str) -> ImageSet:
    jpegs, offsets_file, labels_file = (folder / f"{part}_{kind}.npy" for kind in ("jpeg", "offsets", "labels"))
    with _reading("cifar10", offsets_file):
        offsets = np.load(offsets_file)  # (N + 1,) image i is jpegs[o[i]:o[i+1]]
        if offsets.ndim != 1:
            raise ValueError(f"its offsets are {offsets.shape}, not one list (N + 1,)")
        shrinking = np.flatnonzero(np.diff(offsets) <= 0)
        if len(shrinking):  # checked here, or the empty or negative slice is blamed on the JPEG file
            raise ValueError(f"its offsets do not increase at entry {shrinking[0]} "
                             f"({offsets[shrinking[0]:shrinking[0] + 2].tolist()})")
    with _reading("cifar10", labels_file):
        labels = _labels("cifar10", labels_file, np.load(labels_file))  # (N,)
        if labels.shape != (len(offsets) - 1,):
            raise ValueError(f"{labels.numel()} labels for {len(offsets) - 1} images")
    with _reading("cifar10", jpegs):
        data = np.load(jpegs, mmap_mode="r")  # (bytes,) all JPEG files concatenated
        if len(offsets) and offsets[-1] > len(data):
            raise ValueError(f"it holds {len(data):,} bytes, its offsets reach {offsets[-1]:,}")
        blobs = [torch.from_numpy(np.array(data[a:b])) for a, b in zip(offsets[:-1], offsets[1:])]
        return ImageSet(_decode_jpegs(blobs), labels)


# ---------------------------------------------------------------- STL-10 (column-major binaries)
def _read_stl10(root: Path | None, split: str, download: bool) -> ImageSet:
    prefix = {"ssl": "unlabeled", "train": "train", "test": "test"}[split]
    def has(f: Path) -> bool:
        return (f / f"{prefix}_X.bin").is_file()

    folder, tried = _search(root, ["stl10_binary"], has)
    if folder is None and download:
        from torchvision.datasets import STL10

        _download("stl10", root, lambda where: STL10(where, split=prefix, download=True))
        folder, tried = _search(root, ["stl10_binary"], has)
    if folder is None:
        raise _missing("stl10", tried, f"stl10_binary/{prefix}_X.bin", "set data.root to the folder "
                       "holding stl10_binary/ (from https://cs.stanford.edu/~acoates/stl10/), or "
                       "set data.download = true with data.root")
    path = folder / f"{prefix}_X.bin"
    per_image = 3 * 96 * 96
    n, extra = divmod(path.stat().st_size, per_image)
    if extra:
        raise DatasetCorrupt(f"dataset 'stl10': {path} is not a whole number of 3x96x96 images: it is truncated. "
                             f"Get it again: {_GET_AGAIN['stl10']}")
    # Copy-on-write map: nothing is read until rows are indexed, and torch gets a writable buffer.
    raw = np.memmap(path, np.uint8, mode="c", shape=(n, 3, 96, 96))
    images = torch.from_numpy(raw).transpose(2, 3)  # (N, 3, 96, 96) view: the file is column-major
    if prefix == "unlabeled":
        return ImageSet(images, torch.full((n,), -1, dtype=torch.int64))
    labels_file = folder / f"{prefix}_y.bin"
    with _reading("stl10", labels_file):
        values = np.fromfile(labels_file, np.uint8)
        if values.shape != (n,):
            raise ValueError(f"it holds {values.size} labels for {n} images")
    return ImageSet(images, _labels("stl10", labels_file, values, first=1))  # the file counts classes 1..10


# ---------------------------------------------------------------- Tiny ImageNet (JPEG folders)
def _read_tiny_imagenet(root: Path | None, split: str, download: bool) -> ImageSet:
    folder, tried = _search(root, ["tiny-imagenet-200"], lambda f: (f / "wnids.txt").is_file())
    fix = ("download http://cs231n.stanford.edu/tiny-imagenet-200.zip, unzip it and set data.root "
           "to the folder holding tiny-imagenet-200/ (there is no automatic download)")
    if folder is None:
        raise _missing("tiny_imagenet", tried, "tiny-imagenet-200/wnids.txt", fix)
    wnids = [w.strip() for w in (folder / "wnids.txt").read_text().splitlines() if w.strip()]
    if len(wnids) > DATASETS["tiny_imagenet"].num_classes:  # a label past the classes would fail only in the probe
        raise DatasetCorrupt(f"dataset 'tiny_imagenet': {folder / 'wnids.txt'} lists {len(wnids)} classes, "
                             f"tiny_imagenet has {DATASETS['tiny_imagenet'].num_classes}. To fix: {fix}")
    label_of = {w: i for i, w in enumerate(wnids)}  # class order = line order of wnids.txt
    if split == "test":  # the val folder: the real test split has no labels
        notes = folder / "val" / "val_annotations.txt"
        if not notes.is_file():
            raise _missing("tiny_imagenet", [notes], "val/val_annotations.txt", fix)
        rows = [line.split("\t") for line in notes.read_text().splitlines() if line.strip()]
        unknown = {r[1] for r in rows if r[1] not in label_of}
        if unknown:
            raise DatasetCorrupt(f"dataset 'tiny_imagenet': {notes} names classes absent from wnids.txt: "
                                 f"{sorted(unknown)[:5]}. To fix: {fix}")
        files = [(folder / "val" / "images" / r[0], label_of[r[1]]) for r in rows]
    else:
        files = [(p, label_of[w]) for w in wnids
                 for p in sorted((folder / "train" / w / "images").glob("*.JPEG"))]
    if not files:
        raise _missing("tiny_imagenet", [folder], f"JPEG images of the {split} split", fix)
    blobs = [torch.from_numpy(np.fromfile(p, np.uint8)) for p, _ in files]
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    with _reading("tiny_imagenet", folder / ("val" if split == "test" else "train")):
        return ImageSet(_decode_jpegs(blobs), labels)


_READERS: dict[str, Callable[[Path | None, str, bool], ImageSet]] = {
    "fashion_mnist": _read_fashion_mnist,
    "cifar10": _read_cifar10,
    "stl10": _read_stl10,
    "tiny_imagenet": _read_tiny_imagenet,
}
