"""Dataset loaders on small files in the official formats, made here; the restricted unpickler."""

from __future__ import annotations

import gzip
import io
import pathlib
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from training.datasets import load_cifar10, load_cifar100, load_folder, load_mnist, load_numpy_pickle

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def cifar_records(
    rng: np.random.Generator, n: int, label_columns: int, n_classes: int
) -> tuple[bytes, np.ndarray, np.ndarray]:
    """n records in the official layout: label byte(s), then the R, G and B planes (32x32 each)."""
    labels = rng.integers(0, n_classes, (n, label_columns), dtype=np.uint8)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    planes = images.transpose(0, 3, 1, 2).reshape(n, -1)
    return np.concatenate([labels, planes], axis=1).tobytes(), images, labels


def write_tar(path: pathlib.Path, folder: str, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as archive:
        for name, blob in files.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(blob)
            archive.addfile(info, io.BytesIO(blob))


@pytest.fixture()
def cifar10_archive(tmp_path: pathlib.Path) -> tuple[pathlib.Path, list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(0)
    files, images, labels = {}, [], []
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        blob, x, y = cifar_records(rng, 3, 1, 10)
        files[name] = blob
        images.append(x)
        labels.append(y[:, 0])
    files["batches.meta.txt"] = ("\n".join(CIFAR10_NAMES) + "\n\n").encode()
    path = tmp_path / "cifar-10-binary.tar.gz"
    write_tar(path, "cifar-10-batches-bin", files)
    return path, images, labels


def test_cifar10_reads_the_binary_archive(cifar10_archive: tuple) -> None:
    path, images, labels = cifar10_archive
    ds = load_cifar10(path)
    assert ds.classes == CIFAR10_NAMES
    assert ds.train.images.shape == (15, 32, 32, 3) and ds.test.images.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(ds.train.images, np.concatenate(images[:5]))
    np.testing.assert_array_equal(ds.train.labels, np.concatenate(labels[:5]))
    np.testing.assert_array_equal(ds.test.images, images[5])
    np.testing.assert_array_equal(ds.test.labels, labels[5])
    assert ds.hflip and ds.preprocessing()["color_mode"] == "RGB"


def test_cifar10_reads_the_extracted_folder(cifar10_archive: tuple, tmp_path: pathlib.Path) -> None:
    path, images, _ = cifar10_archive
    with tarfile.open(path) as archive:
        archive.extractall(tmp_path / "x", filter="data")
    ds = load_cifar10(tmp_path / "x" / "cifar-10-batches-bin")
    np.testing.assert_array_equal(ds.test.images, images[5])


def test_cifar10_refuses_an_incomplete_archive(tmp_path: pathlib.Path) -> None:
    blob, _, _ = cifar_records(np.random.default_rng(0), 2, 1, 10)
    write_tar(tmp_path / "c.tar.gz", "cifar-10-batches-bin", {"data_batch_1.bin": blob})
    with pytest.raises(FileNotFoundError, match="missing"):
        load_cifar10(tmp_path / "c.tar.gz")


def test_cifar_refuses_a_truncated_file(tmp_path: pathlib.Path) -> None:
    blob, _, _ = cifar_records(np.random.default_rng(0), 2, 2, 100)
    write_tar(
        tmp_path / "c.tar.gz",
        "cifar-100-binary",
        {"train.bin": blob[:-5], "test.bin": blob, "fine_label_names.txt": b"a\n"},
    )
    with pytest.raises(ValueError, match="record"):
        load_cifar100(tmp_path / "c.tar.gz")


def test_cifar100_fine_and_coarse_labels(tmp_path: pathlib.Path) -> None:
    rng = np.random.default_rng(1)
    train, x_train, y_train = cifar_records(rng, 4, 2, 20)
    test, x_test, y_test = cifar_records(rng, 2, 2, 20)
    fine = [f"fine{i}" for i in range(100)]
    coarse = [f"coarse{i}" for i in range(20)]
    write_tar(
        tmp_path / "cifar-100-binary.tar.gz",
        "cifar-100-binary",
        {
            "train.bin": train,
            "test.bin": test,
            "fine_label_names.txt": "\n".join(fine).encode(),
            "coarse_label_names.txt": "\n".join(coarse).encode(),
        },
    )
    ds = load_cifar100(tmp_path / "cifar-100-binary.tar.gz")
    assert ds.classes == fine
    np.testing.assert_array_equal(ds.train.labels, y_train[:, 1])
    np.testing.assert_array_equal(ds.test.images, x_test)
    ds = load_cifar100(tmp_path / "cifar-100-binary.tar.gz", coarse=True)
    assert ds.classes == coarse
    np.testing.assert_array_equal(ds.test.labels, y_test[:, 0])
    np.testing.assert_array_equal(ds.train.images, x_train)


def make_folder(root: pathlib.Path, classes: dict[str, tuple[int, int, int]], n: int) -> None:
    for name, color in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (40 + i, 30), color).save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")


def test_folder_loader_splits_each_class(tmp_path: pathlib.Path) -> None:
    make_folder(tmp_path / "flowers", {"red": (255, 0, 0), "blue": (0, 0, 255)}, 5)
    (tmp_path / "flowers" / "red" / "notes.txt").write_text("not an image")
    ds = load_folder(tmp_path / "flowers", image_size=16, test_fraction=0.4)
    assert ds.classes == ["blue", "red"]
    assert len(ds.train) == 6 and len(ds.test) == 4
    assert sorted(ds.test.labels.tolist()) == [0, 0, 1, 1]
    assert ds.train.images.shape[1:] == (16, 16, 3)
    pre = ds.preprocessing()
    assert (pre["resize_short"], pre["crop_height"], pre["color_mode"]) == (18, 16, "RGB")
    red = ds.train.images[ds.train.labels == 1]
    assert np.all(red[..., 0] > 240) and np.all(red[..., 2] < 15)


def test_folder_loader_uses_train_and_val_folders(tmp_path: pathlib.Path) -> None:
    make_folder(tmp_path / "d" / "train", {"a": (10, 10, 10), "b": (200, 200, 200)}, 3)
    make_folder(tmp_path / "d" / "val", {"a": (10, 10, 10), "b": (200, 200, 200)}, 2)
    ds = load_folder(tmp_path / "d", image_size=8)
    assert ds.classes == ["a", "b"]
    assert (len(ds.train), len(ds.test)) == (6, 4)


class Evil:
    def __reduce__(self) -> tuple:
        return (print, ("this must never run",))


def test_numpy_pickle_admits_arrays_only() -> None:
    arrays = ((np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2])),)
    loaded = load_numpy_pickle(pickle.dumps(arrays))
    np.testing.assert_array_equal(loaded[0][0], arrays[0][0])
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        load_numpy_pickle(pickle.dumps(Evil()))
    with pytest.raises(pickle.UnpicklingError):
        load_numpy_pickle(pickle.dumps(np.array([{"a": 1}], dtype=object)))


def test_mnist_loader_on_a_small_pickle(tmp_path: pathlib.Path) -> None:
    rng = np.random.default_rng(0)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        return rng.random((n, 784), dtype=np.float32), rng.integers(0, 10, n)

    parts = (split(4), split(2), split(3))
    path = tmp_path / "mnist.pkl.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump(parts, f, protocol=2)
    ds = load_mnist(path)
    assert (len(ds.train), len(ds.test)) == (6, 3)
    assert ds.train.images.shape == (6, 28, 28, 1) and ds.train.images.dtype == np.uint8
    np.testing.assert_array_equal(ds.test.labels, parts[2][1])
    assert ds.preprocessing()["color_mode"] == "GRAYSCALE" and not ds.hflip
