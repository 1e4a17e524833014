"""`ensc train` killed (SIGKILL, ensc.faults) at its vulnerable points, then `--resume`; and what
`--resume` / `--force` must refuse or remove, and a training that diverges (issue 13)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ensc.data.splits import Split
from ensc.engine.loop import OptimConfig, StepResult, train
from ensc.engine.runtime import resolve_runtime
from ensc.errors import DivergenceError
from ensc.models.checkpoint import load_checkpoint
from ensc.teachers.ensemble import load_teacher
from tests.conftest import run_cli

# every run here on one thread, in this process as in the subprocesses (OMP_NUM_THREADS=1), so
# an interrupted run and its uninterrupted reference do the same arithmetic
pytestmark = pytest.mark.usefixtures("one_thread")

# 270 training images after validation: 4 steps an epoch, 8 steps a member
# --amp off: compared bit for bit with a reference run, and --amp auto decides in each process
# from a speed probe that a loaded machine can tip either way on a CPU with native bf16
TRAIN = ("train", "--dataset", "fashion-mnist", "--arch", "resnet8", "--members", "2", "--epochs", "2",
         "--train-subset", "300", "--batch-size", "64", "--amp", "off")  # fmt: skip


def _train(out: Path, *extra: str):
    return run_cli("-q", *TRAIN, "--out", str(out), *extra)


def _killed(out: Path, point: str, *extra: str) -> None:
    """`ensc train` in a process of its own, SIGKILLed at ``point`` (ENSC_FAULT)."""
    env = {**os.environ, "ENSC_FAULT": point, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "ensc.cli", "-q", *TRAIN, "--out", str(out), *extra],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == -9, proc.stderr  # killed there, not finished nor failed


def _names(folder: Path) -> list[str]:
    """The folder's entries, but the lock (a killed process leaves it; the next takes it over)."""
    return sorted(p.name for p in folder.iterdir() if p.name != ".lock")


def _error(result) -> str:
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    return lines[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The teacher an uninterrupted run writes."""
    out = tmp_path_factory.mktemp("reference") / "ckpts"
    result = _train(out)
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize(
    ("point", "left"),
    [
        # member 1's first epoch saved (member 0 reaches the point twice)
        ("train.epoch_saved:3", {"member0.pt", ".member1.state.pt"}),
        # member 1's checkpoint written to its temp file, not yet renamed
        ("train.member_write:2", {"member0.pt", ".member1.state.pt", "tmp"}),
        # member 0 saved, its state file not yet removed
        ("train.member_saved", {"member0.pt", ".member0.state.pt"}),
    ],
)
def test_killed_train_resumes_to_the_uninterrupted_teacher(point, left, reference, tmp_path):
    out = tmp_path / "ckpts"
    _killed(out, point)
    names = {"tmp" if p.name.endswith(".tmp") else p.name for p in out.iterdir()} - {".lock"}
    assert names == left  # the kill happened where the point says
    result = _train(out, "--resume")
    assert result.exit_code == 0, result.output
    assert _names(out) == ["member0.pt", "member1.pt"]  # nothing left over
    teacher = load_teacher(out)  # every member loads
    assert len(teacher) == 2 and {s.arch for s in teacher.specs} == {"resnet8"}
    for k in range(2):
        got = load_checkpoint(out / f"member{k}.pt")
        want = load_checkpoint(reference / f"member{k}.pt")
        assert got.info["seed"] == k and got.info["data"] == want.info["data"]
        assert got.info["optim"] == want.info["optim"]
        for key, value in want.state_dict.items():  # resuming continues the same training
            torch.testing.assert_close(got.state_dict[key], value, msg=f"member{k} {key}")


@pytest.mark.parametrize(
    ("point", "left", "resumed"),
    [
        # member 0 saves after step 3, 4 (epoch end), 6, 8 (epoch end): killed writing the last
        ("save..member0.state.pt:4", {".member0.state.pt", "tmp"},
         "member 0 (1 of 2): resuming at step 6 (epoch 2, after batch 2 of 4)"),
        # member 1 killed right after its first step save (member 0 reached the point twice)
        ("train.step_saved:3", {"member0.pt", ".member1.state.pt"},
         "member 1 (2 of 2): resuming at step 3 (epoch 1, after batch 3 of 4)"),
    ],
)  # fmt: skip
def test_killed_mid_epoch_train_resumes_from_its_last_step_save(
    point, left, resumed, reference, tmp_path
):
    """--save-every (issue 15): `ensc train` killed inside an epoch, even while writing a step
    save, resumes from the last complete one and ends bit for bit as the uninterrupted teacher."""
    out = tmp_path / "ckpts"
    _killed(out, point, "--save-every", "3")
    assert {"tmp" if p.name.endswith(".tmp") else p.name for p in out.iterdir()} - {".lock"} == left
    result = run_cli(*TRAIN, "--out", str(out), "--resume")  # not -q: the log says where
    assert result.exit_code == 0, result.output
    assert resumed in result.output
    assert _names(out) == ["member0.pt", "member1.pt"]
    for k in range(2):
        got = load_checkpoint(out / f"member{k}.pt").state_dict
        for key, value in load_checkpoint(reference / f"member{k}.pt").state_dict.items():
            assert torch.equal(got[key], value), f"member{k} {key}"


def test_interrupted_force_leaves_no_old_member_to_resume(reference, tmp_path):
    out = tmp_path / "ckpts"
    shutil.copytree(reference, out)
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    _killed(out, "train.member_saved", "--force", "--seed", "5")
    assert _names(out) == [".member0.state.pt", ".replaced", "member0.pt"]
    # the old members wait aside until every new one exists: nothing a --resume would keep
    assert {p.name: p.read_bytes() for p in (out / ".replaced").iterdir()} == old
    refused = _train(out, "--resume")  # the default --seed 0: not what member0.pt was trained with
    assert "member0.pt was trained with --seed 5, not --seed 0" in _error(refused)
    assert _train(out, "--resume", "--seed", "5").exit_code == 0
    assert [load_checkpoint(out / f"member{k}.pt").info["seed"] for k in range(2)] == [5, 6]
    assert _names(out) == ["member0.pt", "member1.pt"]  # the old ones dropped, the lock released


@pytest.mark.parametrize(
    "bad", [("--arch", "resnet9"), ("--arch-kwargs", '{"widht": 2}'), ("--lr", "1e6")]
)
def test_a_force_that_fails_gives_the_members_back(bad, reference, tmp_path):
    """--force replaces members only once the new ones exist: a bad architecture, a bad
    architecture argument or a training that diverges leaves the old members as they were."""
    out = tmp_path / "ckpts"
    shutil.copytree(reference, out)
    old = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    result = _train(out, "--force", *bad)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == old


def test_a_second_train_into_a_folder_being_trained_is_refused(reference, tmp_path):
    import json
    import socket

    out = tmp_path / "ckpts"
    shutil.copytree(reference, out)
    other = subprocess.Popen(["sleep", "60"])  # a live process that "trains" there
    try:
        holder = {"pid": other.pid, "host": socket.gethostname(), "command": "train",
                  "since": "2026-01-01T00:00:00"}  # fmt: skip
        (out / ".lock").write_text(json.dumps(holder))
        old = {p.name: p.read_bytes() for p in out.iterdir()}
        line = _error(_train(out, "--force"))
        assert f"{out} is being written by another ensc (train, pid {other.pid}" in line
        assert {p.name: p.read_bytes() for p in out.iterdir()} == old
    finally:
        other.kill()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--arch", "resnet14", "--members", "3"), "member0.pt was trained with --arch resnet8, not --arch resnet14"),
        (("--members", "1"), "holds member1.pt, beyond --members 1: pass --members 2 or more"),
        (("--lr", "0.05"), "member0.pt was trained with --lr unset, not --lr 0.05"),
        (("--train-subset", "200"), "member0.pt was trained with --train-subset 300, not --train-subset 200"),
        (("--epochs", "3"), "member0.pt was trained with --epochs 2, not --epochs 3"),
    ],
)  # fmt: skip
def test_resume_keeps_only_members_of_the_same_settings(extra, message, reference, tmp_path):
    out = tmp_path / "ckpts"
    shutil.copytree(reference, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    line = _error(_train(out, "--resume", *extra))
    assert message in line and "--force" in line
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing written


def test_resume_refuses_an_interrupted_member_of_other_settings(tmp_path):
    out = tmp_path / "ckpts"
    _killed(out, "train.epoch_saved")  # member 0's first epoch saved
    assert _names(out) == [".member0.state.pt"]
    line = _error(_train(out, "--resume", "--weight-decay", "0.001"))
    assert (
        ".member0.state.pt (member 0, interrupted) was saved by a run with other settings" in line
    )


def test_diverged_training_fails_and_writes_no_member(tmp_path):
    out = tmp_path / "ckpts"
    result = run_cli(
        "-q", "train", "--dataset", "fashion-mnist", "--arch", "resnet8", "--members", "1", "--epochs",
        "1", "--train-subset", "300", "--batch-size", "64", "--max-steps", "3", "--warmup-epochs", "0",
        "--lr", "1e6", "--out", str(out),
    )  # fmt: skip
    line = _error(result)
    assert "member 0 (1 of 1)" in line and "lower --lr" in line
    assert not (out / "member0.pt").exists()


def test_non_finite_buffer_with_a_finite_loss_fails_the_epoch():
    """A finite loss can hide NaN BatchNorm statistics: the epoch's end catches them, named."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2), nn.BatchNorm1d(2))
    data = Split(torch.zeros(8, 1, 2, 2, dtype=torch.uint8), torch.zeros(8, dtype=torch.long))

    def step(images, labels, backward) -> StepResult:
        loss = model(images).sum() * 0
        backward(loss)
        model[2].running_var.fill_(float("inf"))
        return StepResult(loss.detach(), 0, len(labels))

    config = OptimConfig(epochs=1, batch_size=4)
    message = r"member 2/3: 2\.running_var became NaN or infinite in epoch 1 \(step 2\); lower --lr"
    with pytest.raises(DivergenceError, match=message):
        train(model, step, data, config, resolve_runtime("cpu"), hflip=False, desc="member 2/3")
