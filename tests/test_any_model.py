"""Any model as teacher or student (issue 15): user builders without num_classes, --arch-kwargs,
torchvision:NAME / timm:NAME, grouped convs and the layers BatchEnsemble leaves shared."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ensc.engine.predict import eval_member_networks
from ensc.engine.runtime import resolve_runtime
from ensc.errors import ConfigError, MissingExtraError
from ensc.models import build_model
from ensc.models.batchensemble import BEConv2d, to_batchensemble
from ensc.models.checkpoint import load_checkpoint
from ensc.models.fold import fold
from ensc.models.normalize import NormalizedModel, RepeatChannels
from ensc.teachers.ensemble import user_code
from tests.conftest import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

# 2 distillation steps on 300 Fashion-MNIST images: enough to train, fold and export
TINY = ("--epochs", "1", "--batch-size", "32", "--train-subset", "300", "--test-subset", "100",
        "--max-steps", "2", "--perturb", "none", "--max-acc-drop", "100")  # fmt: skip

USER_NETS = '''
import torch
from torch import nn


def grouped(width=8):
    """Builds its own 10 outputs (no num_classes); grouped and depthwise convs, no BatchNorm."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.GroupNorm(2, width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, groups=width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 1, groups=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.LayerNorm(2 * width), nn.Linear(2 * width, 10),
    )


def scripted():
    return torch.jit.script(nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10)))
'''


@pytest.fixture(scope="module")
def code_dir(tmp_path_factory) -> Path:
    """A --code-path folder with the user architectures above."""
    folder = tmp_path_factory.mktemp("code")
    (folder / "any_nets.py").write_text(USER_NETS)
    return folder


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """The working folder of every compress run here (they share its teacher-logits cache)."""
    return tmp_path_factory.mktemp("any_model")


@pytest.fixture(scope="module")
def tv_teacher(work: Path) -> Path:
    """A 2-member torchvision resnet18 teacher on grayscale Fashion-MNIST, 2 steps each."""
    out = work / "tv_teacher"
    result = run_cli(
        "train", "--dataset", "fashion-mnist", "--arch", "torchvision:resnet18", "--members", "2",
        "--epochs", "1", "--train-subset", "300", "--batch-size", "32", "--max-steps", "2",
        "--out", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def _compress(work: Path, teacher: Path, name: str, *flags: str) -> Path:
    """A finished compress run folder ``work/runs/name`` (asserts success)."""
    run = work / "runs" / name
    args = ("compress", "--teacher", str(teacher), *TINY, *flags, "--out", str(run))
    result = run_cli(*args, cwd=work)
    assert result.exit_code == 0, result.output
    return run


def _report(run: Path) -> dict:
    return json.loads((run / "report.json").read_text())


def _export(run: Path, *flags: str) -> None:
    result = run_cli("export", "--onnx", "--run", str(run), "--check-samples", "20", *flags)
    assert result.exit_code == 0, result.output
    assert (run / "student.onnx").is_file()


@pytest.mark.parametrize("arch_kwargs", [None, {"width": 4}])
def test_student_without_num_classes(work, tv_teacher, code_dir, arch_kwargs):
    extra = ("--arch-kwargs", json.dumps(arch_kwargs)) if arch_kwargs else ()
    name = f"grouped-{'kw' if arch_kwargs else 'plain'}"
    run = _compress(work, tv_teacher, name, "--arch", "any_nets:grouped", "--code-path",
                    str(code_dir), *extra)  # fmt: skip
    assert _report(run)["parity"]["fold_max_abs_diff"] < 1e-4
    config = json.loads((run / "config.json").read_text())
    assert config["arch_kwargs"] == (arch_kwargs or {})
    for file in ("student.pt", "student_be.pt"):
        assert load_checkpoint(run / file).spec.arch_kwargs == (arch_kwargs or {})
    if arch_kwargs:  # export rebuilds the student from its spec, kwargs included
        _export(run, "--code-path", str(code_dir))
        with user_code(code_dir):
            net = load_checkpoint(run / "student.pt").build_model()
        assert net.model[0].out_channels == 4


def test_torchvision_resnet18_pair_folds_and_exports(work, tv_teacher):
    run = _compress(work, tv_teacher, "tv-resnet18", "--arch", "torchvision:resnet18")
    report = _report(run)
    assert report["parity"]["fold_max_abs_diff"] < 1e-4
    assert report["init_member"] == 0  # --student-init auto: the teacher's own architecture
    _export(run)  # a trusted name: no --code-path


def test_torchvision_mobilenet_v3_small_folds_and_exports(work, tv_teacher):
    run = _compress(work, tv_teacher, "tv-mobilenet", "--arch", "torchvision:mobilenet_v3_small")
    assert _report(run)["parity"]["fold_max_abs_diff"] < 1e-4
    be = load_checkpoint(run / "student_be.pt").build_batchensemble()
    assert any(isinstance(m, BEConv2d) and m.groups > 1 for m in be.modules())  # depthwise
    _export(run)


def test_timm_student(work, tv_teacher):
    pytest.importorskip("timm")
    run = _compress(work, tv_teacher, "timm-resnet10t", "--arch", "timm:resnet10t")
    assert _report(run)["parity"]["fold_max_abs_diff"] < 1e-4


def test_grouped_conv_fold_matches_members():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 1, groups=4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.LayerNorm(12), nn.Linear(12, 5),
    )  # fmt: skip
    be = to_batchensemble(net, members=3, init="normal")
    with torch.no_grad():
        for p in be.member_bias_parameters():
            p.normal_()
    be.eval()
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        want = be.forward_members(x)
        for m in range(3):
            assert (fold(be, m)(x) - want[m]).abs().max() < 1e-5
    assert eval_member_networks(be, resolve_runtime("cpu"), x) is not None  # BN fused, same logits


class _OwnConv(nn.Conv2d):
    """A Conv2d computing something else (like timm's StdConv2d): must stay shared."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = _OwnConv(3, 8, 3, padding=1)
        self.conv1d = nn.Conv1d(8, 8, 1)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.seq_first = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.conv1d(self.stem(x).flatten(2)).transpose(1, 2)  # [B, HW, 8]
        t = self.attn(t, t, t, need_weights=False)[0]
        t = self.seq_first(t.transpose(0, 1)).transpose(0, 1)  # (sequence, batch, features)
        return self.head(t.mean(1))


def test_layers_that_cannot_take_fast_weights_stay_shared(caplog):
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="ensc.models.batchensemble"):
        be = to_batchensemble(_Mixed(), members=2, init="normal")
    lines = [r.getMessage() for r in caplog.records if "stay shared" in r.getMessage()]
    assert len(lines) == 1 and "_OwnConv (stem)" in lines[0] and "Conv1d (conv1d)" in lines[0]
    assert "MultiheadAttention" in lines[0]
    net = be.net
    assert type(net.stem) is _OwnConv and type(net.seq_first.linear1) is nn.Linear
    assert type(net.head) is not nn.Linear  # the one layer that gets fast weights
    be.eval()
    x = torch.rand(3, 3, 6, 6)
    with torch.no_grad():
        want = be.forward_members(x)
        for m in range(2):
            assert (fold(be, m)(x) - want[m]).abs().max() < 1e-5


def test_layers_the_network_never_calls_stay_shared_given_an_example(caplog):
    """torchvision's Swin passes attn.qkv.weight / attn.proj.weight to F.linear itself: given an
    example batch, those Linear layers stay plain (fast weights there would get no gradient and
    make the fold inexact) and every member folds exactly with init "normal"."""
    from torchvision.models import swin_t

    torch.manual_seed(0)
    net = swin_t(num_classes=5)
    x = torch.rand(2, 3, 64, 64)
    with caplog.at_level(logging.WARNING, logger="ensc.models.batchensemble"):
        be = to_batchensemble(net, members=2, init="normal", example=x)
    lines = [r.getMessage() for r in caplog.records if "stay shared" in r.getMessage()]
    assert len(lines) == 1 and "24 Linear (features.1.0.attn.qkv" in lines[0]
    block = be.net.features[1][0]
    assert type(block.attn.qkv) is nn.Linear and type(block.attn.proj) is nn.Linear
    assert type(block.mlp[0]) is not nn.Linear  # called on the batch: fast weights
    assert all(m.training for m in be.modules())  # the probe's eval mode is undone
    be.eval()
    with torch.no_grad():
        want = be.forward_members(x)
        for m in range(2):
            assert (fold(be, m)(x) - want[m]).abs().max() < 1e-4
    with pytest.raises(ConfigError, match=r"fails on an example batch of shape \(2, 3\)"):
        to_batchensemble(net, members=2, example=torch.rand(2, 3))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_unsupported_layer_is_refused_in_one_line(work, tv_teacher, code_dir):
    lazy = nn.Sequential(nn.Flatten(), nn.LazyLinear(5))
    with pytest.raises(ConfigError, match=r"layer 1 \(LazyLinear\) has uninitialized") as err:
        to_batchensemble(lazy, members=2)
    assert "\n" not in str(err.value)
    result = run_cli("compress", "--teacher", str(tv_teacher), *TINY, "--arch", "any_nets:scripted",
                     "--code-path", str(code_dir), "--out", str(work / "runs" / "scripted"), cwd=work)  # fmt: skip
    assert result.exit_code != 0
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "(RecursiveScriptModule) is TorchScript" in error[0], result.output


def test_library_names_and_channels(monkeypatch):
    with pytest.raises(ConfigError, match="close matches: torchvision:resnet18") as err:
        build_model("torchvision:resnet81", num_classes=10)
    assert "\n" not in str(err.value)
    gray = build_model("torchvision:resnet18", num_classes=3, in_channels=1)
    assert isinstance(gray, NormalizedModel) and isinstance(gray.to_rgb, RepeatChannels)
    assert gray(torch.rand(2, 1, 32, 32)).shape == (2, 3)
    with pytest.raises(ConfigError, match="takes 3-channel images and the data has 4"):
        build_model("torchvision:resnet18", num_classes=3, in_channels=4)
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    with pytest.raises(MissingExtraError, match=r"pip install 'ensc\[timm\]'"):
        build_model("timm:resnet10t", num_classes=10)


def test_train_takes_arch_kwargs_records_them_and_resume_checks_them(code_dir: Path, tmp_path):
    out = tmp_path / "ckpts"
    base = ("train", "--dataset", "fashion-mnist", "--arch", "any_nets:grouped", "--code-path",
            str(code_dir), "--members", "1", "--epochs", "1", "--train-subset", "200",
            "--batch-size", "32", "--max-steps", "1", "--out", str(out))  # fmt: skip
    result = run_cli(*base, "--arch-kwargs", '{"width": 4}')
    assert result.exit_code == 0, result.output
    spec = load_checkpoint(out / "member0.pt").spec
    assert spec.arch_kwargs == {"width": 4}
    with user_code(code_dir):  # rebuilt from the record, as a teacher member is
        assert spec.build().model[0].out_channels == 4
    result = run_cli(*base, "--arch-kwargs", '{"width": 6}', "--resume")
    assert result.exit_code != 0
    assert "--arch-kwargs" in result.output and "width" in result.output
    result = run_cli(*base, "--arch-kwargs", '{"num_classes": 10}', "--force")
    assert result.exit_code != 0 and "takes from the data" in result.output
