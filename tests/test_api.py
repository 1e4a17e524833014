"""The Python API (ensc.compress_ensemble, export_onnx, benchmark): the README's example runs, and
it shares the CLI's run folder and report."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ensc
from ensc.data.datasets import load_dataset
from ensc.data.splits import DataConfig
from ensc.errors import ConfigError, DataError
from ensc.models.checkpoint import load_checkpoint
from ensc.teachers.ensemble import load_teacher
from tests.conftest import REPO

# the tiny run's settings, as keywords (tests/conftest.py TINY_COMPRESS)
TINY = dict(epochs=1, batch_size=32, max_steps=2, perturb="none", max_acc_drop=100.0)


def readme_example() -> str:
    """The ```python block of the README's "Use it from Python" section."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Use it from Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def fashion():
    data = load_dataset(DataConfig("fashion-mnist", train_subset=400, test_subset=200))
    train = TensorDataset(data.train.images, data.train.labels)
    test = TensorDataset(data.test.images, data.test.labels)
    return train, test


def test_readme_example_runs_and_matches_the_cli_report(
    tiny_teacher, tiny_run, tmp_path, monkeypatch
):
    code = readme_example()
    # the same code at test size: the tiny teacher, a smaller subset, a few steps
    code = code.replace("train_subset=6000, test_subset=2000", "train_subset=400, test_subset=200")
    code = re.sub(r"steps=\d+", "steps=3", code)
    code = code.replace("repeats=20", "repeats=2")
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "ckpts").symlink_to(tiny_teacher)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    result = scope["result"]
    cli_report = json.loads((tiny_run / "report.json").read_text())
    assert set(result.report) == set(cli_report)
    assert isinstance(scope["network"], nn.Module)
    run = tmp_path / "runs" / "api"
    saved = json.loads((run / "report.json").read_text())
    assert saved["student_avg"] == result.report["student_avg"]
    for name in ("student.pt", "student_be.pt", "report.md", "config.json", "student.onnx"):
        assert (run / name).is_file(), name
    assert not (run / ".incomplete").exists()  # saved runs are finished
    # no empty command span where the CLI's report shows its command line
    assert (run / "report.md").read_text().splitlines()[
        2
    ] == "(from Python: `ensc.compress_ensemble`)"
    assert result.report["train"]["steps"] == 3
    assert onnx.load(str(run / "student.onnx")).graph.input[0].name
    assert {r.family for r in scope["bench"].rows} == {"teacher", "student-be", "student"}


def test_teachers_as_modules_and_a_builder_without_num_classes(
    tiny_teacher, fashion, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    members = load_teacher(tiny_teacher).members
    train, test = fashion

    def small_net():  # builds its own 10 outputs: takes no num_classes
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))  # fmt: skip

    result = ensc.compress_ensemble(
        nn.ModuleList(members), small_net, train_data=DataLoader(train, batch_size=32),
        test_data=test, test_subset=120, **TINY,
    )  # fmt: skip
    assert result.run_dir is None  # nothing written without out=
    assert result.report["settings"]["teacher"].startswith("2 networks from Python")
    x = torch.rand(4, 1, 28, 28)
    assert result.network(x).shape == (4, 10)
    assert result.report["parity"]["fold_max_abs_diff"] < 1e-4
    assert result.report["n_test"] == 120  # test_subset applies to handed-over data too
    assert not Path("runs").exists()  # nothing written: no teacher-logits cache either
    run = result.save(tmp_path / "saved")
    bench = ensc.benchmark(result, batch_sizes=(2,), warmup=0, repeats=1, test_samples=40)
    assert {r.family for r in bench.rows} == {"teacher", "student-be", "student"}
    exported = ensc.export_onnx(result, check_samples=40)
    assert exported.passed and exported.path == run / "student.onnx"


def test_student_network_and_out_writes_as_it_goes(tiny_teacher, fashion, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/latest and the logits cache go here, not into the checkout
    train, test = fashion
    student = load_teacher(tiny_teacher).members[0]  # a resnet8 network, used as the template
    result = ensc.compress_ensemble(tiny_teacher, student, train_data=train, test_data=test,
                                    out=tmp_path / "run", **TINY)  # fmt: skip
    assert result.run_dir == tmp_path / "run"
    assert (tmp_path / "run" / "report.json").is_file()
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"]["name"] == "python"
    with pytest.raises(ConfigError, match="exists|already finished|--force"):
        result.save(tmp_path / "run")
    # a network handed over is not rebuilt from a name: it is exported as it is in memory
    spec = load_checkpoint(tmp_path / "run" / "student.pt").spec
    assert spec.arch.startswith("python:")
    assert ensc.export_onnx(result, check_samples=40).passed
    with pytest.raises(ConfigError, match="handed over from Python"):
        spec.build()


def test_bad_inputs_say_what_is_wrong(tiny_teacher, fashion):
    train, test = fashion
    normalized = TensorDataset((train.tensors[0].float() - 128) / 64, train.tensors[1])
    with pytest.raises(DataError, match=r"not \[0, 1\]: drop Normalize"):
        ensc.compress_ensemble(
            tiny_teacher, "resnet8", train_data=normalized, test_data=test, **TINY
        )
    with pytest.raises(ConfigError, match="need data"):
        ensc.compress_ensemble(load_teacher(tiny_teacher).members, "resnet8", **TINY)
    with pytest.raises(ConfigError, match="teachers must be"):
        ensc.compress_ensemble(42, "resnet8", **TINY)
    with pytest.raises(ConfigError, match="resume needs the run folder"):
        ensc.compress_ensemble(tiny_teacher, "resnet8", train_data=train, test_data=test,
                               resume=True, **TINY)  # fmt: skip
    with pytest.raises(ConfigError, match="need train_data"):
        ensc.compress_ensemble(tiny_teacher, "resnet8", test_data=test, **TINY)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"steps": 0}, r"--steps \(steps=\) must be a whole number ≥ 1; got 0"),
        ({"steps": -1}, r"--steps \(steps=\) must be a whole number ≥ 1; got -1"),
        ({"steps": "300"}, r"--steps \(steps=\) must be a whole number ≥ 1; got '300'"),
        ({"members": 0}, r"--members \(members=\) must be a whole number ≥ 2; got 0"),
        ({"batch_size": 0}, r"--batch-size \(batch_size=\) must be a whole number ≥ 1"),
        ({"lr": -1}, r"--lr \(lr=\) must be a finite number > 0 and ≤ 3.40282e\+38; got -1"),
        (
            {"lr": float("nan")},
            r"--lr \(lr=\) must be a finite number > 0 and ≤ 3.40282e\+38; got nan",
        ),
        ({"max_acc_drop": float("nan")}, r"--max-acc-drop \(max_acc_drop=\) must be a finite"),
        ({"alpha": 1.5}, r"--alpha \(alpha=\) must be a finite number ≥ 0 and ≤ 1; got 1.5"),
        ({"stepz": 300}, r"unknown option 'stepz'"),
        ({"member_batch": "all"}, r"--member-batch \(member_batch=\) must be one of repeat, split"),
        ({"perturb": "odz"}, r"--perturb \(perturb=\) must be one of auto, none, gaussian, ods"),
        ({"init": 1}, r"--init \(init=\) must be one of ones, normal, spread; got 1"),
    ],
)
def test_the_api_checks_options_as_the_cli_does(tiny_teacher, option, message):
    """compress_ensemble's keywords pass the rules the CLI's flags pass, with the same message,
    and only EnscErrors leave it (steps=0 used to train the 200-epoch default silently)."""
    flags = {**TINY, **option}
    with pytest.raises(ConfigError, match=message):
        ensc.compress_ensemble(tiny_teacher, "resnet8", **flags)


def test_export_a_bare_network(tmp_path):
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5)).eval()
    images = torch.rand(16, 3, 8, 8)
    result = ensc.export_onnx(net, tmp_path / "net.onnx", images=images)
    assert result.passed and Path(result.path).is_file()
    with pytest.raises(ConfigError, match="needs images"):
        ensc.export_onnx(net, tmp_path / "other.onnx")


def test_a_script_that_never_configured_logging_sees_the_progress(tiny_teacher, tmp_path):
    """The README's API example used to print nothing for minutes: the CLI's progress lines reach
    stderr of a plain script, and stop there when the caller passes progress=False."""
    script = (
        "import sys, ensc\n"
        "ensc.compress_ensemble(sys.argv[1], 'resnet8', epochs=1, batch_size=32, "
        "train_subset=400, test_subset=200, max_steps=2, perturb='none', max_acc_drop=100, "
        "progress=sys.argv[2] == 'on')\n"
    )
    runs = {
        on: subprocess.run(
            [sys.executable, "-c", script, str(tiny_teacher), on],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )  # fmt: skip
        for on in ("on", "off")
    }
    assert runs["on"].returncode == 0, runs["on"].stderr
    assert "distill BE-2: epoch 1/1" in runs["on"].stderr and "after training:" in runs["on"].stderr
    assert runs["off"].returncode == 0 and "distill BE-2" not in runs["off"].stderr
