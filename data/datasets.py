"""Datasets as decoded uint8 tensors, with seeded splits, class-balanced subsets and batched augmentation.

Small image datasets (Fashion-MNIST, CIFAR, a folder of thumbnails) fit in memory once decoded, so
ensc decodes them a single time into a ``uint8 [N, C, H, W]`` tensor and augments whole batches on
the fly: no per-sample PIL work in the training loop. Pixels reach models in [0, 1]; the
normalization lives inside the model (docs/method.md §1), so ``mean``/``std`` here are only
*measured* on the training split and handed to the model builder. An image folder too large for
that is streamed from disk instead (:mod:`ensc.data.stream`, chosen by :mod:`ensc.data.mode`), and
a large torch Dataset handed over from Python is read item by item (:mod:`ensc.data.torch_stream`);
every kind of split answers ``len``, ``labels``, ``channels``, ``image_size``, ``subset``, ``take``
(the pixels, in memory) and :func:`iterate_batches`.

The built-in datasets are read by :mod:`ensc.data.builtin`, image folders by
:mod:`ensc.data.imagefolder`; this module loads any of them and measures their statistics.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch

from ensc.data.builtin import FASHION_MNIST_CLASSES, load_cifar, load_fashion_mnist
from ensc.data.catalog import DATASETS
from ensc.data.imagefolder import load_imagefolder, load_val_root
from ensc.data.mode import check_mode
from ensc.data.splits import (
    DataConfig,
    ImageDataset,
    Split,
    Streamed,
    split_indices,
    take_subset,
)
from ensc.data.stream import sample_stats
from ensc.errors import DataError
from ensc.fileio import not_a_folder

log = logging.getLogger(__name__)


def load_dataset(config: DataConfig) -> ImageDataset:
    """Load, split and subset the dataset named in ``config``.

    The result's ``config`` is ``config`` with the mode actually used: ``auto`` chooses from the
    memory available now and the number of images (:mod:`ensc.data.mode`), and memory and stream
    preprocess images above 64 px differently (and draw other augmentations at any size), so
    whoever records the data a model was trained on records ``data.config``, not ``config``.
    """
    if config.name not in DATASETS:
        raise DataError(f"unknown dataset {config.name!r}: choose one of {', '.join(DATASETS)}")
    if config.root is not None and Path(config.root).exists() and not Path(config.root).is_dir():
        raise DataError(
            f"--data-root {config.root} {not_a_folder(config.root)}: "
            "point it at the folder that holds the dataset"
        )
    check_mode(config.mode, config.name)
    gen = torch.Generator().manual_seed(config.seed)
    if config.name == "imagefolder":
        train, val, test, classes = load_imagefolder(config, gen)
        mode = "memory" if isinstance(train, Split) else "stream"
    else:
        mode = "memory"  # the named datasets are small: always in memory
        if config.name == "fashion-mnist":
            full, test = load_fashion_mnist(config)
            classes = FASHION_MNIST_CLASSES
        else:
            full, test, classes = load_cifar(config)
        train_idx, val_idx = split_indices(full.labels, config, gen)
        train, val = full.subset(train_idx), full.subset(val_idx)
        test = take_subset(test, config.test_subset, gen, "--test-subset")
    if config.val_root is not None:
        val = load_val_root(config, classes, train, gen)
    mean, std = split_stats(train, seed=config.seed)
    log.info("%s: %d train / %d val / %d test", config.name, len(train), len(val), len(test))
    return ImageDataset(
        name=config.name,
        train=train,
        val=val,
        test=test,
        class_names=tuple(classes),
        mean=mean,
        std=std,
        hflip=config.name != "fashion-mnist",  # garments have a canonical orientation
        config=replace(config, mode=mode),
    )


def split_stats(
    split: Split | Streamed, *, seed: int = 0
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """:func:`channel_stats` of a split's images; of a seeded sample of them when streamed."""
    if isinstance(split, Split):
        return channel_stats(split.images)
    return sample_stats(split, seed=seed)


STATS_CHUNK = 2048  # images converted to float64 at a time by channel_stats


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (sample) std of uint8 images [N, C, H, W], in [0, 1] pixel units.

    Two float64 passes over chunks of :data:`STATS_CHUNK` images, so the extra memory is one
    chunk's, not 16 bytes per pixel value of the whole split (2.2 GB for CIFAR-10's 138 MB).
    """
    channels = images.shape[1]
    n = images.numel() // channels  # values per channel
    chunks = [images[i : i + STATS_CHUNK] for i in range(0, len(images), STATS_CHUNK)]
    total = sum(c.to(torch.float64).sum((0, 2, 3)) for c in chunks)
    mean = total / (255 * n)
    centred = (c.to(torch.float64).div_(255).sub_(mean.view(1, -1, 1, 1)) for c in chunks)
    squares = sum(x.square_().sum((0, 2, 3)) for x in centred)
    std = (squares / max(1, n - 1)).sqrt()
    return tuple(mean.tolist()), tuple(std.clamp_min(1e-3).tolist())


# --- Fashion-MNIST ---------------------------------------------------------------------------


def load_test_split(config: DataConfig) -> Split:
    """Only the test split of a named dataset (``test_subset`` applied, class-balanced and seeded):
    no validation split is carved and no statistics are measured."""
    if config.name == "fashion-mnist":
        _, test = load_fashion_mnist(config)
    elif config.name in ("cifar10", "cifar100"):
        _, test, _ = load_cifar(config)
    else:
        raise DataError(
            f"load_test_split reads fashion-mnist, cifar10 or cifar100, not {config.name!r}"
        )
    gen = torch.Generator().manual_seed(config.seed)
    return take_subset(test, config.test_subset, gen, "--test-subset")
