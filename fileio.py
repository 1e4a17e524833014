"""Atomic file writes (temp file in the same folder + rename), safe ``torch.load``, the no-overwrite rule.

Every file ensc writes gets the mode ``open()`` would give it (0666 less the umask; ``log.txt``
too), not the 0600 of the temp file it starts as.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from ensc import faults
from ensc.errors import CheckpointError, ConfigError, EnscError, WriteError, one_line

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # disk (or quota) full
# what torch.save raises when its stream writer fails (the OSError is only its __context__)
TORCH_WRITE_FAILED = ("inline_container", "file write failed", "PytorchStreamWriter failed")


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it: set and restore (at import, before threads)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # every file ensc writes follows the umask, as open() does


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write`` on a temp file next to ``path``, then rename it over ``path``.

    On any failure the temp file is removed and ``path`` left as it was. A full disk (or torch's
    opaque stream-writer error) raises :class:`WriteError` naming ``path``.
    """
    path = Path(path)
    check_replaceable(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.chmod(tmp, FILE_MODE)  # mkstemp's 0600 -> what open() would give the file
        with os.fdopen(fd, "wb") as f:
            write(f)
        faults.point(f"save.{path.name}")  # fault-injection tests: killed between write and rename
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        failure = _write_error(err, path)
        if failure is None:
            raise
        raise failure from err


def _write_error(err: BaseException, path: Path) -> WriteError | None:
    """A one-line :class:`WriteError` for a failed write of ``path``; None for other errors."""
    chain: list[BaseException] = []
    link: BaseException | None = err
    while link is not None and link not in chain and not isinstance(link, EnscError):
        chain.append(link)  # err, then what it was raised from or while handling
        link = link.__cause__ or link.__context__
    if not chain:  # already one of ours
        return None
    os_err = next((e for e in chain if isinstance(e, OSError)), None)
    if os_err is not None and os_err.errno in NO_SPACE:
        return WriteError(
            f"no space left on device writing {path}: free some space there or write to another disk"
        )
    torch_failed = isinstance(chain[0], RuntimeError) and any(
        m in str(chain[0]) for m in TORCH_WRITE_FAILED
    )
    if torch_failed:
        reason = os_err.strerror if os_err is not None else "the write stopped short (disk full?)"
        return WriteError(f"cannot write {path}: {reason}")
    return None


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
        raise CheckpointError(f"checkpoint {path} {not_a_file(path)}")
    try:
        return torch.load(path, map_location="cpu", weights_only=not unsafe)
    except Exception as err:  # UnpicklingError, RuntimeError, EOFError, ...
        if _not_pytorch(path, err):  # rather than torch's advice to retry with weights_only=False
            raise CheckpointError(f"{path} is not a PyTorch checkpoint (or it is damaged)") from err
        raise CheckpointError(f"cannot load {path} as a checkpoint: {one_line(err)}") from err


def _not_pytorch(path: Path, err: Exception) -> bool:
    """Neither a zip archive nor a pickle (torch.save's two formats), or a pickle of garbage."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:  # unreadable: torch's own error says why
        return False
    return not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80") or (
        "Unsupported operand" in str(err)
    )


def not_a_file(path: Path) -> str:
    """Why ``path`` is not a regular file, to follow its name in a message."""
    path = Path(path)
    if not path.exists():
        return "does not exist"
    if path.is_dir():
        return "is a folder, not a file"
    return "is a device, pipe or socket, not a regular file"


def not_a_folder(path: Path) -> str:
    """Why ``path`` is not a folder, to follow its name in a message."""
    path = Path(path)
    if not path.exists():
        return "does not exist"
    if path.is_file():
        return "is a file, not a folder"
    return "is a device, pipe or socket, not a folder"


def refuse_overwrite(path: Path, force: bool, flag: str = "--force") -> None:
    """Raise unless ``path`` is free or the user passed ``flag``; never for a path that is not a
    regular file (a folder, device, pipe or socket), which no flag replaces."""
    check_replaceable(path)
    if Path(path).exists() and not force:
        raise ConfigError(f"{path} exists; pass {flag} to overwrite it or choose another path")


def check_replaceable(path: Path) -> None:
    """Refuse an output path that exists and is not a regular file: ensc writes by renaming a
    finished temp file over it, which would turn a device or pipe into a file."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise WriteError(f"cannot write {path}: it {not_a_file(path)}; give the path of a file")


def jsonable(value: Any) -> Any:
    """Dataclass dumps made JSON-safe: Paths become strings, tuples lists (recursively)."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def file_sha256(path: Path) -> str:
    """sha256 of a file's contents, read in 1 MiB chunks (of every file, sorted, for a folder)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()
