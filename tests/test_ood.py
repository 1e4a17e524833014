"""Out-of-distribution detection: scores and metrics against hand-computed values, the OOD images'
shape, and `ensc eval --ood-data` end to end on real images."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ensc.data.datasets import load_dataset
from ensc.data.imagefolder import load_image_files, to_input_shape
from ensc.data.source import data_config_for, ood_split
from ensc.data.splits import DataConfig
from ensc.errors import DataError
from ensc.evaluation.ood import (
    auroc,
    detection,
    entropy,
    fpr_at_tpr,
    max_prob,
    mutual_information,
    ood_section,
    paired_scores,
)
from tests.conftest import CIFAR_JPEG, SHARED, needs_cifar_jpeg, run_cli

LN2 = math.log(2)


# --------------------------------------------------------------------------- metrics


def test_auroc_and_fpr95_of_a_perfect_separator():
    inside, outside = torch.tensor([5.0, 6.0, 7.0, 9.0]), torch.tensor([-1.0, 0.0, 4.9])
    assert auroc(inside, outside) == 1.0
    assert fpr_at_tpr(inside, outside) == 0.0
    assert auroc(outside, inside) == 0.0  # the separator upside down
    assert fpr_at_tpr(outside, inside) == 1.0


def test_auroc_is_one_half_for_identical_sets_and_constant_scores():
    x = torch.tensor([0.3, 0.1, 0.9, 0.5, 0.5, 0.7])
    assert auroc(x, x.flip(0)) == 0.5
    assert auroc(torch.full((5,), 0.2), torch.full((9,), 0.2)) == 0.5
    assert fpr_at_tpr(torch.full((5,), 0.2), torch.full((9,), 0.2)) == 1.0  # all accepted


def test_auroc_and_fpr95_hand_computed():
    # pairs (in, out) of 9: 0.9 and 0.8 beat all three (6); 0.4 loses to 0.7, ties 0.4 (1/2),
    # beats 0.1 (1): AUROC = 7.5 / 9. 95 % of 3 in-distribution inputs is all 3: threshold 0.4,
    # which accepts 0.7 and 0.4 of the OOD inputs: FPR@95 = 2/3.
    inside, outside = torch.tensor([0.9, 0.8, 0.4]), torch.tensor([0.7, 0.4, 0.1])
    assert auroc(inside, outside) == pytest.approx(7.5 / 9, abs=1e-12)
    assert fpr_at_tpr(inside, outside) == pytest.approx(2 / 3, abs=1e-12)
    # 20 in-distribution scores 1..20: 95 % is 19 of them, threshold 2 (the 19th largest);
    # OOD 0.5, 1.5, 19.5: only 19.5 is accepted. AUROC: (20 + 19 + 1) / 60.
    inside, outside = torch.arange(1.0, 21.0), torch.tensor([0.5, 1.5, 19.5])
    assert fpr_at_tpr(inside, outside) == pytest.approx(1 / 3, abs=1e-12)
    assert auroc(inside, outside) == pytest.approx(40 / 60, abs=1e-12)
    assert fpr_at_tpr(inside, outside, tpr=0.9) == pytest.approx(1 / 3, abs=1e-12)  # threshold 3


def test_scores_hand_computed():
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.75, 0.25]])
    assert max_prob(probs).tolist() == [1.0, 0.5, 0.75]
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert entropy(probs).tolist() == pytest.approx([0.0, LN2, h], abs=1e-12)
    # two members: sure and disagreeing (MI = ln 2), sure and agreeing (0), both unsure (0)
    members = torch.tensor(
        [[[1.0, 0.0], [1.0, 0.0], [0.5, 0.5]], [[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]]]
    )
    assert mutual_information(members).tolist() == pytest.approx([LN2, 0.0, 0.0], abs=1e-12)


def test_detection_orients_each_score():
    """Confident in-distribution, unsure OOD: every score separates perfectly once oriented."""
    sure = torch.tensor([[0.9, 0.1], [0.95, 0.05], [0.1, 0.9]])
    unsure = torch.tensor([[0.5, 0.5], [0.6, 0.4]])
    agree = torch.stack([sure, sure])  # members agree in distribution ...
    split = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.2, 0.8]]])  # ... not outside
    pairs = paired_scores(sure, split.mean(0), agree, split)
    assert set(pairs) == {"max_prob", "entropy", "mutual_info"}
    row = detection(pairs)
    assert row == {"max_prob_auroc": 1.0, "max_prob_fpr95": 0.0, "entropy_auroc": 1.0,
                   "entropy_fpr95": 0.0, "mutual_info_auroc": 1.0, "mutual_info_fpr95": 0.0}  # fmt: skip
    assert set(detection(paired_scores(sure, unsure))) == {
        "max_prob_auroc", "max_prob_fpr95", "entropy_auroc", "entropy_fpr95",
    }  # fmt: skip
    section = ood_section({"a": pairs}, data="elsewhere")
    assert (section["n_in"], section["n_out"], section["data"]) == (3, 2, "elsewhere")


def test_metrics_refuse_empty_or_non_finite_scores():
    with pytest.raises(ValueError, match="need in- and out-of-distribution scores"):
        auroc(torch.tensor([1.0]), torch.tensor([]))
    with pytest.raises(ValueError, match="finite"):
        fpr_at_tpr(torch.tensor([1.0, math.nan]), torch.tensor([0.0]))


# --------------------------------------------------------------------------- images


@pytest.fixture(scope="module")
def fmnist_test() -> torch.Tensor:
    data = load_dataset(DataConfig("fashion-mnist", train_subset=200, test_subset=64))
    return data.test.images


def test_images_take_the_models_channels_and_size(fmnist_test: torch.Tensor):
    rgb = to_input_shape(fmnist_test, 3, (28, 28))
    assert rgb.shape == (64, 3, 28, 28) and torch.equal(rgb, fmnist_test.repeat(1, 3, 1, 1))
    assert torch.equal(to_input_shape(rgb, 1, (28, 28)), fmnist_test)  # luminance of grey = grey
    big = to_input_shape(fmnist_test, 3, (32, 32))
    assert big.shape == (64, 3, 32, 32) and big.dtype == torch.uint8
    # resized, not padded: the mean brightness stays within a grey level or two
    assert abs(big.float().mean() - fmnist_test.float().mean()) < 2


def _write_png(img: torch.Tensor, path: Path) -> None:
    """A uint8 [1, H, W] image as a grayscale PNG file (lossless)."""
    from PIL import Image

    Image.fromarray(img[0].numpy()).save(path)


def test_image_folder_of_any_layout(fmnist_test: torch.Tensor, tmp_path: Path):
    for i, img in enumerate(fmnist_test[:6]):
        folder = tmp_path / ("flat" if i < 3 else "classes/a")
        folder.mkdir(parents=True, exist_ok=True)
        _write_png(img, folder / f"{i}.png")
    split = load_image_files(tmp_path, (28, 28))
    assert split.images.shape == (6, 3, 28, 28) and split.labels.tolist() == [-1] * 6
    gray = ood_split(str(tmp_path), 1, (28, 28))
    assert sorted(gray.images.flatten(1).sum(1).tolist()) == sorted(
        fmnist_test[:6].flatten(1).sum(1).tolist()
    )  # the same images back, losslessly
    assert len(load_image_files(tmp_path, (28, 28), subset=4)) == 4


def test_ood_data_errors_name_the_flag(tmp_path: Path):
    with pytest.raises(DataError, match=r"--ood-data .*nowhere does not exist: pass a folder"):
        ood_split(str(tmp_path / "nowhere"), 1, (28, 28))
    with pytest.raises(DataError, match="takes the image folder itself"):
        ood_split("imagefolder", 1, (28, 28))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        ood_split(str(tmp_path / "empty"), 1, (28, 28))


def test_ood_dataset_missing_from_its_default_location(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.cache/ensc/data here
    with pytest.raises(DataError) as err:
        ood_split("cifar100", 1, (28, 28))
    assert str(err.value) == (
        f"--ood-data cifar100: not found in {tmp_path}/.cache/ensc/data, where ensc looks for it; "
        "pass a folder of its images instead"
    )


# --------------------------------------------------------------------------- ensc eval


def _photo_crops(folder: Path, n: int = 30) -> Path:
    """``n`` 64×64 crops of a real photograph (matplotlib's sample Grace Hopper portrait) as
    JPEGs in two class folders: images that are not garments."""
    pytest.importorskip("matplotlib")
    import matplotlib
    from PIL import Image

    with Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg") as f:
        photo = f.convert("RGB")
    gen = torch.Generator().manual_seed(0)
    for i in range(n):
        y = int(torch.randint(0, photo.height - 64, (1,), generator=gen))
        x = int(torch.randint(0, photo.width - 64, (1,), generator=gen))
        (folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        photo.crop((x, y, x + 64, y + 64)).save(folder / f"c{i % 2}" / f"{i}.jpg", quality=90)
    return folder


def test_eval_ood_folder_table_json_and_pictures(
    tiny_teacher: Path, tiny_run: Path, tmp_path: Path
):
    photos = _photo_crops(tmp_path / "photos")
    student = tiny_run / "student.pt"
    args = ("eval", "--teacher", str(tiny_teacher), "--student", str(student), "--test-subset", "100",
            "--ood-data", str(photos), "--json", str(tmp_path / "e.json"), "--plot", str(tmp_path / "pics"))  # fmt: skip
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert "OOD detection: 100 test images (positive) vs 30 images of" in result.output
    assert "AUROC maxP" in result.output and "FPR95 MI" in result.output
    ood = json.loads((tmp_path / "e.json").read_text())["ood"]
    assert (ood["data"], ood["n_in"], ood["n_out"], ood["positive"]) == (
        str(photos),
        100,
        30,
        "in-distribution",
    )
    assert [r["name"] for r in ood["models"]] == ["member 0", "member 1", "DE-2", str(student)]
    base = {"name", "max_prob_auroc", "max_prob_fpr95", "entropy_auroc", "entropy_fpr95"}
    for row in ood["models"]:
        mi = {"mutual_info_auroc", "mutual_info_fpr95"} if row["name"] == "DE-2" else set()
        assert set(row) == base | mi
        assert all(0 <= v <= 1 for k, v in row.items() if k != "name")
    pictures = sorted(p.name for p in (tmp_path / "pics").iterdir())
    assert pictures == ["dee.png", "ood_scores.png", "reliability.png"]
    # the pictures are not overwritten without --force, and nothing is evaluated first
    again = run_cli(*args[:-4], "--plot", str(tmp_path / "pics"))
    assert again.exit_code == 1 and "reliability.png exists; pass --force" in again.output


def test_ood_images_identical_to_the_test_images_score_one_half(tiny_teacher: Path, tmp_path: Path):
    """The test images themselves, written as PNG files, as the OOD set: the folder path must
    bring them to the model exactly as the test split is, so nothing tells them apart."""
    from ensc.teachers.ensemble import load_teacher

    teacher = load_teacher(tiny_teacher)
    data = load_dataset(data_config_for(teacher.spec, teacher.data_record, test_subset=100))
    folder = tmp_path / "same" / "x"
    folder.mkdir(parents=True)
    for i, img in enumerate(data.test.images):
        _write_png(img, folder / f"{i:03d}.png")
    out = tmp_path / "e.json"
    result = run_cli("eval", "--teacher", str(tiny_teacher), "--test-subset", "100",
                     "--ood-data", str(tmp_path / "same"), "--json", str(out))  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["ood"]["models"]
    assert len(rows) == 3
    for row in rows:
        for key in ("max_prob_auroc", "entropy_auroc"):
            assert abs(row[key] - 0.5) <= 0.01, row  # round-off may untie a pair or two
        assert row["max_prob_fpr95"] >= 0.94, row


TEACHERS = SHARED / "data" / "teachers-cifar10-resnet"


@needs_cifar_jpeg
@pytest.mark.skipif(not TEACHERS.is_dir(), reason=f"no pretrained CIFAR-10 teacher at {TEACHERS}")
def test_cifar10_ensemble_tells_fashion_mnist_apart(tmp_path: Path):
    """A real pretrained DE-4 (CIFAR-10 ResNet-20/32/44/56) against Fashion-MNIST, a dataset
    name whose grayscale 28×28 images become 3-channel 32×32 ones: well separated, MI too."""
    import shutil

    root = tmp_path / "cifar"
    for part, n in (("train", 10), ("test", 10)):
        for cls in sorted((CIFAR_JPEG / part).iterdir()):
            (root / part / cls.name).mkdir(parents=True)
            for f in sorted(cls.iterdir())[:n]:
                shutil.copy(f, root / part / cls.name / f.name)
    members = [
        {"path": str(p), "arch": f"resnet_cifar:{p.name.split('-')[0]}",
         "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
        for p in sorted((TEACHERS / "checkpoints").glob("resnet*.th"))
    ]  # fmt: skip
    (tmp_path / "ensemble.json").write_text(json.dumps({"members": members}))
    out = tmp_path / "e.json"
    result = run_cli(
        "eval", "--teacher", str(tmp_path / "ensemble.json"), "--code-path", str(TEACHERS / "code"),
        "--dataset", "imagefolder", "--data-root", str(root), "--ood-data", "fashion-mnist",
        "--test-subset", "100", "--json", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    ood = json.loads(out.read_text())["ood"]
    assert (ood["data"], ood["n_in"], ood["n_out"]) == ("fashion-mnist", 100, 100)
    de4 = ood["models"][4]
    assert de4["name"] == "DE-4"
    assert de4["max_prob_auroc"] > 0.75 and de4["entropy_auroc"] > 0.75, de4
    assert de4["mutual_info_auroc"] > 0.6 and de4["max_prob_fpr95"] < 0.95, de4
