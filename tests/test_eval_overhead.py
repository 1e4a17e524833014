"""Evaluation after training: teacher-logits cache, bounded BN recalibration, fast eval copies."""

from __future__ import annotations

import copy
import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from ensc.compress.average import recalibrate_bn
from ensc.compress.config import CompressConfig
from ensc.compress.pipeline import run_compress
from ensc.compress.single import recalibrate_on_train
from ensc.data.datasets import load_dataset
from ensc.data.splits import DataConfig, Split
from ensc.engine.loop import OptimConfig
from ensc.engine.predict import (
    eval_copy,
    eval_member_networks,
    predict_logits,
    predict_logits_many,
    predict_member_logits,
    probe_batch,
)
from ensc.engine.runtime import resolve_runtime
from ensc.evaluation.logits_cache import (
    cache_dir_for,
    cache_key,
    cached_teacher_logits,
    load_logits,
)
from ensc.evaluation.metrics import accuracy, nll
from ensc.models import build_model
from ensc.models.batchensemble import to_batchensemble
from ensc.models.checkpoint import load_checkpoint, load_model, read_payload
from ensc.models.fold import member_network
from ensc.teachers.ensemble import load_teacher

CPU = resolve_runtime("cpu")
TIMING_KEYS = {
    "train_seconds",
    "average_seconds",
    "bn_recal_seconds",
    "eval_seconds",
    "report_seconds",
}


@pytest.fixture(scope="module")
def data():
    return load_dataset(DataConfig("fashion-mnist", train_subset=300, test_subset=100))


def splits_of(data) -> dict[str, Split]:
    return {"val": data.val, "test": data.test}


def config_for(teacher: Path, tmp_path: Path, name: str, **kw) -> CompressConfig:
    return CompressConfig(
        teacher=teacher,
        arch="resnet8",
        data_overrides={"train_subset": 300, "test_subset": 100},
        optim=OptimConfig(epochs=1, batch_size=32, max_steps=2),
        max_acc_drop=100.0,
        out=tmp_path / name,
        runs_dir=tmp_path / "runs",
        **kw,
    )


def without_timing(report: dict) -> dict:
    out = {k: v for k, v in report.items() if k not in ("timing", "wall_seconds", "train")}
    out.pop("teacher_logits_cache")
    curves = out.pop("curves")  # its rows without their seconds
    out["curves"] = [{k: v for k, v in r.items() if k != "seconds"} for r in curves["rows"]]
    return out


# --- the teacher-logits cache ------------------------------------------------------------


def test_cache_hit_gives_the_same_report_as_a_miss(tiny_teacher: Path, tmp_path: Path, caplog):
    caplog.set_level(logging.INFO, logger="ensc")
    first = run_compress(config_for(tiny_teacher, tmp_path, "a"), CPU)
    assert first.report["teacher_logits_cache"] == "written"
    assert "teacher logits: computed" in caplog.text
    files = list(cache_dir_for(tmp_path / "runs").glob("*.pt"))
    assert len(files) == 1
    second = run_compress(config_for(tiny_teacher, tmp_path, "b"), CPU)
    assert second.report["teacher_logits_cache"] == "hit"
    assert "teacher logits: read from the cache" in caplog.text
    assert without_timing(second.report) == without_timing(first.report)
    assert set(second.report["timing"]) == TIMING_KEYS
    assert all(v >= 0 for v in second.report["timing"].values())
    assert "after training:" in second.report_md and "cache: hit" in second.report_md
    assert json.loads((tmp_path / "b" / "report.json").read_text())["timing"].keys() == TIMING_KEYS
    # opting out neither reads nor writes the cache
    off = run_compress(config_for(tiny_teacher, tmp_path, "c", cache_teacher_logits=False), CPU)
    assert off.report["teacher_logits_cache"] == "off"
    assert without_timing(off.report) == without_timing(first.report)


def test_cached_logits_equal_computed_ones(tiny_teacher: Path, tmp_path: Path, data):
    teacher = load_teacher(tiny_teacher)
    splits = splits_of(data)
    computed, status = cached_teacher_logits(teacher, splits, CPU, tmp_path)
    assert status == "written"
    cached, status = cached_teacher_logits(teacher, splits, CPU, tmp_path)
    assert status == "hit"
    for name in splits:
        assert cached[name].shape == (2, len(splits[name]), 10)
        assert torch.equal(cached[name], computed[name])
    # the logits are those of the members themselves (eval copies within float32 round-off)
    direct = predict_logits(teacher.members[1], data.test, CPU)
    torch.testing.assert_close(cached["test"][1], direct, atol=1e-4, rtol=0)


def test_changed_teacher_file_misses_the_cache(tiny_teacher: Path, tmp_path: Path, data):
    own = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, own)
    splits = splits_of(data)
    key = cache_key(load_teacher(own), splits, CPU)
    assert cached_teacher_logits(load_teacher(own), splits, CPU, tmp_path / "cache")[1] == "written"
    assert cached_teacher_logits(load_teacher(own), splits, CPU, tmp_path / "cache")[1] == "hit"

    member = sorted(own.glob("*.pt"))[1]
    payload = read_payload(member)
    weights = payload["state_dict"]
    first = next(k for k, v in weights.items() if v.is_floating_point())
    weights[first] = weights[first] + 0.01
    torch.save(payload, member)
    changed = load_teacher(own)
    assert cache_key(changed, splits, CPU) != key
    assert cached_teacher_logits(changed, splits, CPU, tmp_path / "cache")[1] == "written"


def test_changed_split_misses_the_cache(tiny_teacher: Path, tmp_path: Path, data):
    teacher = load_teacher(tiny_teacher)
    splits = splits_of(data)
    key = cache_key(teacher, splits, CPU)
    assert cache_key(teacher, splits_of(data), CPU) == key  # deterministic
    images = data.test.images.clone()
    images[0, 0, 0, 0] ^= 1  # one pixel, one bit
    assert cache_key(teacher, {**splits, "test": Split(images, data.test.labels)}, CPU) != key
    labels = data.val.labels.clone()
    labels[0] = (labels[0] + 1) % 10
    assert cache_key(teacher, {**splits, "val": Split(data.val.images, labels)}, CPU) != key
    fewer = {**splits, "test": data.test.subset(torch.arange(50))}
    assert cache_key(teacher, fewer, CPU) != key
    # another normalization of the same file changes the logits, so the key
    teacher.specs[0] = replace(teacher.specs[0], mean=(0.5,))
    assert cache_key(teacher, splits, CPU) != key


@pytest.mark.parametrize("damage", ["garbage", "truncated", "flipped", "other key", "shapes"])
def test_corrupt_cache_file_is_recomputed(
    damage: str, tiny_teacher: Path, tmp_path: Path, data, caplog
):
    teacher = load_teacher(tiny_teacher)
    splits = splits_of(data)
    fresh, _ = cached_teacher_logits(teacher, splits, CPU, tmp_path)
    path = tmp_path / f"{cache_key(teacher, splits, CPU)}.pt"
    raw = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"not a torch file")
    elif damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage in ("other key", "shapes", "flipped"):
        obj = torch.load(path, weights_only=True)
        if damage == "other key":
            obj["key"] = "0" * 64
        elif damage == "shapes":
            obj["logits"]["test"] = obj["logits"]["test"][:, :10]
        else:  # a changed value the file format itself does not notice
            obj["logits"]["val"][0, 0, 0] += 1.0
        torch.save(obj, path)
    caplog.set_level(logging.WARNING, logger="ensc")
    logits, status = cached_teacher_logits(teacher, splits, CPU, tmp_path)
    assert status == "written" and "ignoring the teacher-logits cache" in caplog.text
    for name in splits:
        assert torch.equal(logits[name], fresh[name])
    # and the rewritten file is good again
    assert cached_teacher_logits(teacher, splits, CPU, tmp_path)[1] == "hit"


def test_unwritable_cache_costs_a_warning_not_the_run(tiny_teacher: Path, tmp_path: Path, data):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    teacher = load_teacher(tiny_teacher)
    logits, status = cached_teacher_logits(teacher, splits_of(data), CPU, blocker / "cache")
    assert status == "not written" and logits["test"].shape == (2, 100, 10)


def test_load_logits_of_a_missing_file_is_none(tmp_path: Path):
    assert load_logits(tmp_path / "nope.pt", "k", {"test": (1, 2, 3)}) is None


# --- bounded BN recalibration ------------------------------------------------------------


def counting(batches, seen: list[int]):
    for b in batches:
        seen.append(len(b))
        yield b


def test_recalibrate_bn_stops_after_max_batches():
    net = build_model("resnet8", num_classes=10, in_channels=1).eval()
    calls = []
    net.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    seen: list[int] = []
    endless = counting((torch.rand(4, 1, 28, 28) for _ in iter(int, 1)), seen)
    recalibrate_bn(net, endless, max_batches=3, channels_last=True)
    assert len(calls) == 3 and len(seen) == 3  # no batch drawn beyond the bound
    assert not net.training
    assert net.conv1.weight.is_contiguous()  # the model's own layout is untouched
    with pytest.raises(ValueError, match="max_batches"):
        recalibrate_bn(net, [torch.rand(2, 1, 28, 28)], max_batches=0)


def test_recalibrate_bn_does_not_build_a_graph():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    grads = []
    net.register_forward_hook(lambda m, a, out: grads.append(out.requires_grad))
    recalibrate_bn(net, [torch.rand(2, 1, 8, 8)])
    assert grads == [False]


def test_pipeline_recalibration_uses_at_most_n_shuffled_batches(data):
    net = build_model("resnet8", num_classes=10, in_channels=1).eval()
    batches = []
    net.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    config = CompressConfig(
        teacher=Path("unused"), arch="resnet8", optim=OptimConfig(batch_size=32), bn_recal_batches=4
    )
    recalibrate_on_train(config, net, data, CPU)
    assert batches == [32] * 4 and not net.training
    batches.clear()
    recalibrate_on_train(replace(config, bn_recal_batches=None), net, data, CPU)
    assert batches == [32] * (len(data.train) // 32)  # all of them (drop_last)


def test_bounded_recalibration_is_a_random_sample_augmented_as_in_training(data):
    """Shuffled before bounding: a class-sorted split still gives every class to the statistics;
    and augmented (padded random crops) like the batches the weights were trained with."""
    order = data.train.labels.argsort(stable=True)
    train = data.train.subset(order)
    # every image a flat grey that names its class, so a crop's centre still says which class
    train = replace(train, images=(train.labels.view(-1, 1, 1, 1) * 20 + 30).to(torch.uint8)
                    .expand_as(train.images).contiguous())  # fmt: skip
    sorted_data = replace(data, train=train)
    seen: list[torch.Tensor] = []
    net = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(784))
    net.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    config = CompressConfig(
        teacher=Path("unused"), arch="resnet8", optim=OptimConfig(batch_size=32), bn_recal_batches=2
    )
    recalibrate_on_train(config, net, sorted_data, CPU)
    assert len(seen) == 2
    centres = (seen[0][:, 0, 14, 14] * 255).round()
    assert len(set(centres.tolist())) > 1  # not just the first class's images
    padded = (seen[0] == 0).flatten(1).any(1)  # zero padding shows in shifted crops
    assert 0 < int(padded.sum()) < len(padded)


# --- fast evaluation copies --------------------------------------------------------------


def trained_like(net: nn.Module, channels: int, seed: int = 0, batch: int = 16) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, as after training."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
        net.train()
        for _ in range(3):
            net(torch.rand(batch, channels, 28, 28))
    return net.eval()


@pytest.mark.parametrize("arch", ["resnet8", "wrn10x1"])
def test_eval_copy_folds_batchnorm_and_matches(arch: str):
    net = trained_like(build_model(arch, num_classes=10, in_channels=1), 1)
    x = torch.rand(40, 1, 28, 28)
    fast = eval_copy(net, CPU, x[:8])
    assert fast is not net
    if arch == "resnet8":  # post-activation: every BN follows a conv and folds into it
        assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), net(x), atol=1e-4, rtol=0)
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())  # original untouched


class DataDependent(nn.Module):
    """Control flow on tensor values: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if y.mean() > 0:
            y = y * 2
        return self.fc(y.mean((2, 3)))


def test_eval_copy_of_an_untraceable_network_still_matches():
    net = DataDependent().eval()
    x = torch.rand(6, 1, 8, 8)
    fast = eval_copy(net, CPU, x)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), net(x), atol=1e-5, rtol=0)


def test_eval_copy_falls_back_when_the_copy_differs(monkeypatch, caplog):
    net = trained_like(build_model("resnet8", num_classes=10, in_channels=1), 1)
    wrong = copy.deepcopy(net)
    with torch.no_grad():
        wrong.fc.bias += 1.0
    monkeypatch.setattr("ensc.engine.predict._fused", lambda model: wrong)
    caplog.set_level(logging.WARNING, logger="ensc")
    assert eval_copy(net, CPU, torch.rand(4, 1, 28, 28)) is net
    assert "evaluating the network itself" in caplog.text


def test_member_networks_match_the_batchensemble(data):
    be = to_batchensemble(
        build_model("resnet8", num_classes=10, in_channels=1), members=3, init="normal"
    )
    trained_like(be.net, 1, batch=15)  # 15 images: 5 per member
    x = torch.rand(12, 1, 28, 28)
    with torch.inference_mode():
        want = be.forward_members(x)
        for m in range(3):
            torch.testing.assert_close(member_network(be, m)(x), want[m], atol=1e-4, rtol=0)
    nets = eval_member_networks(be, CPU, probe_batch([data.test], CPU))
    assert nets is not None and len(nets) == 3
    got = torch.stack([predict_logits(n, data.test, CPU) for n in nets])
    torch.testing.assert_close(got, predict_member_logits(be, data.test, CPU), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="member must be"):
        member_network(be, 3)


def test_each_model_is_predicted_once_per_split(
    tiny_teacher: Path, tmp_path: Path, monkeypatch, data
):
    """Every teacher member, student member and the averaged network (after and before BN
    recalibration): one pass per split."""
    import ensc.compress.single as pipeline_mod  # where the run's predictions are made
    import ensc.evaluation.evaluate as evaluate_mod

    passes: list[int] = []  # images of one split through one network

    def many(fn):
        def wrapper(models, splits, *args, **kwargs):
            passes.extend(len(split) for _ in models for split in splits.values())
            return fn(models, splits, *args, **kwargs)

        return wrapper

    def members(fn):
        def wrapper(student, split, *args, **kwargs):
            passes.extend([len(split)] * student.members)
            return fn(student, split, *args, **kwargs)

        return wrapper

    for mod in (evaluate_mod, pipeline_mod):
        monkeypatch.setattr(mod, "predict_logits_many", many(mod.predict_logits_many))
    monkeypatch.setattr(
        pipeline_mod, "predict_member_logits", members(pipeline_mod.predict_member_logits)
    )
    config = config_for(tiny_teacher, tmp_path, "once", cache_teacher_logits=False)
    report = run_compress(config, CPU).report
    n_val, n_test = report["n_val"], report["n_test"]
    # 2 teacher members + 2 student members + the averaged network with and without BN
    # recalibration, each on val and test; then the kept network once more on test with its
    # temperature folded in, so that its test numbers are those of the file users get
    # (computing them as logits / T instead differs at float round-off, which moved an OOD
    # AUROC by 4e-4); its validation numbers are the earlier ones over T
    assert report["calibration"]["folded"]
    assert sorted(passes) == sorted([n_val, n_test] * 6 + [n_test])
    shipped, _ = load_model(config.out / "student.pt")
    probs = predict_logits(shipped.eval(), data.test, CPU).softmax(-1)  # the run's test images
    labels = data.test.labels
    assert len(labels) == n_test
    assert accuracy(probs, labels) == pytest.approx(report["student_avg"]["acc"], abs=1e-6)
    assert nll(probs, labels) == pytest.approx(report["student_avg"]["nll"], rel=1e-6)
    assert "student_avg_alternative" in report and set(report["val"]) == {
        "teacher",
        "student_be",
        "student_avg",
        "student_avg_alternative",
    }
    # the single network kept is the one with the lower validation NLL, and student.pt is it
    val = report["val"]
    assert val["student_avg"]["nll"] <= val["student_avg_alternative"]["nll"]
    info = load_checkpoint(config.out / "student.pt").info
    assert info["recalibrated_bn"] == (report["bn_statistics"] == "re-estimated")


def test_predict_logits_many_is_predict_logits_side_by_side(data):
    nets = [
        trained_like(build_model("resnet8", num_classes=10, in_channels=1), 1, seed=s)
        for s in (0, 1)
    ]
    nets[1].train()
    splits = splits_of(data)
    threads = torch.get_num_threads()
    many = predict_logits_many(nets, splits, CPU, batch_size=16)
    assert torch.get_num_threads() == threads  # restored
    assert not nets[0].training and nets[1].training  # modes restored
    for net, got in zip(nets, many, strict=True):
        for name, split in splits.items():
            torch.testing.assert_close(
                got[name], predict_logits(net, split, CPU, 16), atol=1e-5, rtol=0
            )
    torch.set_num_threads(1)
    try:  # one thread: the plain loop
        one = predict_logits_many(nets, splits, CPU, batch_size=16)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one[1]["test"], many[1]["test"], atol=1e-5, rtol=0)


def test_under_cpu_autocast_only_the_shipped_network_is_evaluated_in_float32(
    tiny_teacher: Path, tmp_path: Path, monkeypatch, data
):
    """--amp on a CPU: the teacher's and the BE student's members (reported, not shipped) run
    under bf16 autocast, as in training; the averaged network in float32, so that its numbers
    are still those of student.pt."""
    import ensc.compress.single as pipeline_mod
    import ensc.evaluation.evaluate as evaluate_mod

    calls: list[tuple[str, int, bool]] = []  # (who, models, under autocast)

    def many(fn, who):
        def wrapper(models, splits, runtime, *args, **kwargs):
            calls.append((who, len(models), runtime.eval_amp))
            return fn(models, splits, runtime, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(
        evaluate_mod, "predict_logits_many", many(evaluate_mod.predict_logits_many, "teacher")
    )
    monkeypatch.setattr(
        pipeline_mod, "predict_logits_many", many(pipeline_mod.predict_logits_many, "run")
    )
    amp = resolve_runtime("cpu", amp="on")
    assert amp.amp and not amp.eval_amp and amp.for_reference().eval_amp
    config = config_for(tiny_teacher, tmp_path, "amp", cache_teacher_logits=False)
    report = run_compress(config, amp).report
    # the teacher (2 members); the averaged network with and without BN recalibration, and the
    # kept one again after the temperature fold; the student's 2 members
    assert sorted(calls) == sorted(
        [("teacher", 2, True), ("run", 2, False), ("run", 1, False), ("run", 2, True)]
    )
    s = report["settings"]
    assert (s["amp"], s["eval_amp"], s["reference_amp"]) == ("bfloat16", "off", "bfloat16")
    md = (config.out / "report.md").read_text()
    assert "its network evaluated in float32; the teacher and the BE members in bfloat16" in md
    shipped, _ = load_model(config.out / "student.pt")
    probs = predict_logits(shipped.eval(), data.test, CPU).softmax(-1)
    assert nll(probs, data.test.labels) == pytest.approx(report["student_avg"]["nll"], rel=1e-6)
