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

An image folder may hold images of several sizes; they are stacked at one size (H, W): the size
the model takes when it is known (``DataConfig.image_size``, which ``data.source.data_config_for``
sets from an ensc checkpoint), else the most common size among the training split's images. Every
image of another size is resized to it (bilinear, antialiased, aspect ratio not kept), and the log
says how many were, once per split. Images of another distribution (`ensc eval --ood-data`) are
brought to the model's size the same way and to its channels as well: a grayscale image is
repeated into 3 channels, an RGB image becomes its luminance (:func:`to_input_shape`).
"""

from __future__ import annotations

import gzip
import logging
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ensc.data.catalog import DATASETS
from ensc.data.mode import check_mode, choose_mode
from ensc.data.splits import (
    DataConfig,
    ImageDataset,
    Split,
    balanced_indices,
    split_indices,
    take_subset,
)
from ensc.errors import DataError
from ensc.fileio import not_a_folder

if TYPE_CHECKING:
    from ensc.data.splits import Streamed
    from ensc.data.stream import StreamSplit

log = logging.getLogger(__name__)

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


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
        train, val, test, classes = _load_imagefolder(config, gen)
        mode = "memory" if isinstance(train, Split) else "stream"
    else:
        mode = "memory"  # the named datasets are small: always in memory
        if config.name == "fashion-mnist":
            full, test = _load_fashion_mnist(config)
            classes = FASHION_MNIST_CLASSES
        else:
            full, test, classes = _load_cifar(config)
        train_idx, val_idx = split_indices(full.labels, config, gen)
        train, val = full.subset(train_idx), full.subset(val_idx)
        test = take_subset(test, config.test_subset, gen, "--test-subset")
    if config.val_root is not None:
        val = _load_val_root(config, classes, train, gen)
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
    from ensc.data.stream import sample_stats

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

_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _load_fashion_mnist(config: DataConfig) -> tuple[Split, Split]:
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


def _load_cifar(config: DataConfig) -> tuple[Split, Split, list[str]]:
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


def _load_imagefolder(
    config: DataConfig, gen: torch.Generator
) -> tuple[Split | StreamSplit, Split | StreamSplit, Split | StreamSplit, list[str]]:
    """Scan train/ and test/ (or val/, ImageNet's layout), choose the indices to use, then decode
    only those images, or stream them (``config.mode``, :mod:`ensc.data.mode`)."""
    from torchvision.datasets import ImageFolder

    if config.root is None:
        raise DataError(
            "--dataset imagefolder needs --data-root DIR with train/ and test/ subfolders"
        )
    scans = {}
    for part in ("train", "test"):
        folder = Path(config.root) / part
        if part == "test" and not folder.is_dir() and (Path(config.root) / "val").is_dir():
            folder = Path(config.root) / "val"  # ImageNet: train/ and val/
            log.info("%s has no test/ folder: its val/ images are the test split", config.root)
        if not folder.is_dir():
            raise DataError(
                f"{folder} {not_a_folder(folder)}: --data-root must hold train/ and test/ subfolders "
                "(or train/ and val/)"
            )
        try:
            scans[part] = ImageFolder(str(folder), loader=lambda p: p)  # scan only; decode below
        except (FileNotFoundError, RuntimeError) as err:
            raise DataError(f"no images found in {folder}: {err}") from err
    if scans["train"].classes != scans["test"].classes:
        test_name = Path(scans["test"].root).name
        raise DataError(f"train/ and {test_name}/ of {config.root} have different class folders")

    def decode(
        part: str, index: torch.Tensor, split: str, size: tuple[int, int] | None, why: str
    ) -> Split:
        scan = scans[part]
        labels = torch.tensor(scan.targets, dtype=torch.int64)[index]
        paths = [scan.samples[i][0] for i in index.tolist()]
        return Split(_decode_images(paths, size, split=split, why=why), labels)

    train_idx, val_idx = split_indices(torch.tensor(scans["train"].targets), config, gen)
    test_labels = torch.tensor(scans["test"].targets)
    test_idx = torch.arange(len(test_labels))
    if config.test_subset is not None and config.test_subset < len(test_labels):
        test_idx = balanced_indices(test_labels, config.test_subset, gen)
    size = tuple(config.image_size) if config.image_size else None
    if config.mode != "memory":
        sizes = Counter({size: 1}) if size else sampled_sizes(scans["train"].samples, config.seed)
        stream_size = sizes.most_common(1)[0][0]  # ties: the size seen first
        n_images = len(train_idx) + len(val_idx) + len(test_idx)
        if choose_mode(config.mode, n_images, 3 * stream_size[0] * stream_size[1]) == "stream":
            if len(sizes) > 1:
                log.warning(
                    "the training images have %d sizes in a sample of %d; streaming them at the "
                    "most common, %d×%d (W×H): pass --image-size to choose", len(sizes),
                    sizes.total(), stream_size[1], stream_size[0],
                )  # fmt: skip
            return _stream_imagefolder(config, scans, (train_idx, val_idx, test_idx), stream_size)
    why = "the size the model takes" if size else "the most common size in the training split"
    train = decode("train", train_idx, "train", size, why)
    size = int(train.images.shape[2]), int(train.images.shape[3])  # val and test follow train
    # with --val-root, validation comes from that folder (load_dataset): none carved here
    val = decode("train", val_idx, "val", size, why) if len(val_idx) else train.subset(val_idx)
    return train, val, decode("test", test_idx, "test", size, why), scans["train"].classes


def _load_val_root(
    config: DataConfig, classes: list[str] | tuple[str, ...], train: Split | Streamed,
    gen: torch.Generator,
) -> Split | Streamed:  # fmt: skip
    """The validation split from ``config.val_root`` (class subfolders named as the training
    classes), at the training images' size and channels; streamed when training is, and a
    class-balanced ``val_size`` subset of it when given."""
    from torchvision.datasets import ImageFolder

    root = Path(config.val_root)
    if not root.is_dir():
        raise DataError(
            f"--val-root {root} {not_a_folder(root)}: give a folder of held-out images with one "
            "subfolder per class"
        )
    try:
        scan = ImageFolder(str(root), loader=lambda p: p)  # scan only
    except (FileNotFoundError, RuntimeError) as err:
        raise DataError(f"no images found in --val-root {root}: {err}") from err
    labels = torch.tensor(scan.targets, dtype=torch.int64)
    labels = _val_root_labels(root, scan.classes, classes)[labels]  # folder order -> training order
    index = torch.arange(len(labels))
    if config.val_size is not None and config.val_size < len(labels):
        index = balanced_indices(labels, config.val_size, gen)
    paths = [scan.samples[i][0] for i in index.tolist()]
    log.info("validation: %d images from --val-root %s (none carved from train)", len(paths), root)
    if not isinstance(train, Split):  # streamed training: stream validation too
        from ensc.data.stream import StreamSplit, file_array

        files = file_array(paths, root)
        return StreamSplit(root, files, labels[index], train.image_size, train.workers)
    images = _decode_images(paths, train.image_size, split="--val-root", why="the training size")
    return Split(to_input_shape(images, train.channels, train.image_size), labels[index])


def _val_root_labels(
    root: Path, folders: list[str], classes: list[str] | tuple[str, ...]
) -> torch.Tensor:
    """The training label of each class folder of ``--val-root`` (matched by name, a ``/`` in a
    class name written ``_``); one line naming the folders that are no training class."""
    index = {c.replace("/", "_"): k for k, c in enumerate(classes)}
    unknown = [f for f in folders if f not in index]
    if unknown:
        raise DataError(
            f"--val-root {root} has class folders that are no training class: "
            f"{', '.join(unknown[:5])}; name them as the training classes "
            f"({', '.join(index)})"
        )
    missing = sorted(set(index) - set(folders))
    if missing:
        log.warning("--val-root %s has no images of %s", root, ", ".join(missing))
    return torch.tensor([index[f] for f in folders], dtype=torch.int64)


def sampled_sizes(
    samples: list[tuple[str, int]], seed: int, n: int = 200
) -> Counter[tuple[int, int]]:
    """How many of a seeded sample of ``n`` files have each (H, W), read from their headers: a
    streamed split without ``image_size`` takes the most common for all its images."""
    from PIL import Image

    pick = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))[:n]
    sizes: Counter[tuple[int, int]] = Counter()
    for i in pick.sort().values.tolist():
        path = samples[i][0]
        try:
            with Image.open(path) as img:
                sizes[img.height, img.width] += 1
        except (OSError, Image.DecompressionBombError) as err:  # the bomb is no OSError
            raise DataError(f"cannot decode image {path}: {err}") from err
    return sizes


def _stream_imagefolder(
    config: DataConfig, scans: dict, index: tuple[torch.Tensor, ...], size: tuple[int, int]
) -> tuple[StreamSplit, StreamSplit, StreamSplit, list[str]]:
    """Train, val and test as :class:`~ensc.data.stream.StreamSplit` s over the chosen files."""
    from ensc.data.stream import StreamSplit, auto_workers, file_array

    workers = config.workers if config.workers is not None else auto_workers()
    root = Path(config.root)

    def stream(part: str, idx: torch.Tensor) -> StreamSplit:
        scan = scans[part]
        files = file_array([scan.samples[i][0] for i in idx.tolist()], root)
        labels = torch.tensor(scan.targets, dtype=torch.int64)[idx]
        return StreamSplit(root, files, labels, tuple(size), workers)

    train_idx, val_idx, test_idx = index
    log.info("imagefolder: streamed at %d×%d (W×H) by %s", size[1], size[0],
             f"{workers} reader processes" if workers else "the main process")  # fmt: skip
    return (stream("train", train_idx), stream("train", val_idx), stream("test", test_idx),
            scans["train"].classes)  # fmt: skip


def _decode_images(
    paths: list[str],
    size: tuple[int, int] | None = None,
    *,
    split: str = "this split",
    why: str = "the most common size among them",
) -> torch.Tensor:
    """Decode image files to one uint8 [N, 3, H, W] tensor, (H, W) = ``size``.

    Images of another size are resized (bilinear, antialiased) to ``size``, or with ``size=None``
    to the most common size among them (the first image's on a tie); a warning says how many of
    the ``split`` images were, of which sizes, and ``why`` that size.
    """
    from torchvision.transforms.v2.functional import resize
    from tqdm import tqdm

    from ensc.data.transforms import pil_image

    out: torch.Tensor | None = None
    sizes: Counter[tuple[int, int]] = Counter()  # (H, W) -> images of that size
    odd: dict[int, torch.Tensor] = {}  # size=None: images of another size than out's, for later
    for i, path in enumerate(
        tqdm(
            paths,
            desc="decoding images",
            unit="img",
            leave=False,
            disable=True if len(paths) < 5000 else None,
        )  # None: off without a terminal
    ):
        img = pil_image(path)  # RGB uint8 [3, H, W]; 16-bit files scaled to 8 bits
        hw = int(img.shape[1]), int(img.shape[2])
        sizes[hw] += 1
        if out is None:
            out = torch.empty((len(paths), 3, *(size or hw)), dtype=torch.uint8)
        if hw == tuple(out.shape[2:]):
            out[i] = img
        elif size is not None:
            out[i] = resize(img, list(size), antialias=True)
        else:
            odd[i] = img
    if out is None:
        raise DataError("no images to decode")
    if size is None:
        size = sizes.most_common(1)[0][0]  # ties: the size seen first
        if size != tuple(out.shape[2:]):  # the first image had an unusual size: restack at `size`
            rows = torch.tensor([i for i in range(len(paths)) if i not in odd], dtype=torch.long)
            first, out = out, torch.empty((len(paths), 3, *size), dtype=torch.uint8)
            out[rows] = resize(first[rows], list(size), antialias=True)
            del first
        for i, img in odd.items():
            out[i] = (
                img if tuple(img.shape[1:]) == size else resize(img, list(size), antialias=True)
            )
    _log_resized(sizes, tuple(size), split, why)
    return out


def _log_resized(
    sizes: Counter[tuple[int, int]], size: tuple[int, int], split: str, why: str
) -> None:
    """Warn that ``N of M images in <split> were W×H, resized to W×H``; nothing if none was."""
    others = sorted(((n, hw) for hw, n in sizes.items() if hw != size), reverse=True)
    if not others:
        return
    n_odd = sum(n for n, _ in others)
    listing = ", ".join(f"{w}×{h}" + (f" ({n})" if len(others) > 1 else "") for n, (h, w) in others)
    log.warning(
        "%d of %d images in %s %s %s, resized to %d×%d (W×H; %s)",
        n_odd, sum(sizes.values()), split, "was" if n_odd == 1 else "were", listing,
        size[1], size[0], why,
    )  # fmt: skip


# --- images of another distribution (`ensc eval --ood-data`) -------------------------------


def load_test_split(config: DataConfig) -> Split:
    """Only the test split of a named dataset (``test_subset`` applied, class-balanced and seeded):
    no validation split is carved and no statistics are measured."""
    if config.name == "fashion-mnist":
        _, test = _load_fashion_mnist(config)
    elif config.name in ("cifar10", "cifar100"):
        _, test, _ = _load_cifar(config)
    else:
        raise DataError(
            f"load_test_split reads fashion-mnist, cifar10 or cifar100, not {config.name!r}"
        )
    gen = torch.Generator().manual_seed(config.seed)
    return take_subset(test, config.test_subset, gen, "--test-subset")


def load_image_files(
    root: Path, size: tuple[int, int], *, subset: int | None = None, seed: int = 0
) -> Split:
    """Every image file under ``root``, at any depth (an ImageFolder's class folders or a flat
    folder), decoded as RGB and resized to ``size`` (bilinear, antialiased, aspect ratio not
    kept); with ``subset``, a seeded random choice of that many files. Labels are -1 (none)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} {not_a_folder(root)}: pass a folder of images")
    paths = sorted(
        str(p) for p in root.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file()
    )
    if not paths:
        raise DataError(f"no images found in {root} ({', '.join(IMG_EXTENSIONS)})")
    if subset is not None and subset < len(paths):
        pick = torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed))[:subset]
        paths = [paths[i] for i in pick.sort().values.tolist()]
    images = _decode_images(paths, size, split=str(root), why="the size the model takes")
    return Split(images, torch.full((len(paths),), -1, dtype=torch.int64))


def to_input_shape(images: torch.Tensor, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [N, C, H, W] images as a model taking ``channels`` × ``size`` images gets them.

    Grayscale to RGB repeats the channel; RGB to grayscale takes the luminance
    0.299 R + 0.587 G + 0.114 B (ITU-R 601, PIL's "L" mode), rounded; another size is resized
    (bilinear, antialiased, aspect ratio not kept), as image folders are.
    """
    c = int(images.shape[1])
    if c != channels:
        if c == 1:
            images = images.repeat(1, channels, 1, 1)
        elif c == 3 and channels == 1:
            weights = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32).view(1, 3, 1, 1)
            gray = (images.float() * weights).sum(1, keepdim=True)
            images = gray.round_().clamp_(0, 255).to(torch.uint8)
        else:
            raise DataError(
                f"cannot turn {c}-channel images into the {channels} channels the model takes"
            )
    if tuple(images.shape[2:]) != tuple(size):
        from torchvision.transforms.v2.functional import resize

        images = resize(images, list(size), antialias=True)
    return images.contiguous()
