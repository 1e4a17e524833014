"""``--config RUN/config.json``: rerun a run with the flags it recorded (docs/cli.md).

A run folder's config.json holds every setting as resolved (α, T and the learning rate included),
the teacher's member files with their sha256 and the digest of the images it trained on. Read
back, it gives the options of :func:`ensc.compress.config.compress_config`; the caller's own
options override them one by one. The rerun then checks that the teacher files and the images are
the recorded ones, unless an override names other ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ensc.compress.identity import changed_splits
from ensc.errors import ConfigError

# config.json's nested settings -> the flat options (the CLI's flags, with _ for -)
_OPTIM = {"epochs": "epochs", "batch_size": "batch_size", "lr": "lr",
          "weight_decay": "weight_decay", "max_steps": "max_steps", "steps": "steps",
          "ema": "ema"}  # fmt: skip
_DISTILL = {"alpha": "alpha", "temperature": "temperature", "fast_weights": "fast_weights",
            "member_batch": "member_batch", "targets": "targets", "mix": "mix"}  # fmt: skip
_DATA = {"name": "dataset", "root": "data_root", "train_subset": "train_subset",
         "test_subset": "test_subset", "val_root": "val_root", "mode": "data_mode",
         "workers": "workers", "image_size": "image_size"}  # fmt: skip
_TOP = ("arch", "arch_kwargs", "members", "init", "recalibrate_bn", "calibrate",
        "bn_recal_batches", "max_acc_drop", "fold_tolerance", "seed", "save_every", "eval_every",
        "teacher_arch", "teacher_arch_kwargs", "code_path", "student_init", "method", "baselines",
        "corruptions", "corruption_subset", "ood_data")  # fmt: skip
# options that give other images than the recorded run's (the seed carves another validation
# split): then their digest is not checked
DATA_OPTIONS = ("dataset", "data_root", "train_subset", "test_subset", "val_root", "seed")


def read_record(path: str | Path) -> dict[str, Any]:
    """config.json of a run folder (or the folder itself), as written; one line when it is not."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"--config {path}: cannot read it ({err.strerror or err})") from err
    except ValueError as err:
        raise ConfigError(f"--config {path} is not valid JSON: {err}") from err
    if not isinstance(record, dict) or not {"arch", "optim", "distill"} <= set(record):
        raise ConfigError(f"--config {path} is not the config.json of an `ensc compress` run")
    return record


def recorded_options(record: dict[str, Any]) -> dict[str, Any]:
    """The flat options the recorded run was made with (not where it was written, nor whether it
    resumed or replaced a folder)."""
    options: dict[str, Any] = {k: record[k] for k in _TOP if k in record}
    options["teacher"] = record.get("teacher_path") or record.get("teacher")
    options["teacher_cache"] = record.get("cache_teacher_logits", True)
    options.update({flat: record["optim"][k] for k, flat in _OPTIM.items() if k in record["optim"]})
    distill = record["distill"]
    options.update({flat: distill[k] for k, flat in _DISTILL.items() if k in distill})
    options["perturb"], options["step"] = distill["perturb"]["kind"], distill["perturb"]["step"]
    data = record.get("data_overrides") or {}
    options.update({flat: data[k] for k, flat in _DATA.items() if data.get(k) is not None})
    if isinstance(options.get("image_size"), list):
        options["image_size"] = tuple(options["image_size"])
    if isinstance(options.get("baselines"), list):
        options["baselines"] = tuple(options["baselines"])
    return options


def rerun_options(path: str | Path, given: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The options of a rerun of the run at ``path`` with ``given`` overriding the recorded ones,
    and what the rerun must find again: ``teacher_files`` (unless a teacher is given) and
    ``data_sha256`` (unless the data is)."""
    record = read_record(path)
    if record.get("unsafe_load") and not given.get("unsafe_load"):
        raise ConfigError(
            f"--config {path}: the recorded run loaded its teacher with --unsafe-load, which is "
            "never taken from a file; pass --unsafe-load again if you trust those files"
        )
    options = {**recorded_options(record), **given}
    expected: dict[str, Any] = {"from": str(path)}
    if "teacher" not in given and record.get("teacher_files"):
        expected["teacher_files"] = record["teacher_files"]
    if not any(name in given for name in DATA_OPTIONS) and record.get("data_sha256"):
        expected["data_sha256"] = record["data_sha256"]
    if record.get("amp"):  # --amp auto trains in it again, whatever a probe would say now
        expected["amp"] = record["amp"]
    return options, expected


def check_teacher(expected: dict[str, Any] | None, teacher_files: list[dict[str, Any]]) -> None:
    """The teacher files the rerun found are the recorded run's (by name and sha256)."""
    if not expected or "teacher_files" not in expected:
        return
    want = [(f.get("path"), f.get("sha256")) for f in expected["teacher_files"]]
    got = [(f.get("path"), f.get("sha256")) for f in teacher_files]
    if got != want:
        changed = [g[0] or w[0] for g, w in zip(got, want, strict=False) if g != w] or ["members"]
        raise ConfigError(
            f"--config {expected['from']}: the teacher's files differ from the recorded run's "
            f"({', '.join(map(str, changed))}); pass --teacher to rerun with another teacher"
        )


def check_data(expected: dict[str, Any] | None, digests: dict[str, str]) -> None:
    """The images the rerun read are the recorded run's (each split's digest)."""
    if not expected or "data_sha256" not in expected:
        return
    changed = changed_splits(expected["data_sha256"], digests)
    if changed:
        raise ConfigError(
            f"--config {expected['from']}: the {' and '.join(changed)} images differ from the "
            "recorded run's; pass the data flags (--data-root, --dataset, ...) to rerun on others"
        )
