"""The built-in datasets: Fashion-MNIST (its idx files, from the system package or a download) and
CIFAR-10/100 (torchvision), as uint8 tensors."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np
import torch

from ensc.data.splits import (
    DataConfig,
    Split,
)
from ensc.errors import DataError

log = logging.getLogger(__name__)


FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def load_fashion_mnist(config: DataConfig) -> tuple[Split, Split]:
    candidates = [config.root] if config.root else [FASHION_MNIST_SYSTEM_DIR]
    for folder in candidates:
        found = _find_idx_folder(folder)
        if found is not None:
            return tuple(_read_idx_split(found, *_FMNIST_FILES[s]) for s in ("train", "test"))
    if config.download:
        return _download_fashion_mnist(config.root or _default_download_root())
    where = config.root or FASHION_MNIST_SYSTEM_DIR
    raise DataError(
        f"Fashion-MNIST not found in {where}: install it with `apt-get install dataset-fashion-mnist`, "
        "point --data-root at a folder with the four IDX files, or pass --download"
    )


def _find_idx_folder(folder: Path) -> Path | None:
    """The folder itself or torchvision's ``FashionMNIST/raw`` under it, if it holds the IDX files."""
    for cand in (folder, folder / "FashionMNIST" / "raw"):
        name = _FMNIST_FILES["train"][0]
        if (cand / name).exists() or (cand / f"{name}.gz").exists():
            return cand
    return None


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): big-endian header, then uint8 data."""
    gz = path.with_name(path.name + ".gz")
    opener, real = (gzip.open, gz) if not path.exists() and gz.exists() else (open, path)
    try:
        with opener(real, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise DataError(
            f"cannot read {real}: {err}; the file may be truncated, reinstall it"
        ) from err
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if raw[2] != 0x08 or data.size != int(np.prod(dims)):
        raise DataError(f"{real} is not a valid uint8 IDX file (size or type mismatch)")
    return data.reshape(dims)


def _read_idx_split(folder: Path, images_name: str, labels_name: str) -> Split:
    images = torch.from_numpy(_read_idx(folder / images_name).copy()).unsqueeze(1)
    labels = torch.from_numpy(_read_idx(folder / labels_name).astype(np.int64))
    return Split(images, labels)


def _default_download_root() -> Path:
    return Path.home() / ".cache" / "ensc" / "data"


def default_data_root() -> Path:
    """Where cifar10 / cifar100 (and downloads) are looked for without --data-root."""
    return _default_download_root()


def _download_fashion_mnist(root: Path) -> tuple[Split, Split]:
    from torchvision.datasets import FashionMNIST

    splits = []
    for train in (True, False):
        ds = FashionMNIST(str(root), train=train, download=True)
        splits.append(Split(ds.data.unsqueeze(1).clone(), ds.targets.to(torch.int64)))
    return splits[0], splits[1]


# --- CIFAR -----------------------------------------------------------------------------------


def load_cifar(config: DataConfig) -> tuple[Split, Split, list[str]]:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if config.name == "cifar10" else CIFAR100
    root = config.root or _default_download_root()
    splits = []
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=config.download)
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted. ..."
            raise DataError(
                f"{config.name} not found under {root}: point --data-root at the folder that holds "
                f"torchvision's {cls.base_folder}/, or pass --download"
            ) from err
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
        splits.append(Split(images, torch.tensor(ds.targets, dtype=torch.int64)))
    return splits[0], splits[1], list(ds.classes)


# --- ImageFolder -----------------------------------------------------------------------------
