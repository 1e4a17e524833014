"""What makes a run the same run: the identity ``--resume`` must match (:mod:`ensc.rundir`).

Every flag that shapes the result, the teacher's member files (or the networks handed over from
Python), and the data: its digest is in the identity when the data was handed over from Python,
and in config.json (``data_sha256``) once a run has read it from disk, so that a resumed run
refuses images that changed under the same file names.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ensc import rundir
from ensc.compress.config import CompressConfig
from ensc.data.splits import ImageDataset
from ensc.errors import ConfigError
from ensc.evaluation.logits_cache import split_sha256, weights_sha256
from ensc.fileio import file_sha256, jsonable
from ensc.teachers.ensemble import Teacher
from ensc.teachers.manifest import member_entries

SPLITS = ("train", "val", "test")

# where the run goes, how it is told and what it may touch: not what it computes
# nor the extra evaluations of the finished networks or the baselines beside it: a resumed run
# may add or drop them
_NOT_IN_IDENTITY = ("teacher", "out", "runs_dir", "resume", "force", "command", "cache_teacher_logits",
                    "unsafe_load", "corruptions", "corruption_subset", "ood_data", "save_every", "eval_every", "expected", "tensorboard",
                    "baselines")  # fmt: skip


def data_sha256(data: ImageDataset) -> dict[str, str]:
    """Each split's digest: its pixels and labels (of a streamed split, its files' fingerprint)."""
    return {name: split_sha256(getattr(data, name)) for name in SPLITS}


def changed_splits(recorded: dict[str, str], digests: dict[str, str]) -> list[str]:
    """The splits whose recorded digest differs from the one read now (unrecorded ones pass)."""
    return [name for name in SPLITS if recorded.get(name) not in (None, digests.get(name))]


def check_same_data(run_dir: Path, digests: dict[str, str]) -> None:
    """Refuse to resume ``run_dir`` on other images than it started with (runs that recorded no
    digest, from before it was recorded, are not checked)."""
    try:
        recorded = json.loads((run_dir / rundir.CONFIG).read_text()).get("data_sha256")
    except (OSError, ValueError):
        return  # no config.json yet: stopped before anything was trained on the data
    if not isinstance(recorded, dict):
        return
    changed = changed_splits(recorded, digests)
    if changed:
        raise ConfigError(
            f"--resume: the {' and '.join(changed)} images differ from those {run_dir} started "
            "with (files changed under the same names?); rerun without --resume, with --force, "
            "to start over"
        )


def run_identity(
    config: CompressConfig, teacher: Teacher | None = None, data: ImageDataset | None = None
) -> dict[str, Any]:
    """What ``--resume`` must match: every flag that shapes the result, and the teacher's member
    files (their sha256, and how each is read) or, for networks handed over from Python
    (``teacher``), a digest of each one's weights; for data handed over (``data``), a digest of
    each split. Reads the files, loads nothing."""
    flags = {k: v for k, v in jsonable(asdict(config)).items() if k not in _NOT_IN_IDENTITY}
    if data is not None:
        flags["data_sha256"] = data_sha256(data)
    # how many reader processes feed the data changes nothing it computes (data.stream)
    flags["data_overrides"] = {k: v for k, v in flags["data_overrides"].items() if k != "workers"}
    if teacher is not None:
        files = [
            {"module": type(m).__qualname__, "sha256": weights_sha256(m)} for m in teacher.members
        ]
        return {**flags, "teacher_files": files}
    entries = member_entries(
        config.teacher, arch=config.teacher_arch, arch_kwargs=config.teacher_arch_kwargs
    )
    files = [
        jsonable({**asdict(e), "path": e.path.name, "sha256": file_sha256(e.path)}) for e in entries
    ]
    return {**flags, "teacher_files": files}
