"""Run folders you can trust (issue 13): `ensc compress` / `ensc export` killed at named points,
two writers at once, and the --force / --resume rules, checked on real processes and real files.

Every kill is a real SIGKILL of a real ``python -m ensc.cli`` process, at a point named by
``ENSC_FAULT`` (:mod:`ensc.faults`); what follows it (``--resume``, a rerun) runs in-process to
save a torch import. A run folder must end as one complete run, the same as an uninterrupted one,
and `export` / `bench` must never use what another run (or half of one) left there.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import onnx
import pytest
import torch

from ensc import rundir
from ensc.errors import ConfigError
from ensc.export.onnx import read_metadata, save_onnx, set_metadata
from ensc.fileio import file_sha256
from ensc.models.checkpoint import load_checkpoint
from tests.conftest import png_folder_teacher, rewrite_pngs, run_cli

# every run here on one thread, in this process as in the subprocesses (OMP_NUM_THREADS=1), so
# an interrupted run and its uninterrupted reference do the same arithmetic
pytestmark = pytest.mark.usefixtures("one_thread")

# 200 images, 40 of them validation: 5 steps of 32 per epoch, 10 in all
# --amp off: these runs are compared bit for bit with a reference run, and --amp auto decides from
# a speed probe that a loaded machine can tip either way on a CPU with native bf16
FLAGS = ("--arch", "resnet8", "--epochs", "2", "--batch-size", "32", "--train-subset", "200",
         "--test-subset", "100", "--bn-recal-batches", "2", "--max-acc-drop", "100",
         "--amp", "off")  # fmt: skip
PICTURES = ["dee.png", "reliability.png"] if importlib.util.find_spec("matplotlib") else []
PICTURES = [*PICTURES, "curves.png"] if PICTURES else []
RUN_FILES = sorted(
    ["config.json", "curves.csv", "log.txt", "report.json", "report.md", "student.pt",
     "student_be.pt", *PICTURES]
)  # fmt: skip
EXPORT = ("export", "--onnx", "--check-samples", "16")


def compress(teacher: Path, *extra: str) -> tuple[str, ...]:
    return ("compress", "--teacher", str(teacher), *FLAGS, *extra)


def killed(args: tuple[str, ...], point: str, cwd: Path) -> None:
    """Run ``ensc args`` in a new process that SIGKILLs itself at ``point`` (``ENSC_FAULT``)."""
    env = {**os.environ, "ENSC_FAULT": point, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "ensc.cli", *args], cwd=cwd, env=env, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, (
        f"not killed at {point}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    )


def error_line(result) -> str:
    """The one ``Error:`` line of a command that failed, with no traceback."""
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file's bytes and mtime; the lock aside (whoever comes takes over a stale one)."""
    return {
        p.name: (p.read_bytes(), p.stat().st_mtime_ns)
        for p in folder.iterdir()
        if p.name != rundir.LOCK
    }


def lock_record(run: Path) -> dict:
    try:
        return json.loads((run / rundir.LOCK).read_text())
    except (OSError, ValueError):
        return {}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def assert_unfinished(run: Path, cwd: Path) -> None:
    """Marked unfinished, and so refused by `export` and `bench`."""
    assert (run / rundir.MARKER).is_file()
    for args in (("export", "--onnx", "--run", str(run)), ("bench", "--run", str(run))):
        assert f"run {run} is unfinished" in error_line(run_cli(*args, cwd=cwd)), args


def assert_same_numbers(got: dict, want: dict, what: str) -> None:
    """The same keys and values; floats equal up to round-off (rel 1e-5), everything else exactly."""
    assert got.keys() == want.keys(), what
    for key, value in want.items():
        if key == "fold_max_abs_diff":  # round-off itself (~1e-7): only its size is the run's
            assert got[key] < 1e-4 and value < 1e-4, f"{what}.{key}"
        elif isinstance(value, float) and isinstance(got[key], float):
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-8), f"{what}.{key}"
        elif isinstance(value, dict):
            assert_same_numbers(got[key], value, f"{what}.{key}")
        else:
            assert got[key] == value, f"{what}.{key}"


def assert_finished_as(run: Path, reference: Path) -> None:
    """``run`` holds one complete run and nothing else: the uninterrupted ``reference`` run."""
    assert names(run) == RUN_FILES
    report = json.loads((run / "report.json").read_text())
    expected = json.loads((reference / "report.json").read_text())
    for section in ("teacher", "student_be", "student_avg", "parity", "train"):
        if section == "train":  # times, not results (phase_seconds: this process's steps only)
            for record in (report[section], expected[section]):
                for key in ("seconds", "s_per_step", "phase_seconds"):
                    record.pop(key)
        assert_same_numbers(report[section], expected[section], section)
    for name in ("student.pt", "student_be.pt"):
        got, want = (
            load_checkpoint(run / name).state_dict,
            load_checkpoint(reference / name).state_dict,
        )
        assert got.keys() == want.keys(), name
        for key in want:  # equal up to float round-off: multi-threaded kernels sum in any order
            torch.testing.assert_close(got[key], want[key], msg=f"{name} {key}")
    # the curves continue across the kill: the same rows (no gap, no repeat), times aside
    got, want = (_curves(folder / "curves.csv") for folder in (run, reference))
    assert [row[0] for row in got] == [row[0] for row in want]  # the steps
    for a, b in zip(got, want, strict=True):
        assert a[1:] == pytest.approx(b[1:], rel=1e-4), (a, b)
    # report.json describes this student.pt: the metrics saved inside it are the report's
    metrics = load_checkpoint(run / "student.pt").metrics
    assert metrics == {k: report["student_avg"][k] for k in ("acc", "nll", "bs", "ece")}


def _curves(path: Path) -> list[list[float]]:
    """curves.csv's rows as numbers (empty cells as nan), its seconds column left out."""
    header, *lines = path.read_text().splitlines()
    keep = [i for i, name in enumerate(header.split(",")) if name != "seconds"]
    return [[float(v) if v else float("nan") for i, v in enumerate(line.split(",")) if i in keep]
            for line in lines]  # fmt: skip


@pytest.fixture(scope="module")
def reference(tiny_teacher: Path, tmp_path_factory) -> Path:
    """The uninterrupted run that every interrupted one must end up as."""
    cwd = tmp_path_factory.mktemp("reference")
    result = run_cli(*compress(tiny_teacher, "--out", "ref"), cwd=cwd)
    assert result.exit_code == 0, result.output
    return cwd / "ref"


@pytest.fixture(scope="module")
def interrupted(tiny_teacher: Path, tmp_path_factory) -> Path:
    """A run killed after its 7th step, so epoch 1 (5 steps) is saved in .state.pt. Copy it."""
    cwd = tmp_path_factory.mktemp("interrupted")
    killed(compress(tiny_teacher, "--out", "run"), "compress.step:7", cwd)
    return cwd / "run"


@pytest.fixture(scope="module")
def exported(tiny_run: Path, tmp_path_factory) -> tuple[Path, list[str]]:
    """A copy of the tiny run whose `ensc export` was killed while writing student.onnx (between
    temp file and rename), then run again; and what the folder held after the kill. Copy it."""
    cwd = tmp_path_factory.mktemp("exported")
    run = cwd / "run"
    shutil.copytree(tiny_run, run)
    killed((*EXPORT, "--run", str(run)), "save.student.onnx", cwd)
    after_kill = names(run)
    result = run_cli(*EXPORT, "--run", str(run), cwd=cwd)
    assert result.exit_code == 0, result.output
    return run, after_kill


def test_killed_at_any_point_then_resumed_ends_as_the_uninterrupted_run(
    tiny_teacher: Path, interrupted: Path, reference: Path, tmp_path: Path
):
    run = tmp_path / "runs" / "r"
    shutil.copytree(interrupted, run)
    assert (run / rundir.STATE).is_file() and not (run / "student.pt").exists()
    holder = json.loads((run / rundir.LOCK).read_text())  # left by the killed process: stale
    assert holder["command"] == "compress" and not alive(holder["pid"])
    assert_unfinished(run, tmp_path)
    # a resume with other settings is refused, and writes nothing
    before = snapshot(run)
    other = run_cli(
        *compress(tiny_teacher, "--out", str(run), "--resume", "--seed", "1"), cwd=tmp_path
    )
    line = error_line(other)
    assert "it was started with seed=0, not 1" in line and "--force" in line
    assert snapshot(run) == before
    # killed again and again: inside the save of student.pt (temp file written, not renamed),
    # before report.json, and with every file written but the run not committed
    resume = compress(tiny_teacher, "--out", str(run), "--resume")
    killed(resume, "save.student.pt", tmp_path)
    assert "student.pt" not in names(run) and "student_be.pt" in names(run)
    assert [n for n in names(run) if n.endswith(".tmp")][0].startswith(".student.pt.")
    assert_unfinished(run, tmp_path)
    killed(resume, "compress.before_report", tmp_path)
    assert "student.pt" in names(run) and "report.json" not in names(run)
    assert not [n for n in names(run) if n.endswith(".tmp")]  # the next writer swept it
    assert_unfinished(run, tmp_path)
    killed(resume, "compress.before_commit", tmp_path)
    assert {"student.pt", "student_be.pt", "report.json", "report.md"} <= set(names(run))
    assert_unfinished(run, tmp_path)  # every file there, yet not a finished run
    # the last resume names no folder: it continues the newest unfinished run in runs/
    result = run_cli(*compress(tiny_teacher, "--resume"), cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert_finished_as(run, reference)
    assert (tmp_path / "runs" / "latest").resolve() == run.resolve()
    assert "resuming after epoch 2" in (run / "log.txt").read_text()  # not trained again


def test_killed_mid_epoch_resumes_from_its_last_step_save_to_the_same_weights(
    tiny_teacher: Path, tmp_path: Path
):
    """--save-every (issue 15): a run killed inside an epoch loses only the steps since its last
    step save, even when killed while writing one, and ends bit for bit as the uninterrupted run
    (ODS draws random numbers, batches are augmented: both resume where they were)."""
    ods = ("--perturb", "ods")
    result = run_cli(*compress(tiny_teacher, *ods, "--out", "ref"), cwd=tmp_path)
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    # saves after steps 2 and 4, killed inside step 5 (the last of epoch 1)
    start = compress(tiny_teacher, *ods, "--out", str(run), "--save-every", "2")
    killed(start, "compress.step:5", tmp_path)
    # --save-every is no part of the run's identity: saves after 5 (epoch end), 6, then dies
    # while writing the one after step 7, which leaves the one after step 6
    resume = compress(tiny_teacher, *ods, "--out", str(run), "--resume", "--save-every", "1")
    killed(resume, "save..state.pt:3", tmp_path)
    assert [n for n in names(run) if n.endswith(".tmp")][0].startswith("..state.pt.")
    result = run_cli(*compress(tiny_teacher, *ods, "--out", str(run), "--resume"), cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert names(run) == RUN_FILES
    log = (run / "log.txt").read_text()
    assert "resuming at step 4 (epoch 1, after batch 4 of 5)" in log  # not at 0 nor at an epoch end
    assert "resuming at step 6 (epoch 2, after batch 1 of 5)" in log
    for name in ("student.pt", "student_be.pt"):
        got = load_checkpoint(run / name).state_dict
        want = load_checkpoint(tmp_path / "ref" / name).state_dict
        assert got.keys() == want.keys(), name
        for key, value in want.items():
            assert torch.equal(got[key], value), f"{name} {key}"


def test_interrupted_force_is_never_exported_and_ends_as_one_new_run(
    tiny_teacher: Path, exported, reference: Path, tmp_path: Path
):
    run = tmp_path / "x"
    shutil.copytree(exported[0], run)  # a finished run with its student.onnx
    old = snapshot(run)
    killed(compress(tiny_teacher, "--out", str(run), "--force"), "compress.wipe:1", tmp_path)
    assert json.loads((run / rundir.MARKER).read_text())["cleared"] is False
    left = {rundir.MARKER, rundir.LOCK, rundir.REPLACED, *RUN_FILES, "student.onnx"}
    assert set(names(run)) == left - {"config.json"}  # the first old file (in name order) moved
    assert names(run / rundir.REPLACED) == [".moving", "config.json"]  # ... into REPLACED
    assert_unfinished(run, tmp_path)  # a half-replaced run is never exported
    # --resume first finishes moving the old run aside; killed again
    killed(compress(tiny_teacher, "--out", str(run), "--resume"), "compress.after_config", tmp_path)
    assert names(run) == [rundir.MARKER, rundir.LOCK, rundir.REPLACED, "config.json", "log.txt"]
    assert snapshot(run / rundir.REPLACED) == old  # the finished run, whole, until the new one is
    assert (run / "log.txt").read_text().count("student starts from teacher member 0") == 1
    assert_unfinished(run, tmp_path)
    # what a user would do next: start it over
    result = run_cli(*compress(tiny_teacher, "--out", str(run), "--force"), cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert_finished_as(run, reference)  # no REPLACED left, and no student.onnx of the old run


@pytest.mark.parametrize("bad", [("--arch", "resnet9"), ("--lr", "1e9")])
def test_a_force_that_fails_gives_the_finished_run_back(
    tiny_teacher: Path, exported, tmp_path: Path, bad: tuple[str, str]
):
    """--force replaces a finished run only once the new one exists: a setup error (a bad
    architecture) or a run that fails in training (diverges) leaves the old run as it was."""
    run = tmp_path / "x"
    shutil.copytree(exported[0], run)
    old = snapshot(run)
    result = run_cli(*compress(tiny_teacher, "--out", str(run), "--force", *bad), cwd=tmp_path)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert snapshot(run) == old  # every file, byte for byte, with its modification time


def test_a_killed_force_keeps_the_finished_run_until_a_new_one_finishes(
    tiny_teacher: Path, exported, tmp_path: Path
):
    run = tmp_path / "x"
    shutil.copytree(exported[0], run)
    old = snapshot(run)
    killed(compress(tiny_teacher, "--out", str(run), "--force"), "compress.after_config", tmp_path)
    assert snapshot(run / rundir.REPLACED) == old
    # a second --force that fails (over the killed one) gives the finished run back
    result = run_cli(*compress(tiny_teacher, "--out", str(run), "--force", "--arch", "resnet9"), cwd=tmp_path)  # fmt: skip
    assert result.exit_code == 1, result.output
    assert snapshot(run) == old


def test_force_drops_old_onnx_files_and_bench_refuses_one_not_from_this_run(
    tiny_teacher: Path, exported, tmp_path: Path
):
    run = tmp_path / "x"
    shutil.copytree(exported[0], run)
    stale = (run / "student.onnx").read_bytes()
    result = run_cli(*compress(tiny_teacher, "--out", str(run), "--force"), cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert names(run) == RUN_FILES  # the whole folder replaced, exported files too
    # an ONNX file exported from another student.pt (put back here) is refused, before any work
    (run / "student.onnx").write_bytes(stale)
    bench = ("bench", "--run", str(run), "--batch-sizes", "1", "--repeats", "1", "--warmup", "0")
    line = error_line(run_cli(*bench, cwd=tmp_path))
    assert f"{run / 'student.onnx'} was not exported from the student.pt now in {run}" in line
    assert f"ensc export --onnx --run {run} --what student --force" in line
    # ... and so is one that does not say where it came from (an older ensc wrote it)
    legacy = onnx.load_from_string(stale)
    metadata = {p.key: p.value for p in legacy.metadata_props if p.key != "source_sha256"}
    save_onnx(set_metadata(legacy, metadata), run / "student.onnx")
    assert "does not record which checkpoint it was exported from" in error_line(
        run_cli(*bench, cwd=tmp_path)
    )


def test_killed_export_is_redone_cleanly_and_records_its_source(exported):
    run, after_kill = exported
    assert "student.onnx" not in after_kill and rundir.LOCK in after_kill
    assert any(n.startswith(".student.onnx.") and n.endswith(".tmp") for n in after_kill)
    assert names(run) == sorted([*RUN_FILES, "student.onnx"])  # no temp file, no lock
    metadata = read_metadata(onnx.load(run / "student.onnx"))
    assert metadata["source_sha256"] == [file_sha256(run / "student.pt")]


def test_resume_of_a_finished_run_is_refused_and_writes_nothing(
    tiny_teacher: Path, tiny_run: Path, tmp_path: Path
):
    run = tmp_path / "done"
    shutil.copytree(tiny_run, run)
    before = snapshot(run)
    resume = compress(tiny_teacher, "--out", str(run), "--resume", "--seed", "9")
    line = error_line(run_cli(*resume, cwd=tmp_path))
    assert line == f"Error: {run} is already finished; use --force to redo it"
    plain = error_line(run_cli(*compress(tiny_teacher, "--out", str(run)), cwd=tmp_path))
    assert "--force" in plain and "--resume" not in plain  # the hint that led to a retrain
    assert snapshot(run) == before and names(run) == RUN_FILES
    none = tmp_path / "none"
    line = error_line(
        run_cli(*compress(tiny_teacher, "--out", str(none), "--resume"), cwd=tmp_path)
    )
    assert "nothing to resume" in line and not none.exists()


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(
    tiny_teacher: Path, reference: Path, tmp_path: Path
):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "first.err", "w") as err:
        first = subprocess.Popen(
            [sys.executable, "-m", "ensc.cli", *compress(tiny_teacher, "--out", str(run))],
            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not lock_record(run):  # created, and written
            why = (tmp_path / "first.err").read_text()[-2000:]
            assert first.poll() is None and time.monotonic() < deadline, f"never locked: {why}"
            time.sleep(0.02)
        first.send_signal(signal.SIGSTOP)  # it holds the lock and, stopped, cannot finish
        for extra in (("--seed", "1"), ("--force",)):
            second = run_cli(*compress(tiny_teacher, "--out", str(run), *extra), cwd=tmp_path)
            line = error_line(second)
            assert f"{run} is being written by another ensc (compress, pid {first.pid} on " in line
            assert f"delete {run / rundir.LOCK} if that process is gone" in line
        assert "is unfinished" in error_line(run_cli("export", "--onnx", "--run", str(run)))
        first.send_signal(signal.SIGCONT)
        assert first.wait(timeout=600) == 0, (tmp_path / "first.err").read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGCONT)
            first.kill()
            first.wait()
    assert_finished_as(run, reference)  # the first run's, untouched by the second
    assert (run / "log.txt").read_text().count("epoch 2/2") == 1


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(proc.stdout)


@pytest.mark.parametrize("holder", ["dead here", "empty and old", "alive here", "dead elsewhere"])
def test_a_stale_lock_is_taken_over_and_a_live_one_refuses(holder: str, tmp_path: Path):
    run = tmp_path / "run"
    run.mkdir()
    lock, temp = run / rundir.LOCK, run / ".student.onnx.a1b2.tmp"  # a killed writer's temp file
    temp.write_bytes(b"half a file")
    host = socket.gethostname()
    records = {
        "dead here": {"pid": _dead_pid(), "host": host},
        "alive here": {"pid": os.getppid(), "host": host},
        "dead elsewhere": {"pid": _dead_pid(), "host": f"{host}-elsewhere"},
    }
    if holder == "empty and old":  # killed between creating and filling it
        lock.write_text("")
        os.utime(lock, (time.time() - 60, time.time() - 60))
    else:
        lock.write_text(json.dumps({**records[holder], "command": "export", "since": "then"}))
    opened = rundir.open_run(run, {"seed": 0}, force=False, resume=False)
    if holder in ("alive here", "dead elsewhere"):
        pid = records[holder]["pid"]
        with pytest.raises(
            ConfigError, match=f"being written by another ensc \\(export, pid {pid} "
        ):
            opened.__enter__()
        assert lock.exists() and temp.exists() and names(run) == [lock.name, temp.name]
        return
    with opened:
        assert json.loads(lock.read_text())["pid"] == os.getpid() and not temp.exists()
    assert names(run) == [rundir.MARKER]  # released; the run was not committed: unfinished


def test_export_of_a_run_just_started_says_it_is_being_written(tmp_path: Path):
    run = tmp_path / "run"  # compress has taken the lock, and written nothing else yet
    run.mkdir()
    pid = os.getppid()
    (run / rundir.LOCK).write_text(json.dumps({"pid": pid, "host": socket.gethostname(),
                                               "command": "compress", "since": "now"}))  # fmt: skip
    line = error_line(run_cli("export", "--onnx", "--run", str(run)))
    assert f"run {run} is unfinished: another ensc (compress, pid {pid}) is writing it" in line
    assert names(run) == [rundir.LOCK]


def test_export_holds_a_finished_runs_lock_while_it_writes(tiny_run: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / rundir.LOCK).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(),
                                               "command": "compress", "since": "then"}))  # fmt: skip
    with pytest.raises(ConfigError, match="being written by another ensc"), rundir.adding_to(run):
        pass
    (run / rundir.LOCK).unlink()
    with rundir.adding_to(run):
        assert (run / rundir.LOCK).is_file()
    assert names(run) == RUN_FILES


def test_a_failed_compress_leaves_no_folder(tiny_teacher: Path, tmp_path: Path):
    new, empty = tmp_path / "new", tmp_path / "empty"
    empty.mkdir()
    for out in (new, empty):
        result = run_cli(
            *compress(tiny_teacher, "--out", str(out), "--arch", "no_such_arch"), cwd=tmp_path
        )
        assert "no_such_arch" in error_line(result)
    assert not new.exists() and names(empty) == []  # a folder that was there stays, empty
    assert not (tmp_path / "runs" / "latest").exists()


def test_a_damaged_training_state_is_named_and_force_suggested(
    tiny_teacher: Path, interrupted: Path, tmp_path: Path
):
    run = tmp_path / "run"
    shutil.copytree(interrupted, run)
    state = run / rundir.STATE
    resume = compress(tiny_teacher, "--out", str(run), "--resume")
    state.write_bytes(b"not what torch.save writes")  # refused before anything is written
    before = snapshot(run)
    line = error_line(run_cli(*resume, cwd=tmp_path))
    assert f"{state} is damaged" in line and "--force to start it over" in line
    assert snapshot(run) == before
    with zipfile.ZipFile(state, "w") as z:  # a zip, but not a training state: found on loading
        z.writestr("archive/data.pkl", b"garbage")
    line = error_line(run_cli(*resume, cwd=tmp_path))
    assert f"{state} is damaged" in line and "--force to start it over" in line


def test_every_file_follows_the_umask(tiny_run: Path, exported):
    mask = os.umask(0o022)
    os.umask(mask)
    files = [*tiny_run.iterdir(), exported[0] / "student.onnx"]
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in files}
    assert modes == {p.name: oct(0o666 & ~mask) for p in files}  # log.txt and student.pt alike


def test_a_dangling_latest_is_named(tmp_path: Path):
    (tmp_path / "runs").mkdir()
    os.symlink("gone", tmp_path / "runs" / "latest")
    line = error_line(run_cli("export", "--onnx", cwd=tmp_path))
    assert "runs/latest points at gone, which no longer exists" in line


def test_outputs_that_are_not_regular_files_are_refused(exported, tmp_path: Path):
    """A pipe (or device) or folder given as an output is refused in one line, --force or not, and
    left as it was (a rename over it would have turned the FIFO into a file)."""
    run = tmp_path / "x"
    shutil.copytree(exported[0], run)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    result = run_cli(*EXPORT, "--run", str(run), "--out", str(fifo), "--force", cwd=tmp_path)
    assert f"cannot write {fifo}: it is a device, pipe or socket" in error_line(result)
    assert fifo.is_fifo()
    result = run_cli(*EXPORT, "--run", str(run), "--out", str(tmp_path), "--force", cwd=tmp_path)
    assert f"output {tmp_path} is a folder" in error_line(result)


def test_export_and_bench_use_the_runs_own_teacher_and_check_its_files(
    tiny_teacher: Path, tmp_path: Path
):
    """The teacher a run names relatively is found from any folder (config.json records its
    absolute path), and one whose files are not those the run was distilled from is refused."""
    home, other = tmp_path / "home", tmp_path / "other"
    shutil.copytree(tiny_teacher, home / "ckpts")
    result = run_cli("compress", "--teacher", "ckpts", *FLAGS, "--max-steps", "2", "--out", "run",
                     cwd=home)  # fmt: skip
    assert result.exit_code == 0, result.output
    # another teacher under the same relative name, beside the folder the user works from now
    (other / "ckpts").mkdir(parents=True)
    shutil.copy(tiny_teacher / "member0.pt", other / "ckpts" / "member0.pt")
    run = str(Path("..") / "home" / "run")
    export = ("export", "--onnx", "--run", run, "--what", "teacher", "--check-samples", "16")
    assert run_cli(*export, cwd=other).exit_code == 0
    assert (home / "run" / "teacher.onnx").is_file()  # the run's own 2-member teacher
    # the run's teacher folder changed under it: a member replaced by another one
    shutil.copy(home / "ckpts" / "member0.pt", home / "ckpts" / "member1.pt")
    bench = ("bench", "--run", run, "--batch-sizes", "1", "--repeats", "1", "--warmup", "0")
    line = error_line(run_cli(*bench, cwd=other))
    assert f"the teacher in {home / 'ckpts'} is not the one" in line
    assert "member 1 (member1.pt) differs from the sha256" in line


def test_an_export_records_the_hash_of_the_bytes_it_loaded(tiny_run: Path, tmp_path: Path):
    """The sha256 an export stamps (and a benchmark checks) is taken when the checkpoint is read:
    a student.pt replaced afterwards (a run redone meanwhile) does not lend it its hash."""
    from ensc.export.sources import load_exportable

    run = tmp_path / "x"
    shutil.copytree(tiny_run, run)
    loaded = file_sha256(run / "student.pt")
    exportable = load_exportable("student", run=run)
    shutil.copy(run / "student_be.pt", run / "student.pt")  # another file under the name
    assert exportable.source_sha256 == [loaded]


def test_checkpoints_of_an_unfinished_run_are_refused_by_path(interrupted: Path, tmp_path: Path):
    """`ensc export --model` and `ensc eval --student` name the file directly: one inside an
    unfinished run (interrupted, or still training) is refused as `--run` would refuse it."""
    run = tmp_path / "r"
    shutil.copytree(interrupted, run)
    shutil.copy(run / ".state.pt", run / "student.pt")  # whatever lies there mid-run
    for args in (("export", "--onnx", "--model", str(run / "student.pt")),
                 ("eval", "--student", str(run / "student.pt"))):  # fmt: skip
        assert f"run {run} is unfinished" in error_line(run_cli(*args, cwd=tmp_path)), args


def test_resume_refuses_images_that_changed_under_the_same_names(tmp_path: Path):
    """The API hashed the data it was handed for --resume; the CLI did not, so a run resumed on
    an image folder whose files were rewritten trained on a mix of old and new images."""
    data, teacher = png_folder_teacher(tmp_path)
    run = tmp_path / "run"
    args = ("compress", "--teacher", str(teacher), "--arch", "resnet8", "--batch-size", "16",
            "--epochs", "1", "--max-acc-drop", "100", "--out", str(run))  # fmt: skip
    killed(args, "compress.after_config", tmp_path)
    assert "data_sha256" in json.loads((run / "config.json").read_text())
    rewrite_pngs(data / "train" / "a")  # same names, other pixels
    line = error_line(run_cli(*args, "--resume", cwd=tmp_path))
    assert "--resume: the train" in line and "images differ from those" in line
    assert "--force" in line and rundir.state_of(run) == "unfinished"


def test_a_run_written_elsewhere_leaves_runs_latest_alone(tiny_teacher: Path, tmp_path: Path):
    """`make test` used to re-point the checkout's runs/latest at a test's temp folder: a run whose
    --out lies outside runs/ no longer moves it; one inside does."""
    elsewhere = tmp_path / "elsewhere" / "r"
    result = run_cli(
        *compress(tiny_teacher, "--max-steps", "1", "--out", str(elsewhere)), cwd=tmp_path
    )
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "runs" / "latest").exists()
    assert result.output.rstrip().endswith(f"run folder: {elsewhere}")
    inside = tmp_path / "runs" / "r"
    result = run_cli(*compress(tiny_teacher, "--max-steps", "1", "--out", "runs/r"), cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "runs" / "latest").resolve() == inside.resolve()
    assert result.output.rstrip().endswith("(runs/latest points here)")
