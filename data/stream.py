"""A split read from image files while it is iterated: for data too large to decode into memory.

A :class:`StreamSplit` holds only file names (one numpy bytes array, so that reader processes
share it instead of copying a list of Python strings) and int64 labels. Iterating it
(:meth:`StreamSplit.batches`, reached through :func:`ensc.data.batches.iterate_batches`) reads,
decodes and augments whole batches in ``workers`` DataLoader processes
(:func:`ensc.data.transforms.make_batch`) and yields float32 [B, C, H, W] pixels in [0, 1] as the
in-memory path does (pinned when CUDA is in use).

Deterministic and independent of the number of workers: the shuffle order and one epoch seed are
drawn from the caller's generator when the first batch is asked for; batch k's augmentation is
drawn from a generator seeded with (epoch seed, k). So ``start=k`` jumps straight to batch k
without reading the batches before it, and leaves the caller's generator where an uninterrupted
epoch leaves it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ensc.data.splits import Split, Streamed
from ensc.data.transforms import make_batch
from ensc.errors import DataError

log = logging.getLogger(__name__)

MAX_AUTO_WORKERS = 8  # workers=None: one reader per core, at most this many
STATS_SAMPLE = 2000  # images the channel mean/std of a streamed training split are measured on
READ_BATCH = 64  # images per reader call for take() and the statistics
FINGERPRINT_FORMAT = 1  # bump when what a split's fingerprint covers changes


def auto_workers() -> int:
    """Reader processes when ``--workers`` is not given: one per usable core, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_AUTO_WORKERS, cores))


def file_array(paths: list[str], root: Path) -> np.ndarray:
    """``paths`` relative to ``root`` as a numpy bytes array (one buffer, not N Python objects)."""
    prefix = os.path.join(str(root), "")
    return np.array(
        [os.fsencode(p[len(prefix) :] if p.startswith(prefix) else os.path.relpath(p, root))
         for p in paths],
        dtype=np.bytes_,
    )  # fmt: skip


class StreamedBatches:
    """What every streamed split shares (:class:`StreamSplit`, ``data.torch_stream.TorchStreamSplit``):
    ``take``, ``batches`` and the plain pass over its images, built on what each provides:
    ``labels``, ``channels``, ``image_size``, ``subset`` and ``_uint8_batches`` (batches ``start``
    … ``n_batches`` − 1 of an epoch, given its order and seed, read by DataLoader workers)."""

    def take(self, index: torch.Tensor | None = None) -> Split:
        """The images at ``index`` (all when None) decoded into an in-memory :class:`Split`, as
        evaluation sees them (no augmentation): for the few places that need pixels."""
        part = self if index is None else self.subset(index)
        out = torch.empty((len(part), self.channels, *self.image_size), dtype=torch.uint8)
        done = 0
        for images, _ in part._plain_batches():
            out[done : done + len(images)] = images
            done += len(images)
        return Split(out, part.labels.clone())

    def batches(
        self,
        batch_size: int,
        *,
        gen: torch.Generator | None = None,
        shuffle: bool = False,
        augment_hflip: bool | None = None,
        drop_last: bool = False,
        start: int = 0,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """:func:`ensc.data.batches.iterate_batches` of this split (same arguments, same
        meaning): ``(images float32 [B, C, H, W] in [0, 1], labels int64 [B])``."""
        order, seed, n_batches = epoch_draws(len(self), batch_size, gen=gen, shuffle=shuffle,
                                             augment=augment_hflip is not None,
                                             drop_last=drop_last)  # fmt: skip
        yield from self._uint8_batches(batch_size, order=order, epoch_seed=seed,
                                       hflip=augment_hflip, n_batches=n_batches, start=start,
                                       as_float=True)  # fmt: skip

    def _plain_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every image in split order, uint8, as evaluation sees it, :data:`READ_BATCH` at a time."""
        return self._uint8_batches(READ_BATCH, order=None, epoch_seed=None, hflip=None,
                                   n_batches=-(-len(self) // READ_BATCH))  # fmt: skip


@dataclass(frozen=True, eq=False)
class StreamSplit(StreamedBatches):
    """One split as files: ``root``/``files[i]`` has label ``labels[i]``; images come out at
    ``size`` (H, W) with 3 channels."""

    root: Path
    files: np.ndarray  # relative paths, numpy bytes
    labels: torch.Tensor  # int64 [N]
    size: tuple[int, int]
    workers: int = 0  # reader processes; 0 reads in the calling process

    def __len__(self) -> int:
        return int(self.labels.numel())

    @property
    def channels(self) -> int:
        return 3

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.size)

    def paths(self, index: torch.Tensor | None = None) -> list[str]:
        """The files' full paths (of ``index``, else all)."""
        files = self.files if index is None else self.files[np.asarray(index, dtype=np.int64)]
        root = os.fsencode(self.root)
        return [os.fsdecode(os.path.join(root, f)) for f in files.tolist()]

    def subset(self, index: torch.Tensor) -> StreamSplit:
        """The files at ``index``, still streamed."""
        index = torch.as_tensor(index, dtype=torch.int64)
        return StreamSplit(self.root, self.files[index.numpy()], self.labels[index], self.size,
                           self.workers)  # fmt: skip

    def _uint8_batches(
        self, batch_size: int, *, order: torch.Tensor | None, epoch_seed: int | None,
        hflip: bool | None, n_batches: int, start: int = 0, as_float: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
        """Batches ``start`` … ``n_batches`` − 1, read by the workers (in this process with 0)."""
        data = _Batches(self, batch_size, order, epoch_seed, hflip, as_float)
        batches = range(start, n_batches)
        workers = min(self.workers, len(batches)) if len(batches) > 1 else 0  # 1: not worth a fork
        if workers == 0:
            items = (data[k] for k in batches)
        else:
            items = iter(DataLoader(
                data, batch_size=None, sampler=batches, num_workers=workers,
                pin_memory=as_float and torch.cuda.is_available() and torch.cuda.is_initialized(),
                generator=torch.Generator(),  # worker seeds: not from the global RNG (unused)
            ))  # fmt: skip
        for item in items:
            if isinstance(item, str):  # a DataError in a reader: its own one-line message
                raise DataError(item)
            yield item

    def fingerprint(self) -> str:
        """sha256 of what the split's pixels depend on: each file's path, size and mtime, the
        labels and the size images come out at (the teacher-logits cache key)."""
        digest = hashlib.sha256(f"stream{FINGERPRINT_FORMAT} {tuple(self.size)}".encode())
        for path, rel in zip(self.paths(), self.files.tolist(), strict=True):
            try:
                st = os.stat(path)
            except OSError as err:
                raise DataError(f"cannot read image {path}: {err}") from err
            digest.update(rel + f" {st.st_size} {st.st_mtime_ns}\n".encode())
        digest.update(self.labels.numpy().astype("<i8").tobytes())
        return digest.hexdigest()


class _Batches(Dataset):
    """Batch ``k`` of an epoch as one item: the reader processes' unit of work."""

    def __init__(
        self, split: StreamSplit, batch_size: int, order: torch.Tensor | None,
        epoch_seed: int | None, hflip: bool | None, as_float: bool,
    ) -> None:  # fmt: skip
        self.split, self.batch_size, self.order = split, batch_size, order
        self.epoch_seed, self.hflip, self.as_float = epoch_seed, hflip, as_float

    def __len__(self) -> int:
        return -(-len(self.split) // self.batch_size)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor] | str:
        index = batch_index(self.order, len(self.split), self.batch_size, k)
        gen = None
        if self.epoch_seed is not None:
            gen = torch.Generator().manual_seed(batch_seed(self.epoch_seed, k))
        try:
            images = make_batch(self.split.paths(index), self.split.size, gen=gen,
                                hflip=self.hflip)  # fmt: skip
        except DataError as err:
            return str(err)  # raised again by the reading process, without a worker traceback
        if self.as_float:
            images = images.float().div_(255)
        return images, self.split.labels[index]


def epoch_draws(
    n: int, batch_size: int, *, gen: torch.Generator | None, shuffle: bool, augment: bool,
    drop_last: bool,
) -> tuple[torch.Tensor | None, int | None, int]:  # fmt: skip
    """(shuffle order, epoch seed, number of batches) of an epoch over ``n`` streamed images:
    the order then the seed drawn from ``gen``, the only draws a streamed epoch makes."""
    order = torch.randperm(n, generator=gen) if shuffle else None
    seed = int(torch.randint(0, 2**62, (), generator=gen)) if augment else None
    n_batches = n // batch_size if drop_last and n >= batch_size else -(-n // batch_size)
    return order, seed, n_batches


def batch_index(order: torch.Tensor | None, n: int, batch_size: int, k: int) -> torch.Tensor:
    """The positions in the split of batch ``k`` of an epoch (``order`` None: in split order)."""
    first = k * batch_size
    if order is not None:
        return order[first : first + batch_size]
    return torch.arange(first, min(first + batch_size, n))


def batch_seed(epoch_seed: int, k: int) -> int:
    """The seed of batch ``k``'s augmentation: (epoch seed, k) mixed by numpy's SeedSequence."""
    return int(np.random.SeedSequence([epoch_seed, k]).generate_state(1, np.uint64)[0] >> 1)


def sample_stats(
    split: Streamed, *, n: int = STATS_SAMPLE, seed: int = 0
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units, as :func:`ensc.data.datasets.channel_stats`
    computes them, on a seeded sample of ``n`` images (evaluation view: no augmentation) of any
    streamed split (image files, or a torch Dataset's items)."""
    gen = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(split), generator=gen)[:n].sort().values
    part = split.subset(index)
    s1 = torch.zeros(split.channels, dtype=torch.float64)
    s2 = torch.zeros(split.channels, dtype=torch.float64)
    count = 0
    for images, _ in part._plain_batches():
        x = images.to(torch.float64).div_(255).transpose(0, 1).flatten(1)  # [C, B*H*W]
        s1 += x.sum(1)
        s2 += x.square().sum(1)
        count += x.shape[1]
    count = max(count, 1)
    mean = s1 / count
    var = ((s2 - count * mean.square()) / max(count - 1, 1)).clamp_min(0)
    return tuple(mean.tolist()), tuple(var.sqrt().clamp_min(1e-3).tolist())
