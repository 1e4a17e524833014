"""Corruption robustness: the CIFAR-10-C benchmark generated on the fly from any test split.

Source of every corruption and of its five severities: Hendrycks & Dietterich, "Benchmarking
Neural Network Robustness to Common Corruptions and Perturbations", ICLR 2019, code
github.com/hendrycks/robustness, ``ImageNet-C/create_c/make_cifar_c.py`` (parameters read from
that file, commit ca36008). They were chosen for 32×32 CIFAR images; ensc applies the same ones
to any image size (Fashion-MNIST is 28×28; blur radii and pixelation do not scale with larger
image-folder images).

Everything works on batches ``float [B, C, H, W]`` in [0, 1] (C = 1 or 3) with tensor ops on the
whole batch (only the noises' generators and the JPEG codec go image by image; no PIL) and
returns the same shape and dtype, still in [0, 1]; ``benchmarks/bench_corruptions.py`` times it
(docs/bench-corruptions.md). How ensc differs from the reference code, which works on one
32×32×3 uint8 image at a time:

- **randomness** (the three noises): image ``index[i]`` of a split draws its noise from its own
  ``torch.Generator``, seeded from (seed, corruption, severity, index[i]); so a corrupted image
  does not depend on the batch it is in, on the batch order or on the global RNG. The reference
  draws from NumPy's global RNG, so its exact noise cannot be reproduced anyway.
- **brightness, saturate** change V or S of HSV (skimage ``rgb2hsv``/``hsv2rgb``); every channel
  of an HSV colour is V·(1 − S·g) with g a function of the hue alone, so both are computed
  without the HSV round trip, with the same result (skimage's convention included: a grey pixel
  has hue 0, so ``saturate`` severities 4–5 tint grey RGB pixels red, as CIFAR-10-C does). A
  1-channel image is its own V with S = 0: ``brightness`` adds to it, ``saturate`` is the
  identity (a grey image has no saturation to change).
- **contrast** pulls each channel towards its own spatial mean (as the reference does, not
  towards the grey-level mean of torchvision's ``adjust_contrast``).
- **gaussian_blur** is torchvision's ``gaussian_blur`` with scipy's kernel radius
  (int(4σ + 0.5)) and skimage's ``nearest`` border (the image is edge-padded first).
- **defocus_blur** convolves with the reference's anti-aliased disk kernel (cv2 border
  ``REFLECT_101`` = torch's ``reflect`` padding).
- **jpeg_compression** is torchvision's ``jpeg`` on the image rounded to uint8 (libjpeg: the same
  bytes as PIL's encoder and decoder, which take over when torchvision drops its deprecated
  JPEG codec); **pixelate** reproduces PIL's ``BOX`` resize down and back up as two matrix
  products (torchvision's tensor ``resize`` has no box filter); PIL rounds to uint8 after each
  pass, ensc does not (a difference of at most one grey level).
- The reference stores its images with ``np.uint8`` (truncation); ensc's evaluation
  (:func:`corrupted_split`) rounds to the nearest uint8, so a clean image survives unchanged.
"""

from __future__ import annotations

import functools
import hashlib
import io
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.io
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from ensc.data.splits import Split
from ensc.data.stream import StreamSplit
from ensc.evaluation.table import render_table

SEVERITIES = (1, 2, 3, 4, 5)
_TORCHVISION_JPEG = all(
    hasattr(m, f)
    for m, f in ((TF, "jpeg"), (torchvision.io, "encode_jpeg"), (torchvision.io, "decode_jpeg"))
)

# Parameters per severity 1..5, from make_cifar_c.py (see the module docstring).
PARAMS: dict[str, tuple[Any, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # std of N(0, c²) added to pixels
    "shot_noise": (500, 250, 100, 75, 50),  # Poisson(x·c) / c: photons per unit intensity
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # fraction of values set to 0 or 1
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # sigma in pixels
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),  # (radius, alias σ)
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # factor towards the per-channel mean
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to V of HSV
    "saturate": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),  # S ← S·a + b of HSV
    "jpeg_compression": (80, 65, 58, 50, 40),  # JPEG quality
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # box-downscale to int(side·c), box-upscale back
}
CORRUPTIONS: tuple[str, ...] = tuple(PARAMS)
FAMILIES = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("gaussian_blur", "defocus_blur"),
    "digital": ("contrast", "brightness", "saturate", "jpeg_compression", "pixelate"),
}
METRICS = ("acc", "nll", "cnll", "ece")  # what the evaluation reports per model and severity
METRIC_UNITS = (
    "acc in percent; nll and cnll in nats per image (cnll: softmax(log p / T) with each model's "
    "temperature T fitted on the clean validation split); ece (15 bins) a fraction"
)


def corrupt(
    images: torch.Tensor,
    name: str,
    severity: int,
    *,
    seed: int = 0,
    index: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor:
    """``images`` (float [B, C, H, W] in [0, 1]) under corruption ``name`` at ``severity`` 1–5.

    ``index`` (default 0..B−1) are the images' positions in their split: the random corruptions
    draw image ``index[i]``'s noise from a generator seeded with (seed, name, severity, index[i]),
    so any batching of a split gives the same images.
    """
    if name not in PARAMS:
        raise ValueError(f"unknown corruption {name!r}: choose one of {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of 1..5, got {severity}")
    if images.ndim != 4 or not images.is_floating_point() or images.shape[1] not in (1, 3):
        raise ValueError(
            f"images must be float [B, C, H, W] with C = 1 or 3, got {images.dtype} "
            f"{tuple(images.shape)}"
        )
    c = PARAMS[name][severity - 1]
    if name in _RANDOM:
        idx = range(len(images)) if index is None else [int(i) for i in index]
        if len(idx) != len(images):
            raise ValueError(f"index has {len(idx)} entries for {len(images)} images")
        gens = _generators(seed, name, severity, idx)
        out = _RANDOM[name](images, c, gens)
    else:
        out = _DETERMINISTIC[name](images, c)
    return out.clamp_(0, 1).to(images.dtype)


def corrupted_split(
    split: Split | StreamSplit, name: str, severity: int, *, seed: int = 0, batch_size: int = 1000
) -> Split:
    """``split`` (uint8 images) under a corruption, rounded back to uint8 as CIFAR-10-C is stored.

    Works through ``batch_size`` images at a time; the result does not depend on it. A streamed
    split is decoded first (:meth:`~ensc.data.stream.StreamSplit.take`): pass one taken once.
    """
    split = split.take()
    out = torch.empty_like(split.images)
    for start in range(0, len(split), batch_size):
        stop = min(start + batch_size, len(split))
        x = split.images[start:stop].float().div_(255)
        y = corrupt(x, name, severity, seed=seed, index=range(start, stop))
        out[start:stop] = y.mul_(255).round_().to(torch.uint8)
    return Split(out, split.labels)


# --------------------------------------------------------------------------- randomness


def _generators(seed: int, name: str, severity: int, index: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded from a hash of (seed, corruption, severity, index).

    torch's CPU generator (mt19937) keeps only the low 32 bits of a seed; the hash spreads the
    keys over them.
    """
    out = []
    for i in index:
        key = f"{seed}/{name}/{severity}/{i}".encode()
        s = int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "little")
        out.append(torch.Generator().manual_seed(s))
    return out


def _gaussian_noise(x: torch.Tensor, c: float, gens: list[torch.Generator]) -> torch.Tensor:
    noise = torch.empty_like(x, dtype=torch.float32)
    for k, g in enumerate(gens):
        noise[k].normal_(generator=g)
    return x + c * noise


def _shot_noise(x: torch.Tensor, c: float, gens: list[torch.Generator]) -> torch.Tensor:
    rate = x.float() * c
    return torch.stack([torch.poisson(rate[k], generator=g) for k, g in enumerate(gens)]) / c


def _impulse_noise(x: torch.Tensor, c: float, gens: list[torch.Generator]) -> torch.Tensor:
    # skimage random_noise(mode="s&p", amount=c): each value (every channel on its own) is hit
    # with probability c, and a hit is salt (1) or pepper (0) with probability 1/2 each.
    u = torch.empty_like(x, dtype=torch.float32)
    for k, g in enumerate(gens):
        u[k].uniform_(generator=g)
    out = torch.where(u < c, (u >= c / 2).to(x.dtype), x)
    return out


# --------------------------------------------------------------------------- blurs


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = int(4 * sigma + 0.5)  # scipy.ndimage.gaussian_filter's radius (truncate = 4)
    padded = F.pad(x, (r, r, r, r), mode="replicate")  # skimage's mode="nearest"
    blurred = TF.gaussian_blur(padded, kernel_size=[2 * r + 1, 2 * r + 1], sigma=[sigma, sigma])
    return blurred[..., r:-r, r:-r]


@functools.cache
def disk_kernel(radius: float, alias_blur: float) -> torch.Tensor:
    """make_cifar_c.py's ``disk`` (radius ≤ 8): the points of the grid −8..8 within ``radius`` of
    the centre, normalized, then cv2.GaussianBlur(ksize 3×3, σ = ``alias_blur``, border
    REFLECT_101); cropped to its non-zero part, float64."""
    if not 0 < radius <= 8:
        raise ValueError(f"disk radius must be in (0, 8], got {radius}")
    grid = torch.arange(-8, 9, dtype=torch.float64)
    disk = ((grid[:, None] ** 2 + grid[None, :] ** 2) <= radius**2).to(torch.float64)
    disk /= disk.sum()
    g = torch.exp(-(torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64) ** 2) / (2 * alias_blur**2))
    g /= g.sum()
    padded = F.pad(disk[None, None], (1, 1, 1, 1), mode="reflect")
    blurred = F.conv2d(padded, (g[:, None] * g[None, :])[None, None])[0, 0]  # [17, 17]
    # symmetric by construction: every entry read from the octant 0 ≤ |dy| ≤ |dx| (a CPU's conv
    # may round mirrored entries 1 ulp apart, e.g. AVX-512 vs AVX2 kernels)
    d = grid.abs().long()
    lo, hi = torch.minimum(d[:, None], d[None, :]), torch.maximum(d[:, None], d[None, :])
    blurred = blurred[8 + lo, 8 + hi]
    used = blurred.abs().sum(1).nonzero().flatten()
    half = int(max(8 - int(used.min()), int(used.max()) - 8))  # the kernel is symmetric
    return blurred[8 - half : 9 + half, 8 - half : 9 + half].contiguous()


def _defocus_blur(x: torch.Tensor, c: tuple[float, float]) -> torch.Tensor:
    kernel = disk_kernel(*c).to(x.dtype)
    half = kernel.shape[0] // 2
    channels = x.shape[1]
    padded = F.pad(x, (half, half, half, half), mode="reflect")  # cv2's BORDER_REFLECT_101
    weight = kernel.expand(channels, 1, *kernel.shape)
    return F.conv2d(padded, weight, groups=channels)  # filter2D is a correlation: same here


# --------------------------------------------------------------------------- colour


def _contrast(x: torch.Tensor, c: float) -> torch.Tensor:
    means = x.mean(dim=(2, 3), keepdim=True)  # per image and channel, as the reference
    return (x - means) * c + means


def _brightness(x: torch.Tensor, c: float) -> torch.Tensor:
    # V ← min(V + c, 1) with H, S kept: every channel is scaled by V'/V; a black pixel (S = 0)
    # becomes grey V'.
    v = x.amax(dim=1, keepdim=True)
    v_new = (v + c).clamp_(max=1)
    return torch.where(v > 0, x * (v_new / v.clamp_min(1e-12)), v_new)


def _saturate(x: torch.Tensor, c: tuple[float, float]) -> torch.Tensor:
    if x.shape[1] == 1:
        return x.clone()  # grey: no saturation to change (documented in the module docstring)
    a, b = c
    v = x.amax(dim=1, keepdim=True)
    delta = v - x.amin(dim=1, keepdim=True)
    s = torch.where(delta > 0, delta / v.clamp_min(1e-12), torch.zeros_like(v))
    s_new = (s * a + b).clamp(0, 1)
    # S ← s_new with H, V kept: channel = V − (V − channel)·s_new/s; a grey pixel has hue 0
    # (red), so skimage's hsv2rgb turns it into (V, V(1 − s_new), V(1 − s_new)).
    coloured = v - (v - x) * (s_new / s.clamp_min(1e-12))
    grey = torch.cat([v, v * (1 - s_new), v * (1 - s_new)], dim=1)
    return torch.where(s > 0, coloured, grey)


# --------------------------------------------------------------------------- digital


def _jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    as_uint8 = x.mul(255).round_().to(torch.uint8)
    if not _TORCHVISION_JPEG:
        return jpeg_with_pil(as_uint8, quality).to(x.dtype).div_(255)
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its JPEG codec (for TorchCodec)
        warnings.simplefilter("ignore", DeprecationWarning)
        return TF.jpeg(as_uint8, quality=quality).to(x.dtype).div_(255)


def jpeg_with_pil(images: torch.Tensor, quality: int) -> torch.Tensor:
    """uint8 [B, C, H, W] through PIL's JPEG encoder and decoder, as make_cifar_c.py does: the
    fallback for a torchvision without its JPEG codec (the results are the same bytes)."""
    out = torch.empty_like(images)
    for k, img in enumerate(images):
        array = img.permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(
            buf, "JPEG", quality=quality
        )
        decoded = torch.from_numpy(np.array(Image.open(buf)))
        out[k] = decoded.reshape(array.shape).permute(2, 0, 1)
    return out


@functools.cache
def box_resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """[n_out, n_in] weights of PIL's ``BOX`` resize along one axis (Pillow's
    ``precompute_coeffs``: box filter of support ½ scaled by max(1, n_in / n_out))."""
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    out = torch.zeros(n_out, n_in, dtype=torch.float64)
    for xx in range(n_out):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), n_in)
        for x in range(xmin, xmax):
            t = (x - center + 0.5) / filterscale
            out[xx, x] = 1.0 if -0.5 < t <= 0.5 else 0.0
        total = out[xx].sum()
        if total > 0:
            out[xx] /= total
    return out


def _pixelate(x: torch.Tensor, c: float) -> torch.Tensor:
    h, w = x.shape[-2:]
    small_h, small_w = int(h * c), int(w * c)
    rows = box_resize_matrix(small_h, h) @ box_resize_matrix(h, small_h)  # [H, H]: down, up
    cols = box_resize_matrix(small_w, w) @ box_resize_matrix(w, small_w)  # [W, W]
    return rows.to(x.dtype) @ x @ cols.to(x.dtype).T


_RANDOM: dict[str, Callable[[torch.Tensor, Any, list[torch.Generator]], torch.Tensor]] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
}
_DETERMINISTIC: dict[str, Callable[[torch.Tensor, Any], torch.Tensor]] = {
    "gaussian_blur": _gaussian_blur,
    "defocus_blur": _defocus_blur,
    "contrast": _contrast,
    "brightness": _brightness,
    "saturate": _saturate,
    "jpeg_compression": _jpeg,
    "pixelate": _pixelate,
}
assert set(_RANDOM) | set(_DETERMINISTIC) == set(PARAMS)


# --------------------------------------------------------------------------- summaries


def summarize(per_corruption: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, Any]:
    """From ``{corruption: {"1".."5": {metric: value}}}`` of one model: ``by_severity``
    (``{"1".."5": {metric: mean over corruptions}}``) and ``mean`` (over all corruptions and
    severities: the mCE-style summary, not normalized by a baseline model)."""
    names = list(per_corruption)
    by_severity = {
        str(s): {m: sum(per_corruption[n][str(s)][m] for n in names) / len(names) for m in METRICS}
        for s in SEVERITIES
    }
    mean = {m: sum(by_severity[str(s)][m] for s in SEVERITIES) / len(SEVERITIES) for m in METRICS}
    return {"by_severity": by_severity, "mean": mean}


_TABLE_METRICS = {"acc": ("ACC %", "{:.2f}"), "nll": ("NLL", "{:.4f}"),
                  "cnll": ("cNLL", "{:.4f}"), "ece": ("ECE", "{:.4f}")}  # fmt: skip


def corruption_table(section: Mapping[str, Any]) -> str:
    """The "under corruption" table of ``result["corruptions"]``: one line per model and metric,
    a column per severity (mean over the corruptions) and their mean."""
    header = ["model", "metric", *(f"sev {s}" for s in SEVERITIES), "mean"]
    rows = []
    for model in section["models"]:
        for m in METRICS:
            label, fmt = _TABLE_METRICS[m]
            cells = [fmt.format(model["by_severity"][str(s)][m]) for s in SEVERITIES]
            rows.append([model["name"], label, *cells, fmt.format(model["mean"][m])])
    return render_table(header, rows, align="ll" + "r" * (len(SEVERITIES) + 1))
