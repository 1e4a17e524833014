"""A DeepEns teacher (docs/method.md §2): member networks from ensc or from anyone else's code.

Each member ends up as a frozen ``nn.Module`` in eval mode that takes [0, 1] pixels
(docs/method.md §1) and returns logits ``[B, K]``, with a :class:`ModelSpec` describing it. Files
are read by :mod:`ensc.teachers.formats`; which files, with which architecture and normalization,
comes from :mod:`ensc.teachers.manifest`; :mod:`ensc.teachers.member` turns each into a module.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ensc.data.splits import Split
from ensc.engine.runtime import Runtime
from ensc.errors import CheckpointError, ConfigError
from ensc.models.checkpoint import ModelSpec
from ensc.models.registry import trusted_code
from ensc.teachers.manifest import find_member_files, member_entries
from ensc.teachers.member import load_member

__all__ = ["Teacher", "find_member_files", "load_teacher", "near_chance_limit", "sanity_check"]

log = logging.getLogger(__name__)

# (channels, height, width) of the built-in datasets: the test input for members that do not say
DATASET_INPUT = {"fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32), "cifar100": (3, 32, 32)}


@dataclass
class Teacher:
    """M frozen member networks in eval mode, with the spec of each and the files they came from."""

    members: list[nn.Module]
    specs: list[ModelSpec]
    paths: list[Path]
    infos: list[dict[str, Any]]  # provenance of each member: format, seed, data config, ...

    def __len__(self) -> int:
        return len(self.members)

    @property
    def num_classes(self) -> int:
        return self.specs[0].num_classes

    @property
    def spec(self) -> ModelSpec:
        """The spec of the first member that records its dataset (else the first member's)."""
        return next((s for s in self.specs if s.dataset), self.specs[0])

    @property
    def data_record(self) -> dict[str, Any] | None:
        """The DataConfig record of the first member trained by ensc; None for third-party teachers."""
        return next((i["data"] for i in self.infos if i.get("data")), None)

    @property
    def arch_summary(self) -> str:
        """E.g. ``2 × resnet20 + 1 × torchscript``."""
        return " + ".join(
            f"{n} × {arch}" for arch, n in Counter(s.arch for s in self.specs).items()
        )

    def to(self, device: torch.device) -> Teacher:
        self.members = [m.to(device) for m in self.members]
        return self


def load_teacher(
    source: Path | str,
    *,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    code_path: Path | None = None,
    unsafe_load: bool = False,
    dataset: str | None = None,
) -> Teacher:
    """Load every member of a teacher, frozen and in eval mode.

    Args:
        source: a folder of member files (with or without an ``ensemble.json``), a manifest, a
            single file or a glob.
        arch: architecture of weight-only members (registry name or ``package.module:callable``)
            without one in the manifest.
        arch_kwargs: arguments of that architecture's builder, e.g. ``{"num_classes": 100}``.
        code_path: a folder put first on ``sys.path`` while the members load (as PYTHONPATH
            would be), so that user architectures and pickled classes import; architectures
            named ``package.module:callable`` must be defined in modules under it.
        unsafe_load: allow full unpickling of files that hold Python objects, and architectures
            from any importable module. Runs code from the file: only for files you trust.
        dataset: the dataset the teacher is used with, a hint for the input size of members
            that do not record it (``fashion-mnist`` 1×28×28, ``cifar10``/``cifar100`` 3×32×32).
    """
    with user_code(code_path, unsafe=unsafe_load):
        entries = member_entries(source, arch=arch, arch_kwargs=arch_kwargs)
        hint = DATASET_INPUT.get(dataset or "")
        members, specs, infos = [], [], []
        for entry in entries:
            model, spec, info = load_member(entry, unsafe_load=unsafe_load, hint=hint)
            members.append(model.eval().requires_grad_(False))
            specs.append(spec)
            infos.append(info)
    recorded = [i for i, info in enumerate(infos) if info["format"] == "ensc"]  # others: a guess
    for what, values, among in (
        ("the number of classes", [s.num_classes for s in specs], range(len(specs))),
        ("input channels", [s.in_channels for s in specs], range(len(specs))),
        # all are fed the images of one size: a member trained on another would be fed wrong ones
        ("the input size they were trained on", [_size(s) for s in specs], recorded),
    ):
        if len({values[i] for i in among}) > 1:
            listing = ", ".join(f"{entries[i].path.name}: {values[i]}" for i in among)
            raise CheckpointError(f"teacher members in {source} disagree on {what} ({listing})")
    return Teacher(members, specs, [e.path for e in entries], infos)


def _size(spec: ModelSpec) -> str:
    return f"{spec.image_size[0]}×{spec.image_size[1]}"


@contextlib.contextmanager
def user_code(code_path: Path | None, *, unsafe: bool = False) -> Iterator[None]:
    """``code_path`` first on ``sys.path`` while the block runs, so user code imports from it
    (modules imported meanwhile stay imported), and the only place ``package.module:callable``
    architectures may come from (anywhere with ``unsafe``: see ``models.registry.trusted_code``).
    None and not ``unsafe``: what an enclosing ``user_code`` allows (outside one, ensc's own
    architectures only)."""
    if code_path is None:
        with trusted_code(None, unsafe=True) if unsafe else contextlib.nullcontext():
            yield
        return
    folder = Path(code_path).expanduser().resolve()
    if not folder.is_dir():
        raise ConfigError(f"--code-path {code_path} is not a folder")
    added = str(folder) not in sys.path
    if added:
        sys.path.insert(0, str(folder))
    importlib.invalidate_caches()
    try:
        with trusted_code(folder, unsafe=unsafe):
            yield
    finally:
        if added and str(folder) in sys.path:
            sys.path.remove(str(folder))


@torch.no_grad()
def sanity_check(
    teacher: Teacher, split: Split, runtime: Runtime, *, n: int = 256, seed: int = 0
) -> list[float]:
    """Each member's accuracy (%) on ``n`` random images of ``split``; warns when near chance.

    A member far below its usual accuracy almost always means a wrong input normalization
    (``mean``/``std`` in ensemble.json) or a class order other than the dataset's.
    """
    from ensc.engine.predict import predict_logits

    gen = torch.Generator().manual_seed(seed)
    sample = split.subset(torch.randperm(len(split), generator=gen)[:n])
    if len(sample) == 0:
        return [float("nan")] * len(teacher)
    limit = near_chance_limit(teacher.num_classes, len(sample))
    accs = []
    for k, (model, path) in enumerate(zip(teacher.members, teacher.paths, strict=True)):
        pred = predict_logits(model, sample, runtime).argmax(-1)
        acc = 100.0 * float((pred == sample.labels).float().mean())
        accs.append(acc)
        if acc < limit:
            log.warning(
                "teacher member %d (%s) is near chance: %.1f%% on %d images (chance %.1f%%); "
                "usually a wrong normalization (mean/std in ensemble.json) or another class order",
                k, path.name, acc, len(sample), 100.0 / teacher.num_classes,
            )  # fmt: skip
    return accs


def near_chance_limit(num_classes: int, n: int) -> float:
    """Accuracy (%) below which a member counts as guessing, on ``n`` images of ``num_classes``.

    chance + margin, with margin = chance / 2 (at most 10 points, for few classes) but at least
    3 standard errors of a guessing model's accuracy on n images: 15.6 % for 10 classes and 256
    images, 60 % for 2 classes, 2.9 % for 100 classes.
    """
    p = 1.0 / num_classes
    chance, stderr = 100.0 * p, 100.0 * math.sqrt(p * (1 - p) / n)
    return chance + max(min(0.5 * chance, 10.0), 3.0 * stderr)
