"""A torch ``Dataset`` handed over from Python, streamed: its items are read batch by batch while
the split is iterated, for data too large to read into memory (:mod:`ensc.data.from_torch`
chooses; a torchvision image folder streams from its files, :class:`~ensc.data.stream.StreamSplit`).

A :class:`TorchStreamSplit` holds the dataset, the indices of the split's items in it and their
int64 labels: the dataset's ``.targets`` when it (or a ``Subset`` it is wrapped in) has them, else
read in one pass through ``__getitem__`` (which decodes every image too, and says so in the log).
Iterating it (:meth:`TorchStreamSplit.batches`, reached through
:func:`ensc.data.batches.iterate_batches`) reads each batch with a ``DataLoader`` over the
dataset (``workers`` processes; 0 reads in the calling process) whose batch sampler yields the
epoch's index batches; in the workers each item's image becomes uint8 (:func:`to_uint8`; every
image must have the first one's size) and the batch gets the in-memory augmentation (pad-4 crop +
flip, :func:`ensc.data.batches.augment`, at any image size).

Deterministic as a :class:`~ensc.data.stream.StreamSplit` is, with the same draws: the shuffle
order and one epoch seed come from the caller's generator when the first batch is asked for, and
batch k's augmentation from a generator seeded with (epoch seed, k); so ensc's augmentation does
not depend on the number of workers, and ``start=k`` jumps to batch k without reading the batches
before it. The dataset's own transform runs inside the workers as it is: if it is random, its
draws are not governed by ensc's seed (with workers they come from the workers' seeds, derived
from the epoch seed, so they depend on the number of workers; without, from the global RNG).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ensc.data.batches import augment
from ensc.data.stream import READ_BATCH, StreamedBatches, batch_index, batch_seed
from ensc.errors import DataError

log = logging.getLogger(__name__)

FINGERPRINT_SAMPLE = 64  # items whose pixels a split's fingerprint covers
FINGERPRINT_FORMAT = 1  # bump when what the fingerprint covers changes


@dataclass(frozen=True, eq=False)
class TorchStreamSplit(StreamedBatches):
    """One split as items of a map-style ``dataset``: position i is ``dataset[index[i]]``, with
    label ``labels[i]``; every image comes out as uint8 ``shape`` (C, H, W)."""

    dataset: Dataset
    index: torch.Tensor  # int64 [N]: the items' indices in dataset
    labels: torch.Tensor  # int64 [N]
    shape: tuple[int, int, int]  # of the first item's image: every image must have it
    name: str = "data"  # what messages call the dataset (train_data, ...)
    workers: int = 0  # DataLoader worker processes; 0 reads in the calling process

    def __len__(self) -> int:
        return int(self.labels.numel())

    @property
    def channels(self) -> int:
        return int(self.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.shape[1]), int(self.shape[2])

    def subset(self, index: torch.Tensor) -> TorchStreamSplit:
        """The items at ``index``, still streamed (nothing is read)."""
        index = torch.as_tensor(index, dtype=torch.int64)
        return replace(self, index=self.index[index], labels=self.labels[index])

    def _uint8_batches(
        self, batch_size: int, *, order: torch.Tensor | None, epoch_seed: int | None,
        hflip: bool | None, n_batches: int, start: int = 0, as_float: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
        """Batches ``start`` … ``n_batches`` − 1, read by the DataLoader's workers."""
        batches = range(start, n_batches)
        loader = _loader(
            self.dataset, _KeyBatches(self.index, order, batch_size, batches),
            _Images(self.name, self.shape, epoch_seed, hflip, as_float), self.workers,
            seed=epoch_seed, pin=as_float,
        )  # fmt: skip
        for k, images in zip(batches, loader, strict=True):
            if isinstance(images, str):  # a DataError in a worker: its own one-line message
                raise DataError(images)
            yield images, self.labels[batch_index(order, len(self), batch_size, k)]

    def fingerprint(self) -> str:
        """sha256 of what the split's pixels depend on, as far as ensc can tell without reading
        every item (the teacher-logits cache key): the dataset's type, the items' indices, labels
        and image shape, and the pixels of a seeded *sample* of :data:`FINGERPRINT_SAMPLE` items,
        so an edit that changes only other items' pixels goes unnoticed."""
        kind = type(self.dataset).__qualname__
        digest = hashlib.sha256(
            f"torch{FINGERPRINT_FORMAT} {kind} {len(self)} {self.shape}".encode()
        )
        digest.update(self.index.numpy().astype("<i8").tobytes())
        digest.update(self.labels.numpy().astype("<i8").tobytes())
        gen = torch.Generator().manual_seed(0)
        pick = torch.randperm(len(self), generator=gen)[:FINGERPRINT_SAMPLE].sort().values
        digest.update(self.take(pick).images.numpy().tobytes())
        return digest.hexdigest()


def stream_dataset(dataset: Dataset, name: str, workers: int) -> TorchStreamSplit:
    """Every item of ``dataset`` as a :class:`TorchStreamSplit` (reads its labels, see
    :func:`dataset_labels`, and its first item, for the image shape)."""
    labels = dataset_labels(dataset, name, workers)
    shape = tuple(item_image(dataset[0], f"{name}[0]").shape)
    return TorchStreamSplit(dataset, torch.arange(len(dataset)), labels, shape, name, workers)  # type: ignore[arg-type]


def dataset_labels(dataset: Dataset, name: str, workers: int) -> torch.Tensor:
    """Every item's label: :func:`dataset_targets` when the dataset has them, else one pass over
    the items through ``__getitem__`` (by ``workers`` processes), which the log announces."""
    targets = dataset_targets(dataset)
    if targets is not None:
        return targets
    n = len(dataset)  # type: ignore[arg-type]
    log.info("%s has no .targets: reading its %d items once for their labels (each __getitem__ "
             "call reads its image too; a .targets list of labels avoids this pass)", name, n)  # fmt: skip
    batches = range(-(-n // READ_BATCH))
    keys = _KeyBatches(torch.arange(n), None, READ_BATCH, batches)
    parts = []
    for labels in _loader(dataset, keys, _Labels(name), workers, seed=None, pin=False):
        if isinstance(labels, str):
            raise DataError(labels)
        parts.append(labels)
    return torch.cat(parts)


def dataset_targets(dataset: Any) -> torch.Tensor | None:
    """``dataset.targets`` as int64 labels, looked up through ``Subset`` wrappers; None when there
    are none to trust (absent, of another length, or changed by a ``target_transform``)."""
    targets = getattr(dataset, "targets", None)
    if targets is None and isinstance(dataset, Subset):
        inner = dataset_targets(dataset.dataset)
        index = torch.as_tensor(np.asarray(dataset.indices), dtype=torch.int64)
        return None if inner is None else inner[index]
    if targets is None or getattr(dataset, "target_transform", None) is not None:
        return None
    try:
        labels = torch.as_tensor(np.asarray(targets), dtype=torch.int64)
    except (TypeError, ValueError, RuntimeError):
        return None
    return labels if labels.dim() == 1 and len(labels) == len(dataset) else None


def item_image(item: Any, where: str) -> torch.Tensor:
    """The image of an ``(image, label)`` item as uint8 [C, H, W] (:func:`to_uint8`)."""
    return to_uint8(_pair(item, where)[0], where)


def item_label(item: Any, where: str) -> int:
    """The label of an ``(image, label)`` item, a class index."""
    label = _pair(item, where)[1]
    try:
        return int(label)
    except (TypeError, ValueError, RuntimeError) as err:
        raise DataError(
            f"{where}: the label must be an integer class index; got {type(label).__name__}"
        ) from err


def _pair(item: Any, where: str) -> Sequence[Any]:
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise DataError(f"{where} must be an (image, label) pair; got {type(item).__name__}")
    return item


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


def _loader(
    dataset: Dataset, keys: _KeyBatches, collate: Any, workers: int, *, seed: int | None,
    pin: bool,
) -> DataLoader:  # fmt: skip
    """A DataLoader reading ``keys``' batches of ``dataset`` into ``collate`` (in the calling
    process for a single batch: not worth a fork); its workers' seeds come from ``seed``, never
    from the global RNG."""
    workers = min(workers, len(keys)) if len(keys) > 1 else 0
    return DataLoader(
        _Keyed(dataset), batch_sampler=keys, num_workers=workers, collate_fn=collate,
        pin_memory=pin and torch.cuda.is_available() and torch.cuda.is_initialized(),
        generator=torch.Generator().manual_seed(seed if seed is not None else 0),
    )  # fmt: skip


class _KeyBatches:
    """The batch sampler: batch k of an epoch as ``(k, dataset index)`` keys, for k in ``batches``."""

    def __init__(
        self, index: torch.Tensor, order: torch.Tensor | None, batch_size: int, batches: range
    ) -> None:
        self.index, self.order, self.batch_size, self.batches = index, order, batch_size, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for k in self.batches:
            positions = batch_index(self.order, len(self.index), self.batch_size, k)
            yield [(k, i) for i in self.index[positions].tolist()]


class _Keyed(Dataset):
    """``dataset`` read by ``(batch number, index)`` keys, so that a batch knows its number."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, int, Any]:
        k, i = key
        return k, i, self.dataset[i]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[tuple[int, int, Any]]:
        """A batch at once, through the dataset's own ``__getitems__`` when it has one."""
        indices = [i for _, i in keys]
        getitems = getattr(self.dataset, "__getitems__", None)
        items = getitems(indices) if callable(getitems) else [self.dataset[i] for i in indices]
        return [(k, i, item) for (k, i), item in zip(keys, items, strict=True)]


class _Images:
    """A batch's items as uint8 [B, C, H, W], augmented with batch k's seed when training (float
    in [0, 1] with ``as_float``), or a DataError's message (raised again by the reading process,
    without a worker traceback)."""

    def __init__(
        self, name: str, shape: tuple[int, int, int], epoch_seed: int | None, hflip: bool | None,
        as_float: bool,
    ) -> None:  # fmt: skip
        self.name, self.shape, self.epoch_seed = name, tuple(shape), epoch_seed
        self.hflip, self.as_float = hflip, as_float

    def __call__(self, items: list[tuple[int, int, Any]]) -> torch.Tensor | str:
        try:
            images = torch.stack([self._image(item, f"{self.name}[{i}]") for _, i, item in items])
        except DataError as err:
            return str(err)
        if self.hflip is not None:
            assert self.epoch_seed is not None
            gen = torch.Generator().manual_seed(batch_seed(self.epoch_seed, items[0][0]))
            images = augment(images, gen, hflip=self.hflip)
        return images.float().div_(255) if self.as_float else images

    def _image(self, item: Any, where: str) -> torch.Tensor:
        image = item_image(item, where)
        if tuple(image.shape) != self.shape:
            got, want = ("×".join(map(str, s)) for s in (tuple(image.shape), self.shape))
            raise DataError(
                f"{where} is {got} (C×H×W) but the first image of {self.name} is {want}: give "
                "every image one size (resize them in the dataset's transform)"
            )
        return image


class _Labels:
    """A batch's labels as int64 [B], or a DataError's message."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, items: list[tuple[int, int, Any]]) -> torch.Tensor | str:
        try:
            labels = [item_label(item, f"{self.name}[{i}]") for _, i, item in items]
        except DataError as err:
            return str(err)
        return torch.tensor(labels, dtype=torch.int64)
