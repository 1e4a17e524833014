"""A user's torch ``Dataset``/``DataLoader`` as an ensc :class:`ImageDataset` (the Python API).

ensc trains on uint8 images and normalizes inside the model (docs/method.md §1), so each item's
image becomes a uint8 tensor: a PIL image or a uint8 tensor as it is, a float tensor with pixels
in [0, 1] scaled by 255 and rounded. Normalized tensors (pixels outside [0, 1]) are refused: the
normalization belongs in the model, where ensc measures and records it.

The splits are held in memory or streamed (``DataConfig.mode``, the API's ``data_mode=``), chosen
as ``--data-mode`` chooses for image folders: ``auto`` streams when every item of every split,
decoded at the first training image's uint8 size, would take more than 25 % of the memory
available now (:mod:`ensc.data.mode`). One log line says which and why, and the returned
``ImageDataset.config`` records the mode used. In memory, every item is read once. Streamed:

- a torchvision ``ImageFolder``/``DatasetFolder`` of image files (``.samples`` of
  (path, class index) and ``.classes``, no ``target_transform``; through DataLoader and Subset
  wrappers) is read from its files by ensc, as ``--dataset imagefolder`` is
  (:class:`~ensc.data.stream.StreamSplit`: RGB, at ``image_size`` or else the most common size in
  a sample of the training files, with ensc's recipe): its own ``transform`` is NOT applied (the
  recipe wants [0, 1] pixels without normalization anyway);
- any other map-style Dataset is read item by item through its ``__getitem__``, its transform
  included, by DataLoader workers (:class:`~ensc.data.torch_stream.TorchStreamSplit`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ensc.data.datasets import split_stats
from ensc.data.imagefolder import sampled_sizes
from ensc.data.mode import MEMORY_SHARE, MODES, auto_mode
from ensc.data.splits import DataConfig, ImageDataset, Split, split_indices, take_subset
from ensc.data.stream import StreamSplit, auto_workers, file_array
from ensc.data.torch_stream import TorchStreamSplit, item_image, item_label, stream_dataset
from ensc.errors import ConfigError, DataError

log = logging.getLogger(__name__)

TorchData = Dataset | DataLoader  # what the API accepts for a split
AnySplit = Split | StreamSplit | TorchStreamSplit
GIB = 2**30


def dataset_from_torch(
    train: TorchData,
    test: TorchData,
    val: TorchData | None = None,
    *,
    config: DataConfig,
    hflip: bool = True,
) -> ImageDataset:
    """The splits, in memory or streamed (``config.mode``, see the module docstring); without
    ``val``, validation is carved from ``train`` by index (no image read) as
    :func:`ensc.data.splits.split_indices` does for ensc's own datasets (``config``: its
    ``val_size``, ``train_subset`` and ``seed``); ``test_subset`` (and, with ``val``,
    ``train_subset``) take class-balanced subsets as for ensc's datasets."""
    sets = {name: torch_dataset(data, name) for name, data in
            (("train_data", train), ("val_data", val), ("test_data", test)) if data is not None}  # fmt: skip
    mode, why = choose_torch_mode(config.mode, sets)
    read = _reader(mode, why, config, sets)
    gen = torch.Generator().manual_seed(config.seed)
    full = read(train, "train_data")
    if val is None:
        train_idx, val_idx = split_indices(full.labels, config, gen)
        train_split, val_split = full.subset(train_idx), full.subset(val_idx)
    else:  # train_subset counts training images only: validation is its own split
        train_split = take_subset(full, config.train_subset, gen, "train_subset")
        val_split = read(val, "val_data")
    test_split = take_subset(read(test, "test_data"), config.test_subset, gen, "test_subset")
    _check_shapes(train_split, {"val_data": val_split, "test_data": test_split}, config)
    classes = class_names(train, int(full.labels.max()) + 1)
    mean, std = split_stats(train_split, seed=config.seed)
    log.info("%s: %d train / %d val / %d test", config.name, len(train_split), len(val_split),
             len(test_split))  # fmt: skip
    return ImageDataset(name=config.name, train=train_split, val=val_split, test=test_split,
                        class_names=classes, mean=mean, std=std, hflip=hflip,
                        config=replace(config, mode=mode))  # fmt: skip


def torch_dataset(data: TorchData, name: str) -> Dataset:
    """The map-style Dataset ``data`` is (or a DataLoader reads); refused when not one or empty."""
    dataset = data.dataset if isinstance(data, DataLoader) else data
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise DataError(
            f"{name} must be a map-style torch Dataset (with __len__ and __getitem__) or a "
            f"DataLoader over one; got {type(data).__name__}"
        )
    if len(dataset) == 0:
        raise DataError(f"{name} is empty")
    return dataset


def choose_torch_mode(mode: str, sets: dict[str, Dataset]) -> tuple[str, str]:
    """``memory`` or ``stream`` for the datasets handed over, and the log line's reason: ``auto``
    weighs every item at the first training image's uint8 size against the memory available."""
    if mode not in MODES:
        raise ConfigError(f"unknown data_mode {mode!r}: choose one of {', '.join(MODES)}")
    n = sum(len(d) for d in sets.values())  # type: ignore[arg-type]
    if mode != "auto":
        doing = (
            f"streaming {n:,} images" if mode == "stream" else f"reading {n:,} images into memory"
        )
        return mode, f'{doing} (data_mode="{mode}")'
    need = n * item_image(sets["train_data"][0], "train_data[0]").numel()
    choice, available = auto_mode(need)
    return choice, _auto_reason(choice, n, need, available)


def _auto_reason(choice: str, n: int, need: int, available: int | None) -> str:
    """Why ``auto`` chose ``choice`` for ``n`` images taking ``need`` bytes decoded."""
    share = round(100 * MEMORY_SHARE)
    if available is None:
        return (f"reading {n:,} images into memory ({_amount(need)} decoded; available memory "
                'unknown; data_mode="stream" to stream them instead)')  # fmt: skip
    if choice == "stream":
        return (f"streaming {n:,} images: decoded they would take {_amount(need)}, more than "
                f'{share} % of the {available / GIB:.1f} GiB available (data_mode="memory" to '
                "read them into memory anyway)")  # fmt: skip
    return (f"reading {n:,} images into memory: {_amount(need)} decoded, within {share} % of the "
            f'{available / GIB:.1f} GiB available (data_mode="stream" to stream them instead)')  # fmt: skip


def _amount(n_bytes: int) -> str:
    """``n_bytes`` in MB below a GiB, else in GiB."""
    return f"{n_bytes / 2**20:.1f} MB" if n_bytes < GIB else f"{n_bytes / GIB:.2f} GiB"


def _reader(
    mode: str, why: str, config: DataConfig, sets: dict[str, Dataset]
) -> Callable[[TorchData, str], AnySplit]:
    """How each split is read in ``mode``; logs the choice (``why``) and, streamed, how."""
    if mode == "memory":
        log.info("%s data: %s", config.name, why)
        return read_split
    workers = config.workers if config.workers is not None else auto_workers()
    folders = [name for name, d in sets.items() if image_folder(d) is not None]
    size = _folder_size(config, sets) if folders else None
    how = [why]
    if size is not None:
        how.append(f"{', '.join(folders)}: image folder{'s' if len(folders) > 1 else ''}, read "
                   f"from the files by ensc at {size[1]}×{size[0]} (W×H), RGB, with ensc's "
                   "augmentation: the dataset's own transform is not applied")  # fmt: skip
    others = [name for name in sets if name not in folders]
    if others:
        how.append(f"{', '.join(others)}: read through __getitem__ (transform included)")
    how.append(f"by {workers} reader processes" if workers else "in the main process")
    log.info("%s data: %s", config.name, "; ".join(how))
    return lambda data, name: stream_split(data, name, size, workers)


def read_split(data: TorchData, name: str) -> Split:
    """Every ``(image, label)`` item of ``data`` (a Dataset, or a DataLoader's dataset) as uint8."""
    dataset = torch_dataset(data, name)
    images, labels = [], []
    for index in range(len(dataset)):
        item = dataset[index]
        images.append(item_image(item, f"{name}[{index}]"))
        labels.append(item_label(item, f"{name}[{index}]"))
    shapes = {tuple(x.shape) for x in images}
    if len(shapes) > 1:
        raise DataError(
            f"{name} images have {len(shapes)} different shapes (e.g. {', '.join(map(str, sorted(shapes)[:3]))}): "
            "resize them to one size in the dataset's transform"
        )
    return Split(torch.stack(images), torch.tensor(labels, dtype=torch.int64))


def stream_split(
    data: TorchData, name: str, size: tuple[int, int] | None, workers: int
) -> StreamSplit | TorchStreamSplit:
    """``data`` streamed: an image folder from its files at ``size``, any other dataset item by item."""
    folder = image_folder(data)
    if folder is not None:
        assert size is not None
        return folder_split(*folder, size, workers)
    return stream_dataset(torch_dataset(data, name), name, workers)


def image_folder(data: Any) -> tuple[Any, np.ndarray | None] | None:
    """(the torchvision ImageFolder/DatasetFolder ``data`` is or wraps in DataLoader and Subset
    wrappers, the indices of its samples in ``data``, None for all) when ensc can read its
    image files itself; else None (no ``.samples``/``.classes``, files that are not images, or a
    ``target_transform`` that changes the labels)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    dataset, index = (data.dataset if isinstance(data, DataLoader) else data), None
    while isinstance(dataset, Subset):
        inner = np.asarray(dataset.indices, dtype=np.int64)
        index, dataset = (inner if index is None else inner[index]), dataset.dataset
    samples = getattr(dataset, "samples", None)
    if not isinstance(samples, list) or not samples or getattr(dataset, "root", None) is None:
        return None
    if not isinstance(getattr(dataset, "classes", None), (list, tuple)):
        return None
    first = samples[0]
    if not isinstance(first, (tuple, list)) or len(first) != 2 or not isinstance(first[1], int):
        return None
    if getattr(dataset, "target_transform", None) is not None:
        return None
    return (dataset, index) if str(first[0]).lower().endswith(IMG_EXTENSIONS) else None


def folder_split(
    folder: Any, index: np.ndarray | None, size: tuple[int, int], workers: int
) -> StreamSplit:
    """The folder dataset's samples at ``index`` (all when None) as a StreamSplit at ``size``."""
    samples = folder.samples if index is None else [folder.samples[i] for i in index.tolist()]
    root = Path(folder.root)
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return StreamSplit(root, file_array([str(p) for p, _ in samples], root), labels, tuple(size),
                       workers)  # fmt: skip


def _folder_size(config: DataConfig, sets: dict[str, Dataset]) -> tuple[int, int]:
    """(H, W) streamed image folders come out at: ``image_size``, else the training split's: the
    most common size in a sample of its files (a folder) or its first image's."""
    if config.image_size:
        return int(config.image_size[0]), int(config.image_size[1])
    train = sets["train_data"]
    folder = image_folder(train)
    if folder is None:  # the folders follow the training images
        shape = item_image(train[0], "train_data[0]").shape
        return int(shape[1]), int(shape[2])
    dataset, index = folder
    samples = dataset.samples if index is None else [dataset.samples[i] for i in index.tolist()]
    sizes = sampled_sizes(samples, config.seed)
    size = sizes.most_common(1)[0][0]  # ties: the size seen first
    if len(sizes) > 1:
        log.warning("train_data's images have %d sizes in a sample of %d; streaming them at the "
                    "most common, %d×%d (W×H): pass image_size= to choose", len(sizes),
                    sizes.total(), size[1], size[0])  # fmt: skip
    return size


def _check_shapes(train: AnySplit, others: dict[str, AnySplit], config: DataConfig) -> None:
    """Every split must have the training images' channels and size; ``image_size``, when given,
    must be theirs (it sizes only image folders, which ensc reads itself)."""
    want = (train.channels, *train.image_size)
    for name, split in others.items():
        got = (split.channels, *split.image_size)
        if got != want:
            raise DataError(
                f"{name} images are {got} but train_data images are {want}: give every split the "
                "same size and channels"
            )
    if config.image_size and tuple(config.image_size) != train.image_size:
        (h, w), (ih, iw) = train.image_size, config.image_size
        raise DataError(
            f"train_data images are {w}×{h} (W×H) but image_size= asks for {iw}×{ih}: resize "
            "them in the dataset's transform, or drop image_size= (it sizes only image folders "
            "that ensc streams from their files)"
        )


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
