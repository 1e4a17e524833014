"""The run folder of `ensc compress`: which files it holds, the states it moves through, how it is found.

A run folder holds ``student.pt`` (the single plain network in ensc's checkpoint format),
``student_be.pt`` (the BatchEns student), ``config.json``, ``log.txt``, ``report.json`` and
``report.md`` (with ``reliability.png`` and ``dee.png`` when matplotlib is installed, and
``ood_scores.png`` / ``corruptions.png`` with ``--ood-data`` / ``--corruptions``), and with
``--baselines`` a run folder of its own per baseline in ``baselines/<method>/``;
``.state.pt`` while training can still be resumed; `ensc export` adds ``*.onnx`` files.
``runs/latest`` points at the newest finished run, so `ensc export` / `ensc bench` find it
without options. This module is the only place that spells those names and the rules below out:
`compress` writes a run through :func:`open_run`, `export` and `bench` read it through
:func:`resolve_run`, :func:`check_finished`, :func:`checkpoint_path` and :func:`check_derived`.

A folder is always in one of three states, never a mix:

- **absent** (or empty);
- **unfinished**: it holds the marker ``.incomplete``, a JSON record of the run's identity (the
  teacher files' sha256 and every flag that shapes the result) and of whether the folder's old
  contents are cleared yet. `compress` writes the marker before anything else and removes it
  last, so a run killed at any point is unfinished. Its files may be partial: `export` and
  `bench` refuse it, plain `compress` refuses it, ``compress --resume`` continues it only with
  the same identity (from ``.state.pt``, saved at epoch ends and every ``--save-every`` steps, else from the start), and
  ``compress --force`` replaces it;
- **finished**: no marker, no ``.state.pt``; ``student.pt`` and ``report.json`` there, every
  file written by one run. ``--resume`` refuses it ("already finished"), ``--force`` replaces it.

How `compress` moves a folder between them (:class:`RunWriter`), always holding its lock:

- absent/empty, or anything with ``--force`` → unfinished: the marker is written (not cleared),
  every other entry (``.state.pt`` first, ``*.onnx`` included) deleted, the marker rewritten as
  cleared. ``--force`` over a **finished** run moves its entries into ``.replaced/`` instead,
  where it waits until the new run commits (then it is deleted); a new run that fails (a setup
  error, divergence) or is interrupted before anything resumable exists puts it back, byte for
  byte. A killed ``--force`` leaves it there: ``--resume`` or another ``--force`` keeps it
  waiting, and a failure of either gives it back;
- unfinished ``--resume`` with the same identity → unfinished: a folder whose clearing was
  interrupted is cleared first; otherwise its previous outputs are deleted (the resumed run
  rewrites them) and ``.state.pt``, ``config.json``, ``log.txt`` and ``baselines/`` (the
  ``--baselines`` runs, each a run folder of its own) are kept. A refused resume
  (other identity, finished run, damaged ``.state.pt``) writes nothing;
- unfinished → finished (:meth:`RunWriter.commit`): after every file is written, ``.state.pt``
  is removed, then ``.replaced/``, then the marker; then ``runs/latest`` is repointed;
- a run that fails with an exception before anything resumable exists (no ``.state.pt``) and
  that started fresh leaves no folder behind (a folder that existed empty stays, empty).

The lock ``.lock`` (JSON: pid, host, command, since) is created exclusively: a second writer is
refused with one line while the holder lives; a lock whose process is dead on this host (or that
stayed empty) is stale and taken over. `compress` holds it for the whole run, `export` while it
adds a file to a finished run (:func:`adding_to`); whoever takes it deletes the temp files
(``.*.tmp``) that killed writers left. Readers (`bench`) take no lock: they check the state and
the hashes. Every ONNX file `export` writes records the sha256 of the checkpoints it came from;
`export` and `bench` refuse an ONNX file in a run that does not match the run's current
checkpoints (:func:`check_derived`). Files follow the umask (see :mod:`ensc.fileio`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import time
import zipfile
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from ensc import faults
from ensc.errors import CheckpointError, ConfigError
from ensc.fileio import atomic_write_text

log = logging.getLogger(__name__)

RUNS_DIR = Path("runs")  # default home of run folders and the `latest` link
STUDENT = "student.pt"
STUDENT_BE = "student_be.pt"
CONFIG = "config.json"
LOG = "log.txt"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
RELIABILITY_PNG = "reliability.png"  # pictures linked from report.md (with matplotlib)
DEE_PNG = "dee.png"
OOD_PNG = "ood_scores.png"  # with --ood-data
CORRUPTIONS_PNG = "corruptions.png"  # with --corruptions
CURVES_CSV = "curves.csv"  # the training record, written as it comes (compress/curves.py)
CURVES_PNG = "curves.png"
BASELINES = "baselines"  # --baselines: one finished or unfinished run folder per baseline method
RESTART_HINT = (
    "--force to start it over"  # how a refused run is started again (reworded for baselines)
)
STATE = ".state.pt"  # resumable training state; removed when the run finishes
MARKER = ".incomplete"  # written first, removed last: the folder holds an unfinished run
REPLACED = ".replaced"  # --force over a finished run: that run, kept until the new one finishes
MOVING = ".moving"  # in REPLACED while the entries are still being moved in
LOCK = ".lock"  # held by the one process that writes the folder
LATEST = "latest"
CHECKPOINTS = {"student": STUDENT, "student-be": STUDENT_BE}  # what --what names -> file
# what --what names -> the stem of its ONNX file in the run, <stem>.onnx
ONNX_STEMS = {"student": "student", "student-be": "student_be", "teacher": "teacher"}
RUN_FILES = (STUDENT, STUDENT_BE, CONFIG, LOG, REPORT_JSON, REPORT_MD, RELIABILITY_PNG, DEE_PNG,
             OOD_PNG, CORRUPTIONS_PNG, CURVES_CSV, CURVES_PNG, STATE, MARKER)  # fmt: skip
STALE_UNREADABLE_LOCK_SECONDS = 10.0  # a lock still unreadable after this long was left by a crash


def default_run_dir(runs_dir: Path, name: str) -> Path:
    """``runs_dir/<name>-<YYYYmmdd-HHMMSS>``: a new folder per run."""
    return Path(runs_dir) / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def onnx_file(run_dir: Path, what: str) -> Path:
    """Where `ensc export` puts the fp32 ONNX file of ``what`` (student, student-be, teacher)."""
    return Path(run_dir) / f"{ONNX_STEMS[what]}.onnx"


def state_of(run_dir: Path) -> str:
    """``absent``, ``empty``, ``unfinished``, ``finished``, or ``foreign`` (not empty, no run).

    The lock and temp files left by killed writers do not count.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return "absent"
    names = {p.name for p in run_dir.iterdir() if not _is_lock_or_temp(p.name)}
    if not names:
        return "empty"
    if MARKER in names or STATE in names:
        return "unfinished"
    if {STUDENT, REPORT_JSON} <= names:
        return "finished"
    return "unfinished" if names & set(RUN_FILES) else "foreign"  # unfinished: by an older ensc


def latest_to_resume(runs_dir: Path) -> Path:
    """The most recently touched unfinished run in ``runs_dir`` (``--resume`` without ``--out``)."""
    runs_dir = Path(runs_dir)
    found = [
        p for p in (runs_dir.iterdir() if runs_dir.is_dir() else ())
        if p.is_dir() and not p.is_symlink() and (p / MARKER).is_file()
    ]  # fmt: skip
    if not found:
        raise ConfigError(
            f"nothing to resume in {runs_dir}: no unfinished run there; pass --out RUN_DIR of the "
            "interrupted run"
        )
    return max(found, key=lambda p: (p / MARKER).stat().st_mtime)


class RunWriter:
    """A run folder this process writes while holding its lock; made by :func:`open_run`."""

    def __init__(self, path: Path, identity: dict[str, Any]) -> None:
        self.path = Path(path)
        self.identity = json.loads(json.dumps(identity))  # as the marker stores it
        self._fresh = False  # started from an empty folder in this process
        self._committed = False
        self._replacing = False  # --force over a finished run, which waits in REPLACED

    def commit(self, runs_dir: Path | None) -> None:
        """Unfinished → finished, once every file is written: ``.state.pt`` goes, then the
        marker; then ``runs_dir/latest`` points here when the run is inside ``runs_dir`` (a run
        written elsewhere with --out leaves the current folder's runs/latest alone)."""
        (self.path / STATE).unlink(missing_ok=True)
        if (self.path / REPLACED).exists():  # the run --force replaced: no longer needed
            shutil.rmtree(self.path / REPLACED)
        (self.path / MARKER).unlink()
        self._committed = True
        if runs_dir is not None and is_inside(self.path, runs_dir):
            point_latest(runs_dir, self.path)

    def _start(self, *, force: bool, resume: bool) -> None:
        """Refuse (writing nothing), resume, or start from an empty folder."""
        path, state = self.path, state_of(self.path)
        if state == "foreign":
            first = min(p.name for p in path.iterdir() if not _is_lock_or_temp(p.name))
            raise ConfigError(
                f"{path} is not empty and holds no ensc run (it has {first}): choose a new or "
                "empty folder for --out"
            )
        if state == "finished" and resume:
            raise ConfigError(f"{path} is already finished; use --force to redo it")
        if state == "finished" and not force:
            raise ConfigError(
                f"{path} already holds a finished run: pass --force to redo it, or choose another --out"
            )
        if state == "unfinished" and resume:
            self._resume()
            return
        if state == "unfinished" and not force:
            raise ConfigError(
                f"{path} holds an unfinished run: pass --resume (with the flags it was started "
                "with) to continue it, or --force to start it over"
            )
        # --force over a finished run (or over the unfinished run of an earlier --force that
        # was killed, whose REPLACED still holds one): keep that run until this one finishes
        self._replacing = state == "finished" or (path / REPLACED).is_dir()
        self._write_marker(cleared=False)
        self._clear(keep=(MARKER,))
        self._write_marker(cleared=True)
        self._fresh = True

    def _resume(self) -> None:
        path = self.path
        marker = _read_json(path / MARKER)
        if marker is None or not isinstance(marker.get("identity"), dict):
            raise ConfigError(
                f"{path} holds an unfinished run that records no settings (an older ensc left "
                f"it), so --resume cannot check them: pass {RESTART_HINT}"
            )
        diffs = _differences(marker["identity"], self.identity)
        if diffs:
            more = f" (and {len(diffs) - 1} more differences)" if len(diffs) > 1 else ""
            raise ConfigError(
                f"cannot resume {path}: it was started with {diffs[0]}{more}; pass the flags it "
                f"was started with (see {path / CONFIG} and {path / LOG}), or {RESTART_HINT}"
            )
        state = path / STATE
        if state.exists() and not zipfile.is_zipfile(state):  # torch.save writes a zip archive
            raise ConfigError(
                f"{state} is damaged (not a file torch.save wrote), so {path} cannot be "
                f"resumed: pass {RESTART_HINT}"
            )
        self._replacing = bool(marker.get("replacing"))
        if marker.get("cleared"):  # the outputs of the earlier attempt are rewritten
            self._clear(keep=(MARKER, STATE, CONFIG, LOG, BASELINES))
        else:  # an interrupted --force: finish clearing the folder first
            self._clear(keep=(MARKER,))
            self._write_marker(cleared=True)

    def _write_marker(self, *, cleared: bool) -> None:
        record = {"identity": self.identity, "cleared": cleared, "replacing": self._replacing,
                  "since": datetime.now().isoformat(timespec="seconds")}  # fmt: skip
        atomic_write_text(self.path / MARKER, json.dumps(record, indent=2) + "\n")

    def _clear(self, keep: Sequence[str]) -> None:
        """Delete every entry but the lock, ``keep`` and REPLACED; ``.state.pt`` first, so that a
        clearing cut short never leaves an old training state to resume from. While replacing a
        finished run, its entries move into REPLACED instead (a REPLACED already there holds
        the finished run, and what is left beside it is an unfinished run: deleted)."""
        keep = (*keep, REPLACED)
        doomed = [
            p for p in self.path.iterdir() if p.name not in keep and not p.name.startswith(LOCK)
        ]
        into = self.path / REPLACED
        move = self._replacing and (not into.exists() or (into / MOVING).exists())
        if move:
            into.mkdir(exist_ok=True)
            (into / MOVING).touch()  # until every entry of the finished run is in
        for p in sorted(doomed, key=lambda p: (p.name != STATE, p.name)):
            if move and not _is_temp(p.name):
                os.replace(p, into / p.name)
            elif p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
            faults.point("compress.wipe")
        if move:
            (into / MOVING).unlink()

    def _abandon(self, error: BaseException) -> None:
        """After an exception: a fresh run with nothing resumable yet leaves nothing behind. A run
        that replaced a finished one gives it back when it failed, or when it was interrupted
        with nothing resumable yet (an interrupted run that can be resumed keeps it waiting)."""
        if self._committed:
            return
        resumable = (self.path / STATE).exists()
        interrupted = isinstance(error, KeyboardInterrupt | SystemExit)
        into = self.path / REPLACED
        whole = into.is_dir() and not (into / MOVING).exists()  # all of it moved in
        if self._replacing and whole and not (interrupted and resumable):
            self._restore()
        elif self._fresh and not resumable:
            self._clear(keep=())

    def _restore(self) -> None:
        """Put the finished run that waits in REPLACED back, and remove this run's files."""
        into = self.path / REPLACED
        self._replacing = False  # _clear deletes from here on
        self._clear(keep=(MARKER,))
        for p in into.iterdir():
            if p.name != MOVING:
                os.replace(p, self.path / p.name)
        shutil.rmtree(into)
        (self.path / MARKER).unlink()
        log.warning("%s: the run failed; the finished run --force was replacing is back", self.path)


@contextlib.contextmanager
def open_run(
    run_dir: Path, identity: dict[str, Any], *, force: bool, resume: bool
) -> Iterator[RunWriter]:
    """Lock ``run_dir`` and make it an unfinished run for this process (rules: module docstring).

    ``identity`` (JSON-able) is what a ``--resume`` must match. Refusals raise a one-line
    ConfigError before anything is written. Write the run's files into ``writer.path`` and call
    ``writer.commit`` once all are there; an exception before that leaves the folder unfinished,
    or removes it when the run started fresh and nothing resumable exists yet.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} is a file; give a folder for the run")
    if resume and state_of(run_dir) in ("absent", "empty"):
        raise ConfigError(
            f"nothing to resume in {run_dir}: no run there; drop --resume to start one"
        )
    existed = run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        held = _acquire(run_dir, "compress")
    except BaseException:
        if not existed:
            _rmdir_if_empty(run_dir)
        raise
    writer = RunWriter(run_dir, identity)
    try:
        writer._start(force=force, resume=resume)
        yield writer
    except BaseException as error:
        writer._abandon(error)
        raise
    finally:
        _release(run_dir, held)
        if not existed:
            _rmdir_if_empty(run_dir)


@contextlib.contextmanager
def adding_to(folder: Path, command: str = "export") -> Iterator[None]:
    """Hold the lock of the run in ``folder`` while a file is added to it; refuse an unfinished
    run. A folder that holds no run is not locked."""
    folder = Path(folder)
    if state_of(folder) not in ("finished", "unfinished"):
        yield
        return
    held = _acquire(folder, command)
    try:
        check_finished(folder)
        yield
    finally:
        _release(folder, held)


@contextlib.contextmanager
def locked(folder: Path, command: str) -> Iterator[None]:
    """Hold ``folder``'s lock (made if missing) while ``command`` writes into it: a second writer
    is refused with one line (`ensc train`'s member folders)."""
    held = _acquire(Path(folder), command)
    try:
        yield
    finally:
        _release(Path(folder), held)


# --- the lock ---------------------------------------------------------------------------------


def _acquire(run_dir: Path, command: str) -> dict[str, Any]:
    """Create ``run_dir/.lock`` exclusively (taking over a stale one) and delete leftover temp
    files; a one-line ConfigError when a live process holds it."""
    lock = run_dir / LOCK
    record = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
              "since": datetime.now().isoformat(timespec="seconds")}  # fmt: skip
    deadline = time.monotonic() + STALE_UNREADABLE_LOCK_SECONDS + 5
    while time.monotonic() < deadline:
        if _create_exclusive(lock, record):
            for p in run_dir.iterdir():  # nobody else writes here now: these are a crash's
                if _is_temp(p.name) and p.is_file():
                    p.unlink(missing_ok=True)
            return record
        holder = _read_json(lock)
        if _is_stale(lock, holder):
            _remove_stale(lock, holder)
        elif holder is not None:
            raise ConfigError(
                f"{run_dir} is being written by another ensc ({holder.get('command')}, pid "
                f"{holder.get('pid')} on {holder.get('host')} since {holder.get('since')}): wait "
                f"for it to finish, or delete {lock} if that process is gone"
            )
        else:  # being created right now
            time.sleep(0.05)
    raise ConfigError(
        f"cannot lock {run_dir}: {lock} stays unreadable; delete it if no ensc runs there"
    )


def _create_exclusive(path: Path, record: dict[str, Any]) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    return True


def _is_stale(lock: Path, holder: dict[str, Any] | None) -> bool:
    """Left by a process that is gone: its pid is dead on this host, or it never got written."""
    if holder is None:
        try:
            return time.time() - lock.stat().st_mtime > STALE_UNREADABLE_LOCK_SECONDS
        except FileNotFoundError:
            return False  # released meanwhile: try again
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or os.name == "nt":
        return False  # cannot tell from here (on Windows os.kill would end the process)
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _remove_stale(lock: Path, holder: dict[str, Any] | None) -> None:
    """Delete the stale ``lock`` unless another process replaced it meanwhile; takers are
    serialized by a short-lived guard file."""
    guard = lock.with_name(f"{lock.name}.takeover")
    if not _create_exclusive(guard, {"pid": os.getpid(), "host": socket.gethostname()}):
        if _is_stale(guard, _read_json(guard)):  # a taker died within these few lines
            guard.unlink(missing_ok=True)
        else:
            time.sleep(0.05)
        return
    try:
        if _read_json(lock) == holder:
            lock.unlink(missing_ok=True)
    finally:
        guard.unlink(missing_ok=True)


def _release(run_dir: Path, record: dict[str, Any]) -> None:
    lock = run_dir / LOCK
    if _read_json(lock) == record:
        lock.unlink(missing_ok=True)


def _is_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")  # ensc.fileio.atomic_write's temp files


def _is_lock_or_temp(name: str) -> bool:
    return name.startswith(LOCK) or _is_temp(name)


def _rmdir_if_empty(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _differences(old: Any, new: Any, key: str = "") -> list[str]:
    """What differs between two identities, as ``key=old, not new`` (long values: ``other key``)."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = [*old, *(k for k in new if k not in old)]
        return [
            d
            for k in keys
            for d in _differences(old.get(k), new.get(k), f"{key}.{k}" if key else k)
        ]
    if old == new:
        return []
    if len(json.dumps(old)) + len(json.dumps(new)) > 60:
        return [f"other {key.replace('_', ' ')}"]
    return [f"{key}={json.dumps(old)}, not {json.dumps(new)}"]


# --- finding and reading runs ----------------------------------------------------------------


def is_inside(run_dir: Path, runs_dir: Path) -> bool:
    """Whether ``run_dir`` lies under ``runs_dir`` (both resolved)."""
    return Path(run_dir).resolve().is_relative_to(Path(runs_dir).resolve())


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
    try:
        with info_to(handler):
            yield
    finally:
        handler.close()


@contextlib.contextmanager
def info_to(handler: logging.Handler) -> Iterator[None]:
    """The ``ensc`` loggers' INFO lines (and above) also go to ``handler`` meanwhile."""
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


def resolve_run(run: Path | None, runs_dir: Path = RUNS_DIR) -> Path:
    """The run folder: ``run`` or ``runs_dir/latest``; a one-line error when there is none."""
    run_dir = Path(run) if run is not None else Path(runs_dir) / LATEST
    if not run_dir.exists() and run_dir.is_symlink():
        raise CheckpointError(
            f"{run_dir} points at {os.readlink(run_dir)}, which no longer exists: pass --run DIR "
            "of another run, or run `ensc compress` again"
        )
    if not run_dir.exists():
        hint = "" if run is not None else f" (no {run_dir} here)"
        raise CheckpointError(
            f"no run found at {run_dir}{hint}: run `ensc compress --teacher DIR --arch ARCH` "
            "first, or pass --run DIR or --model FILE.pt"
        )
    if not run_dir.is_dir():
        raise CheckpointError(f"--run {run_dir} is a file; pass the run folder of `ensc compress`")
    return run_dir


def check_not_unfinished(checkpoint: Path) -> None:
    """Refuse ``student.pt`` / ``student_be.pt`` given by path when its folder is an unfinished
    run (its files may be from the interrupted attempt, or half written)."""
    checkpoint = Path(checkpoint)
    if checkpoint.name in CHECKPOINTS.values() and state_of(checkpoint.parent) == "unfinished":
        check_finished(checkpoint.parent)


def check_finished(run_dir: Path) -> Path:
    """``run_dir`` if it holds a finished run; a one-line error otherwise (see the module docstring)."""
    state = state_of(run_dir)
    lock = Path(run_dir) / LOCK
    holder = _read_json(lock) if state != "finished" else None
    if holder is not None and not _is_stale(lock, holder):
        raise CheckpointError(
            f"run {run_dir} is unfinished: another ensc ({holder.get('command')}, pid "
            f"{holder.get('pid')}) is writing it now; wait for it to finish"
        )
    if state == "unfinished":
        raise CheckpointError(
            f"run {run_dir} is unfinished (`ensc compress` was interrupted there, or still runs): "
            f"finish it with `ensc compress --out {run_dir} --resume` and the flags it was started "
            "with, or redo it with --force"
        )
    if state != "finished":
        raise CheckpointError(
            f"run {run_dir} has no {STUDENT}: it is not a run of `ensc compress`; pass --run DIR "
            "of one, or --model FILE.pt"
        )
    return Path(run_dir)


def checkpoint_path(run_dir: Path, what: str) -> Path:
    """``student.pt`` or ``student_be.pt`` of a finished run; a one-line error when it is missing."""
    path = check_finished(run_dir) / CHECKPOINTS[what]
    if not path.is_file():
        raise CheckpointError(
            f"run {run_dir} has no {path.name} (deleted?): redo the run with `ensc compress "
            f"--out {run_dir} --force`, or pass --model FILE.pt"
        )
    return path


def check_derived(
    path: Path, recorded: Any, sources: Sequence[Path], current: Sequence[str], redo: str
) -> None:
    """Refuse a file derived from a run's checkpoints (an ONNX export) unless ``recorded`` (the
    sha256 of its sources when it was made) equals ``current`` (theirs now); ``redo`` remakes it."""
    if recorded is None:
        raise CheckpointError(
            f"{path} does not record which checkpoint it was exported from (an older ensc wrote "
            f"it): re-export it with `{redo}`, or delete it"
        )
    if list(recorded) != list(current):
        names = ", ".join(Path(p).name for p in sources)
        raise CheckpointError(
            f"{path} was not exported from the {names} now in {Path(path).parent} (it is left from "
            f"another run): re-export it with `{redo}`, or delete it"
        )


def read_config(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``config.json`` (None when it is missing or unreadable)."""
    try:
        record = json.loads((Path(run_dir) / CONFIG).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def teacher_dir(run_dir: Path) -> Path:
    """The teacher folder recorded in the run's config.json: its absolute path (``teacher_path``;
    runs of older ensc versions recorded only the path as given, read from the cwd)."""
    config = Path(run_dir) / CONFIG
    record = read_config(run_dir) or {}
    recorded = record.get("teacher_path") or record.get("teacher")
    if not isinstance(recorded, str):
        raise CheckpointError(f"cannot read the teacher folder from {config}: pass --teacher DIR")
    folder = Path(recorded)
    if not folder.exists():
        raise CheckpointError(
            f"the run's teacher {folder} (recorded in {config}) is not here: pass --teacher DIR"
        )
    return folder


def check_teacher_files(run_dir: Path, folder: Path, hashes: Sequence[str]) -> None:
    """Refuse a teacher whose member files (``hashes``: their sha256, in order) are not the ones
    the run recorded in config.json (``teacher_files``) when it was distilled."""
    config = Path(run_dir) / CONFIG
    files = (read_config(run_dir) or {}).get("teacher_files")
    if not isinstance(files, list):
        return  # handed over from Python, or an older ensc: nothing recorded to check
    recorded = [f.get("sha256") for f in files if isinstance(f, dict)]
    if list(hashes) == recorded:
        return
    if len(hashes) != len(recorded):
        what = f"it has {len(hashes)} members, the run's teacher had {len(recorded)}"
    else:
        k = next(i for i, (a, b) in enumerate(zip(hashes, recorded, strict=True)) if a != b)
        what = f"member {k} ({files[k].get('path')}) differs from the sha256 in {config}"
    raise CheckpointError(
        f"the teacher in {folder} is not the one {run_dir} was distilled from: {what}; pass "
        "--teacher DIR to use another teacher on purpose"
    )
