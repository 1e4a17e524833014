"""The run folder of `ensc compress`: which files it holds, where it goes, and how it is found.

A run folder holds ``student.pt`` (the single plain network in ensc's checkpoint format),
``student_be.pt`` (the BatchEns student), ``config.json``, ``log.txt``, ``report.json`` and
``report.md``; ``.state.pt`` while training can still be resumed. ``runs/latest`` points at the
newest finished run, so `ensc export` / `ensc bench` find it without options. This module is the
only place that spells those names out: `compress` writes a run, `export` reads it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from ensc.errors import CheckpointError, ConfigError

RUNS_DIR = Path("runs")  # default home of run folders and the `latest` link
STUDENT = "student.pt"
STUDENT_BE = "student_be.pt"
CONFIG = "config.json"
LOG = "log.txt"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
STATE = ".state.pt"  # resumable training state; removed when the run finishes
LATEST = "latest"
CHECKPOINTS = {"student": STUDENT, "student-be": STUDENT_BE}  # what --what names -> file


def default_run_dir(runs_dir: Path, name: str) -> Path:
    """``runs_dir/<name>-<YYYYmmdd-HHMMSS>``: a new folder per run."""
    return Path(runs_dir) / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def latest_to_resume(runs_dir: Path) -> Path:
    """The run ``runs_dir/latest`` points at, if it can be resumed."""
    run_dir = Path(runs_dir) / LATEST
    if not (run_dir / STATE).exists():
        raise ConfigError(
            f"nothing to resume in {run_dir}: pass --out RUN_DIR of the interrupted run"
        )
    return run_dir.resolve()


def claim(run_dir: Path, *, force: bool, resume: bool) -> Path:
    """Make ``run_dir`` ready for a run; refuse to overwrite a finished or resumable run unless asked."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} is a file; give a folder for the run")
    if run_dir.exists() and not (force or resume):
        taken = [n for n in (STUDENT, REPORT_JSON, STATE) if (run_dir / n).exists()]
        if taken:
            raise ConfigError(
                f"{run_dir} already holds a run ({taken[0]}): pass --resume to continue it or "
                "--force to overwrite it"
            )
    if force:
        (run_dir / STATE).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def point_latest(runs_dir: Path, run_dir: Path) -> None:
    """Atomically repoint ``runs_dir/latest`` at ``run_dir`` (relative when inside runs_dir)."""
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir.resolve()
    try:
        link_to = os.path.relpath(target, runs_dir.resolve())
    except ValueError:  # another drive on Windows
        link_to = str(target)
    tmp = runs_dir / f".{LATEST}.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(link_to, tmp, target_is_directory=True)
    os.replace(tmp, runs_dir / LATEST)


@contextlib.contextmanager
def run_log(run_dir: Path | None) -> Iterator[None]:
    """Copy ensc's INFO log lines into the run's ``log.txt`` while the block runs (None: no file).

    The ``ensc`` logger's level is lowered to INFO if needed and restored afterwards.
    """
    if run_dir is None:
        yield
        return
    handler = logging.FileHandler(Path(run_dir) / LOG, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    handler.setLevel(logging.INFO)
    logger = logging.getLogger("ensc")
    level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()


def resolve_run(run: Path | None, runs_dir: Path = RUNS_DIR) -> Path:
    """The run folder: ``run`` or ``runs_dir/latest``; a one-line error when there is none."""
    run_dir = Path(run) if run is not None else Path(runs_dir) / LATEST
    if not run_dir.exists():
        hint = "" if run is not None else f" (no {run_dir} here)"
        raise CheckpointError(
            f"no run found at {run_dir}{hint}: run `ensc compress --teacher DIR --arch ARCH` "
            "first, or pass --run DIR or --model FILE.pt"
        )
    if not run_dir.is_dir():
        raise CheckpointError(f"--run {run_dir} is a file; pass the run folder of `ensc compress`")
    return run_dir


def checkpoint_path(run_dir: Path, what: str) -> Path:
    """``student.pt`` or ``student_be.pt`` of a finished run; a one-line error when it is missing."""
    path = Path(run_dir) / CHECKPOINTS[what]
    if not path.is_file():
        raise CheckpointError(
            f"run {run_dir} has no {path.name}: `ensc compress` did not finish there; "
            "rerun it with --resume, or pass --model FILE.pt"
        )
    return path


def read_config(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``config.json`` (None when it is missing or unreadable)."""
    try:
        record = json.loads((Path(run_dir) / CONFIG).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def teacher_dir(run_dir: Path) -> Path:
    """The teacher folder recorded in the run's config.json (relative paths: from the cwd)."""
    config = Path(run_dir) / CONFIG
    recorded = (read_config(run_dir) or {}).get("teacher")
    if not isinstance(recorded, str):
        raise CheckpointError(f"cannot read the teacher folder from {config}: pass --teacher DIR")
    folder = Path(recorded)
    if not folder.exists():
        raise CheckpointError(
            f"the run's teacher {folder} (recorded in {config}) is not here: pass --teacher DIR"
        )
    return folder
