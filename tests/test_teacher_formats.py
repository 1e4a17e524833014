"""Teachers from other codebases: every format saved by torch itself, loaded as one heterogeneous
ensemble through a manifest, must predict exactly what the original modules predict."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from ensc.compress.warmstart import init_from_member
from ensc.engine.runtime import resolve_runtime
from ensc.errors import CheckpointError, ConfigError
from ensc.models import build_model, to_batchensemble
from ensc.models.checkpoint import ModelSpec, save_checkpoint
from ensc.teachers.ensemble import load_teacher, near_chance_limit, sanity_check
from ensc.teachers.formats import read_member_file, sniff
from ensc.teachers.manifest import member_entries
from tests.conftest import CIFAR_JPEG, needs_cifar_jpeg, run_cli

USER_CODE = '''
from torch import nn


class TinyNet(nn.Module):
    """A user architecture: not in ensc's registry, takes normalized input."""

    def __init__(self, num_classes=10, width=8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


def tiny_fixed():
    """A builder with the class count fixed in the code (no num_classes argument)."""
    return TinyNet(10, width=3)


class Linear(nn.Module):
    def __init__(self, num_classes=10, in_features=784):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1))
'''
MODULE = "ensc_test_byo_nets"  # unique, so no other test's import of the same name interferes
MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def _trained_like(model: nn.Module, seed: int) -> nn.Module:
    """Random BN statistics, so that running stats matter as they do in a trained network."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


def _normalized(model: nn.Module, mean, std) -> Callable[[torch.Tensor], torch.Tensor]:
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    return lambda x: model((x - m) / s)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict:
    """One member file per format, the manifest describing them, and what each must predict."""
    root = tmp_path_factory.mktemp("zoo")
    code = root / "code"
    code.mkdir()
    (code / f"{MODULE}.py").write_text(USER_CODE)
    sys.path.insert(0, str(code))
    user = __import__(MODULE)
    torch.manual_seed(0)
    folder = root / "teacher"
    folder.mkdir()
    expected, entries = [], []

    def add(entry: dict, predict: Callable) -> None:
        entries.append(entry)
        expected.append(predict)

    # 1. registry architecture, DataParallel `module.` keys, inside a training-state dict
    a = _trained_like(build_model("resnet8", num_classes=10), 1)
    opt = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    torch.save({"model_state_dict": nn.DataParallel(a).state_dict(), "optimizer": opt.state_dict(),
                "epoch": 7}, folder / "a_dataparallel.pth")  # fmt: skip
    add({"path": "a_dataparallel.pth", "arch": "resnet8"}, a)
    # 2. user architecture, torch.compile `_orig_mod.` keys, trained on normalized input
    b = _trained_like(user.TinyNet(width=6), 2)
    torch.save({"state_dict": torch.compile(b).state_dict(), "acc": 0.9}, folder / "b_compiled.pt")
    add({"path": "b_compiled.pt", "arch": f"{MODULE}:TinyNet", "kwargs": {"width": 6},
         "mean": list(MEAN), "std": list(STD)}, _normalized(b, MEAN, STD))  # fmt: skip
    # 3. TorchScript archive, one mean/std value for all channels
    c = _trained_like(user.TinyNet(width=5), 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still common
        torch.jit.save(torch.jit.script(c), folder / "c_scripted.pt")
    add({"path": "c_scripted.pt", "mean": 0.5, "std": 0.25}, _normalized(c, (0.5,), (0.25,)))
    # 4. torch.export program with a static batch of 1 (runs in chunks)
    d = _trained_like(user.TinyNet(width=4), 4)
    torch.export.save(torch.export.export(d, (torch.rand(1, 3, 32, 32),)), folder / "d_static.pt2")
    add({"path": "d_static.pt2"}, d)
    # 5. torch.export program with a dynamic batch, saved under another extension
    e = _trained_like(user.TinyNet(width=7), 5)
    program = torch.export.export(
        e, (torch.rand(2, 3, 32, 32),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    torch.export.save(program, folder / "e_dynamic.pt2")
    add({"path": "e_dynamic.pt2"}, e)
    # 6. legacy (pre-1.6, non-zip) torch.save, Lightning-style "model." keys under "net"
    f = _trained_like(user.TinyNet(width=3), 6)
    lightning = {f"model.{k}": v for k, v in f.state_dict().items()}
    torch.save({"net": lightning}, folder / "f_legacy.ckpt", _use_new_zipfile_serialization=False)
    add(
        {
            "path": "f_legacy.ckpt",
            "arch": f"{MODULE}:TinyNet",
            "kwargs": {"width": 3},
            "prefix": "model.",
        },
        f,
    )
    # 7. a builder without num_classes, raw state_dict
    g = _trained_like(user.tiny_fixed(), 7)
    torch.save(g.state_dict(), folder / "g_fixed.pt")
    add({"path": "g_fixed.pt", "arch": f"{MODULE}:tiny_fixed", "mean": list(MEAN), "std": list(STD)},
        _normalized(g, MEAN, STD))  # fmt: skip
    # 8. ensc's own checkpoint
    h = _trained_like(build_model("resnet8", num_classes=10, mean=MEAN, std=STD), 8)
    spec = ModelSpec("resnet8", 10, 3, (32, 32), MEAN, STD)
    save_checkpoint(folder / "h_ensc.pt", h, spec)
    add({"path": "h_ensc.pt"}, h)
    # 9. safetensors (optional dependency)
    try:
        from safetensors.torch import save_file
    except ImportError:
        pass
    else:
        s = _trained_like(build_model("resnet8", num_classes=10), 9)
        save_file(s.state_dict(), str(folder / "i_weights.safetensors"))
        add({"path": "i_weights.safetensors", "arch": "resnet8", "mean": list(MEAN), "std": list(STD)},
            _normalized(s, MEAN, STD))  # fmt: skip
    (folder / "ensemble.json").write_text(json.dumps({"members": entries}, indent=2))
    # a smaller mix for the end-to-end run: registry + user arch + TorchScript + torch.export
    small = [entries[i] for i in (0, 1, 2, 4)]
    (folder / "small.json").write_text(json.dumps({"members": small}))
    return {"folder": folder, "code": code, "expected": expected, "user": user, "modules": [a, b]}


def test_heterogeneous_manifest_matches_the_original_modules(zoo):
    teacher = load_teacher(zoo["folder"], code_path=zoo["code"])
    assert len(teacher) == len(zoo["expected"]) >= 8
    formats = [info["format"] for info in teacher.infos]
    assert formats[:8] == ["state_dict", "state_dict", "torchscript", "torch.export", "torch.export",
                           "state_dict", "state_dict", "ensc"]  # fmt: skip
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # [0, 1] pixels
    with torch.no_grad():
        for k, (member, predict) in enumerate(zip(teacher.members, zoo["expected"], strict=True)):
            assert not member.training and not any(p.requires_grad for p in member.parameters())
            assert torch.allclose(member(x), predict(x), atol=1e-5), (k, teacher.paths[k].name)
    assert {s.num_classes for s in teacher.specs} == {10} and {
        s.in_channels for s in teacher.specs
    } == {3}
    assert teacher.specs[1].arch == f"{MODULE}:TinyNet" and teacher.specs[1].mean == pytest.approx(
        MEAN
    )
    assert teacher.specs[2].std == pytest.approx((0.25,) * 3)
    assert teacher.specs[0].dataset == "" and teacher.data_record is None
    assert "DataParallel prefix 'module.' stripped" in teacher.infos[0]["notes"]
    assert "torch.compile prefix '_orig_mod.' stripped" in teacher.infos[1]["notes"]
    assert "1 × torchscript" in teacher.arch_summary


@pytest.fixture(scope="module")
def small_teacher(zoo):
    """resnet8 (DataParallel keys), user TinyNet with mean/std, TorchScript, torch.export."""
    return load_teacher(zoo["folder"] / "small.json", code_path=zoo["code"])


def test_gradients_reach_the_input_through_every_format(small_teacher):
    """Perturbations (ODS, TDiv-SDiv) differentiate teachers with respect to their input."""
    teacher = small_teacher
    x = torch.rand(3, 3, 32, 32, requires_grad=True)
    sum(m(x).logsumexp(-1).sum() for m in teacher.members).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_sources_folder_glob_and_file_with_teacher_arch(zoo, tmp_path: Path):
    for k in (10, 2, 1):
        torch.save(build_model("resnet8", num_classes=4).state_dict(), tmp_path / f"m{k}.pth")
    (tmp_path / "notes.txt").write_text("not a member")
    names = [e.path.name for e in member_entries(tmp_path, arch="resnet8")]
    assert names == ["m1.pth", "m2.pth", "m10.pth"]  # natural order, only checkpoint suffixes
    assert len(member_entries(str(tmp_path / "m1*.pth"))) == 2
    teacher = load_teacher(tmp_path / "m2.pth", arch="resnet8")
    assert len(teacher) == 1 and teacher.num_classes == 4  # read from the classifier's weights
    same = load_teacher(tmp_path, arch="resnet8", arch_kwargs={"num_classes": 4})
    assert len(same) == 3 and same.arch_summary == "3 × resnet8"


def test_pickled_modules_need_unsafe_load(zoo, tmp_path: Path):
    b = zoo["modules"][1]
    torch.save(nn.DataParallel(b), tmp_path / "whole.pt")
    with pytest.raises(CheckpointError, match="--unsafe-load"):
        read_member_file(tmp_path / "whole.pt")
    teacher = load_teacher(tmp_path / "whole.pt", unsafe_load=True)
    assert teacher.infos[0]["format"] == "pickled module"
    assert teacher.specs[0].arch == f"{MODULE}:TinyNet"  # DataParallel unwrapped
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(teacher.members[0](x), b(x), atol=1e-6)


class _Payload:
    """Unpickling it creates a file: the harmless stand-in for code a malicious file would run."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def _with_entry(archive: Path, suffix: str, data: bytes, out: Path) -> None:
    """A copy of zip ``archive`` with the entry whose name ends with ``suffix`` replaced."""
    import zipfile

    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, data if info.filename.endswith(suffix) else src.read(info))


@pytest.mark.parametrize("part", ["sample_inputs/model.pt", "weights/weight_0"])
def test_a_torch_export_archive_with_a_pickle_payload_runs_nothing(zoo, tmp_path: Path, part):
    """torch.export.load unpickles these parts with weights_only=False (the sample inputs after
    the safe load fails): without --unsafe-load the payload must never run."""
    import io
    import zipfile

    pwned, buffer = tmp_path / "PWNED", io.BytesIO()
    torch.save(_Payload(pwned), buffer)
    source, bad = zoo["folder"] / "d_static.pt2", tmp_path / "teacher" / "bad.pt2"
    bad.parent.mkdir()
    _with_entry(source, part, buffer.getvalue(), bad)
    if part.startswith("weights/"):  # mark the weight as pickled, as torch.export does
        with zipfile.ZipFile(source) as src:
            name = next(n for n in src.namelist() if n.endswith("model_weights_config.json"))
            config = json.loads(src.read(name))
        config["config"][next(iter(config["config"]))]["use_pickle"] = True
        _with_entry(bad, "model_weights_config.json", json.dumps(config).encode(), tmp_path / "b")
        (tmp_path / "b").replace(bad)
    with pytest.raises(CheckpointError, match="needs a full unpickle.*--unsafe-load"):
        read_member_file(bad)
    result = run_cli("teachers", "inspect", str(bad.parent))
    assert result.exit_code != 0 and "--unsafe-load" in result.output
    assert "Traceback" not in result.output
    assert not pwned.exists()


def test_sniff_tells_formats_by_content_not_extension(zoo, tmp_path: Path):
    folder = zoo["folder"]
    assert sniff(folder / "c_scripted.pt") == "torchscript"
    assert sniff(folder / "d_static.pt2") == "torch.export"
    assert sniff(folder / "f_legacy.ckpt") == "pickle"
    assert sniff(folder / "a_dataparallel.pth") == "torch.save"
    (tmp_path / "exported.pt").write_bytes((folder / "e_dynamic.pt2").read_bytes())
    assert read_member_file(tmp_path / "exported.pt").format == "torch.export"


def test_student_init_copies_member_weights(small_teacher):
    teacher = small_teacher
    spec = ModelSpec("resnet8", 10, 3, (32, 32), (0.1,) * 3, (0.2,) * 3)
    net = spec.build()
    new_spec = init_from_member(net, spec, teacher, 0)
    be = to_batchensemble(net, members=2, init="ones").eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(be.forward_members(x)[1], teacher.members[0](x), atol=1e-5)
    assert new_spec.mean == (0.0,) * 3  # member 0 normalizes with the identity
    with pytest.raises(ConfigError, match="does not have the student's architecture resnet8"):
        init_from_member(spec.build(), spec, teacher, 1)
    with pytest.raises(ConfigError, match="members 0 to 3"):
        init_from_member(spec.build(), spec, teacher, 4)


def test_auto_student_init_finds_the_member_with_the_students_architecture(small_teacher):
    from ensc.compress.warmstart import matching_member

    spec = ModelSpec("resnet8", 10, 3, (32, 32), (0.1,) * 3, (0.2,) * 3)
    assert matching_member(spec.build(), small_teacher) == 0  # the resnet8 member
    other = ModelSpec("resnet14", 10, 3, (32, 32), (0.1,) * 3, (0.2,) * 3)
    assert matching_member(other.build(), small_teacher) is None  # then: random weights


def test_user_architecture_without_num_classes_builds_a_student(tmp_path: Path):
    from ensc.teachers.ensemble import user_code

    (tmp_path / "fixed_nets.py").write_text(
        "from torch import nn\n"
        "def ten():\n    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))\n"
    )
    with user_code(tmp_path):
        net = build_model("fixed_nets:ten", num_classes=10)
        with pytest.raises(ValueError, match="builds 10 outputs, but the data has 4 classes"):
            build_model("fixed_nets:ten", num_classes=4)
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert str(tmp_path.resolve()) not in sys.path  # the folder left sys.path again


def test_inspect_prints_one_row_per_member(zoo):
    result = run_cli("teachers", "inspect", str(zoo["folder"]), "--code-path", str(zoo["code"]))
    assert result.exit_code == 0, result.output
    for text in ("torchscript", "torch.export", "h_ensc.pt", f"{MODULE}:TinyNet", "from ensemble.json",
                 "no dataset recorded: pass --dataset"):  # fmt: skip
        assert text in result.output, text


def test_sanity_pass_warns_about_a_misnormalized_member(zoo, tmp_path: Path, caplog):
    """A nearest-centroid classifier is good with its own normalization and at chance with a wrong one."""
    from ensc.data.datasets import load_dataset
    from ensc.data.splits import DataConfig

    data = load_dataset(DataConfig("fashion-mnist", train_subset=2000, test_subset=500))
    mean, std = data.mean[0], data.std[0]
    z = (data.train.images.float() / 255 - mean) / std  # [N, 1, 28, 28] normalized
    centroids = torch.stack([z[data.train.labels == k].mean(0).flatten() for k in range(10)])
    model = zoo["user"].Linear(num_classes=10)
    with torch.no_grad():
        model.fc.weight.copy_(centroids)  # logit_k = <z, c_k> - |c_k|² / 2
        model.fc.bias.copy_(-0.5 * centroids.pow(2).sum(1))
    torch.save(model.state_dict(), tmp_path / "centroids.pt")
    members = [{"path": "centroids.pt", "mean": [mean], "std": [std]},
               {"path": "centroids.pt", "mean": [5.0], "std": [0.1]}]  # fmt: skip
    for m in members:
        m["arch"] = f"{MODULE}:Linear"
    (tmp_path / "ensemble.json").write_text(json.dumps({"members": members}))
    teacher = load_teacher(tmp_path, code_path=zoo["code"], dataset="fashion-mnist")
    assert teacher.specs[0].in_channels == 1 and teacher.specs[0].image_size == (28, 28)
    with caplog.at_level(logging.WARNING, logger="ensc.teachers.ensemble"):
        good, bad = sanity_check(teacher, data.test, resolve_runtime("cpu"))
    assert good > 50 and bad < 15
    warnings = [r.getMessage() for r in caplog.records if r.name == "ensc.teachers.ensemble"]
    assert len(warnings) == 1 and "member 1" in warnings[0] and "normalization" in warnings[0]


def test_near_chance_limit_by_hand():
    # 10 classes, 256 images: chance 10, margin max(min(5, 10), 3 * 100 * sqrt(0.1 * 0.9 / 256) = 5.625)
    assert near_chance_limit(10, 256) == pytest.approx(15.625)
    assert near_chance_limit(2, 256) == pytest.approx(60.0)  # margin capped at 10 points
    assert near_chance_limit(100, 256) == pytest.approx(1 + 3 * 100 * (0.01 * 0.99 / 256) ** 0.5)


@needs_cifar_jpeg
def test_compress_with_a_heterogeneous_teacher_on_cifar10_jpeg(zoo, tmp_path: Path):
    result = run_cli(
        "compress", "--teacher", str(zoo["folder"] / "small.json"), "--code-path", str(zoo["code"]),
        "--arch", "resnet8", "--members", "2", "--student-init", "member:0", "--dataset", "imagefolder",
        "--data-root", str(CIFAR_JPEG), "--max-steps", "3", "--train-subset", "300",
        "--test-subset", "100", "--batch-size", "32", "--epochs", "1", "--out", str(tmp_path / "run"),
        "--max-acc-drop", "100", cwd=tmp_path,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["dataset"] == "imagefolder" and report["train"]["steps"] == 3
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["student_init"] == 0 and config["code_path"] == str(zoo["code"])
    assert "torchscript" in (tmp_path / "run" / "report.md").read_text()
