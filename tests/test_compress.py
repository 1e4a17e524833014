"""`ensc compress` end to end on a tiny real teacher: run folder, report sections, parity gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ensc.compress.pipeline import CompressConfig, run_compress
from ensc.compress.report import gap_closed, gaps_closed, parity
from ensc.compress.warmstart import SCRATCH_LOSS, WARM_START_LOSS, WARM_START_LR
from ensc.data.datasets import load_dataset
from ensc.data.splits import DataConfig
from ensc.engine.loop import OptimConfig
from ensc.engine.runtime import resolve_runtime
from ensc.errors import CompressParityError
from ensc.models.checkpoint import load_checkpoint, load_model
from tests.conftest import run_cli

SMOKE = (
    "--arch",
    "resnet8",
    "--epochs",
    "1",
    "--batch-size",
    "32",
    "--train-subset",
    "400",
    "--test-subset",
    "200",
)


def test_compress_writes_run_folder_and_latest(tiny_teacher: Path, tmp_path: Path):
    result = run_cli(
        "compress",
        "--teacher",
        str(tiny_teacher),
        *SMOKE,
        "--max-steps",
        "4",
        "--max-acc-drop",
        "100",
        cwd=tmp_path,
    )
    assert result.exit_code == 0, result.output
    latest = tmp_path / "runs" / "latest"
    assert latest.is_symlink()
    for name in (
        "student.pt",
        "student_be.pt",
        "report.json",
        "report.md",
        "config.json",
        "log.txt",
    ):
        assert (latest / name).is_file(), name
    assert not (latest / ".state.pt").exists()
    report = json.loads((latest / "report.json").read_text())
    for section in ("teacher", "student_be", "student_avg"):
        assert {"acc", "nll", "bs", "ece", "dee"} <= set(report[section]), section
    assert report["parity"]["fold_max_abs_diff"] < 1e-3
    # the members' fast-weight spread, recomputed from the saved BE student: split member batches
    # give each member its own images, so r, s left their common "ones" start and moved apart
    fast = [
        t for k, t in load_checkpoint(latest / "student_be.pt").state_dict.items()
        if k.endswith((".r", ".s"))
    ]  # fmt: skip
    spread = max(float((t - t.mean(0, keepdim=True)).abs().max()) for t in fast)
    assert report["fast_weights"]["max_member_spread"] == pytest.approx(spread, rel=1e-6)
    assert spread > 0
    assert (
        report["params"]["student_avg"] * 2 == report["params"]["teacher"]
    )  # same arch, 2 teachers
    assert "| averaged single network" in (latest / "report.md").read_text()
    # the member -> DE gap closed, from the member the student started from (teacher 0)
    gaps, start = report["gap_closed"], report["teacher_members"][0]
    assert report["init_member"] == 0 and gaps["from"] == "teacher 0"
    expected = gap_closed(
        report["student_avg"]["acc"], start["acc"], report["teacher"]["acc"], True
    )
    assert gaps["student_avg"]["acc"] == (None if expected is None else pytest.approx(expected))
    assert "gap closed (from teacher 0)" in (latest / "report.md").read_text()
    # warm start by default: the student has the members' architecture
    assert "student starts from teacher member 0" in (latest / "log.txt").read_text()
    # ... and fine-tunes at the warm-start learning rate, scaled to the batch (32 here) and
    # divided by the KD temperature (a 13-step schedule: a short run)
    config = json.loads((latest / "config.json").read_text())
    want = WARM_START_LR * 32 / 128 / WARM_START_LOSS["temperature"]
    assert config["optim"]["lr"] == pytest.approx(want)
    # ... with the warm start's loss and the BatchEnsemble's default perturbation
    settings = report["settings"]
    assert (settings["alpha"], settings["temperature"]) == (WARM_START_LOSS["alpha"], WARM_START_LOSS["temperature"])  # fmt: skip
    assert settings["perturbation"] == "tdiv-sdiv"
    assert "ensc compress --teacher" in (latest / "report.md").read_text()
    # student.pt is a plain ensc checkpoint of the student architecture that reproduces the report
    model, spec = load_model(latest / "student.pt")
    assert spec.arch == "resnet8" and spec.kind == "model" and spec.dataset == "fashion-mnist"
    assert load_checkpoint(latest / "student_be.pt").spec.members == 2
    assert isinstance(model(torch.rand(3, 1, 28, 28)), torch.Tensor)
    # a second run into the same folder is refused without --force
    again = run_cli(
        "compress",
        "--teacher",
        str(tiny_teacher),
        *SMOKE,
        "--max-steps",
        "1",
        "--out",
        str(latest.resolve()),
        cwd=tmp_path,
    )
    assert again.exit_code != 0 and "--force" in again.output


@pytest.mark.parametrize("perturb", ["none", "gaussian", "ods", "confods", "tdiv-sdiv"])
def test_every_perturbation_runs(perturb: str, tiny_teacher: Path, tmp_path: Path):
    result = run_cli(
        "compress", "--teacher", str(tiny_teacher), *SMOKE, "--max-steps", "3", "--perturb", perturb,
        "--out", str(tmp_path / perturb), "--max-acc-drop", "100", cwd=tmp_path,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / perturb / "config.json").read_text())
    assert config["distill"]["perturb"]["kind"] == perturb


def test_parity_gate_fails_after_writing_report(tiny_teacher: Path, tmp_path: Path):
    config = CompressConfig(
        teacher=tiny_teacher,
        arch="resnet8",
        data_overrides={"train_subset": 300, "test_subset": 100},
        optim=OptimConfig(epochs=1, batch_size=32, max_steps=2),
        max_acc_drop=-100.0,  # impossible to meet: the gate must fail
        out=tmp_path / "run",
        runs_dir=tmp_path / "runs",
    )
    with pytest.raises(CompressParityError, match="parity gate failed"):
        run_compress(config, resolve_runtime("cpu")).check()  # the gate: after writing
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["parity"]["passed"] is False and (tmp_path / "run" / "student.pt").exists()
    # plain `ensc export` / `ensc bench` must not pick it up as the latest run
    assert not (tmp_path / "runs" / "latest").exists()


def test_gap_closed_arithmetic():
    assert gap_closed(84.0, 82.0, 86.0) == pytest.approx(50.0)  # ACC: halfway up
    assert gap_closed(0.50, 0.55, 0.48) == pytest.approx(100 * 0.05 / 0.07)  # cNLL: lower is better
    assert gap_closed(0.58, 0.55, 0.48) < 0  # worse than the member
    assert gap_closed(86.0, 82.0, 86.0) == pytest.approx(100.0)
    assert gap_closed(80.0, 82.0, 82.0) is None  # no gap to close
    # a teacher ensemble worse than its member (the demo's weak DE-4): no share of a negative gap
    assert gap_closed(83.0, 82.6, 82.1, higher_is_better=True) is None
    assert gap_closed(0.50, 0.55, 0.60, higher_is_better=False) is None
    assert gap_closed(84.0, 82.0, 86.0, higher_is_better=True) == pytest.approx(50.0)


def test_gaps_closed_from_the_average_member_without_a_warm_start():
    row = lambda acc, cnll: {"acc": acc, "cnll": cnll}  # noqa: E731
    report = {
        "teacher": row(90.0, 0.3),
        "teacher_members": [row(80.0, 0.5), row(84.0, 0.7)],
        "student_avg": row(86.0, 0.45),
        "student_be": row(88.0, 0.4),
    }
    gaps = gaps_closed(report, None)
    assert gaps["from"] == "the average member" and "student_avg_alternative" not in gaps
    assert gaps["student_avg"]["acc"] == pytest.approx(50.0)  # 82 -> 90, at 86
    assert gaps["student_be"]["cnll"] == pytest.approx(66.666, rel=1e-3)  # 0.6 -> 0.3, at 0.4
    assert gaps_closed(report, 1)["student_avg"]["acc"] == pytest.approx(100 * 2 / 6)


def test_parity_rules():
    report = {
        "student_avg": {"acc": 90.0, "nll": 0.3, "ece": 0.02},
        "student_be": {"acc": 91.5},
        "teacher": {"acc": 92.0, "nll": 0.25, "ece": 0.01},
    }
    assert not parity(report, 1.0, 1e-6, 1e-3)["passed"]  # 1.5-point drop
    assert parity(report, 2.0, 1e-6, 1e-3)["passed"]
    assert not parity(report, 2.0, 1e-2, 1e-3)["fold_passed"]
    assert parity(report, 2.0, 1e-6, 1e-3)["vs_teacher"]["acc"] == pytest.approx(-2.0)


def test_compress_bad_teacher_is_one_line(tmp_path: Path):
    result = run_cli(
        "compress", "--teacher", str(tmp_path / "nope"), "--arch", "resnet8", cwd=tmp_path
    )
    assert (
        result.exit_code != 0
        and "does not exist" in result.output
        and "Traceback" not in result.output
    )


def test_amp_and_channels_last_paths_run_on_cpu(tiny_teacher: Path, tmp_path: Path):
    # the CUDA speed options (autocast, NHWC) exercised on the CPU: bfloat16 autocast here
    result = run_cli(
        "compress", "--teacher", str(tiny_teacher), *SMOKE, "--max-steps", "2", "--perturb", "ods",
        "--amp", "--channels-last", "--device", "cpu", "--out", str(tmp_path / "amp"), "--max-acc-drop", "100",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "amp" / "report.json").read_text())
    assert report["parity"]["fold_max_abs_diff"] < 1e-3
    # bf16 trained it; the numbers are the float32 network's: its test NLL and accuracy,
    # recomputed in float32 from student.pt on the run's own test subset (channels-last sums in
    # another order: round-off, at most one image's decision)
    assert (
        "under bfloat16 autocast (its network evaluated in float32; the teacher and the BE "
        "members in bfloat16)" in (tmp_path / "amp" / "report.md").read_text()
    )
    data = json.loads((tmp_path / "amp" / "config.json").read_text())["data"]
    root = Path(data["root"]) if data["root"] else None
    test = load_dataset(DataConfig(**{**data, "root": root})).test
    model, _ = load_model(tmp_path / "amp" / "student.pt")
    with torch.no_grad():
        logits = model(test.images.float() / 255).double()
    assert len(test) == report["n_test"] == 200
    nll = float(torch.nn.functional.cross_entropy(logits, test.labels))
    assert report["student_avg"]["nll"] == pytest.approx(nll, rel=1e-5)
    acc = 100 * float((logits.argmax(-1) == test.labels).double().mean())
    assert report["student_avg"]["acc"] == pytest.approx(acc, abs=0.5)


def test_eval_student_checkpoint_against_teacher(tiny_teacher: Path, tmp_path: Path):
    run = tmp_path / "run"
    assert (
        run_cli(
            "compress",
            "--teacher",
            str(tiny_teacher),
            *SMOKE,
            "--max-steps",
            "2",
            "--out",
            str(run),
            "--max-acc-drop",
            "100",
            cwd=tmp_path,
        ).exit_code
        == 0
    )
    out = tmp_path / "s.json"
    result = run_cli(
        "eval",
        "--teacher",
        str(tiny_teacher),
        "--student",
        str(run / "student.pt"),
        "--test-subset",
        "100",
        "--json",
        str(out),
    )
    assert result.exit_code == 0, result.output
    student = json.loads(out.read_text())["students"][0]
    assert student["name"].endswith("student.pt") and 0 <= student["agreement"] <= 100
    report = json.loads((run / "report.json").read_text())
    assert report["n_test"] == 200  # compress evaluated on 200 images, eval here on 100: both ran
    assert run_cli("eval").exit_code != 0  # neither --teacher nor --student


def test_student_init_scratch_opts_out_of_the_warm_start(tiny_teacher: Path, tmp_path: Path):
    result = run_cli(
        "compress", "--teacher", str(tiny_teacher), *SMOKE, "--max-steps", "1",
        "--max-acc-drop", "100", "--student-init", "scratch", "--out", str(tmp_path / "run"),
        cwd=tmp_path,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "student starts from teacher member" not in (tmp_path / "run" / "log.txt").read_text()
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["student_init"] == "scratch"
    assert config["optim"]["lr"] is None  # from scratch: the papers' 0.1 × batch/128
    settings = json.loads((tmp_path / "run" / "report.json").read_text())["settings"]
    assert (settings["alpha"], settings["temperature"]) == (SCRATCH_LOSS["alpha"], SCRATCH_LOSS["temperature"])  # fmt: skip


def test_kd_single_baseline_trains_one_plain_network(tiny_teacher: Path, tmp_path: Path):
    result = run_cli(
        "compress", "--teacher", str(tiny_teacher), *SMOKE, "--max-steps", "2", "--perturb", "ods",
        "--max-acc-drop", "100", "--method", "kd-single", "--no-recalibrate-bn",
        "--out", str(tmp_path / "kd"),
        cwd=tmp_path,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "kd" / "report.json").read_text())
    assert report["method"] == "kd-single" and report["train"]["steps"] == 2
    assert report["fast_weights"]["max_abs_from_one"] == 0.0  # r = s = 1 stayed frozen
    # without BN recalibration the single network is the one-member student itself (calibrated:
    # its temperature folded in, so the same up to temperature)
    assert report["student_be"]["acc"] == report["student_avg"]["acc"]
    assert report["student_be"]["cnll"] == pytest.approx(report["student_avg"]["cnll"], rel=1e-4)
    md = (tmp_path / "kd" / "report.md").read_text()
    assert "KD into one resnet8" in md and "| KD student (one network)" in md
    assert "BE-1" not in md and "student member 0" not in md
    refused = run_cli(
        "compress", "--teacher", str(tiny_teacher), *SMOKE, "--method", "kd-single",
        "--perturb", "tdiv-sdiv", "--out", str(tmp_path / "kd2"), cwd=tmp_path,
    )  # fmt: skip
    assert refused.exit_code != 0 and "use --perturb ods" in refused.output


def test_warm_start_lr_is_divided_by_t_only_for_a_short_batchensemble_with_a_kd_term():
    from ensc.compress.warmstart import SHORT_RUN_STEPS, warm_start_lr

    short, long = SHORT_RUN_STEPS - 1, SHORT_RUN_STEPS
    assert warm_start_lr("batchensemble", 1.0, 4.0, 128, short) == pytest.approx(WARM_START_LR / 4)
    assert warm_start_lr("batchensemble", 1.0, 4.0, 128, long) == pytest.approx(WARM_START_LR)
    assert warm_start_lr("batchensemble", 1.0, 4.0, 256, long) == pytest.approx(WARM_START_LR * 2)
    assert warm_start_lr("kd-single", 1.0, 1.0, 256, short) == pytest.approx(WARM_START_LR * 2)
    assert warm_start_lr("kd-single", 1.0, 4.0, 128, short) == pytest.approx(WARM_START_LR)
    assert warm_start_lr("finetune", 1.0, 4.0, 128, short) == pytest.approx(WARM_START_LR)
    assert warm_start_lr("batchensemble", 0.0, 4.0, 128, short) == pytest.approx(WARM_START_LR)


def test_the_default_perturbation_is_none_only_for_a_long_warm_batchensemble():
    from ensc.compress.warmstart import LONGER_RUN_STEPS, start_perturbation

    assert start_perturbation("batchensemble", True, LONGER_RUN_STEPS) == "none"
    assert start_perturbation("batchensemble", True, LONGER_RUN_STEPS - 1) == "tdiv-sdiv"
    assert start_perturbation("batchensemble", False, LONGER_RUN_STEPS) == "tdiv-sdiv"  # cold start
    for method in ("kd-single", "finetune"):
        assert start_perturbation(method, True, 10) == start_perturbation(method, False, 10**4)
        assert start_perturbation(method, True, 10) == "none"


def test_a_long_schedule_cut_short_still_runs_the_long_schedule_defaults(
    tiny_teacher: Path, tmp_path: Path
):
    from ensc.compress.warmstart import LONG_RUN_LR, LONGER_RUN_STEPS

    run = tmp_path / "run"
    args = ("compress", "--teacher", str(tiny_teacher), "--arch", "resnet8", "--batch-size", "32",
            "--train-subset", "400", "--test-subset", "100", "--steps", str(LONGER_RUN_STEPS),
            "--max-steps", "1", "--max-acc-drop", "100")  # fmt: skip
    result = run_cli(*args, "--out", str(run), cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert (
        f"perturbation none over a {LONGER_RUN_STEPS}-step schedule"
        in (run / "log.txt").read_text()
    )
    config = json.loads((run / "config.json").read_text())
    assert config["distill"]["perturb"]["kind"] == "none"
    assert config["optim"]["lr"] == pytest.approx(LONG_RUN_LR * 32 / 128)
    assert json.loads((run / "report.json").read_text())["settings"]["perturbation"] == "none"
    # a perturbation named on the command line is kept, and the default run folder names it
    named = run_cli(*args, "--perturb", "gaussian", cwd=tmp_path)
    assert named.exit_code == 0, named.output
    (folder,) = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("resnet8-gaussian-")]
    assert (
        json.loads((folder / "config.json").read_text())["distill"]["perturb"]["kind"] == "gaussian"
    )


def test_a_long_warm_start_schedule_takes_each_methods_long_run_lr():
    from ensc.compress.warmstart import (
        KD_LONGER_RUN_LR,
        LONG_RUN_LR,
        LONG_RUN_STEPS,
        LONGER_RUN_STEPS,
        warm_start_lr,
    )

    for method in ("batchensemble", "kd-single", "finetune"):
        below = warm_start_lr(method, 1.0, 4.0, 128, LONG_RUN_STEPS - 1)
        assert below == pytest.approx(WARM_START_LR)
        assert warm_start_lr(method, 1.0, 4.0, 128, LONG_RUN_STEPS) == pytest.approx(LONG_RUN_LR)
        assert warm_start_lr(method, 1.0, 4.0, 64, LONG_RUN_STEPS) == pytest.approx(LONG_RUN_LR / 2)
        longer = warm_start_lr(method, 1.0, 4.0, 64, LONGER_RUN_STEPS)
        want = KD_LONGER_RUN_LR if method == "kd-single" else LONG_RUN_LR
        assert longer == pytest.approx(want / 2)
