"""What a dataset is once loaded: its config, its splits and how they are cut.

A split in memory is a :class:`Split` (``uint8 [N, C, H, W]`` images and int64 labels); a split
streamed from disk (:class:`ensc.data.stream.StreamSplit`) or read from a torch Dataset
(:class:`ensc.data.torch_stream.TorchStreamSplit`) answers the same ``len``, ``labels``,
``channels``, ``image_size``, ``subset`` and ``take``. Validation is carved from the training
images by :func:`split_indices` unless a clean validation folder is given (``val_root``).
This module imports no other module of :mod:`ensc.data`: every other one builds on it (streamed
splits are typed by the :class:`Streamed` protocol, which they implement).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ensc.errors import DataError, plural

VAL_FRACTION = 0.1  # validation carved from train: 10 % ...
VAL_CAP = 5000  # ... capped at 5,000 images


@dataclass(frozen=True)
class DataConfig:
    """Which dataset to load and how to cut it."""

    name: str  # one of DATASETS
    root: Path | None = None  # where the files are; None = the dataset's default location
    val_size: int | None = None  # images carved from train for validation; None = 10 %, max 5,000
    train_subset: int | None = None  # class-balanced training subset (validation taken from it)
    # a folder of held-out images (one subfolder per class, the training classes) to validate on
    # instead of carving validation from the training images (which a third-party teacher may
    # have trained on); with it, val_size subsets it and train_subset counts training images only
    val_root: Path | None = None
    test_subset: int | None = None  # class-balanced test subset
    seed: int = 0  # seeds the validation split and the subsets (not training)
    download: bool = False  # allow torchvision to download fashion-mnist / cifar when missing
    # imagefolder: (H, W) every image is resized to; None = the most common size in the training split
    image_size: tuple[int, int] | None = None
    # imagefolder: "memory" decodes every image once, "stream" reads them while iterating
    # (ensc.data.stream), "auto" streams what would not fit comfortably in memory (ensc.data.mode);
    # a loaded dataset's ImageDataset.config holds the mode used (never "auto"): record that one
    mode: str = "auto"
    workers: int | None = None  # stream: reader processes; None = one per core, at most 8


class Streamed(Protocol):
    """A split read while iterating: image files (``data.stream.StreamSplit``) or a torch
    Dataset's items (``data.torch_stream.TorchStreamSplit``). Both implement this, so that this
    module needs neither (the modules of :mod:`ensc.data` import one way, from here outwards)."""

    labels: torch.Tensor

    def __len__(self) -> int: ...

    @property
    def channels(self) -> int: ...

    @property
    def image_size(self) -> tuple[int, int]: ...

    def subset(self, index: torch.Tensor) -> Streamed: ...

    def take(self, index: torch.Tensor | None = None) -> Split: ...

    def batches(
        self, batch_size: int, *, gen: torch.Generator | None = None, shuffle: bool = False,
        augment_hflip: bool | None = None, drop_last: bool = False, start: int = 0,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...  # fmt: skip


@dataclass(frozen=True)
class Split:
    """One split: ``images`` uint8 [N, C, H, W], ``labels`` int64 [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.numel())

    def subset(self, index: torch.Tensor) -> Split:
        return Split(self.images[index], self.labels[index])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def take(self, index: torch.Tensor | None = None) -> Split:
        """The images at ``index`` (all when None) as an in-memory split: the one way to get
        pixels from any split (a :class:`~ensc.data.stream.StreamSplit` decodes them)."""
        return self if index is None else self.subset(index)


@dataclass(frozen=True)
class ImageDataset:
    """The three splits of a dataset plus what a model needs to know about its inputs."""

    name: str
    train: Split | Streamed
    val: Split | Streamed
    test: Split | Streamed
    class_names: tuple[str, ...]
    mean: tuple[float, ...]  # per-channel pixel mean of the training split, in [0, 1] units
    std: tuple[float, ...]
    hflip: bool  # whether horizontal flips are a valid augmentation for this data
    # what load_dataset loaded, with ``mode`` as used ("memory" or "stream", never "auto"): the
    # DataConfig to record with a model, so that later loads preprocess its images the same way;
    # None for data made elsewhere (torch datasets)
    config: DataConfig | None = None

    @property
    def channels(self) -> int:
        return self.train.channels

    @property
    def image_size(self) -> tuple[int, int]:
        return self.train.image_size

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def balanced_indices(labels: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` seeded indices spread evenly over the classes (the first ``n % K`` get one more)."""
    classes = labels.unique()
    per_class, extra = divmod(n, len(classes))
    picked = []
    for i, c in enumerate(classes.tolist()):
        members = (labels == c).nonzero().flatten()
        want = min(per_class + (i < extra), len(members))
        picked.append(members[torch.randperm(len(members), generator=gen)[:want]])
    return torch.cat(picked).sort().values


def split_indices(
    labels: torch.Tensor, config: DataConfig, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and validation indices into the full training set.

    Validation is drawn from a fixed pool — the first min(10 %, 5,000) images of a seeded
    permutation (or ``val_size`` if larger) — and training images from the rest. So validation
    never overlaps a training subset drawn with the same seed, whatever ``train_subset`` is: a
    student distilled on another subset than its teacher still gets a held-out validation split.
    ``train_subset`` N counts both (N − val_size class-balanced training images).

    With ``config.val_root`` nothing is carved: every training image (or a class-balanced
    ``train_subset`` of them) trains, and the validation indices are empty (the loader reads the
    validation images from that folder).
    """
    n_full = len(labels)
    if config.val_root is not None:
        keep = torch.arange(n_full)
        if config.train_subset is not None and config.train_subset < n_full:
            keep = balanced_indices(labels, config.train_subset, gen)
        return keep, torch.empty(0, dtype=torch.int64)
    n = min(config.train_subset or n_full, n_full)
    val_size = (
        config.val_size if config.val_size is not None else min(int(n * VAL_FRACTION), VAL_CAP)
    )
    if n < 2 or (config.val_size is None and val_size < 1):  # 10 % of n is under one image
        cut = config.train_subset is not None and config.train_subset < n_full
        what = f"--train-subset {n}" if cut else f"the training set ({plural(n, 'image')})"
        smallest = config.val_size + 1 if config.val_size else round(1 / VAL_FRACTION)
        fix = f"use --train-subset {smallest} or more" if cut else "add images"
        if n >= 2:
            fix += f", or pass --val-size between 1 and {n - 1}"
        raise DataError(f"{what} is too small to carve a validation split from: {fix}")
    if not 0 < val_size < n:
        raise DataError(
            f"--val-size must be between 1 and {n - 1} for {n} training images, got {val_size}"
        )
    pool = max(min(int(n_full * VAL_FRACTION), VAL_CAP), val_size)
    order = torch.randperm(n_full, generator=gen)
    val_idx, rest = order[:val_size], order[pool:]
    n_train = n - val_size
    if n_train < len(rest):
        rest = rest[balanced_indices(labels[rest], n_train, gen)]
    return rest.sort().values, val_idx.sort().values


def take_subset(
    split: Split | Streamed, n: int | None, gen: torch.Generator, flag: str
) -> Split | Streamed:
    """A class-balanced, seeded subset of ``n`` images of ``split`` (all of it if ``n`` is None or
    not smaller); ``flag`` names the option in the error for ``n < 1``."""
    if n is None or n >= len(split):
        return split
    if n < 1:
        raise DataError(f"{flag} must be a positive number of images, got {n}")
    return split.subset(balanced_indices(split.labels, n, gen))
