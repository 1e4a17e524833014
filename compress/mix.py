"""Mix pairs of training images before distillation (docs/method.md §5).

In domain, the teachers fit their own training images: their predictions there are confident and
alike, so KD on those images passes on little more than the labels. Between two training images
they disagree more. Both kinds pair image b with image π(b) of the same batch (π a random
permutation) and give the teachers and the student the same mixed image, so that the student
matches the teachers' function there ("function matching": Beyer, Zhai, Royer, Markeeva, Anil,
Kolesnikov. Knowledge distillation: A good teacher is patient and consistent. CVPR 2022.
https://arxiv.org/abs/2106.05237):

- ``mixup``  x' = λ_b·x_b + (1 − λ_b)·x_π(b), λ_b ~ Unif[0, 1] per image (Zhang et al. 2018,
             https://arxiv.org/abs/1710.09412).
- ``cutmix`` x' = x_b with a box of x_π(b) pasted in, of area fraction 1 − λ_b, λ_b ~ Unif[0, 1]
             (Yun et al. 2019, https://arxiv.org/abs/1905.04899).

No label is mixed: the KD term needs none, and the CE term of α < 1 runs on the clean batch.
Every draw comes from the given generator on the CPU, so one seed gives the same images on any
device and a resumed run the same draws.
"""

from __future__ import annotations

import torch

from ensc.compress.names import MIXES


def check_mix(kind: str) -> str:
    if kind not in MIXES:
        raise ValueError(f"unknown mix {kind!r}: choose one of {', '.join(MIXES)}")
    return kind


def mix_batch(x: torch.Tensor, kind: str, gen: torch.Generator | None = None) -> torch.Tensor:
    """The mixed batch (``none``: x itself), same shape, dtype and device as x [B, C, H, W]."""
    check_mix(kind)
    if kind == "none" or x.shape[0] < 2:
        return x
    b = x.shape[0]
    partner = torch.randperm(b, generator=gen).to(x.device)
    lam = torch.rand(b, generator=gen)  # [B] on the CPU
    if kind == "mixup":
        w = lam.to(x.device, x.dtype).view(b, *([1] * (x.dim() - 1)))
        return w * x + (1 - w) * x[partner]
    return _cutmix(x, partner, lam, gen)


def _cutmix(
    x: torch.Tensor, partner: torch.Tensor, lam: torch.Tensor, gen: torch.Generator | None
) -> torch.Tensor:
    """Paste a box of area ≈ (1 − λ_b)·H·W from x_π(b) into x_b, centred uniformly, clipped."""
    b, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    side = (1 - lam).sqrt()  # [B]: the box's height and width as fractions
    cy, cx = torch.rand(b, generator=gen) * h, torch.rand(b, generator=gen) * w
    rows, cols = torch.arange(h).view(1, h), torch.arange(w).view(1, w)
    top, bottom = cy - side * h / 2, cy + side * h / 2
    left, right = cx - side * w / 2, cx + side * w / 2
    in_rows = (rows >= top.view(b, 1)) & (rows < bottom.view(b, 1))  # [B, H]
    in_cols = (cols >= left.view(b, 1)) & (cols < right.view(b, 1))  # [B, W]
    box = (in_rows.unsqueeze(2) & in_cols.unsqueeze(1)).unsqueeze(1).to(x.device)  # [B, 1, H, W]
    return torch.where(box, x[partner], x)
