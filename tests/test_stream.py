"""Streamed image folders (ensc.data.stream): same pixels as the in-memory path, batches that do
not depend on the number of reader processes or on where an epoch resumes, the ImageNet recipe at
224 px, the auto mode's choice, and `ensc train/eval/compress --data-mode stream` end to end."""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ensc.data.batches import augment, iterate_batches, steps_per_epoch
from ensc.data.datasets import load_dataset
from ensc.data.splits import DataConfig
from ensc.data.stream import StreamSplit, batch_seed
from ensc.errors import ConfigError, DataError
from tests.conftest import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ("n00000000", "n00000001", "n00000002", "n00000003")  # ImageNet-style wnid folders


def write_folder(root: Path, per_split: dict[str, int], size: tuple[int, int] | None) -> Path:
    """Real Fashion-MNIST images as RGB JPEGs in ``root/<split>/<wnid>/*.JPEG`` (4 classes),
    resized to ``size`` (W×H kept at 28×28 when None); every 5th image is 5/4 as wide."""
    from PIL import Image

    from ensc.data.builtin import load_fashion_mnist

    full, _ = load_fashion_mnist(DataConfig("fashion-mnist"))
    start = 0
    for split, n in per_split.items():
        for i in range(n):
            k = i % len(CLASSES)
            index = int((full.labels == k).nonzero()[start + i // len(CLASSES)])
            img = Image.fromarray(full.images[index, 0].numpy()).convert("RGB")
            if size is not None:
                w = size[1] * 5 // 4 if i % 5 == 4 else size[1]
                img = img.resize((w, size[0]), Image.BILINEAR)
            folder = root / split / CLASSES[k]
            folder.mkdir(parents=True, exist_ok=True)
            img.save(folder / f"{split}_{i:04d}.JPEG", quality=90)
        start += n
    return root


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory) -> Path:
    """28×28 JPEGs: 80 train, 40 test."""
    return write_folder(tmp_path_factory.mktemp("small"), {"train": 80, "test": 40}, None)


@pytest.fixture(scope="module")
def imagenet_folder(tmp_path_factory) -> Path:
    """ImageNet layout: train/ and val/ (no test/) of 256-px JPEGs, 40 each."""
    return write_folder(tmp_path_factory.mktemp("imagenet"), {"train": 40, "val": 40}, (256, 256))


def stream(root: Path, workers: int = 0, **kw) -> object:
    return load_dataset(DataConfig("imagefolder", root=root, mode="stream", workers=workers, **kw))


def test_stream_decodes_the_pixels_the_memory_path_decodes(small_folder: Path):
    memory = load_dataset(DataConfig("imagefolder", root=small_folder, mode="memory"))
    streamed = stream(small_folder)
    assert isinstance(streamed.train, StreamSplit) and not isinstance(memory.train, StreamSplit)
    assert (streamed.channels, streamed.image_size) == (memory.channels, memory.image_size)
    for part in ("train", "val", "test"):
        want, got = getattr(memory, part), getattr(streamed, part)
        assert torch.equal(got.labels, want.labels)
        assert torch.equal(got.take().images, want.images)  # libjpeg via torchvision == PIL
    # fewer than 2,000 training images: the sampled statistics are the full ones
    assert streamed.mean == pytest.approx(memory.mean) and streamed.std == pytest.approx(memory.std)
    evaluated = torch.cat([x for x, _ in iterate_batches(streamed.test, 16)])
    assert torch.equal(evaluated, memory.test.images.float() / 255)


def test_batches_do_not_depend_on_workers_and_start_jumps(small_folder: Path, monkeypatch):
    train = stream(small_folder).train
    n_batches = steps_per_epoch(len(train), 16)

    def epoch(split: StreamSplit, start: int = 0) -> tuple[list, torch.Tensor]:
        gen = torch.Generator().manual_seed(3)
        batches = list(iterate_batches(split, 16, gen=gen, shuffle=True, augment_hflip=True,
                                       drop_last=True, start=start))  # fmt: skip
        return batches, gen.get_state()

    base, state = epoch(train)
    assert len(base) == n_batches and all(x.shape == (16, 3, 28, 28) for x, _ in base)
    for workers, start in ((2, 0), (1, 2), (0, n_batches - 1)):
        split = StreamSplit(train.root, train.files, train.labels, train.size, workers)
        got, got_state = epoch(split, start)
        assert torch.equal(got_state, state)  # the caller's generator ends where it always does
        assert len(got) == n_batches - start
        for (x, y), (x0, y0) in zip(got, base[start:], strict=True):
            assert torch.equal(x, x0) and torch.equal(y, y0)
    # a jump reads no skipped batch
    import ensc.data.stream as stream_module

    calls = []
    real = stream_module.make_batch
    monkeypatch.setattr(
        stream_module, "make_batch", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    epoch(train, start=2)
    assert len(calls) == n_batches - 2


def test_small_images_get_the_in_memory_augmentation(small_folder: Path):
    train = stream(small_folder).train
    gen = torch.Generator().manual_seed(0)
    batches = list(iterate_batches(train, 16, gen=gen, shuffle=True, augment_hflip=True))
    replay = torch.Generator().manual_seed(0)
    order = torch.randperm(len(train), generator=replay)
    epoch_seed = int(torch.randint(0, 2**62, (), generator=replay))
    for k in (0, len(batches) - 1):
        idx = order[16 * k : 16 * (k + 1)]
        want = augment(
            train.take(idx).images, torch.Generator().manual_seed(batch_seed(epoch_seed, k))
        )
        assert torch.equal(batches[k][0], want.float() / 255)
        assert torch.equal(batches[k][1], train.labels[idx])


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # torchvision 0.29
def test_imagenet_layout_224_train_and_eval_views(imagenet_folder: Path, caplog):
    caplog.set_level(logging.INFO)
    data = stream(imagenet_folder, image_size=(224, 224))
    assert "val/ images are the test split" in caplog.text
    assert data.image_size == (224, 224) and data.num_classes == 4
    assert len(data.test) == 40 and len(data.train) + len(data.val) == 40
    # evaluation: resize the shorter side to 256, centre 224 crop
    from torchvision.io import decode_image, read_file
    from torchvision.transforms.v2.functional import center_crop, resize

    paths = data.test.paths()
    wide = next(i for i, p in enumerate(paths) if int(Path(p).stem.split("_")[1]) % 5 == 4)
    img = decode_image(read_file(paths[wide]))
    assert tuple(img.shape[1:]) == (256, 320)  # H, W
    want = center_crop(resize(img, [256, 320], antialias=True), [224, 224])
    assert torch.equal(data.test.take(torch.tensor([wide])).images[0], want)
    # training: random resized crops + flips at 224, seeded
    gen = torch.Generator().manual_seed(0)
    x, y = next(iterate_batches(data.train, 8, gen=gen, shuffle=True, augment_hflip=True))
    assert x.shape == (8, 3, 224, 224) and x.dtype == torch.float32 and 0 <= x.min() <= x.max() <= 1
    again = next(iterate_batches(data.train, 8, gen=torch.Generator().manual_seed(0), shuffle=True,
                                 augment_hflip=True))  # fmt: skip
    assert torch.equal(again[0], x)
    plain = data.train.take(torch.arange(8)).images
    assert plain.shape == (8, 3, 224, 224)


def test_rrc_boxes_stay_inside_the_image():
    from ensc.data.transforms import rrc_box

    gen = torch.Generator().manual_seed(0)
    for h, w in ((256, 256), (100, 400), (375, 500), (10, 10)):
        for _ in range(200):
            top, left, ch, cw = rrc_box(h, w, gen)
            assert 0 <= top and 0 <= left and 0 < ch and 0 < cw
            assert top + ch <= h and left + cw <= w


def test_auto_mode_streams_what_does_not_fit(small_folder: Path, monkeypatch, caplog):
    import ensc.data.mode as mode

    caplog.set_level(logging.INFO)
    monkeypatch.setattr(mode, "available_memory", lambda: 1000)
    data = load_dataset(DataConfig("imagefolder", root=small_folder, workers=0))
    assert isinstance(data.test, StreamSplit)
    assert "streaming 120 images from disk" in caplog.text and "--data-mode memory" in caplog.text
    monkeypatch.setattr(mode, "available_memory", lambda: 2**34)
    data = load_dataset(DataConfig("imagefolder", root=small_folder))
    assert not isinstance(data.test, StreamSplit)
    assert "decoding 120 images into memory" in caplog.text


def test_stream_mode_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="--data-mode stream reads image folders"):
        load_dataset(DataConfig("fashion-mnist", mode="stream"))
    with pytest.raises(ConfigError, match="unknown --data-mode"):
        load_dataset(DataConfig("fashion-mnist", mode="disk"))
    bad = write_folder(tmp_path, {"train": 20, "test": 4}, None)
    broken = next((bad / "test").rglob("*.JPEG"))
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    data = stream(bad, workers=1)
    with pytest.raises(DataError, match="cannot decode image") as err:
        list(iterate_batches(data.test, 2))  # 2 batches: read by the reader process
    assert "\n" not in str(err.value) and broken.name in str(err.value)  # one line, the file


def test_fingerprint_covers_files_and_changes(small_folder: Path):
    from ensc.evaluation.logits_cache import split_sha256

    test = stream(small_folder).test
    before = split_sha256(test)
    assert before == split_sha256(stream(small_folder).test)
    assert before != split_sha256(test.subset(torch.arange(10)))
    path = test.paths(torch.tensor([0]))[0]
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file was rewritten
    try:
        assert before != split_sha256(test)
    finally:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_image_size_flag_parses_square_and_hxw():
    import click

    from ensc.cli.options import parse_image_size

    assert parse_image_size(None, None, "224") == (224, 224)
    assert parse_image_size(None, None, "224x160") == (224, 160)
    with pytest.raises(click.BadParameter, match="N or HxW"):
        parse_image_size(None, None, "big")


def test_cli_imagenet_layout_stream_224_train_eval_compress(imagenet_folder: Path, tmp_path: Path):
    ckpts = tmp_path / "ckpts"
    common = ("--data-mode", "stream", "--workers", "1")
    result = run_cli(
        "train", "--dataset", "imagefolder", "--data-root", str(imagenet_folder), "--image-size",
        "224", *common, "--arch", "resnet8", "--members", "2", "--epochs", "1", "--batch-size", "8",
        "--max-steps", "2", "--out", str(ckpts),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    result = run_cli("eval", "--teacher", str(ckpts), *common)
    assert result.exit_code == 0, result.output
    assert "40 test images" in result.output
    run = tmp_path / "runs" / "stream"
    result = run_cli(
        "compress", "--teacher", str(ckpts), "--arch", "resnet8", "--batch-size", "8",
        "--max-steps", "2", "--bn-recal-batches", "2", "--max-acc-drop", "100", *common,
        "--perturb", "none", "--out", str(run), cwd=tmp_path,  # streaming is the point here
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    import json

    report = json.loads((run / "report.json").read_text())
    assert report["n_test"] == 40 and report["dataset"] == "imagefolder"
    result = run_cli("eval", "--student", str(run / "student.pt"), *common)
    assert result.exit_code == 0, result.output


def test_auto_mode_is_resolved_recorded_and_reused(small_folder: Path, tmp_path: Path, monkeypatch):
    """The mode `auto` chose is what a loaded dataset, a trained member, a compress run's
    config.json record, and what later loads and --resume reuse, whatever memory is free then."""
    import json

    import ensc.data.mode as mode
    from ensc import rundir
    from ensc.compress.config import compress_config, with_recorded_data_mode
    from ensc.data.source import data_config_for
    from ensc.engine.loop import OptimConfig
    from ensc.engine.runtime import resolve_runtime
    from ensc.models.checkpoint import load_checkpoint
    from ensc.teachers.train import TeacherTrainConfig, member_path, train_teacher

    monkeypatch.setattr(mode, "available_memory", lambda: 1000)  # auto streams
    auto = DataConfig("imagefolder", root=small_folder, workers=0)
    data = load_dataset(auto)
    assert isinstance(data.train, StreamSplit) and data.config == DataConfig(
        "imagefolder", root=small_folder, workers=0, mode="stream"
    )
    assert load_dataset(DataConfig("fashion-mnist", train_subset=20)).config.mode == "memory"
    config = TeacherTrainConfig(arch="resnet8", data=auto, out=tmp_path / "ckpts", members=1,
                                optim=OptimConfig(epochs=1, batch_size=16, max_steps=1))  # fmt: skip
    train_teacher(config, resolve_runtime("cpu"))
    member = load_checkpoint(member_path(config.out, 0))
    assert member.info["data"]["mode"] == "stream"
    # later: memory to spare, but the member's loads and a --resume keep streaming
    monkeypatch.setattr(mode, "available_memory", lambda: 2**40)
    again = data_config_for(member.spec, member.info["data"])
    assert again.mode == "stream" and isinstance(load_dataset(again).train, StreamSplit)
    assert data_config_for(member.spec, member.info["data"], mode="memory").mode == "memory"
    train_teacher(replace(config, members=2, resume=True), resolve_runtime("cpu"))
    assert load_checkpoint(member_path(config.out, 1)).info["data"]["mode"] == "stream"
    # compress --resume: the mode its config.json records, unless --data-mode names one
    run = tmp_path / "run"
    run.mkdir()
    (run / rundir.CONFIG).write_text(json.dumps({"data": {"mode": "stream"}}))
    resumed = compress_config(teacher=config.out, arch="resnet8", resume=True)
    assert with_recorded_data_mode(resumed, run).data_overrides["mode"] == "stream"
    fresh = replace(resumed, resume=False)
    assert with_recorded_data_mode(fresh, run) == fresh  # a new run chooses
    asked = compress_config(teacher=config.out, arch="resnet8", resume=True, data_mode="memory")
    assert with_recorded_data_mode(asked, run).data_overrides["mode"] == "memory"
    assert with_recorded_data_mode(resumed, tmp_path) == resumed  # no config.json yet


def _png16_rgb(path: Path, pixels) -> None:
    """A 16-bit RGB PNG (PIL cannot write one): ``pixels`` uint16 [H, W, 3]."""
    import struct
    import zlib

    import numpy as np

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    h, w, _ = pixels.shape
    rows = b"".join(b"\0" + np.ascontiguousarray(row, dtype=">u2").tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)  # 16 bits per channel, RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))  # fmt: skip


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # torchvision 0.29
def test_16_bit_pngs_decode_to_the_same_scaled_pixels_in_memory_and_streamed(tmp_path: Path):
    import numpy as np
    from PIL import Image

    from ensc.data.imagefolder import decode_images
    from ensc.data.transforms import read_image

    values = (np.arange(64, dtype=np.int64).reshape(8, 8) * 1031 + 7).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "gray.png")  # PIL mode I;16
    with Image.open(tmp_path / "gray.png") as img:
        assert img.mode.startswith("I;16")  # which PIL's RGB conversion clips at 255
    rgb = np.stack([values, values // 3, 65535 - values], axis=-1)
    _png16_rgb(tmp_path / "rgb.png", rgb)
    for name, want in (("gray", np.stack([values] * 3)), ("rgb", rgb.transpose(2, 0, 1))):
        expected = torch.from_numpy((want >> 8).astype(np.uint8))  # the high byte
        streamed = read_image(str(tmp_path / f"{name}.png"))
        memory = decode_images([str(tmp_path / f"{name}.png")])[0]
        assert streamed.dtype == memory.dtype == torch.uint8
        assert torch.equal(streamed, expected) and torch.equal(memory, expected), name
