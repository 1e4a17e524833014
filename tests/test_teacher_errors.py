"""What goes wrong with teachers from elsewhere, and the one-line error each case gets."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ensc.errors import ConfigError
from ensc.models import build_model
from ensc.models.checkpoint import ModelSpec, save_checkpoint
from ensc.teachers.ensemble import user_code
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
    # a diverged training: NaN BatchNorm statistics, in ensc's format and as a bare state_dict
    diverged = build_model("resnet8", num_classes=10, in_channels=1)
    diverged.layer1[0].bn1.running_var.fill_(float("nan"))
    spec = ModelSpec("resnet8", 10, 1, (28, 28), (0.5,), (0.25,), dataset="fashion-mnist")
    save_checkpoint(root / "nan_ensc.pt", diverged, spec, info={"seed": 0})
    torch.save(diverged.state_dict(), root / "nan.pth")
    (root / "garbage.pt").write_bytes(b"\x80\x02garbage")  # a pickle header, then nothing valid
    (root / "twice.json").write_text(json.dumps({"members": [
        "resnet8.pth", {"path": "resnet8.pth", "mean": [0.5], "std": [0.2]}, "./resnet8.pth",
    ], }))  # fmt: skip
    # ensc members trained on images of different sizes: one size is fed to both
    (root / "sizes").mkdir()
    for name, size in (("m0.pt", (28, 28)), ("m1.pt", (16, 16))):
        small = ModelSpec("resnet8", 10, 1, size, (0.5,), (0.25,), dataset="fashion-mnist")
        save_checkpoint(
            root / "sizes" / name, build_model("resnet8", num_classes=10, in_channels=1), small
        )
    # NaN normalization (json reads NaN) and an empty prefix that lists one member twice
    (root / "nan_mean.json").write_text('{"members": [{"path": "resnet8.pth", "arch": "resnet8", '
                                        '"mean": [NaN, 0.5, 0.5], "std": [0.2, 0.2, 0.2]}]}')  # fmt: skip
    (root / "prefix.json").write_text(json.dumps({"members": [
        {"path": "resnet8.pth", "arch": "resnet8"},
        {"path": "resnet8.pth", "arch": "resnet8", "prefix": ""},
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
    ((*INSPECT, "{bad}/resnet8.pth", "--teacher-arch", "nosuchpkg.nets:Net"), "'nosuchpkg.nets:Net' is not one of ensc's"),
    ((*INSPECT, "{bad}/resnet8.pth"), "--teacher-arch"),
    ((*INSPECT, "{bad}/resnet8.pth", "--teacher-arch", "resnet8", "--teacher-arch-kwargs",
      '{{"num_classes": 100}}'), "[100, 64]"),
    (("eval", "--teacher", "{bad}/resnet8.pth", "--teacher-arch", "resnet8"), "pass --dataset"),
    ((*INSPECT, "{bad}/typo.json"), "unknown field(s) std_dev"),
    ((*INSPECT, "{bad}/gone.json"), "missing.pth does not exist"),
    ((*INSPECT, "{bad}/broken.json"), "not valid JSON"),
    ((*INSPECT, "{bad}/twice.json", "--teacher-arch", "resnet8"),
     "twice.json: members 0 and 2 are the same (resnet8.pth, same settings); list each member once"),
    ((*INSPECT, "{bad}/nan_mean.json"), "member 0: mean must be finite numbers; got [nan, 0.5, 0.5]"),
    ((*INSPECT, "{bad}/prefix.json"), "members 0 and 1 are the same (resnet8.pth, same settings)"),
    ((*INSPECT, "{bad}/sizes"), "disagree on the input size they were trained on (m0.pt: 28×28, m1.pt: 16×16)"),
    ((*INSPECT, "/dev/zero"), "teacher /dev/zero is a device, pipe or socket, not a regular file"),
    ((*INSPECT, "{bad}/nan_ensc.pt"), "nan_ensc.pt holds non-finite values (NaN or inf) in layer1.0.bn1.running_var"),
    ((*INSPECT, "{bad}/nan.pth", "--teacher-arch", "resnet8"), "nan.pth holds non-finite values"),
    (("eval", "--student", "{bad}/nan_ensc.pt"), "nan_ensc.pt holds non-finite values"),
    (("eval", "--student", "{bad}/junk.pt"), "junk.pt is not a PyTorch checkpoint"),
    ((*INSPECT, "{bad}/garbage.pt"), "garbage.pt is not a PyTorch checkpoint"),
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


HUBCONF = """
import pathlib
pathlib.Path(__file__).with_name("RAN").write_text("hubconf.py ran")
from torch import nn


def net(num_classes=10):
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, num_classes))
"""
USER_NETS = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.fc = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * in_channels, num_classes))

    def forward(self, x):
        return self.fc(x)
"""


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    """A torch.hub folder whose hubconf.py leaves a file RAN when it runs, a manifest naming
    ``torch.hub:load`` on it, and a --code-path folder with a real architecture (and a json.py)."""
    root = tmp_path_factory.mktemp("hub")
    (root / "repo").mkdir()
    (root / "repo" / "hubconf.py").write_text(HUBCONF)
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).state_dict(), root / "w.pt")
    kwargs = {"repo_or_dir": str(root / "repo"), "model": "net", "source": "local"}
    (root / "ensemble.json").write_text(json.dumps({"members": [
        {"path": "w.pt", "arch": "torch.hub:load", "kwargs": kwargs}]}))  # fmt: skip
    code = root / "code"
    (code / "ensc_test_trust").mkdir(parents=True)
    (code / "ensc_test_trust" / "__init__.py").write_text("")
    (code / "ensc_test_trust" / "nets.py").write_text(USER_NETS)
    (code / "ensc_test_trust" / "fresh.py").write_text(USER_NETS)  # imported by one test only
    (code / "json.py").write_text("raise SystemExit('the json.py of --code-path was imported')\n")
    (root / "via_user_module.json").write_text(json.dumps({"members": [
        {"path": "w.pt", "arch": "ensc_test_trust.nets:torch.hub.load", "kwargs": kwargs}]}))  # fmt: skip
    return root


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ((), "architecture 'torch.hub:load' is not one of ensc's: other code builds only from the "
             "folder you pass with --code-path, or from anywhere with --unsafe-load"),
        (("--code-path", "{hub}/repo"), "module torch.hub is"),
        (("--code-path", "{hub}/code"), "not in the --code-path folder"),
    ],
)  # fmt: skip
def test_manifest_cannot_run_hub_code_without_unsafe_load(extra, message, hub: Path):
    result = run_cli(*INSPECT, str(hub / "ensemble.json"), *(a.format(hub=hub) for a in extra))
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert result.exit_code == 1 and len(errors) == 1 and message in errors[0], result.output
    assert "--unsafe-load" in errors[0]
    assert not (hub / "repo" / "RAN").exists()  # hubconf.py never ran


def test_callable_reached_through_a_trusted_module_is_refused(hub: Path):
    result = run_cli(*INSPECT, str(hub / "via_user_module.json"), "--code-path", str(hub / "code"))
    assert result.exit_code == 1, result.output
    assert "is torch.hub.load, defined outside the --code-path folder" in result.output
    assert not (hub / "repo" / "RAN").exists()


def test_unsafe_load_builds_any_callable_as_before(hub: Path):
    result = run_cli(*INSPECT, str(hub / "ensemble.json"), "--unsafe-load")
    assert result.exit_code == 0, result.output
    assert "torch.hub:load" in result.output and (hub / "repo" / "RAN").exists()
    (hub / "repo" / "RAN").unlink()


def test_architectures_come_only_from_the_code_path_folder(hub: Path):
    code = hub / "code"
    name = "ensc_test_trust.fresh:Net"
    with pytest.raises(ConfigError, match="is not one of ensc's"):
        build_model(name, num_classes=3)  # outside any --code-path, nothing is imported
    assert "ensc_test_trust.fresh" not in sys.modules
    with user_code(code):
        net = build_model(name, num_classes=3, in_channels=1)  # a package under the folder
        assert net(torch.rand(2, 1, 8, 8)).shape == (2, 3)
        elsewhere = r"module json is .*json/__init__.py, not in the --code-path"
        with pytest.raises(ConfigError, match=elsewhere):  # not the folder's json.py
            build_model("json:loads", num_classes=3)
        with pytest.raises(ConfigError, match="is torch.nn.modules.linear.Linear, defined outside"):
            build_model("ensc_test_trust.nets:nn.Linear", num_classes=3)
        assert isinstance(build_model("resnet8", num_classes=3), nn.Module)  # the registry, always
    with pytest.raises(ConfigError, match="is not one of ensc's"):
        build_model(name, num_classes=3)  # imported meanwhile, still not trusted outside the block
    with user_code(None, unsafe=True):
        assert isinstance(build_model(name, num_classes=3), nn.Module)


def test_user_architecture_needs_its_code_path_to_train_and_load(hub: Path, tmp_path: Path):
    """`ensc train --arch module:callable` and the checkpoints it writes, which name the callable."""
    args = ("train", "--dataset", "fashion-mnist", "--arch", "ensc_test_trust.nets:Net", "--members",
            "1", "--epochs", "1", "--train-subset", "200", "--batch-size", "32", "--max-steps", "2",
            "--out", str(tmp_path / "t"))  # fmt: skip
    refused = run_cli(*args)
    assert refused.exit_code == 1 and "is not one of ensc's" in refused.output, refused.output
    assert run_cli(*args, "--code-path", str(hub / "code")).exit_code == 0
    member = ("--teacher", str(tmp_path / "t"), "--test-subset", "50")
    assert "is not one of ensc's" in run_cli("eval", *member).output  # the file names user code
    loaded = run_cli("eval", *member, "--code-path", str(hub / "code"))
    assert loaded.exit_code == 0 and "| member 0" in loaded.output, loaded.output


def test_student_arch_follows_the_same_rule(tiny_teacher: Path, tmp_path: Path):
    result = run_cli(
        "compress", "--teacher", str(tiny_teacher), "--arch", "torch.hub:load", "--train-subset",
        "100", "--test-subset", "50", "--out", str(tmp_path / "run"), cwd=tmp_path,
    )  # fmt: skip
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert result.exit_code == 1 and len(errors) == 1, result.output
    assert "'torch.hub:load' is not one of ensc's" in errors[0]


def test_settings_an_ensc_checkpoint_does_not_use_are_named(tiny_teacher: Path, tmp_path, caplog):
    """An ensc checkpoint is built from what it records; an "arch" or "kwargs" that says otherwise
    used to be dropped without a word (kwargs) or named only for arch."""
    from ensc.teachers.manifest import read_manifest
    from ensc.teachers.member import load_member

    manifest = tmp_path / "ensemble.json"
    manifest.write_text(json.dumps({"members": [
        {"path": str(tiny_teacher / "member0.pt"), "arch": "resnet14", "kwargs": {"width": 2}},
        {"path": str(tiny_teacher / "member1.pt"), "kwargs": {"num_classes": 10}},
    ]}))  # fmt: skip
    first, second = read_manifest(manifest)
    with caplog.at_level(logging.WARNING, logger="ensc"):
        load_member(first)
        load_member(second)  # what it records: nothing to say
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert 'ignoring arch resnet14 and kwargs {"width": 2}' in lines[0] and "member0.pt" in lines[0]
