"""Image files to a uint8 batch at the model's size, with or without training augmentation.

What a streamed split (:mod:`ensc.data.stream`) runs in its reader processes, one whole batch per
call. Two regimes, by the model's input size (H, W):

- small (both sides ≤ :data:`SMALL_MAX`, CIFAR-like): every image is resized (bilinear,
  antialiased, aspect ratio not kept) to (H, W), as the in-memory loader does; training adds the
  same pad-4 random crop + flip (:func:`ensc.data.batches.augment`);
- large (ImageNet-like): training takes a RandomResizedCrop (area 8–100 %, aspect 3/4–4/3) to
  (H, W) plus a flip; evaluation resizes the image (aspect ratio kept) to cover (H, W) × 256/224
  and takes the centre (H, W).

Randomness comes only from the generator passed in, so a batch is a function of its files and
its seed, whichever process makes it. Files are read with ``torchvision.io`` (libjpeg-turbo, the
same pixels as PIL for JPEGs, 6x faster); what it cannot decode goes through PIL. torchvision 0.29
deprecates these decoders in favour of TorchCodec and warns at every call: that warning is
silenced here (the user can do nothing about it); move to TorchCodec when torchvision drops them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

from ensc.data.batches import augment
from ensc.errors import DataError

SMALL_MAX = 64  # sides up to this use the CIFAR recipe, larger ones the ImageNet recipe
EVAL_ZOOM = 256 / 224  # evaluation: resize to cover size × this, then centre crop
RRC_SCALE = (0.08, 1.0)  # RandomResizedCrop: share of the image's area ...
RRC_RATIO = (3 / 4, 4 / 3)  # ... and aspect ratio (w/h) of the crop
_DEPRECATED = "The image decoding and encoding capabilities of TorchVision are deprecated"


def is_small(size: tuple[int, int]) -> bool:
    """Whether (H, W) gets the CIFAR recipe (pad-crop, plain resize) rather than ImageNet's."""
    return max(size) <= SMALL_MAX


def read_image(path: str) -> torch.Tensor:
    """One file as RGB uint8 [3, H, W] (grayscale and CMYK converted, EXIF orientation ignored
    as PIL's loader ignores it). A 16-bit PNG, which torchvision decodes to uint16, is scaled to
    8 bits (its high byte, the pixels :func:`pil_image` gives in memory)."""
    from torchvision.io import ImageReadMode, decode_image, read_file
    from torchvision.transforms.v2.functional import to_dtype

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", _DEPRECATED, DeprecationWarning)
            data = read_file(path)
            image = decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError:  # a format torchvision does not decode (BMP, TIFF, PPM, ...): PIL
        return pil_image(path)
    return image if image.dtype == torch.uint8 else to_dtype(image, torch.uint8, scale=True)


def pil_image(path: str) -> torch.Tensor:
    """One file decoded by PIL as RGB uint8 [3, H, W]: how the in-memory path reads every file.

    PIL reads 16-bit RGB(A) as its high bytes, but converts 16-bit grayscale (modes ``I;16*``,
    ``I``) to RGB by clipping at 255: those are scaled to their high byte too, as
    :func:`read_image` scales torchvision's uint16.
    """
    import numpy as np
    from PIL import Image

    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            if img.mode.startswith("I;16") or img.mode == "I":
                gray = np.clip(np.asarray(img).astype(np.int64), 0, 65535) >> 8
                return torch.from_numpy(gray.astype(np.uint8)).unsqueeze(0).repeat(3, 1, 1)
            rgb = np.asarray(img.convert("RGB"))
    except (OSError, Image.DecompressionBombError) as err:  # the bomb is no OSError
        raise DataError(f"cannot decode image {path}: {err}") from err
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def make_batch(
    paths: Sequence[str],
    size: tuple[int, int],
    *,
    gen: torch.Generator | None = None,
    hflip: bool | None = None,
) -> torch.Tensor:
    """The images at ``paths`` as uint8 [B, 3, H, W]; ``hflip`` None: evaluation (no
    augmentation), True/False: training augmentation with/without flips, drawn from ``gen``."""
    images = [read_image(p) for p in paths]
    if is_small(size):
        batch = _stack([_fit(img, size) for img in images], size)
        return batch if hflip is None else augment(batch, gen, hflip=hflip)
    if hflip is None:
        return _stack([_centre(img, size) for img in images], size)
    return _stack([_random_resized_crop(img, size, gen, hflip) for img in images], size)


def _stack(images: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    if not images:
        return torch.empty((0, 3, *size), dtype=torch.uint8)
    return torch.stack(images)


def _fit(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``img`` at exactly ``size`` (bilinear, antialiased, aspect ratio not kept)."""
    from torchvision.transforms.v2.functional import resize

    if tuple(img.shape[1:]) == tuple(size):
        return img
    return resize(img, list(size), antialias=True)


def _centre(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (aspect kept) to cover ``size`` × 256/224, then crop the centre ``size``."""
    from torchvision.transforms.v2.functional import center_crop, resize

    h, w = int(img.shape[1]), int(img.shape[2])
    scale = max(size[0] * EVAL_ZOOM / h, size[1] * EVAL_ZOOM / w)
    target = [max(size[0], round(h * scale)), max(size[1], round(w * scale))]
    return center_crop(resize(img, target, antialias=True), list(size))


def rrc_box(h: int, w: int, gen: torch.Generator | None) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a RandomResizedCrop of an h×w image, as torchvision draws
    it (10 tries, then the centre at the nearest allowed aspect ratio), from ``gen``."""
    area = h * w
    log_ratio = (math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1]))
    for _ in range(10):
        u = torch.rand(2, generator=gen, dtype=torch.float64).tolist()
        target = area * (RRC_SCALE[0] + u[0] * (RRC_SCALE[1] - RRC_SCALE[0]))
        aspect = math.exp(log_ratio[0] + u[1] * (log_ratio[1] - log_ratio[0]))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
            return top, left, ch, cw
    ratio = w / h
    if ratio < RRC_RATIO[0]:
        cw, ch = w, round(w / RRC_RATIO[0])
    elif ratio > RRC_RATIO[1]:
        ch, cw = h, round(h * RRC_RATIO[1])
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def _random_resized_crop(
    img: torch.Tensor, size: tuple[int, int], gen: torch.Generator | None, hflip: bool
) -> torch.Tensor:
    from torchvision.transforms.v2.functional import horizontal_flip, resized_crop

    top, left, ch, cw = rrc_box(int(img.shape[1]), int(img.shape[2]), gen)
    out = resized_crop(img, top, left, ch, cw, list(size), antialias=True)
    if hflip and float(torch.rand((), generator=gen)) < 0.5:
        out = horizontal_flip(out)
    return out
