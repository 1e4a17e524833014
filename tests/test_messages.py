"""Issue 13: image folders of mixed sizes, and messages that say what is wrong and how to fix it."""

from __future__ import annotations

import errno
import io
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor, resize

from ensc import fileio
from ensc.data.datasets import load_dataset
from ensc.data.imagefolder import decode_images
from ensc.data.source import data_config_for
from ensc.data.splits import DataConfig, split_indices
from ensc.errors import DataError, WriteError, plural, signed
from ensc.models.checkpoint import ModelSpec, load_checkpoint
from tests.conftest import run_cli

TRAIN_ONE_STEP = ("--arch", "resnet8", "--members", "1", "--epochs", "1", "--max-steps", "1",
                  "--batch-size", "32", "--device", "cpu")  # fmt: skip


def _image_folder(
    root: Path, size: tuple[int, int] = (16, 16), odd: dict[str, tuple[int, int]] | None = None
) -> Path:
    """train/{a,b}/0..9.png and test/{a,b}/0..2.png of random pixels, W×H ``size`` (``odd``: other
    W×H for some files, e.g. ``{"test/a/0.png": (40, 30)}``)."""
    rng = np.random.default_rng(0)
    for part, n in (("train", 10), ("test", 3)):
        for cls in ("a", "b"):
            folder = root / part / cls
            folder.mkdir(parents=True)
            for i in range(n):
                w, h = (odd or {}).get(f"{part}/{cls}/{i}.png", size)
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def _pixels(path: Path) -> torch.Tensor:
    return pil_to_tensor(Image.open(path).convert("RGB"))  # uint8 [3, H, W]


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# --- 8: one size per dataset, by a stated rule -----------------------------------------------


def test_odd_image_is_resized_to_the_training_size_and_logged(tmp_path: Path, caplog):
    root = _image_folder(tmp_path / "d", odd={"test/a/0.png": (40, 30)})  # the first test image
    with caplog.at_level(logging.WARNING):
        data = load_dataset(DataConfig("imagefolder", root=root))
    assert data.image_size == (16, 16)
    assert tuple(data.test.images.shape) == (6, 3, 16, 16)
    assert _warnings(caplog) == [
        "1 of 6 images in test was 40×30, resized to 16×16 "
        "(W×H; the most common size in the training split)"
    ]  # one line, for test only: train and val are all 16×16
    # the odd image is resized whole (bilinear, antialiased), the others keep their exact pixels
    assert torch.equal(
        data.test.images[0], resize(_pixels(root / "test/a/0.png"), [16, 16], antialias=True)
    )
    assert torch.equal(data.test.images[1], _pixels(root / "test/a/1.png"))


def test_model_size_wins_and_equal_sizes_log_nothing(tmp_path: Path, caplog):
    root = _image_folder(tmp_path / "d")
    with caplog.at_level(logging.WARNING):
        data = load_dataset(DataConfig("imagefolder", root=root))
    assert data.image_size == (16, 16) and _warnings(caplog) == []
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        data = load_dataset(DataConfig("imagefolder", root=root, image_size=(8, 12)))  # (H, W)
    for split in (data.train, data.val, data.test):
        assert tuple(split.images.shape[1:]) == (3, 8, 12)
    why = "(W×H; the size the model takes)"
    assert _warnings(caplog) == [
        f"18 of 18 images in train were 16×16, resized to 12×8 {why}",
        f"2 of 2 images in val were 16×16, resized to 12×8 {why}",
        f"6 of 6 images in test were 16×16, resized to 12×8 {why}",
    ]


def test_most_common_size_wins_even_when_the_first_image_is_odd(tmp_path: Path, caplog):
    root = _image_folder(tmp_path / "d", odd={"train/a/0.png": (40, 30), "train/a/1.png": (24, 24)})
    paths = [root / "train/a" / f"{i}.png" for i in range(5)]  # 40×30, 24×24, then three 16×16
    with caplog.at_level(logging.WARNING):
        images = decode_images([str(p) for p in paths], split="train")
    assert tuple(images.shape) == (5, 3, 16, 16)
    for row, path in zip(images, paths, strict=True):
        assert torch.equal(row, resize(_pixels(path), [16, 16], antialias=True))  # no-op at 16×16
    assert _warnings(caplog) == [
        "2 of 5 images in train were 40×30 (1), 24×24 (1), resized to 16×16 "
        "(W×H; the most common size among them)"
    ]


def test_data_config_for_takes_the_size_an_ensc_model_was_trained_on():
    def spec(dataset: str) -> ModelSpec:
        return ModelSpec("resnet8", 2, 3, (32, 32), (0.5,) * 3, (0.25,) * 3, dataset=dataset)

    recorded = {"name": "imagefolder", "root": "/x", "image_size": [8, 8]}
    assert data_config_for(spec("imagefolder"), recorded).image_size == (32, 32)
    assert data_config_for(spec("cifar10"), None, name="imagefolder").image_size == (32, 32)
    # a teacher from other code: its input size may be a guess, so the data decides
    assert data_config_for(spec(""), None, name="imagefolder").image_size is None
    assert data_config_for(spec(""), recorded).image_size == (8, 8)  # JSON list back to a tuple


def test_saved_model_is_evaluated_at_its_own_size(tmp_path: Path):
    """The tester's case: a test split led by an odd-sized image, for a model of another size."""
    out = tmp_path / "T"
    result = run_cli(
        "train", "--dataset", "imagefolder", "--data-root", str(_image_folder(tmp_path / "d")),
        *TRAIN_ONE_STEP, "--out", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"teacher with 1 member in {out}" in result.output
    assert load_checkpoint(out / "member0.pt").spec.image_size == (16, 16)
    other = _image_folder(tmp_path / "other", size=(24, 24), odd={"test/a/0.png": (40, 30)})
    result = run_cli("eval", "--teacher", str(out), "--data-root", str(other))
    assert result.exit_code == 0, result.output
    assert (
        "6 of 6 images in test were 24×24 (5), 40×30 (1), resized to 16×16 "
        "(W×H; the size the model takes)" in result.output
    )
    assert "imagefolder: 6 test images, T fitted on 2 validation images" in result.output
    result = run_cli("eval", "--teacher", str(out), "--data-root", str(other), "--test-subset", "1")
    assert result.exit_code == 0, result.output
    assert "imagefolder: 1 test image, T fitted on 2 validation images" in result.output
    result = run_cli("teachers", "inspect", str(out))
    assert result.exit_code == 0, result.output
    assert "1 member, 2 classes;" in result.output


# --- 9: messages -----------------------------------------------------------------------------


class _FullDisk(io.RawIOBase):
    """A file whose device fills up after ``room`` bytes, as a full disk does."""

    def __init__(self, f: io.BufferedIOBase, room: int) -> None:
        self.f, self.room = f, room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)


@pytest.mark.parametrize("room", [0, 2000])  # 2000: torch's stream writer fails mid-file
def test_disk_full_names_the_file_and_leaves_no_temp_file(tmp_path: Path, room: int):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"the previous version")
    state = {"w": torch.zeros(10_000)}
    with pytest.raises(WriteError) as caught:
        fileio.atomic_write(path, lambda f: torch.save(state, _FullDisk(f, room)))
    assert str(caught.value) == (
        f"no space left on device writing {path}: free some space there or write to another disk"
    )
    assert isinstance(caught.value, OSError)  # callers that tolerate OSError still do
    assert os.listdir(tmp_path) == ["ckpt.pt"] and path.read_bytes() == b"the previous version"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_real_full_device_fails_the_command_in_one_line(tmp_path: Path, monkeypatch):
    """Temp files in OUT are opened on /dev/full, whose every write fails with ENOSPC."""
    out = tmp_path / "T"
    real_mkstemp = tempfile.mkstemp

    def mkstemp_on_full_device(*args, dir=None, **kwargs):
        fd, name = real_mkstemp(*args, dir=dir, **kwargs)
        if dir is not None and Path(dir) == out:
            full = os.open("/dev/full", os.O_WRONLY)
            os.dup2(full, fd)  # the temp file exists, but every write to fd hits a full device
            os.close(full)
        return fd, name

    monkeypatch.setattr(fileio.tempfile, "mkstemp", mkstemp_on_full_device)
    result = run_cli(
        "train", "--dataset", "imagefolder", "--data-root", str(_image_folder(tmp_path / "d")),
        *TRAIN_ONE_STEP, "--out", str(out),
    )  # fmt: skip
    assert result.exit_code == 1
    last = result.output.strip().splitlines()[-1]
    assert last.startswith(f"Error: no space left on device writing {out}/"), result.output
    assert "Traceback" not in result.output and "inline_container" not in result.output
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_garbage_onnx_in_the_run_is_named_with_the_fix(tiny_run: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "teacher.onnx").write_text("this is not an ONNX graph\n")  # the first one bench reads
    result = run_cli(
        "bench", "--run", str(run), "--batch-sizes", "1", "--warmup", "0", "--repeats", "1",
        "--test-samples", "8", "--threads", "1",
    )  # fmt: skip
    assert result.exit_code == 1
    last = result.output.strip().splitlines()[-1]
    assert last.startswith(f"Error: {run / 'teacher.onnx'} is not an ONNX graph"), result.output
    assert last.endswith(
        f"re-export it with `ensc export --onnx --run {run} --what teacher --force`"
    )


@pytest.mark.parametrize(
    ("n_labels", "subset", "val_size", "message"),
    [
        (100, 5, None, "--train-subset 5 is too small to carve a validation split from: "
                       "use --train-subset 10 or more, or pass --val-size between 1 and 4"),
        (100, 1, None, "--train-subset 1 is too small to carve a validation split from: "
                       "use --train-subset 10 or more"),
        (100, 1, 3, "--train-subset 1 is too small to carve a validation split from: "
                    "use --train-subset 4 or more"),
        (5, None, None, "the training set (5 images) is too small to carve a validation split "
                        "from: add images, or pass --val-size between 1 and 4"),
        (100, 5, 7, "--val-size must be between 1 and 4 for 5 training images, got 7"),
    ],
)  # fmt: skip
def test_too_small_training_subset_says_what_size_works(n_labels, subset, val_size, message):
    config = DataConfig("x", train_subset=subset, val_size=val_size)
    with pytest.raises(DataError) as caught:
        split_indices(torch.arange(n_labels) % 2, config, torch.Generator().manual_seed(0))
    assert str(caught.value) == message


def test_train_subset_too_small_on_the_command_line(tmp_path: Path):
    result = run_cli(
        "train", "--dataset", "imagefolder", "--data-root", str(_image_folder(tmp_path / "d")),
        *TRAIN_ONE_STEP, "--train-subset", "5", "--out", str(tmp_path / "T"),
    )  # fmt: skip
    assert result.exit_code == 1
    assert "Error: --train-subset 5 is too small to carve a validation split" in result.output
    assert "--val-size must" not in result.output


def test_paths_that_are_not_folders_or_files_say_so(tmp_path: Path):
    result = run_cli("train", "--dataset", "imagefolder", "--data-root", "/dev/zero",
                     *TRAIN_ONE_STEP, "--out", str(tmp_path / "T"))  # fmt: skip
    assert result.exit_code == 1
    assert "Error: --data-root /dev/zero is a device, pipe or socket, not a folder" in result.output
    result = run_cli("export", "--onnx", "--model", "/dev/zero", "--out", str(tmp_path / "m.onnx"))
    assert result.exit_code == 1
    assert "Error: checkpoint /dev/zero is a device, pipe or socket, not a regular file" in (
        result.output
    )
    root = tmp_path / "d"
    (root / "test").mkdir(parents=True)
    (root / "train").write_text("not a folder")
    with pytest.raises(DataError, match=r"/d/train is a file, not a folder: --data-root must hold"):
        load_dataset(DataConfig("imagefolder", root=root))
    with pytest.raises(DataError, match=r"--data-root .*/d/train is a file, not a folder"):
        load_dataset(DataConfig("cifar10", root=root / "train"))


def test_plural():
    assert [plural(n, "member") for n in (0, 1, 2)] == ["0 members", "1 member", "2 members"]
    assert (
        plural(1, "class", "classes") == "1 class" and plural(3, "class", "classes") == "3 classes"
    )


def test_signed_never_says_minus_zero():
    """report.md said "-0.00 accuracy points" for a drop that rounds to nothing."""
    assert [signed(v) for v in (-0.004, 0.0, -0.5, 1.234)] == ["+0.00", "+0.00", "-0.50", "+1.23"]
    assert signed(-0.00004, 4) == "+0.0000" and signed(-0.00006, 4) == "-0.0001"


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--lr", "nan"), ("--max-acc-drop", "nan"), ("--weight-decay", "nan"), ("--step", "inf")],
)
def test_non_finite_numbers_are_refused_in_one_line(
    tiny_teacher: Path, tmp_path: Path, flag, value
):
    """NaN and inf pass click's ranges: the config's rules refuse them before any work (and
    nothing reaches report.json)."""
    result = run_cli("compress", "--teacher", str(tiny_teacher), "--arch", "resnet8", flag, value,
                     "--out", str(tmp_path / "run"))  # fmt: skip
    assert result.exit_code == 1 and "Traceback" not in result.output
    name = flag[2:].replace("-", "_")
    assert f"Error: {flag} ({name}=) must be a finite number" in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["compress", "train"])
def test_a_learning_rate_beyond_float32_is_refused_in_one_line(tiny_teacher, tmp_path, command):
    """--lr 1e300 is finite, so it passed every range and ended in torch's raw RuntimeError
    ("cannot be converted to type float without overflow"); now both commands refuse it first."""
    if command == "compress":
        args = ("compress", "--teacher", str(tiny_teacher), "--arch", "resnet8")
    else:
        args = ("train", "--dataset", "fashion-mnist", *TRAIN_ONE_STEP, "--train-subset", "200")
    result = run_cli(*args, "--lr", "1e300", "--out", str(tmp_path / "out"))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "must be a finite number" in result.output and "3.40282e+38" in result.output
    assert not (tmp_path / "out").exists()


def test_an_image_over_pils_pixel_limit_is_named(tmp_path: Path, monkeypatch):
    """PIL's DecompressionBombError is no OSError: it left as a raw exception that named no file.
    (The limit is lowered here instead of writing a 200-megapixel file.)"""
    from PIL import Image as PILImage

    root = _image_folder(tmp_path / "data", size=(64, 64))
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)  # 64×64 > 2× the limit: a bomb
    with pytest.raises(DataError, match=r"cannot decode image .*\.png: .*decompression bomb"):
        load_dataset(DataConfig("imagefolder", root=root, val_size=2))
