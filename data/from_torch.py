"""A user's torch ``Dataset``/``DataLoader`` as an ensc :class:`ImageDataset` (the Python API).

ensc trains on uint8 images and normalizes inside the model (docs/method.md §1), so each item's
image is read once into a uint8 tensor: a PIL image or a uint8 tensor as it is, a float tensor
with pixels in [0, 1] scaled by 255 and rounded. Normalized tensors (pixels outside [0, 1]) are
refused: the normalization belongs in the model, where ensc measures and records it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ensc.data.datasets import (
    DataConfig,
    ImageDataset,
    Split,
    channel_stats,
    split_indices,
    take_subset,
)
from ensc.errors import DataError

log = logging.getLogger(__name__)

TorchData = Dataset | DataLoader  # what the API accepts for a split


def dataset_from_torch(
    train: TorchData,
    test: TorchData,
    val: TorchData | None = None,
    *,
    config: DataConfig,
    hflip: bool = True,
) -> ImageDataset:
    """Read the splits into memory; without ``val``, validation is carved from ``train`` as
    :func:`ensc.data.datasets.split_indices` does for ensc's own datasets (``config``: its
    ``val_size``, ``train_subset`` and ``seed``); ``test_subset`` (and, with ``val``,
    ``train_subset``) take class-balanced subsets as for ensc's datasets."""
    gen = torch.Generator().manual_seed(config.seed)
    full = read_split(train, "train_data")
    if val is None:
        train_idx, val_idx = split_indices(full.labels, config, gen)
        train_split, val_split = full.subset(train_idx), full.subset(val_idx)
    else:  # train_subset counts training images only: validation is its own split
        train_split = take_subset(full, config.train_subset, gen, "train_subset")
        val_split = read_split(val, "val_data")
    test_split = take_subset(read_split(test, "test_data"), config.test_subset, gen, "test_subset")
    for name, split in (("val_data", val_split), ("test_data", test_split)):
        if split.images.shape[1:] != train_split.images.shape[1:]:
            raise DataError(
                f"{name} images are {tuple(split.images.shape[1:])} but train_data images are "
                f"{tuple(train_split.images.shape[1:])}: give every split the same size and channels"
            )
    classes = class_names(train, int(full.labels.max()) + 1)
    mean, std = channel_stats(train_split.images)
    log.info("%s: %d train / %d val / %d test", config.name, len(train_split), len(val_split),
             len(test_split))  # fmt: skip
    return ImageDataset(name=config.name, train=train_split, val=val_split, test=test_split,
                        class_names=classes, mean=mean, std=std, hflip=hflip)  # fmt: skip


def read_split(data: TorchData, name: str) -> Split:
    """Every ``(image, label)`` item of ``data`` (a Dataset, or a DataLoader's dataset) as uint8."""
    dataset = data.dataset if isinstance(data, DataLoader) else data
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise DataError(
            f"{name} must be a map-style torch Dataset (with __len__ and __getitem__) or a "
            f"DataLoader over one; got {type(data).__name__}"
        )
    if len(dataset) == 0:
        raise DataError(f"{name} is empty")
    images, labels = [], []
    for index in range(len(dataset)):
        item = dataset[index]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise DataError(
                f"{name}[{index}] must be an (image, label) pair; got {type(item).__name__}"
            )
        images.append(to_uint8(item[0], f"{name}[{index}]"))
        labels.append(int(item[1]))
    shapes = {tuple(x.shape) for x in images}
    if len(shapes) > 1:
        raise DataError(
            f"{name} images have {len(shapes)} different shapes (e.g. {', '.join(map(str, sorted(shapes)[:3]))}): "
            "resize them to one size in the dataset's transform"
        )
    return Split(torch.stack(images), torch.tensor(labels, dtype=torch.int64))


def to_uint8(image: Any, where: str) -> torch.Tensor:
    """One image as a uint8 [C, H, W] tensor (PIL image, uint8 or [0, 1] float tensor, HWC array)."""
    if type(image).__module__.startswith("PIL."):  # a PIL image (PIL imported only if used)
        from torchvision.transforms.functional import pil_to_tensor

        return pil_to_tensor(image)
    if isinstance(image, np.ndarray):
        array = image if image.ndim == 2 else np.moveaxis(image, -1, 0)  # HWC -> CHW
        image = torch.from_numpy(np.ascontiguousarray(array))
    if not isinstance(image, torch.Tensor):
        raise DataError(
            f"{where}: an image must be a PIL image, a tensor or an array; got {type(image).__name__}"
        )
    if image.dim() == 2:
        image = image.unsqueeze(0)
    if image.dim() != 3:
        raise DataError(f"{where}: an image must be [C, H, W]; got shape {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        return image
    if not image.is_floating_point():
        raise DataError(f"{where}: images must be uint8 or float tensors; got {image.dtype}")
    low, high = float(image.min()), float(image.max())
    if low < -1e-6 or high > 1 + 1e-6:
        raise DataError(
            f"{where}: pixels range over [{low:.3g}, {high:.3g}], not [0, 1]: drop Normalize from "
            "the transform (ensc normalizes inside the model) and keep ToTensor / ToImage"
        )
    return image.mul(255).round_().to(torch.uint8)


def class_names(data: TorchData, num_classes: int) -> tuple[str, ...]:
    """The dataset's ``classes`` (looked up through DataLoader/Subset wrappers), else "0", "1", ..."""
    for obj in _wrapped(data):
        classes = getattr(obj, "classes", None)
        if isinstance(classes, (list, tuple)) and len(classes) >= num_classes:
            return tuple(str(c) for c in classes)
    return tuple(str(k) for k in range(num_classes))


def _wrapped(data: Any) -> Iterable[Any]:
    """``data``, then what it wraps (``.dataset`` of a DataLoader or Subset), outermost first."""
    seen = 0
    while data is not None and seen < 10:
        yield data
        data, seen = getattr(data, "dataset", None), seen + 1
