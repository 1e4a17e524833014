"""Image folders (one subfolder per class) as uint8 tensors in memory or streamed from disk, a clean
validation folder (``--val-root``), and images brought to the size and channels a model takes.

An image folder may hold images of several sizes; they are stacked at one size (H, W): the size
the model takes when it is known (``DataConfig.image_size``, which ``data.source.data_config_for``
sets from an ensc checkpoint), else the most common size among the training split's images. Every
image of another size is resized to it (bilinear, antialiased, aspect ratio not kept), and the log
says how many were, once per split. Images of another distribution (`ensc eval --ood-data`) are
brought to the model's size the same way and to its channels as well: a grayscale image is
repeated into 3 channels, an RGB image becomes its luminance (:func:`to_input_shape`).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import torch

from ensc.data.mode import choose_mode
from ensc.data.splits import (
    DataConfig,
    Split,
    Streamed,
    balanced_indices,
    split_indices,
)
from ensc.data.stream import StreamSplit, auto_workers, file_array
from ensc.data.transforms import pil_image
from ensc.errors import DataError
from ensc.fileio import not_a_folder

log = logging.getLogger(__name__)


def load_imagefolder(
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
        return Split(decode_images(paths, size, split=split, why=why), labels)

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


def load_val_root(
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
        files = file_array(paths, root)
        return StreamSplit(root, files, labels[index], train.image_size, train.workers)
    images = decode_images(paths, train.image_size, split="--val-root", why="the training size")
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


def decode_images(
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
    images = decode_images(paths, size, split=str(root), why="the size the model takes")
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
