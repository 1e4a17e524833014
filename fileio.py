"""Atomic file writes (temp file in the same folder + rename), safe ``torch.load``, the no-overwrite rule."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from ensc.errors import CheckpointError, ConfigError, one_line


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write`` on a temp file next to ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def torch_load(path: Path, *, unsafe: bool = False) -> Any:
    """``torch.load`` onto the CPU with ``weights_only=True``; ``unsafe`` unpickles anything.

    ``unsafe`` runs code from the file: only for files the user trusts and asked for. A missing
    or unreadable file raises a one-line :class:`CheckpointError` naming it, raised from torch's
    own error (callers that give more specific advice read its ``__cause__``).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=not unsafe)
    except Exception as err:  # UnpicklingError, RuntimeError, EOFError, ...
        raise CheckpointError(f"cannot load {path} as a checkpoint: {one_line(err)}") from err


def refuse_overwrite(path: Path, force: bool, flag: str = "--force") -> None:
    """Raise unless ``path`` is free or the user passed ``flag``."""
    if Path(path).exists() and not force:
        raise ConfigError(f"{path} exists; pass {flag} to overwrite it or choose another path")


def jsonable(value: Any) -> Any:
    """Dataclass dumps made JSON-safe: Paths become strings, tuples lists (recursively)."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return str(value) if isinstance(value, Path) else value
