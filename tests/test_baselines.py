"""The baselines a user would otherwise deploy (issue 21): `--method finetune` runs no teacher in
its step; `--baselines finetune,kd-single` trains them at the run's budget and seed, as run folders
of their own that a resumed run reuses, and puts their rows, a verdict and a teacher warning into
report.json and report.md."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ensc
from ensc import rundir
from ensc.compress.baselines import (
    LABELS,
    NOT_RUN,
    baseline_lines,
    teacher_warning,
    verdict_line,
)
from ensc.errors import ConfigError
from ensc.models.checkpoint import load_checkpoint
from tests.conftest import run_cli
from tests.test_report_json import documented

# every run on one thread, so that a killed and resumed run does the arithmetic of an uninterrupted one
pytestmark = pytest.mark.usefixtures("one_thread")

# float32 throughout: `--amp auto` times bf16 against float32 at the start of each run, and on a
# busy machine two runs that are compared bit for bit could choose differently
FLAGS = ("--arch", "resnet8", "--epochs", "1", "--batch-size", "32", "--train-subset", "400",
         "--test-subset", "200", "--max-steps", "3", "--max-acc-drop", "100",
         "--amp", "off")  # fmt: skip
BOTH = ("--baselines", "finetune,kd-single")


def compress(teacher: Path, run: Path, *extra: str, cwd: Path) -> dict:
    result = run_cli(
        "compress", "--teacher", str(teacher), *FLAGS, *extra, "--out", str(run), cwd=cwd
    )
    assert result.exit_code == 0, result.output
    return json.loads((run / "report.json").read_text())


@pytest.fixture(scope="module")
def with_baselines(tiny_teacher: Path, tmp_path_factory) -> Path:
    """A finished run with both baselines beside it."""
    cwd = tmp_path_factory.mktemp("baselines")
    compress(tiny_teacher, cwd / "runs" / "both", *BOTH, cwd=cwd)
    return cwd / "runs" / "both"


def test_finetune_runs_no_teacher_in_its_step(tiny_teacher: Path, tmp_path: Path):
    finetune = compress(tiny_teacher, tmp_path / "ft", "--method", "finetune", cwd=tmp_path)
    kd = compress(tiny_teacher, tmp_path / "kd", "--method", "kd-single", cwd=tmp_path)
    phases = finetune["train"]["phase_seconds"]
    assert "student" in phases and "teacher" not in phases and "perturb" not in phases, phases
    assert kd["train"]["phase_seconds"]["teacher"] > 0  # the KD baseline asks the teacher
    assert finetune["method"] == "finetune" and finetune["student_members"] == []
    assert finetune["student_avg"]["name"].startswith("fine-tuned network")
    # same start, other loss: the two single networks differ
    assert finetune["student_avg"]["nll"] != kd["student_avg"]["nll"]
    md = (tmp_path / "ft" / "report.md").read_text()
    assert "fine-tuned on the labels alone" in md
    assert "Not run: pass --baselines finetune,kd-single" in md


def test_finetune_with_a_perturbation_is_refused(tiny_teacher: Path, tmp_path: Path):
    result = run_cli("compress", "--teacher", str(tiny_teacher), *FLAGS, "--method", "finetune",
                     "--perturb", "ods", "--out", str(tmp_path / "r"), cwd=tmp_path)  # fmt: skip
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "--method finetune trains on the labels alone" in result.output
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("value", "message"),
    [("finetune,bogus", "unknown baseline 'bogus'"),
     ("batchensemble", "unknown baseline 'batchensemble'")],
)  # fmt: skip
def test_bad_baselines_are_refused_in_one_line(tiny_teacher: Path, tmp_path: Path, value, message):
    result = run_cli("compress", "--teacher", str(tiny_teacher), *FLAGS, "--baselines", value,
                     "--out", str(tmp_path / "r"), cwd=tmp_path)  # fmt: skip
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output
    with pytest.raises(ConfigError, match="this run's own --method"):
        ensc.compress_ensemble(tiny_teacher, "resnet8", method="kd-single", baselines="kd-single")


def test_baselines_are_rows_with_a_verdict(with_baselines: Path):
    report = json.loads((with_baselines / "report.json").read_text())
    section = report["baselines"]
    assert section["methods"] == ["finetune", "kd-single"]
    row_keys = set(documented()["Model rows"]) | {"method", "folder", "train"}
    mine = report["student_avg"]
    for row, verdict in zip(section["rows"], section["verdict"], strict=True):
        assert set(row) == row_keys
        folder = with_baselines / row["folder"]
        assert rundir.state_of(folder) == "finished"  # a run folder of its own, exportable
        own = json.loads((folder / "report.json").read_text())
        assert own["method"] == row["method"] == verdict["baseline"]
        assert own["train"]["steps"] == report["train"]["steps"] == 3  # the run's budget
        assert own["student_avg"]["acc"] == row["acc"] and own["student_avg"]["cnll"] == row["cnll"]
        assert verdict["acc_diff"] == pytest.approx(mine["acc"] - row["acc"])
        assert verdict["cnll_diff"] == pytest.approx(mine["cnll"] - row["cnll"])
        assert verdict["better_acc"] == (verdict["acc_diff"] > 0)
        # its own report points at the run it is beside, not at --baselines (it used to say "not
        # run: pass --baselines ...")
        assert own["baselines"]["note"].startswith(
            f"this run is the {LABELS[row['method']]} baseline"
        )
        assert "../../report.md" in (folder / "report.md").read_text()
    # the finetune baseline ran no teacher in its step
    assert "teacher" not in section["rows"][0]["train"]["phase_seconds"]
    md = (with_baselines / "report.md").read_text()
    assert (
        "| fine-tune on the labels (baseline) " in md and "| KD into one network (baseline) " in md
    )
    assert f"**Verdict:** {section['note']}." in md
    assert section["note"] == verdict_line("the averaged network", section["verdict"])
    # said in plain words exactly when fine-tuning on the labels beats the teacher ensemble
    beaten = section["rows"][0]["acc"] > report["teacher"]["acc"]
    assert (report["teacher_warning"] is not None) == beaten
    assert ("**Warning:**" in md) == beaten
    assert "baselines_seconds" in report["timing"]
    assert (with_baselines.parent / "latest").resolve() == with_baselines.resolve()


def test_a_baseline_is_the_run_it_names(with_baselines: Path, tiny_teacher: Path, tmp_path: Path):
    """The finetune baseline is exactly `ensc compress --method finetune` with the run's flags."""
    alone = compress(tiny_teacher, tmp_path / "ft", "--method", "finetune", cwd=tmp_path)
    inside = with_baselines / "baselines" / "finetune" / "student.pt"
    a = load_checkpoint(tmp_path / "ft" / "student.pt").state_dict
    b = load_checkpoint(inside).state_dict
    for (name, x), (_, y) in zip(a.items(), b.items(), strict=True):
        assert torch.equal(x, y), name
    assert (
        alone["student_avg"]["acc"]
        == json.loads((with_baselines / "report.json").read_text())["baselines"]["rows"][0]["acc"]
    )


def test_a_run_killed_in_a_baseline_resumes_to_the_same_report(
    with_baselines: Path, tiny_teacher: Path, tmp_path: Path
):
    run = tmp_path / "runs" / "k"
    args = ["compress", "--teacher", str(tiny_teacher), *FLAGS, *BOTH, "--out", str(run)]
    # steps 1-3 are the run's own, 4-6 the finetune baseline's, 7 the first of kd-single's
    env = {**os.environ, "ENSC_FAULT": "compress.step:7", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "ensc.cli", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert rundir.state_of(run) == "unfinished"
    assert rundir.state_of(run / "baselines" / "finetune") == "finished"
    assert rundir.state_of(run / "baselines" / "kd-single") == "unfinished"
    result = run_cli(*args, "--resume", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert "baseline finetune: reusing the finished run" in result.output
    resumed = json.loads((run / "report.json").read_text())
    reference = json.loads((with_baselines / "report.json").read_text())
    for key in ("student_avg", "teacher"):
        assert resumed[key]["acc"] == reference[key]["acc"]
        assert resumed[key]["nll"] == pytest.approx(reference[key]["nll"], abs=1e-6)
    for a, b in zip(resumed["baselines"]["rows"], reference["baselines"]["rows"], strict=True):
        assert a["acc"] == b["acc"] and a["nll"] == pytest.approx(b["nll"], abs=1e-6)


def test_baselines_from_python_stay_in_memory(tiny_teacher: Path, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = ensc.compress_ensemble(
        tiny_teacher, "resnet8", epochs=1, batch_size=32, max_steps=2, train_subset=400,
        test_subset=200, max_acc_drop=100.0, baselines=["finetune"],
    )  # fmt: skip
    section = result.report["baselines"]
    assert section["methods"] == ["finetune"] and len(section["rows"]) == 1
    assert not (tmp_path / "runs").exists()  # nothing written without out=
    assert section["rows"][0]["folder"] is None  # and no folder named in the report


def test_a_damaged_finished_baseline_is_one_line_to_fix(with_baselines: Path, tmp_path: Path):
    from ensc.compress.baselines import run_baselines
    from ensc.compress.config import CompressConfig

    run = tmp_path / "run"
    shutil.copytree(with_baselines, run)
    (run / "baselines" / "finetune" / "report.json").write_text('{"student_avg": ')
    config = CompressConfig(teacher=None, arch="resnet8", baselines=("finetune",))
    with pytest.raises(ConfigError, match=r"report.json is missing or damaged.*delete .*finetune"):
        run_baselines(config, run, lambda sub: pytest.fail("retrained instead of refused"))


def test_single_network_methods_refuse_member_wise_init(tiny_teacher: Path, tmp_path: Path):
    result = run_cli("compress", "--teacher", str(tiny_teacher), *FLAGS, "--method", "finetune",
                     "--init", "normal", "--out", str(tmp_path / "r"), cwd=tmp_path)  # fmt: skip
    assert result.exit_code != 0 and "drop --init" in result.output
    assert "Traceback" not in result.output


def test_teacher_warning_only_when_labels_alone_beat_the_teacher():
    report = {
        "teacher": {"name": "DE-4 teacher", "acc": 85.9},
        "student_avg": {"acc": 85.0},
        "baselines": {
            "rows": [{"method": "finetune", "acc": 87.7}, {"method": "kd-single", "acc": 99.0}]
        },
    }
    warning = teacher_warning(report, "batchensemble")
    assert warning.startswith(
        "the fine-tune on the labels baseline (87.70 %) beats the DE-4 teacher (85.90 %)"
    )
    report["baselines"]["rows"][0]["acc"] = 85.0  # KD beating its teacher is no such sign
    assert teacher_warning(report, "batchensemble") is None
    assert "this fine-tuned network (85.00 %)" not in (teacher_warning(report, "finetune") or "")
    report["student_avg"]["acc"] = 86.0
    assert teacher_warning(report, "finetune").startswith("this fine-tuned network (86.00 %)")
    report.update(teacher_warning=teacher_warning(report, "finetune"),
                  baselines={"methods": [], "rows": [], "verdict": [], "note": NOT_RUN})  # fmt: skip
    lines = baseline_lines(report)
    assert (
        lines[-1] == f"**Warning:** {report['teacher_warning']}."
        and "out of its domain" in lines[-1]
    )
    assert lines[3].startswith("Not run: pass --baselines finetune,kd-single")
