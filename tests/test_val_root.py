"""--val-root (issue 21): validation from a folder of held-out images instead of images carved from
the training folder, which a teacher ensc did not train may have trained on; the report says
where validation came from, and warns when it was carved for such a teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import ensc
from ensc.data.datasets import FASHION_MNIST_CLASSES, load_dataset
from ensc.data.splits import DataConfig
from ensc.models.registry import build_model
from tests.conftest import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

FLAGS = ("--arch", "resnet8", "--epochs", "1", "--batch-size", "32", "--train-subset", "400",
         "--test-subset", "200", "--max-steps", "2", "--max-acc-drop", "100")  # fmt: skip


def write_folder(root: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Images as PNGs in one subfolder per class, named as the training classes ('/' as '_')."""
    for i, (img, label) in enumerate(zip(images, labels.tolist(), strict=True)):
        folder = root / FASHION_MNIST_CLASSES[label].replace("/", "_")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0].numpy()).save(folder / f"{i:05d}.png")


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> Path:
    """100 real Fashion-MNIST test images as a class-folder tree: held out from any training."""
    data = load_dataset(DataConfig("fashion-mnist", test_subset=100))
    root = tmp_path_factory.mktemp("val") / "val"
    write_folder(root, data.test.images, data.test.labels)
    return root


@pytest.fixture(scope="module")
def third_party(tmp_path_factory) -> Path:
    """A teacher as other code leaves it: two weight-only resnet8 files (read with --teacher-arch)."""
    folder = tmp_path_factory.mktemp("third") / "teacher"
    folder.mkdir()
    for k in range(2):
        torch.manual_seed(k)
        net = build_model("resnet8", num_classes=10, in_channels=1)
        torch.save(net.state_dict(), folder / f"m{k}.pth")
    return folder


def test_val_root_images_keep_their_labels(held_out: Path):
    data = load_dataset(DataConfig("fashion-mnist", train_subset=400, val_root=held_out))
    reference = load_dataset(DataConfig("fashion-mnist", test_subset=100)).test
    assert len(data.val) == 100 and len(data.train) == 400  # nothing carved from train
    flat = reference.images.flatten(1)
    for image, label in zip(data.val.images, data.val.labels, strict=True):
        match = (flat == image.flatten()).all(1).nonzero().flatten()
        assert len(match) >= 1 and reference.labels[match[0]] == label  # folder name -> label
    subset = load_dataset(
        DataConfig("fashion-mnist", train_subset=400, val_root=held_out, val_size=30)
    )
    assert len(subset.val) == 30


def test_streamed_folder_validates_on_the_same_images(held_out: Path, tmp_path: Path):
    data = load_dataset(DataConfig("fashion-mnist", train_subset=200, test_subset=50))
    root = tmp_path / "fm"
    write_folder(root / "train", data.train.images, data.train.labels)
    write_folder(root / "test", data.test.images, data.test.labels)
    memory = load_dataset(DataConfig("imagefolder", root=root, val_root=held_out, mode="memory"))
    stream = load_dataset(
        DataConfig("imagefolder", root=root, val_root=held_out, mode="stream", workers=0)
    )
    assert type(stream.val).__name__ == "StreamSplit" and len(stream.val) == len(memory.val) == 100
    streamed = stream.val.take()
    assert torch.equal(streamed.images, memory.val.images)
    assert torch.equal(streamed.labels, memory.val.labels)


FOREIGN = ("--teacher-arch", "resnet8", "--dataset", "fashion-mnist")  # weight-only files


def compress(teacher: Path, run: Path, *extra: str) -> dict:
    args = ["compress", "--teacher", str(teacher), *FLAGS, "--out", str(run), *extra]
    result = run_cli(*args, cwd=run.parent)
    assert result.exit_code == 0, result.output
    return json.loads((run / "report.json").read_text())


def test_report_warns_when_validation_is_carved_for_a_foreign_teacher(
    third_party: Path, held_out: Path, tiny_teacher: Path, tmp_path: Path
):
    carved = compress(third_party, tmp_path / "carved", *FOREIGN)
    assert carved["validation"]["source"] == "carved from train"
    assert "pass --val-root DIR" in carved["validation"]["warning"]
    md = (tmp_path / "carved" / "report.md").read_text()
    assert "- validation: carved from the training images. **Warning:**" in md

    clean = compress(third_party, tmp_path / "clean", *FOREIGN, "--val-root", str(held_out))
    assert clean["validation"] == {"source": "val_root", "path": str(held_out), "warning": None}
    assert clean["n_val"] == 100 and clean["n_train"] == 400
    assert (
        f"- validation: held-out images from {held_out} (--val-root)"
        in (tmp_path / "clean" / "report.md").read_text()
    )

    # a teacher ensc trained holds its validation images out itself: no warning
    own = compress(tiny_teacher, tmp_path / "own")
    assert (
        own["validation"]["source"] == "carved from train" and own["validation"]["warning"] is None
    )


def test_val_root_from_python(third_party: Path, held_out: Path):
    result = ensc.compress_ensemble(
        third_party, "resnet8", teacher_arch="resnet8", dataset="fashion-mnist", epochs=1,
        batch_size=32, max_steps=2, train_subset=400, test_subset=200, max_acc_drop=100.0,
        val_root=held_out,
    )  # fmt: skip
    assert result.report["validation"]["source"] == "val_root" and result.report["n_val"] == 100


@pytest.mark.parametrize(
    ("make", "message"),
    [(lambda p: (p / "Sock").mkdir(parents=True) or (p / "Sock" / "a.png").write_bytes(b""),
      "class folders that are no training class: Sock"),
     (lambda p: p.write_text("not a folder"), "is a file")],
)  # fmt: skip
def test_bad_val_root_is_one_line(third_party: Path, tmp_path: Path, make, message):
    bad = tmp_path / "bad"
    make(bad)
    result = run_cli("compress", "--teacher", str(third_party), *FOREIGN, *FLAGS, "--val-root", str(bad),
                     "--out", str(tmp_path / "r"), cwd=tmp_path)  # fmt: skip
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert message in result.output, result.output
    assert not (tmp_path / "r").exists()
