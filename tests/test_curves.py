"""Watch a run: per-epoch records, validation of the averaged network during training, curves."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tests.conftest import run_cli

FLAGS = ("--arch", "resnet8", "--epochs", "2", "--batch-size", "32", "--train-subset", "400",
         "--test-subset", "100", "--perturb", "none", "--alpha", "0.9", "--max-acc-drop", "100")  # fmt: skip


@pytest.fixture(scope="module")
def watched(tiny_teacher: Path, tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("curves")
    run = cwd / "run"
    result = run_cli("compress", "--teacher", str(tiny_teacher), *FLAGS, "--eval-every", "5",
                     "--out", str(run), cwd=cwd)  # fmt: skip
    assert result.exit_code == 0, result.output
    return run


def test_every_epoch_and_every_n_steps_are_recorded(watched: Path):
    report = json.loads((watched / "report.json").read_text())
    curves = report["curves"]
    steps = [r["step"] for r in curves["rows"]]
    # 360 training images, batches of 32: 11 steps per epoch, 22 in all
    assert steps == [5, 10, 11, 15, 20, 22]
    epochs = [r for r in curves["rows"] if r["loss"] is not None]
    assert [r["step"] for r in epochs] == [11, 22] and [r["epoch"] for r in epochs] == [1, 2]
    for r in epochs:  # α 0.9 with no perturbation: one pass, both parts, summing to the loss
        assert r["kd"] > 0 and r["ce"] > 0 and r["kd"] + r["ce"] == pytest.approx(r["loss"])
        assert 0 <= r["acc"] <= 100 and r["lr"] >= 0
    assert epochs[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # the cosine ends at zero
    for r in curves["rows"]:
        assert 0 <= r["val_acc"] <= 100 and r["val_nll"] > 0
    assert curves["eval_seconds"] > 0 and 0 < curves["eval_share"] < 1
    assert set(curves["lines"]) == {"DE-2 teacher", "start: member 0"}
    assert curves["lines"]["DE-2 teacher"] == report["val"]["teacher"]["acc"]
    with open(watched / "curves.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [int(r["step"]) for r in table] == steps
    assert [r["loss"] == "" for r in table] == [r["loss"] is None for r in curves["rows"]]
    assert float(table[2]["val_acc"]) == pytest.approx(curves["rows"][2]["val_acc"])


@pytest.mark.skipif(not importlib.util.find_spec("matplotlib"), reason="needs matplotlib")
def test_report_md_shows_the_curves(watched: Path):
    assert (watched / "curves.png").stat().st_size > 1000
    assert "![training curves](curves.png)" in (watched / "report.md").read_text()


def test_eval_every_is_checked(tiny_teacher: Path, tmp_path: Path):
    result = run_cli("compress", "--teacher", str(tiny_teacher), *FLAGS, "--eval-every", "0",
                     "--out", str(tmp_path / "r"), cwd=tmp_path)  # fmt: skip
    assert result.exit_code != 0 and "--eval-every" in result.output


def test_tensorboard_gets_the_same_scalars(tiny_teacher: Path, tmp_path: Path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, board = tmp_path / "run", tmp_path / "tb"
    result = run_cli("compress", "--teacher", str(tiny_teacher), *FLAGS, "--eval-every", "5",
                     "--tensorboard", str(board), "--out", str(run), cwd=tmp_path)  # fmt: skip
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(board))
    events.Reload()
    report = json.loads((run / "report.json").read_text())
    rows = report["curves"]["rows"]
    got = [(e.step, e.value) for e in events.Scalars("val/acc")]
    assert got == [(r["step"], pytest.approx(r["val_acc"])) for r in rows]
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert loss == [(r["step"], pytest.approx(r["loss"])) for r in rows if r["loss"] is not None]
    final = events.Scalars("test/acc")
    assert len(final) == 1 and final[0].value == pytest.approx(report["student_avg"]["acc"])
    assert "command/text_summary" in events.Tags()["tensors"]


def test_tensorboard_without_the_package_is_one_line(tiny_teacher: Path, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if the extra were not installed
    result = run_cli("compress", "--teacher", str(tiny_teacher), *FLAGS, "--tensorboard",
                     str(tmp_path / "tb"), "--out", str(tmp_path / "r"), cwd=tmp_path)  # fmt: skip
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert (
        "Error: --tensorboard needs the tensorboard package: pip install 'ensc[tensorboard]'"
        in result.output
    )
    assert not (tmp_path / "r").exists() and not (tmp_path / "tb").exists()


def test_ensc_train_records_each_member(tmp_path: Path):
    """Each member's record (its validation at every epoch's end) is kept in its checkpoint, and
    --tensorboard writes it under DIR/member<k>."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ensc.models.checkpoint import load_checkpoint

    out, board = tmp_path / "ckpts", tmp_path / "tb"
    result = run_cli("train", "--dataset", "fashion-mnist", "--arch", "resnet8", "--members", "2",
                     "--epochs", "2", "--train-subset", "600", "--batch-size", "64",
                     "--max-steps", "12", "--tensorboard", str(board), "--out", str(out))  # fmt: skip
    assert result.exit_code == 0, result.output
    for k in (0, 1):
        ckpt = load_checkpoint(out / f"member{k}.pt")
        rows = ckpt.info["curves"]
        assert [r["epoch"] for r in rows] == [1, 2] and [r["step"] for r in rows] == [8, 12]
        assert rows[-1]["val_acc"] == pytest.approx(ckpt.metrics["val_acc"])
        assert all(r["ce"] == pytest.approx(r["loss"]) and r["kd"] == 0 for r in rows)
        events = EventAccumulator(str(board / f"member{k}"))
        events.Reload()
        assert [e.step for e in events.Scalars("val/acc")] == [8, 12]
    assert sorted(p.name for p in out.iterdir()) == ["member0.pt", "member1.pt"]  # nothing else


def test_the_curve_validates_on_a_fixed_balanced_subset(tiny_teacher: Path, tmp_path, monkeypatch):
    """At most CURVE_VAL_IMAGES validation images per evaluation (the final report uses all)."""
    import ensc.compress.curves as curves

    monkeypatch.setattr(curves, "CURVE_VAL_IMAGES", 10)  # one image per class of the 40
    result = run_cli("compress", "--teacher", str(tiny_teacher), *FLAGS, "--eval-every", "5",
                     "--out", str(tmp_path / "run"), cwd=tmp_path)  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["n_val"] == 40
    for row in report["curves"]["rows"]:  # 10 images: accuracy in steps of 10 %
        assert row["val_acc"] == pytest.approx(round(row["val_acc"] / 10) * 10)
