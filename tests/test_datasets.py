"""Each reader on a tiny fake copy of its on-disk layout, the real copies when present, and errors."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import encode_jpeg

from sim.data.datasets import DATASETS, DatasetCorrupt, DatasetMissing, ImageSet, dataset_info, load_split

FMNIST_SYSTEM = Path("/usr/share/datasets/fashion-mnist")
CIFAR_SHARDS = Path(os.environ.get("LAMINAR_CIFAR10", "/work/shared/data/cifar10"))


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_fmnist(folder: Path, gz: bool, rng: np.random.Generator) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (5, 28, 28)),
              "train-labels-idx1-ubyte": np.array([3, 1, 4, 1, 5]),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (2, 28, 28)),
              "t10k-labels-idx1-ubyte": np.array([9, 0])}
    for stem, array in arrays.items():
        data = _idx_bytes(array)
        (folder / (stem + ".gz" if gz else stem)).write_bytes(gzip.compress(data) if gz else data)
    return arrays


@pytest.mark.parametrize("layout, gz", [("", True), ("FashionMNIST/raw", False)])
def test_fashion_mnist_reads_idx_files(tmp_path: Path, layout: str, gz: bool) -> None:
    arrays = _write_fmnist(tmp_path / layout, gz, np.random.default_rng(0))
    train = load_split("fashion_mnist", str(tmp_path), "train")
    assert train.images.shape == (5, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64 and train.labels.tolist() == [3, 1, 4, 1, 5]
    assert np.array_equal(train.images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    test = load_split("fashion_mnist", str(tmp_path), "test")
    assert np.array_equal(test.images[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    assert torch.equal(load_split("fashion_mnist", str(tmp_path), "ssl").images, train.images)


def test_fashion_mnist_rejects_a_truncated_file(tmp_path: Path) -> None:
    _write_fmnist(tmp_path, True, np.random.default_rng(0))
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-10]))
    with pytest.raises(ValueError, match="truncated"):
        load_split("fashion_mnist", str(tmp_path), "train")


def test_real_fashion_mnist() -> None:
    if not (FMNIST_SYSTEM / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST not installed in {FMNIST_SYSTEM} (apt-get install dataset-fashion-mnist)")
    train = load_split("fashion_mnist", None, "train")
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert torch.equal(train.labels.bincount(), torch.full((10,), 6000))
    assert abs(train.images[:1000].float().mean().item() / 255 - DATASETS["fashion_mnist"].mean[0]) < 0.02
    assert len(load_split("fashion_mnist", None, "test")) == 10000


def _cifar_image(i: int) -> np.ndarray:
    """A 3x32x32 image whose channels and rows are told apart: channel c, row r holds 10 c + r + i."""
    return (10 * np.arange(3)[:, None, None] + np.arange(32)[None, :, None] + i
            + np.zeros((3, 32, 32), np.int64)).astype(np.uint8)


@pytest.mark.parametrize("root_is_parent", [True, False])
def test_cifar10_reads_python_pickles(tmp_path: Path, root_is_parent: bool) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        data = np.stack([_cifar_image(2 * k), _cifar_image(2 * k + 1)]).reshape(2, 3072)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": [k, 9 - k]}, f)
    root = str(tmp_path if root_is_parent else folder)
    train = load_split("cifar10", root, "train")
    assert train.images.shape == (10, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == [0, 9, 1, 8, 2, 7, 3, 6, 4, 5]
    assert np.array_equal(train.images[3].numpy(), _cifar_image(3))  # batch order kept, CHW layout
    test = load_split("cifar10", root, "test")
    assert test.labels.tolist() == [5, 4] and np.array_equal(test.images[1].numpy(), _cifar_image(11))


def test_cifar10_reads_jpeg_shards(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    colours = rng.integers(30, 220, (4, 3))  # flat colours survive JPEG nearly unchanged
    images = torch.from_numpy(np.broadcast_to(colours[:, :, None, None], (4, 3, 32, 32)).astype(np.uint8))
    for split, rows in [("train", slice(0, 3)), ("test", slice(3, 4))]:
        blobs = [encode_jpeg(img, quality=95).numpy() for img in images[rows]]
        offsets = np.cumsum([0] + [len(b) for b in blobs])
        np.save(tmp_path / f"{split}_jpeg.npy", np.concatenate(blobs))
        np.save(tmp_path / f"{split}_offsets.npy", offsets.astype(np.int64))
        labels = np.arange(len(blobs), dtype=np.uint8) + 7 * (split == "test")
        np.save(tmp_path / f"{split}_labels.npy", labels)
    train = load_split("cifar10", str(tmp_path), "train")
    assert train.images.shape == (3, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == [0, 1, 2]
    assert (train.images.int() - images[:3].int()).abs().max() <= 4
    test = load_split("cifar10", str(tmp_path), "test")
    assert test.labels.tolist() == [7] and (test.images.int() - images[3:].int()).abs().max() <= 4


def test_real_cifar10_shards() -> None:
    if not (CIFAR_SHARDS / "test_jpeg.npy").is_file():
        pytest.skip(f"no CIFAR-10 shard folder at {CIFAR_SHARDS} (set LAMINAR_CIFAR10 to one)")
    test = load_split("cifar10", str(CIFAR_SHARDS), "test")
    assert test.images.shape == (10000, 3, 32, 32) and test.images.dtype == torch.uint8
    assert torch.equal(test.labels[:20], torch.arange(20) % 10)  # the README's row order
    mean = test.images.float().mean(dim=(0, 2, 3)) / 255
    assert torch.allclose(mean, torch.tensor(DATASETS["cifar10"].mean), atol=0.02)


def _stl_images(n: int, seed: int) -> np.ndarray:
    """(n, 3, 96, 96) row-major images with a bright top row and a dark left column."""
    images = np.random.default_rng(seed).integers(60, 200, (n, 3, 96, 96)).astype(np.uint8)
    images[:, :, 0, :] = 255
    images[:, :, 1:, 0] = 0
    return images


def _write_stl_x(path: Path, images: np.ndarray) -> None:
    path.write_bytes(np.ascontiguousarray(images.transpose(0, 1, 3, 2)).tobytes())  # column-major


def test_stl10_fixes_the_column_major_orientation(tmp_path: Path) -> None:
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    train, unlabeled = _stl_images(3, 0), _stl_images(4, 1)
    _write_stl_x(folder / "train_X.bin", train)
    (folder / "train_y.bin").write_bytes(bytes([1, 10, 4]))
    _write_stl_x(folder / "unlabeled_X.bin", unlabeled)
    labeled = load_split("stl10", str(tmp_path), "train")
    assert labeled.images.shape == (3, 3, 96, 96) and labeled.labels.tolist() == [0, 9, 3]
    images, labels = labeled.batch(torch.tensor([2, 0]))
    assert images.is_contiguous() and images.dtype == torch.uint8 and labels.tolist() == [3, 0]
    assert (images[:, :, 0, :] == 255).all() and (images[:, :, 1:, 0] == 0).all()
    assert np.array_equal(images.numpy(), train[[2, 0]])
    ssl = load_split("stl10", str(folder), "ssl")  # the folder itself as root works too
    assert len(ssl) == 4 and (ssl.labels == -1).all()
    batch, _ = ssl.batch(torch.tensor([3]))
    assert np.array_equal(batch.numpy(), unlabeled[[3]])


def _write_jpeg(path: Path, image: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_jpeg(image, quality=95).numpy().tobytes())


def test_tiny_imagenet_reads_folders_and_grayscale(tmp_path: Path) -> None:
    top = tmp_path / "tiny-imagenet-200"
    top.mkdir()
    (top / "wnids.txt").write_text("n02\nn01\n")  # class order is line order, not sorted order
    red = torch.zeros(3, 64, 64, dtype=torch.uint8)
    red[0] = 200
    gray = torch.full((1, 64, 64), 90, dtype=torch.uint8)
    _write_jpeg(top / "train/n02/images/n02_0.JPEG", red)
    _write_jpeg(top / "train/n01/images/n01_0.JPEG", gray)
    _write_jpeg(top / "train/n01/images/n01_1.JPEG", red)
    _write_jpeg(top / "val/images/val_0.JPEG", gray)
    (top / "val/val_annotations.txt").write_text("val_0.JPEG\tn01\t0\t0\t63\t63\n")
    train = load_split("tiny_imagenet", str(tmp_path), "train")
    assert train.images.shape == (3, 3, 64, 64) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == [0, 1, 1]
    assert (train.images[0, 0].float().mean() - 200).abs() < 4 and train.images[0, 1:].float().mean() < 4
    grayscale = train.images[1].int()  # decoded to RGB: three equal channels
    assert (grayscale - 90).abs().max() <= 2 and torch.equal(grayscale[0], grayscale[2])
    test = load_split("tiny_imagenet", str(top), "test")
    assert test.labels.tolist() == [1] and test.images.shape == (1, 3, 64, 64)


def _fmnist_label_200(root: Path) -> Path:
    _write_fmnist(root, True, np.random.default_rng(0))
    (root / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(np.array([3, 1, 200, 1, 200]))))
    return root / "train-labels-idx1-ubyte.gz"


def _cifar_pickle_label_10(root: Path) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [k, 10 if k == 3 else 9]}, f)
    return folder / "data_batch_4"


def _cifar_shard_label_12(root: Path) -> Path:
    blobs = [encode_jpeg(torch.full((3, 32, 32), 90, dtype=torch.uint8)).numpy() for _ in range(3)]
    np.save(root / "train_jpeg.npy", np.concatenate(blobs))
    np.save(root / "train_offsets.npy", np.cumsum([0] + [len(b) for b in blobs]))
    np.save(root / "train_labels.npy", np.array([0, 12, 1]))
    return root / "train_labels.npy"


def _stl_label_0(root: Path) -> Path:
    folder = root / "stl10_binary"
    folder.mkdir()
    _write_stl_x(folder / "train_X.bin", _stl_images(3, 0))
    (folder / "train_y.bin").write_bytes(bytes([1, 0, 4]))  # the file counts classes 1..10
    return folder / "train_y.bin"


@pytest.mark.parametrize("name, damage, value", [("fashion_mnist", _fmnist_label_200, "label 200"),
                                                 ("cifar10", _cifar_pickle_label_10, "label 10"),
                                                 ("cifar10", _cifar_shard_label_12, "label 12"),
                                                 ("stl10", _stl_label_0, "label 0")])
def test_labels_outside_the_classes_are_refused_on_load(tmp_path: Path, name: str, damage, value: str) -> None:
    path = damage(tmp_path)  # left alone, a label past the classes fails only in the probe, after training
    with pytest.raises(DatasetCorrupt) as caught:
        load_split(name, str(tmp_path), "train")
    message = str(caught.value)
    assert str(path) in message and value in message and "Get it again" in message, message


def test_fashion_mnist_with_fewer_labels_than_images_names_both_files(tmp_path: Path) -> None:
    _write_fmnist(tmp_path, True, np.random.default_rng(0))
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(np.array([3, 1, 4, 1]))))
    with pytest.raises(DatasetCorrupt, match="train-labels-idx1-ubyte.gz holds 4 labels for the 5 images of .*"
                                             "train-images-idx3-ubyte.gz. Get both again"):
        load_split("fashion_mnist", str(tmp_path), "train")


def test_tiny_imagenet_with_classes_it_does_not_have(tmp_path: Path) -> None:
    (tmp_path / "wnids.txt").write_text("".join(f"n{i:03d}\n" for i in range(201)))
    with pytest.raises(DatasetCorrupt, match="wnids.txt lists 201 classes, tiny_imagenet has 200"):
        load_split("tiny_imagenet", str(tmp_path), "train")
    (tmp_path / "wnids.txt").write_text("n001\n")
    _write_jpeg(tmp_path / "val/images/val_0.JPEG", torch.zeros(3, 64, 64, dtype=torch.uint8))
    (tmp_path / "val/val_annotations.txt").write_text("val_0.JPEG\tn999\t0\t0\t63\t63\n")
    with pytest.raises(DatasetCorrupt, match=r"val_annotations.txt names classes absent from wnids.txt: \['n999'\]"):
        load_split("tiny_imagenet", str(tmp_path), "test")


@pytest.mark.parametrize("name, fixes", [
    ("fashion_mnist", ["apt-get install dataset-fashion-mnist", "data.download = true"]),
    ("cifar10", ["https://www.cs.toronto.edu/~kriz/cifar.html", "data.download = true"]),
    ("stl10", ["stl10_binary", "data.download = true"]),
    ("tiny_imagenet", ["http://cs231n.stanford.edu/tiny-imagenet-200.zip"]),
])
def test_missing_files_name_the_searched_paths_and_the_fix(tmp_path: Path, name: str,
                                                           fixes: list[str]) -> None:
    with pytest.raises(DatasetMissing) as caught:
        load_split(name, str(tmp_path), "train")
    message = str(caught.value)
    assert name in message and str(tmp_path) in message
    assert all(fix in message for fix in fixes)
    assert isinstance(caught.value, FileNotFoundError)


def test_cifar10_without_root_asks_for_data_root() -> None:
    with pytest.raises(DatasetMissing, match="data.root"):
        load_split("cifar10", None, "test")


def test_unknown_name_and_split_list_the_choices() -> None:
    with pytest.raises(ValueError, match="cifar10.*stl10"):
        dataset_info("imagenet")
    with pytest.raises(ValueError, match="cifar10"):
        load_split("imagenet", None, "train")
    with pytest.raises(ValueError, match="'ssl', 'train', 'test'"):
        load_split("synthetic", None, "val")


def test_registry_is_consistent() -> None:
    assert set(DATASETS) == {"fashion_mnist", "cifar10", "stl10", "tiny_imagenet", "synthetic",
                             "synthetic_gray", "synthetic_96"}
    for name, info in DATASETS.items():
        assert info.name == name and info.channels in (1, 3)
        assert len(info.mean) == len(info.std) == info.channels
        assert all(0 < m < 1 for m in info.mean) and all(0 < s < 1 for s in info.std)
    assert DATASETS["fashion_mnist"].image_size == 32 and DATASETS["tiny_imagenet"].num_classes == 200


def test_image_set_checks_types() -> None:
    with pytest.raises(ValueError, match="uint8"):
        ImageSet(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="labels"):
        ImageSet(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))


@pytest.mark.parametrize("name", ["synthetic", "synthetic_gray", "synthetic_96"])
def test_synthetic_is_deterministic_balanced_and_learnable(name: str) -> None:
    info = dataset_info(name)
    train, again = load_split(name, None, "train"), load_split(name, "/ignored", "train")
    test = load_split(name, None, "test")
    assert torch.equal(train.images, again.images) and torch.equal(train.labels, again.labels)
    side = info.image_size
    assert train.images.shape == (5000, info.channels, side, side) and train.images.dtype == torch.uint8
    assert len(test) == 1000 and not torch.equal(test.images, train.images[:1000])
    assert torch.equal(train.labels.bincount(), torch.full((10,), 500))
    assert torch.equal(load_split(name, None, "ssl").images, train.images)
    # Nearest class mean on raw pixels: the classes must be separable without any learning.
    x, x_test = train.images.flatten(1).float(), test.images.flatten(1).float()
    means = torch.stack([x[train.labels == k].mean(0) for k in range(10)])  # (10, D)
    accuracy = (torch.cdist(x_test, means).argmin(1) == test.labels).float().mean().item()
    assert accuracy > 0.5, f"nearest-class-mean accuracy {accuracy:.2f} is near chance (0.1)"
    mean = train.images.float().mean(dim=(0, 2, 3)) / 255  # the registry holds these statistics
    assert torch.allclose(mean, torch.tensor(info.mean), atol=1e-3)
