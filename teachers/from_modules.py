"""A teacher made of ``nn.Module``s handed over from Python (:func:`ensc.compress_ensemble`).

Each member must take pixels in [0, 1] (normalizing inside itself, as ensc's members do:
docs/method.md §1) and return logits ``[B, K]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ensc.data.splits import ImageDataset
from ensc.errors import ConfigError
from ensc.models.checkpoint import ModelSpec
from ensc.teachers.ensemble import Teacher


@torch.no_grad()
def teacher_from_modules(modules: Sequence[nn.Module], data: ImageDataset) -> Teacher:
    """The members, frozen and in eval mode, with specs describing them on ``data``."""
    modules = list(modules)
    if len(modules) < 2:
        raise ConfigError(f"a teacher ensemble needs at least 2 networks; got {len(modules)}")
    bad = [type(m).__name__ for m in modules if not isinstance(m, nn.Module)]
    if bad:
        raise ConfigError(f"teachers must be torch.nn.Module networks; got {', '.join(bad)}")
    probe = data.val.take(torch.arange(min(2, len(data.val)))).images.float().div(255)
    specs = []
    for k, module in enumerate(modules):
        module.eval().requires_grad_(False)
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        out = module(probe.to(device))
        if out.dim() != 2 or out.shape[1] != data.num_classes:
            raise ConfigError(
                f"teacher network {k} ({type(module).__name__}) returns {tuple(out.shape)} for a "
                f"batch of 2 images; expected [2, {data.num_classes}] logits for the data's classes"
            )
        specs.append(
            ModelSpec(
                arch=f"{type(module).__module__}:{type(module).__qualname__}",
                num_classes=data.num_classes,
                in_channels=data.channels,
                image_size=data.image_size,
                mean=(),
                std=(),
                class_names=data.class_names,
                dataset=data.name,
            )  # fmt: skip
        )
    paths = [Path(f"network {k}") for k in range(len(modules))]
    infos = [{"format": "python module"} for _ in modules]
    return Teacher(modules, specs, paths, infos)
