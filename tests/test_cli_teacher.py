"""`ensc train` and `ensc eval` end to end on real data, and their one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ensc.models.checkpoint import load_checkpoint
from tests.conftest import CIFAR_JPEG, needs_cifar_jpeg, run_cli

TRAIN_SMOKE = (
    "--arch",
    "resnet8",
    "--members",
    "2",
    "--epochs",
    "1",
    "--batch-size",
    "64",
    "--max-steps",
    "3",
)


def test_train_writes_self_describing_members(tiny_teacher: Path):
    assert sorted(p.name for p in tiny_teacher.iterdir()) == [
        "member0.pt",
        "member1.pt",
    ]  # no state files left
    ckpt = load_checkpoint(tiny_teacher / "member1.pt")
    assert (
        ckpt.spec.arch == "resnet8" and ckpt.spec.num_classes == 10 and ckpt.spec.in_channels == 1
    )
    assert ckpt.spec.image_size == (28, 28) and ckpt.spec.dataset == "fashion-mnist"
    assert ckpt.spec.class_names[9] == "Ankle boot" and len(ckpt.spec.mean) == 1
    assert ckpt.info["seed"] == 1 and ckpt.info["ensc_version"]
    assert {"val_acc", "val_nll", "train_steps"} <= set(ckpt.metrics)
    # weights_only loading is what load_checkpoint uses; the raw file must pass it too
    torch.load(tiny_teacher / "member0.pt", weights_only=True)
    # members differ (own seeds)
    w0 = load_checkpoint(tiny_teacher / "member0.pt").state_dict["fc.weight"]
    assert not torch.equal(w0, ckpt.state_dict["fc.weight"])


def test_eval_prints_table_and_writes_json(tiny_teacher: Path, tmp_path: Path):
    out = tmp_path / "e.json"
    result = run_cli(
        "eval", "--teacher", str(tiny_teacher), "--test-subset", "200", "--json", str(out)
    )
    assert result.exit_code == 0, result.output
    assert "| DE-2" in result.output and "| member 1" in result.output
    report = json.loads(out.read_text())
    assert report["n_test"] == 200 and len(report["members"]) == 2
    de2 = report["ensembles"][1]
    assert de2["name"] == "DE-2"
    for row in [*report["members"], de2]:
        assert (
            0 <= row["acc"] <= 100
            and row["nll"] > 0
            and 0 <= row["bs"] <= 2
            and 0 <= row["ece"] <= 1
        )
    assert de2["disagreement"] is not None
    # refuses to overwrite without --force
    again = run_cli(
        "eval", "--teacher", str(tiny_teacher), "--test-subset", "200", "--json", str(out)
    )
    assert again.exit_code != 0 and "--force" in again.output


def test_train_refuses_to_overwrite_and_resumes(tiny_teacher: Path, tmp_path: Path):
    out = tmp_path / "ckpts"
    args = (
        "train",
        "--dataset",
        "fashion-mnist",
        *TRAIN_SMOKE,
        "--train-subset",
        "400",
        "--out",
        str(out),
    )
    assert run_cli(*args).exit_code == 0
    before = (out / "member0.pt").stat().st_mtime_ns
    refused = run_cli(*args)
    assert refused.exit_code != 0 and "--resume" in refused.output and "--force" in refused.output
    (out / "member1.pt").unlink()
    resumed = run_cli(*args, "--resume")
    assert resumed.exit_code == 0 and (out / "member1.pt").exists()
    assert (out / "member0.pt").stat().st_mtime_ns == before  # finished member kept
    assert run_cli(*args, "--force").exit_code == 0
    assert (out / "member0.pt").stat().st_mtime_ns != before


@needs_cifar_jpeg
def test_train_and_eval_on_cifar10_jpeg(tmp_path: Path):
    out = tmp_path / "X"
    result = run_cli(
        "train", "--dataset", "imagefolder", "--data-root", str(CIFAR_JPEG), *TRAIN_SMOKE,
        "--train-subset", "300", "--out", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    spec = load_checkpoint(out / "member0.pt").spec
    assert (
        spec.in_channels == 3 and spec.image_size == (32, 32) and spec.class_names[0] == "airplane"
    )
    report = tmp_path / "e.json"
    result = run_cli("eval", "--teacher", str(out), "--test-subset", "100", "--json", str(report))
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["dataset"] == "imagefolder"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("eval", "--teacher", "does/not/exist"), "does not exist"),
        (("eval", "--teacher", "{empty}"), "no checkpoints"),
        (("eval", "--teacher", "{junk}"), "cannot load"),
        (
            (
                "train",
                "--dataset",
                "fashion-mnist",
                "--arch",
                "resnet9",
                "--out",
                "{tmp}/o",
                "--max-steps",
                "1",
            ),
            "depth must be 6n+2",
        ),
        (
            ("train", "--dataset", "fashion-mnist", "--arch", "nope", "--out", "{tmp}/o"),
            "unknown model",
        ),
        (
            ("train", "--dataset", "imagefolder", "--arch", "resnet8", "--out", "{tmp}/o"),
            "needs --data-root",
        ),
        (
            ("eval", "--teacher", "{teacher}", "--dataset", "imagefolder", "--data-root", "{tmp}"),
            "train/ and test/",
        ),
        (
            (
                "train",
                "--dataset",
                "fashion-mnist",
                "--arch",
                "resnet8",
                "--out",
                "{tmp}/o",
                "--device",
                "cuda:7",
            ),
            "cuda",
        ),
    ],
)
def test_bad_input_gives_one_line_error(args, message, tmp_path: Path, tiny_teacher: Path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "member0.pt").write_text("not a checkpoint")
    fields = {
        "tmp": tmp_path,
        "empty": tmp_path / "empty",
        "junk": tmp_path / "junk",
        "teacher": tiny_teacher,
    }
    argv = [a.format(**fields) for a in args]
    proc = subprocess.run(
        [sys.executable, "-m", "ensc.cli", *argv], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("Error")]
    assert len(lines) == 1 and message.lower() in lines[0].lower(), proc.stderr


def test_help_and_version():
    result = run_cli("--help")
    assert (
        result.exit_code == 0 and "ensc compress --teacher ckpts/ --arch wrn28x5" in result.output
    )
    assert "ensc train --dataset" in run_cli("train", "--help").output
    assert run_cli("--version").output.startswith("ensc, version ")
