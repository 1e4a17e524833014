"""`ensc export --onnx` on a tiny real run: parity with PyTorch, fp16/int8, the gate, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from ensc.compress.average import average
from ensc.errors import CheckpointError
from ensc.export.quantize import to_fp16
from ensc.export.sources import load_check_images
from ensc.export.validate import make_session, run_torch, tolerance_for, validate_onnx
from ensc.export.wrappers import BatchEnsembleMean, EnsembleMean, SingleNetwork, mean_of_softmax
from ensc.models import build_model, to_batchensemble
from ensc.models.batchensemble import BatchEnsemble
from ensc.models.checkpoint import load_checkpoint, save_checkpoint
from tests.conftest import REPO, run_cli

CHECK = ("--check-samples", "200")


def copy_run(run: Path, cwd: Path) -> Path:
    """A private copy of ``run`` as ``cwd/runs/r`` with ``cwd/runs/latest`` pointing at it."""
    shutil.copytree(run, cwd / "runs" / "r")
    os.symlink("r", cwd / "runs" / "latest")
    return cwd / "runs" / "r"


def test_ensemble_wrappers_average_member_probabilities():
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Flatten(), nn.Linear(4, 3)) for _ in range(2)]
    x = torch.rand(5, 1, 2, 2)
    logits, probs = EnsembleMean(nets)(x)
    by_hand = (nets[0](x).softmax(-1) + nets[1](x).softmax(-1)) / 2
    torch.testing.assert_close(probs, by_hand)
    torch.testing.assert_close(logits.softmax(-1), probs)  # logits are log-probs
    # stays finite where a member's probability underflows float32
    extreme = torch.tensor([[[1000.0, 0.0]], [[-1000.0, 0.0]]])  # [M=2, B=1, K=2]
    log_p, p = mean_of_softmax(extreme)
    assert torch.isfinite(log_p).all()
    torch.testing.assert_close(p, torch.tensor([[0.5, 0.5]]))

    torch.manual_seed(1)
    be = to_batchensemble(
        build_model("resnet8", num_classes=3, in_channels=1), members=3, init="normal"
    ).eval()
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        _, probs = BatchEnsembleMean(be)(x)
        members = be.forward_members(x).softmax(-1)  # [M, B, K]
    torch.testing.assert_close(probs, members.mean(0))
    assert not torch.allclose(members[0], members[1])  # members differ: the mean is not trivial


def test_build_batchensemble_reloads_the_averaged_student(tiny_run: Path):
    be_ckpt = load_checkpoint(tiny_run / "student_be.pt")
    be = be_ckpt.build_batchensemble()
    assert isinstance(be, BatchEnsemble) and be.members == 2 and not be.training
    student = load_checkpoint(tiny_run / "student.pt").build_model()
    # averaging the reloaded BE student gives student.pt's weights back; only the BatchNorm
    # running statistics differ, since `ensc compress` recalibrates them by default, and the
    # classifier holds the calibration temperature (divided into it)
    folded = average(be).state_dict()
    t = json.loads((tiny_run / "report.json").read_text())["calibration"]["temperature"]
    head = [name for name, m in student.named_modules() if isinstance(m, nn.Linear)][-1]
    for key, value in student.state_dict().items():
        if "running_" not in key and "num_batches" not in key:
            want = folded[key] / t if key.startswith(f"{head}.") else folded[key]
            torch.testing.assert_close(want, value, atol=1e-5, rtol=1e-5)
    with pytest.raises(CheckpointError, match="not a plain network"):
        be_ckpt.build_model()
    with pytest.raises(CheckpointError, match="not a BatchEnsemble"):
        load_checkpoint(tiny_run / "student.pt").build_batchensemble()


@pytest.fixture(scope="module")
def exported(tiny_run: Path, tmp_path_factory) -> Path:
    """`ensc export --onnx` run once in a copy of the tiny run; returns the copy."""
    cwd = tmp_path_factory.mktemp("exported")
    run = copy_run(tiny_run, cwd)
    result = run_cli("export", "--onnx", *CHECK, cwd=cwd)
    assert result.exit_code == 0, result.output
    assert "| fp32" in result.output and "| ok" in result.output and "student.onnx" in result.output
    return run


def test_export_writes_a_checked_self_describing_file(exported: Path):
    path = exported / "student.onnx"
    assert path.is_file() and not (exported / "student.onnx.failed").exists()
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["images"]
    assert [o.name for o in model.graph.output] == ["logits", "probs"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [1, 28, 28]
    meta = {p.key: p.value for p in model.metadata_props}
    spec = load_checkpoint(exported / "student.pt").spec
    assert json.loads(meta["class_names"]) == list(spec.class_names) and len(spec.class_names) == 10
    assert json.loads(meta["input_shape"]) == ["batch", 1, 28, 28]
    assert json.loads(meta["mean"]) == pytest.approx(spec.mean) and json.loads(
        meta["std"]
    ) == pytest.approx(spec.std)
    assert meta["what"] == "student" and meta["precision"] == "fp32" and meta["ensc_version"]
    assert json.loads(meta["source"])[0].endswith("student.pt")


def test_onnx_matches_pytorch_at_any_batch_size(exported: Path):
    ckpt = load_checkpoint(exported / "student.pt")
    net = SingleNetwork(ckpt.build_model())
    images = load_check_images(ckpt.spec, ckpt.info["data"], test_samples=70).test_images
    session = make_session(str(exported / "student.onnx"))
    for batch in (1, 7, 64):
        x = images[:batch]
        logits, probs = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            ref_logits, ref_probs = net(x)
        assert logits.shape == (batch, 10)
        np.testing.assert_allclose(logits, ref_logits.numpy(), atol=1e-4)
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_export_refuses_to_overwrite(exported: Path):
    path = exported / "student.onnx"
    before = path.stat().st_mtime_ns
    result = run_cli("export", "--onnx", "--run", str(exported), *CHECK)
    assert result.exit_code != 0 and "--force" in result.output
    assert path.stat().st_mtime_ns == before


def test_fp16_conversion_keeps_float32_io(exported: Path):
    ckpt = load_checkpoint(exported / "student.pt")
    data = load_check_images(ckpt.spec, ckpt.info["data"], test_samples=200)
    fp32 = onnx.load(exported / "student.onnx")
    half = to_fp16(fp32)
    float32, float16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert [v.type.tensor_type.elem_type for v in [*half.graph.input, *half.graph.output]] == [
        float32
    ] * 3
    weights = {t.data_type for t in half.graph.initializer if t.data_type in (float32, float16)}
    assert weights == {float16}
    reference = run_torch(SingleNetwork(ckpt.build_model()), data.test_images)
    report = validate_onnx(
        make_session(half), reference, data.test_images, data.test_labels,
        precision="fp16", tolerance=tolerance_for("fp16", max_acc_drop=1.0),
    )  # fmt: skip
    assert report.passed, report.failures
    assert 0 < report.max_abs_logit_diff < 0.05  # really float16 (not a copy of fp32), still close
    assert len(half.SerializeToString()) < 0.6 * len(fp32.SerializeToString())


def test_parity_check_catches_an_altered_graph(exported: Path):
    ckpt = load_checkpoint(exported / "student.pt")
    data = load_check_images(ckpt.spec, ckpt.info["data"], test_samples=200)
    reference = run_torch(SingleNetwork(ckpt.build_model()), data.test_images)
    model = onnx.load(exported / "student.onnx")
    ok = validate_onnx(make_session(model), reference, data.test_images, data.test_labels,
                       precision="fp32", tolerance=tolerance_for("fp32"))  # fmt: skip
    assert ok.passed and ok.max_abs_logit_diff < 1e-4 and ok.agreement == 100.0
    # alter the classifier: shuffle the rows of the last layer's weight (the largest 2-D initializer)
    weight = max(
        (t for t in model.graph.initializer if len(t.dims) == 2),
        key=lambda t: t.dims[0] * t.dims[1],
    )
    w = onnx.numpy_helper.to_array(weight)
    weight.CopyFrom(onnx.numpy_helper.from_array(w[::-1].copy() * 5, weight.name))
    bad = validate_onnx(make_session(model), reference, data.test_images, data.test_labels,
                        precision="fp32", tolerance=tolerance_for("fp32"))  # fmt: skip
    assert not bad.passed and bad.max_abs_logit_diff > 1e-3 and bad.agreement < 99.9
    assert any("Δlogit" in f for f in bad.failures) and any("agreement" in f for f in bad.failures)
    # names are checked before values
    producer = next(n for n in model.graph.node if "probs" in n.output)
    producer.output[list(producer.output).index("probs")] = "p"
    model.graph.output[1].name = "p"
    renamed = validate_onnx(make_session(model), reference, data.test_images, data.test_labels,
                            precision="fp32", tolerance=tolerance_for("fp32"))  # fmt: skip
    assert (
        not renamed.passed
        and "outputs" in renamed.failures[0]
        and renamed.max_abs_logit_diff is None
    )


def test_int8_export_is_quantized_and_checked(tiny_run: Path, tmp_path: Path):
    run = copy_run(tiny_run, tmp_path)
    result = run_cli(
        "export", "--onnx", "--precision", "int8", "--calib-samples", "64", *CHECK, cwd=tmp_path
    )
    assert result.exit_code == 0, result.output
    assert "| int8" in result.output and "Δacc ≤ 1" in result.output
    model = onnx.load(run / "student.int8.onnx")
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert {v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]} == {
        onnx.TensorProto.FLOAT
    }
    assert {p.key: p.value for p in model.metadata_props}["precision"] == "int8"
    assert not (run / "student.onnx").exists()  # only the asked-for precision is written


class ExportDrift(nn.Module):
    """A network whose exported graph differs from its eager forward (class order reversed)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        return logits.flip(-1) if torch.compiler.is_exporting() else logits


def drifting_resnet8(*, num_classes: int, in_channels: int, mean, std) -> nn.Module:
    return ExportDrift(
        build_model("resnet8", num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)
    )


def test_parity_gate_fails_and_keeps_the_file_as_failed(tiny_run: Path, tmp_path: Path):
    ckpt = load_checkpoint(tiny_run / "student.pt")
    net = drifting_resnet8(num_classes=10, in_channels=1, mean=ckpt.spec.mean, std=ckpt.spec.std)
    net.net.load_state_dict(ckpt.state_dict)
    path = tmp_path / "drift.pt"
    save_checkpoint(
        path, net, replace(ckpt.spec, arch="tests.test_export:drifting_resnet8"), info=ckpt.info
    )
    # the architecture is this test module's: user code, trusted through --code-path
    result = run_cli(
        "export", "--onnx", "--model", str(path), "--check-samples", "100", "--code-path", str(REPO)
    )
    assert result.exit_code == 1
    assert "FAILED" in result.output and "Error: parity check failed" in result.output
    assert "agreement" in result.output and "Traceback" not in result.output
    assert (tmp_path / "drift.onnx.failed").is_file() and not (tmp_path / "drift.onnx").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("export", "--onnx"), "no run found"),
        (("export", "--onnx", "--run", "{nostudent}"), "has no student.pt"),
        (("export", "--onnx", "--run", "{run}", "--out", "{file}/x.onnx"), "cannot write"),
        (
            ("export", "--onnx", "--run", "{run}", "--precision", "int4"),
            "invalid value for '--precision'",
        ),
        (("export", "--run", "{run}"), "--onnx"),
        (
            ("export", "--onnx", "--model", "{run}/student.pt", "--what", "teacher"),
            "--model exports",
        ),
        (
            ("export", "--onnx", "--what", "teacher", "--run", "{run}", "--teacher", "{tmp}/none"),
            "does not exist",
        ),
        (("export", "--onnx", "--model", "{file}"), "file is not a PyTorch checkpoint"),
    ],
)
def test_bad_input_is_one_line(args, message, tiny_run: Path, tmp_path: Path):
    (tmp_path / "nostudent").mkdir()
    (tmp_path / "file").write_text("not a folder")
    fields = {
        "run": tiny_run,
        "nostudent": tmp_path / "nostudent",
        "file": tmp_path / "file",
        "tmp": tmp_path,
    }
    result = run_cli(*[a.format(**fields) for a in args], cwd=tmp_path)
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and message.lower() in errors[0].lower(), result.output
    assert not list(tmp_path.rglob("*.onnx*"))


def test_no_run_error_has_no_traceback_in_a_real_process(tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, "-m", "ensc.cli", "export", "--onnx"], cwd=tmp_path, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("Error: no run found at runs/latest")
