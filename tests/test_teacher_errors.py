"""What goes wrong with teachers from elsewhere, and the one-line error each case gets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ensc.models import build_model
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> Path:
    """One file or folder per failure."""
    root = tmp_path_factory.mktemp("bad")
    (root / "empty").mkdir()
    (root / "junk.pt").write_text("not a checkpoint")
    torch.save(build_model("resnet8", num_classes=10).state_dict(), root / "resnet8.pth")
    full = (root / "resnet8.pth").read_bytes()
    (root / "truncated.pth").write_bytes(full[: len(full) // 2])
    whole = nn.Sequential(nn.Conv2d(3, 5, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    torch.save(whole, root / "pickled.pt")  # the whole module, not its state_dict
    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 30 * 30, 10))
    torch.save({"model": other.state_dict()}, root / "other_arch.pth")
    prefixed = {
        f"encoder.{k}": v for k, v in build_model("resnet8", num_classes=10).state_dict().items()
    }
    torch.save({"encoder.extra": torch.zeros(1), **prefixed}, root / "prefixed.pth")
    torch.save(build_model("resnet8", num_classes=100).state_dict(), root / "resnet8_c100.pth")
    (root / "mixed").mkdir()
    (root / "mixed" / "ensemble.json").write_text(json.dumps({"members": [
        {"path": "../resnet8.pth", "arch": "resnet8"},
        {"path": "../resnet8_c100.pth", "arch": "resnet8"},
    ]}))  # fmt: skip
    (root / "typo.json").write_text(
        json.dumps({"members": [{"path": "resnet8.pth", "std_dev": 1}]})
    )
    (root / "gone.json").write_text(json.dumps({"members": [{"path": "missing.pth"}]}))
    (root / "broken.json").write_text('{"members": [')
    # a 1-channel teacher whose member 1 has another architecture than the student
    for name, arch in (("g0.pth", "resnet8"), ("g1.pth", "resnet14")):
        torch.save(build_model(arch, num_classes=10, in_channels=1).state_dict(), root / name)
    (root / "gray.json").write_text(json.dumps({"members": [
        {"path": "g0.pth", "arch": "resnet8"}, {"path": "g1.pth", "arch": "resnet14"},
    ]}))  # fmt: skip
    return root


INSPECT = ("teachers", "inspect")
CASES = [
    ((*INSPECT, "{bad}/nope"), "does not exist"),
    ((*INSPECT, "{bad}/empty"), "no checkpoints"),
    (("eval", "--teacher", "{bad}/empty"), "no checkpoints"),
    ((*INSPECT, "{bad}/junk.pt"), "not a torch.save, TorchScript, torch.export or safetensors file"),
    ((*INSPECT, "{bad}/truncated.pth"), "truncated"),
    ((*INSPECT, "{bad}/pickled.pt"), "--unsafe-load"),
    ((*INSPECT, "{bad}/other_arch.pth", "--teacher-arch", "resnet8"), "missing keys (conv1.weight"),
    ((*INSPECT, "{bad}/prefixed.pth", "--teacher-arch", "resnet8"), "start with 'encoder.': set \"prefix\""),
    ((*INSPECT, "{bad}/mixed"), "disagree on the number of classes (resnet8.pth: 10, resnet8_c100.pth: 100)"),
    (("eval", "--teacher", "{bad}/resnet8_c100.pth", "--teacher-arch", "resnet8", "--dataset",
      "fashion-mnist"), "predicts 100 classes but fashion-mnist has 10"),
    ((*INSPECT, "{bad}/resnet8.pth", "--teacher-arch", "nosuchnet"), "unknown model 'nosuchnet'"),
    ((*INSPECT, "{bad}/resnet8.pth", "--teacher-arch", "nosuchpkg.nets:Net"), "cannot import 'nosuchpkg.nets'"),
    ((*INSPECT, "{bad}/resnet8.pth"), "--teacher-arch"),
    ((*INSPECT, "{bad}/resnet8.pth", "--teacher-arch", "resnet8", "--teacher-arch-kwargs",
      '{{"num_classes": 100}}'), "[100, 64]"),
    (("eval", "--teacher", "{bad}/resnet8.pth", "--teacher-arch", "resnet8"), "pass --dataset"),
    ((*INSPECT, "{bad}/typo.json"), "unknown field(s) std_dev"),
    ((*INSPECT, "{bad}/gone.json"), "missing.pth does not exist"),
    ((*INSPECT, "{bad}/broken.json"), "not valid JSON"),
    ((*INSPECT, "{bad}/resnet8.pth", "--teacher-arch-kwargs", "[1]"), "expected a JSON object"),
    (("compress", "--teacher", "{bad}/gray.json", "--arch", "resnet8", "--student-init", "member:one"),
     "expected member:K"),
    (("compress", "--teacher", "{bad}/gray.json", "--arch", "resnet8", "--student-init", "member:1",
      "--dataset", "fashion-mnist", "--train-subset", "100", "--test-subset", "50", "--out", "{bad}/run"),
     "member 1 (resnet14) does not have the student's architecture resnet8"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "message"), CASES, ids=[c[1][:40] for c in CASES])
def test_teacher_errors_are_one_line(args, message, bad: Path):
    result = run_cli(*(a.format(bad=bad) for a in args))
    assert result.exit_code != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and message.lower() in errors[0].lower(), result.output
    assert "Traceback" not in result.output


def test_refusal_to_unpickle_in_a_real_process(bad: Path):
    """The same through `python -m ensc.cli`: stderr holds the one line and no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "ensc.cli", "eval", "--teacher", str(bad / "pickled.pt")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("Error")]
    assert (
        len(lines) == 1
        and "--unsafe-load" in lines[0]
        and "torch.nn.modules.container.Sequential" in lines[0]
    )
    loaded = run_cli(*INSPECT, str(bad / "pickled.pt"), "--unsafe-load")
    assert loaded.exit_code == 0 and "pickled module" in loaded.output, loaded.output
