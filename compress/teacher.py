"""A DeepEns teacher: the member networks found in a folder of checkpoints (SPEC.md §2)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ensc.compress.checkpoint import ModelSpec, load_checkpoint
from ensc.errors import CheckpointError

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")


@dataclass
class Teacher:
    """M frozen member networks in eval mode, with the spec of each and the files they came from."""

    members: list[nn.Module]
    specs: list[ModelSpec]
    paths: list[Path]
    infos: list[dict[str, Any]]  # provenance of each member: seed, data config, ...

    def __len__(self) -> int:
        return len(self.members)

    @property
    def num_classes(self) -> int:
        return self.specs[0].num_classes

    @property
    def spec(self) -> ModelSpec:
        """The first member's spec: dataset, input contract and class names of the ensemble."""
        return self.specs[0]

    def to(self, device: torch.device) -> Teacher:
        self.members = [m.to(device) for m in self.members]
        return self


def find_member_files(folder: Path) -> list[Path]:
    """Checkpoint files in ``folder``, in natural order (member2 before member10)."""
    folder = Path(folder)
    if not folder.exists():
        raise CheckpointError(
            f"teacher {folder} does not exist; make one with `ensc train --out {folder}`"
        )
    if folder.is_file():
        return [folder]
    files = [
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES and not p.name.startswith(".")
    ]
    if not files:
        raise CheckpointError(
            f"no checkpoints ({', '.join('*' + s for s in CHECKPOINT_SUFFIXES)}) in {folder}; "
            "train members with `ensc train` or point --teacher at a folder of member checkpoints"
        )
    return sorted(
        files, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]
    )


def load_teacher(folder: Path) -> Teacher:
    """Load every member checkpoint of a teacher folder, frozen and in eval mode."""
    paths = find_member_files(folder)
    members, specs, infos = [], [], []
    for path in paths:
        ckpt = load_checkpoint(path)
        members.append(ckpt.build_model().requires_grad_(False))
        specs.append(ckpt.spec)
        infos.append(ckpt.info)
    classes = {s.num_classes for s in specs}
    if len(classes) > 1:
        raise CheckpointError(
            f"teacher members in {folder} disagree on the number of classes: {sorted(classes)}"
        )
    channels = {s.in_channels for s in specs}
    if len(channels) > 1:
        raise CheckpointError(
            f"teacher members in {folder} disagree on input channels: {sorted(channels)}"
        )
    return Teacher(members, specs, paths, infos)
