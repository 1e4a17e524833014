"""On-disk cache of a teacher's logits on the validation and test splits.

Every `ensc compress` run on the same teacher and data evaluates the same teacher members on the
same images, which for a DE-4 of CIFAR ResNets on 7,000 images is the largest part of the
evaluation after training. The logits are kept in ``<runs_dir>/.cache/teacher-logits/<key>.pt``
(a dict of tensors and strings, read with ``torch.load(weights_only=True)``). The key is a
sha256 of:

- the contents of every member file (streamed), plus each member as loaded: its architecture,
  builder arguments, normalization and a digest of its weights (an ``ensemble.json`` that
  changes a member's mean/std or key prefix changes its logits without touching its file);
- each split's uint8 image tensor and labels (a streamed split: its files' paths, sizes and
  modification times, its labels and the size images come out at);
- :data:`LOGITS_FORMAT` and how the logits were computed (device type, autocast dtype).

A file that does not load, holds another key, has the wrong shapes or fails its checksum is
ignored with a warning and recomputed (then overwritten); a cache that cannot be written costs a
warning, never the run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ensc.data.splits import Split
from ensc.data.stream import StreamSplit
from ensc.engine.runtime import Runtime
from ensc.errors import CheckpointError
from ensc.evaluation.evaluate import member_logits
from ensc.fileio import atomic_torch_save, file_sha256, torch_load
from ensc.teachers.ensemble import Teacher

log = logging.getLogger(__name__)

LOGITS_FORMAT = 1  # bump when what is stored, or how teacher logits are computed, changes
CACHE_SUBDIR = Path(".cache") / "teacher-logits"


def cache_dir_for(runs_dir: Path) -> Path:
    """Where the teacher-logits cache of the runs in ``runs_dir`` lives."""
    return Path(runs_dir) / CACHE_SUBDIR


def tensor_sha256(tensor: torch.Tensor, digest: Any | None = None) -> Any:
    """Feed a tensor's dtype, shape and bytes into ``digest`` (a new sha256 if None); returns it."""
    digest = digest if digest is not None else hashlib.sha256()
    t = tensor.detach().to("cpu").contiguous()
    digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest


def split_sha256(split: Split | StreamSplit) -> str:
    """sha256 of a split's images (uint8 [N, C, H, W]) and labels; of a streamed split, its
    :meth:`~ensc.data.stream.StreamSplit.fingerprint` (no image is read)."""
    if not isinstance(split, Split):
        return split.fingerprint()
    digest = tensor_sha256(split.images)
    return tensor_sha256(split.labels, digest).hexdigest()


def weights_sha256(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    try:
        state = model.state_dict()
    except Exception:  # an exotic wrapper without a state_dict: the file hash covers it
        return ""
    for name, value in state.items():
        digest.update(name.encode())
        if isinstance(value, torch.Tensor):
            tensor_sha256(value, digest)
    return digest.hexdigest()


def cache_key(teacher: Teacher, splits: Mapping[str, Split], runtime: Runtime) -> str:
    """The cache key of ``teacher``'s logits on ``splits`` computed on ``runtime``."""
    members = [
        {
            "file": file_sha256(path),
            "arch": spec.arch,
            "kwargs": spec.arch_kwargs,
            "mean": list(spec.mean),
            "std": list(spec.std),
            "num_classes": spec.num_classes,
            "weights": weights_sha256(model),
        }
        for path, spec, model in zip(teacher.paths, teacher.specs, teacher.members, strict=True)
    ]
    record = {
        "format": LOGITS_FORMAT,
        "members": members,
        "splits": {name: split_sha256(split) for name, split in splits.items()},
        "device": runtime.device.type,
        "autocast": str(runtime.amp_dtype) if runtime.eval_amp else "off",
    }
    blob = json.dumps(record, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def _logits_sha256(logits: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(logits):
        digest.update(name.encode())
        tensor_sha256(logits[name], digest)
    return digest.hexdigest()


def load_logits(
    path: Path, key: str, shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, torch.Tensor] | None:
    """The cached logits in ``path`` if it holds ``key`` with tensors of ``shapes``, else None.

    Anything wrong with the file (missing, unreadable, another key or format, other shapes, a
    checksum that does not match) gives None; all but a missing file are logged as a warning.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        obj = torch_load(path)
    except CheckpointError as error:
        err = error.__cause__ or error  # torch's own error
        return _ignore(path, f"unreadable: {type(err).__name__}: {err}")
    if not isinstance(obj, dict) or obj.get("format") != LOGITS_FORMAT:
        return _ignore(path, f"not a format-{LOGITS_FORMAT} teacher-logits file")
    if obj.get("key") != key:
        return _ignore(path, "made for another teacher or data")
    logits = obj.get("logits")
    if not isinstance(logits, dict) or set(logits) != set(shapes):
        return _ignore(path, f"holds other splits than {sorted(shapes)}")
    for name, shape in shapes.items():
        t = logits[name]
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or tuple(t.shape) != shape:
            return _ignore(path, f"{name} logits are not float32 {list(shape)}")
    if obj.get("sha256") != _logits_sha256(logits):
        return _ignore(path, "checksum mismatch (corrupt file)")
    return logits


def save_logits(path: Path, key: str, logits: Mapping[str, torch.Tensor]) -> bool:
    """Write the cache file atomically; False (with a warning) when it cannot be written."""
    obj = {
        "format": LOGITS_FORMAT,
        "key": key,
        "logits": {
            name: t.detach().to("cpu", torch.float32).contiguous() for name, t in logits.items()
        },
    }
    obj["sha256"] = _logits_sha256(obj["logits"])
    try:
        atomic_torch_save(obj, path)
    except OSError as err:
        log.warning("could not write the teacher-logits cache %s: %s", path, err)
        return False
    return True


def _ignore(path: Path, reason: str) -> None:
    log.warning("ignoring the teacher-logits cache %s (%s); recomputing", path, reason)
    return None


def cached_teacher_logits(
    teacher: Teacher,
    splits: Mapping[str, Split],
    runtime: Runtime,
    cache_dir: Path | None,
) -> tuple[dict[str, torch.Tensor], str]:
    """Each member's logits on each split, ``{name: [M, N, K]}``, and where they came from.

    The second value is ``"hit"`` (read from ``cache_dir``), ``"written"`` (computed and
    cached), ``"not written"`` (computed; writing failed) or ``"off"`` (``cache_dir`` None).
    """
    if cache_dir is None:
        return member_logits(teacher, splits, runtime), "off"
    started = time.perf_counter()
    key = cache_key(teacher, splits, runtime)
    path = Path(cache_dir) / f"{key}.pt"
    shapes = {
        name: (len(teacher), len(split), teacher.num_classes) for name, split in splits.items()
    }
    cached = load_logits(path, key, shapes)
    if cached is not None:
        log.info(
            "teacher logits: read from the cache %s (%.1f s); delete it to recompute",
            path, time.perf_counter() - started,
        )  # fmt: skip
        return cached, "hit"
    logits = member_logits(teacher, splits, runtime)
    if save_logits(path, key, logits):
        log.info(
            "teacher logits: computed in %.1f s and cached in %s",
            time.perf_counter() - started, path,
        )  # fmt: skip
        return logits, "written"
    return logits, "not written"
