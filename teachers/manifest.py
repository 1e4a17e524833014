"""Which files make up a teacher, and how to read each: a folder, ``ensemble.json``, a file or a glob.

A manifest lets members differ in architecture and preprocessing::

    {"members": [
      {"path": "resnet20_seed0.pth", "arch": "resnet20", "prefix": "module."},
      {"path": "mynet.pt", "arch": "mynets.models:MyNet", "kwargs": {"width": 64},
       "mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616]},
      {"path": "vgg.torchscript.pt"}
    ]}

``path`` is relative to the manifest; ``mean``/``std`` are the normalization the member was trained
with (ensc wraps it around the member so that it takes [0, 1] pixels); ``prefix`` selects the
state_dict keys under it and strips it.
"""

from __future__ import annotations

import glob
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ensc.errors import CheckpointError, ConfigError
from ensc.fileio import not_a_file

MANIFEST_NAME = "ensemble.json"
MEMBER_FIELDS = ("path", "arch", "kwargs", "mean", "std", "prefix")
# files a teacher folder is scanned for; the format itself is detected from the content
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".pt2", ".safetensors", ".pth.tar")


@dataclass(frozen=True)
class MemberEntry:
    """One member: its file and what ensc needs to know to turn it into a [0, 1]-pixel model."""

    path: Path
    arch: str | None = None  # registry name or "package.module:callable"; weight-only files need it
    kwargs: dict[str, Any] = field(
        default_factory=dict
    )  # builder arguments, e.g. {"num_classes": 100}
    mean: tuple[float, ...] | None = None  # input normalization the member was trained with
    std: tuple[float, ...] | None = None
    prefix: str | None = None  # keep only state_dict keys under this prefix, stripped


def member_entries(
    source: Path | str, *, arch: str | None = None, arch_kwargs: dict[str, Any] | None = None
) -> list[MemberEntry]:
    """The members of a teacher given as a folder, a manifest, a single file or a glob.

    ``arch`` and ``arch_kwargs`` (the command line's ``--teacher-arch`` and
    ``--teacher-arch-kwargs``) apply to members whose manifest entry does not say otherwise.
    """
    source_path = Path(source)
    defaults = {"arch": arch, "kwargs": dict(arch_kwargs or {})}
    if not source_path.exists() and any(c in str(source) for c in "*?["):
        files = [Path(p) for p in glob.glob(str(source)) if Path(p).is_file()]
        if not files:
            raise CheckpointError(f"no files match the teacher pattern {source}")
        return [MemberEntry(p, **defaults) for p in sorted(files, key=_natural_key)]
    if source_path.is_dir() and (source_path / MANIFEST_NAME).is_file():
        return read_manifest(source_path / MANIFEST_NAME, **defaults)
    if source_path.is_file() and source_path.suffix == ".json":
        return read_manifest(source_path, **defaults)
    return [MemberEntry(p, **defaults) for p in find_member_files(source_path)]


def find_member_files(folder: Path) -> list[Path]:
    """Checkpoint files in ``folder`` (or ``folder`` itself if it is a file), in natural order."""
    folder = Path(folder)
    if not folder.exists():
        raise CheckpointError(
            f"teacher {folder} does not exist: give a folder of member checkpoints, an "
            f"{MANIFEST_NAME}, a checkpoint file or a quoted glob (make one with `ensc train --out {folder}`)"
        )
    if folder.is_file():
        return [folder]
    if not folder.is_dir():
        raise CheckpointError(
            f"teacher {folder} {not_a_file(folder)}: give a folder of member checkpoints, an "
            f"{MANIFEST_NAME}, a checkpoint file or a quoted glob"
        )
    files = [
        p
        for p in folder.iterdir()
        if p.is_file() and p.name.endswith(CHECKPOINT_SUFFIXES) and not p.name.startswith(".")
    ]
    if not files:
        raise CheckpointError(
            f"no checkpoints ({', '.join('*' + s for s in CHECKPOINT_SUFFIXES)}) and no "
            f"{MANIFEST_NAME} in {folder}; train members with `ensc train` or point --teacher at "
            "a folder of member checkpoints"
        )
    return sorted(files, key=_natural_key)


def read_manifest(
    path: Path, *, arch: str | None = None, kwargs: dict[str, Any] | None = None
) -> list[MemberEntry]:
    """Parse and check an ``ensemble.json``; every problem is a one-line :class:`ConfigError`."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from err
    members = doc.get("members") if isinstance(doc, dict) else None
    if not isinstance(members, list) or not members:
        raise ConfigError(
            f'{path} needs a non-empty list "members": [{{"path": ..., "arch": ...}}, ...]'
        )
    entries = [
        _entry(item, f"{path}: member {i}", path.parent, arch, kwargs or {})
        for i, item in enumerate(members)
    ]
    seen: dict[tuple[Any, ...], int] = {}
    for i, e in enumerate(entries):  # one file twice is fine with another arch or normalization
        key = (e.path.resolve(), e.arch, json.dumps(e.kwargs, sort_keys=True, default=str),
               e.mean, e.std, e.prefix)  # fmt: skip
        if key in seen:
            raise ConfigError(
                f"{path}: members {seen[key]} and {i} are the same ({e.path.name}, same settings); "
                "list each member once"
            )
        seen[key] = i
    return entries


def _entry(
    item: Any, where: str, base: Path, arch: str | None, kwargs: dict[str, Any]
) -> MemberEntry:
    if isinstance(item, str):  # a bare path
        item = {"path": item}
    if not isinstance(item, dict):
        raise ConfigError(f"{where} must be an object with a path; got {item!r}")
    unknown = sorted(set(item) - set(MEMBER_FIELDS))
    if unknown:
        raise ConfigError(
            f"{where} has unknown field(s) {', '.join(unknown)}; known: {', '.join(MEMBER_FIELDS)}"
        )
    if not isinstance(item.get("path"), str) or not item["path"]:
        raise ConfigError(f'{where} needs "path": the member file, relative to the manifest')
    file = Path(item["path"]).expanduser()
    file = file if file.is_absolute() else base / file
    if not file.is_file():
        raise CheckpointError(f"{where}: {file} {not_a_file(file)}")
    for key, typ in (("arch", str), ("prefix", str), ("kwargs", dict)):
        if key in item and not isinstance(item[key], typ):
            raise ConfigError(f'{where}: "{key}" must be a {typ.__name__}; got {item[key]!r}')
    if ("mean" in item) != ("std" in item):
        raise ConfigError(
            f'{where}: give both "mean" and "std" (the normalization it was trained with)'
        )
    return MemberEntry(
        path=file,
        arch=item.get("arch", arch),
        kwargs={**kwargs, **item.get("kwargs", {})},
        mean=_floats(item.get("mean"), f"{where}: mean"),
        std=_floats(item.get("std"), f"{where}: std", positive=True),
        prefix=item.get("prefix") or None,  # "": the whole state dict, as without a prefix
    )


def _floats(value: Any, where: str, positive: bool = False) -> tuple[float, ...] | None:
    if value is None:
        return None
    values = value if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    if not values or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in values
    ):
        raise ConfigError(
            f"{where} must be a number or a list of numbers (one per channel); got {value!r}"
        )
    if not all(math.isfinite(v) for v in values):  # NaN was blamed on the learning rate later
        raise ConfigError(f"{where} must be finite numbers; got {value!r}")
    if positive and not all(v > 0 for v in values):
        raise ConfigError(f"{where} must be > 0; got {value!r}")
    return tuple(float(v) for v in values)


def _natural_key(path: Path) -> list[Any]:
    """member2 before member10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", Path(path).name)]
