"""Batches of a split for training and prediction, with the CIFAR augmentation drawn per batch."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ensc.data.splits import Split, Streamed


def augment(
    images: torch.Tensor, gen: torch.Generator, *, pad: int = 4, hflip: bool = True
) -> torch.Tensor:
    """Standard CIFAR augmentation on a batch: zero-pad, random crop per image, random h-flip.

    Works on any dtype [B, C, H, W]; each image gets its own crop offset and flip.
    """
    b, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b, 1, 1), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b, 1, 1), generator=gen)
    rows = (torch.arange(h).view(1, h, 1) + dy).expand(b, h, w)  # [B, H, W]
    cols = torch.arange(w).view(1, 1, w) + dx
    if hflip:
        flip = torch.rand(b, 1, 1, generator=gen) < 0.5
        cols = torch.where(flip, cols.flip(-1), cols)
    cols = cols.expand(b, h, w)
    batch = torch.arange(b).view(b, 1, 1).expand(b, h, w)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def iterate_batches(
    split: Split | Streamed,
    batch_size: int,
    *,
    gen: torch.Generator | None = None,
    shuffle: bool = False,
    augment_hflip: bool | None = None,
    drop_last: bool = False,
    start: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(images float32 [B, C, H, W] in [0, 1], labels int64 [B])``.

    ``augment_hflip=None`` means no augmentation; True/False augments with/without flips.
    ``start`` skips the first ``start`` batches, leaving ``gen`` exactly as if they had been
    drawn (a run resumed mid-epoch sees the batches an uninterrupted run would). A streamed
    split reads its batches as they are asked for (:meth:`~ensc.data.stream.StreamSplit.batches`).
    """
    if not isinstance(split, Split):
        return split.batches(batch_size, gen=gen, shuffle=shuffle, augment_hflip=augment_hflip,
                             drop_last=drop_last, start=start)  # fmt: skip
    return _memory_batches(split, batch_size, gen=gen, shuffle=shuffle,
                           augment_hflip=augment_hflip, drop_last=drop_last, start=start)  # fmt: skip


def _memory_batches(
    split: Split,
    batch_size: int,
    *,
    gen: torch.Generator | None,
    shuffle: bool,
    augment_hflip: bool | None,
    drop_last: bool,
    start: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`iterate_batches` of a split held in memory."""
    n = len(split)
    order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for k, first in enumerate(range(0, stop, batch_size)):
        idx = order[first : first + batch_size]
        if k < start:  # skipped: draw its augmentation, so later batches get the same draws
            if augment_hflip is not None:
                augment(split.images[idx[:0]].new_empty((len(idx), 1, 1, 1)), gen,
                        hflip=augment_hflip)  # fmt: skip
            continue
        images = split.images[idx]
        if augment_hflip is not None:
            images = augment(images, gen, hflip=augment_hflip)
        yield images.float().div_(255), split.labels[idx]


def steps_per_epoch(n: int, batch_size: int, drop_last: bool = True) -> int:
    """Number of batches ``iterate_batches`` yields for ``n`` images."""
    if drop_last and n >= batch_size:
        return n // batch_size
    return -(-n // batch_size)
