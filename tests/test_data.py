"""Data loading on real files: Fashion-MNIST IDX, an ImageFolder, splits, subsets, augmentation."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch

from ensc.data.batches import augment, iterate_batches, steps_per_epoch
from ensc.data.datasets import load_dataset
from ensc.data.splits import DataConfig, balanced_indices
from ensc.errors import DataError
from tests.conftest import CIFAR_JPEG, needs_cifar_jpeg


def test_fashion_mnist_splits_and_stats():
    data = load_dataset(DataConfig("fashion-mnist", train_subset=3000, test_subset=500))
    assert (len(data.train), len(data.val), len(data.test)) == (2700, 300, 500)
    assert data.channels == 1 and data.image_size == (28, 28) and data.num_classes == 10
    assert data.train.images.dtype == torch.uint8
    assert torch.equal(data.test.labels.bincount(), torch.full((10,), 50))  # class-balanced
    assert 0.2 < data.mean[0] < 0.4 and 0.25 < data.std[0] < 0.45  # Fashion-MNIST: 0.286 / 0.353
    assert not data.hflip


def test_full_validation_split_is_capped_and_disjoint():
    data = load_dataset(DataConfig("fashion-mnist"))
    assert len(data.val) == 5000 and len(data.train) == 55000 and len(data.test) == 10000
    # carved with a fixed seed: same split twice, different with another seed
    again = load_dataset(DataConfig("fashion-mnist"))
    other = load_dataset(DataConfig("fashion-mnist", seed=1))
    assert torch.equal(again.val.images, data.val.images)
    assert not torch.equal(other.val.images, data.val.images)


def test_val_size_option_and_errors():
    data = load_dataset(DataConfig("fashion-mnist", train_subset=1000, val_size=123))
    assert len(data.val) == 123 and len(data.train) == 877
    with pytest.raises(DataError, match="--val-size"):
        load_dataset(DataConfig("fashion-mnist", train_subset=100, val_size=100))
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset(DataConfig("mnist2"))


def test_idx_reader_reads_plain_and_gzip_and_rejects_truncated(tmp_path: Path):
    src = Path("/usr/share/datasets/fashion-mnist")
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        raw = gzip.open(src / f"{name}.gz").read()
        (tmp_path / name).write_bytes(raw)  # uncompressed copies
    data = load_dataset(DataConfig("fashion-mnist", root=tmp_path, test_subset=100))
    ref = load_dataset(DataConfig("fashion-mnist", test_subset=100))
    assert torch.equal(data.test.images, ref.test.images)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(
        gzip.open(src / "t10k-images-idx3-ubyte.gz").read()[:5000]
    )
    with pytest.raises(DataError, match="not a valid uint8 IDX"):
        load_dataset(DataConfig("fashion-mnist", root=tmp_path))


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path: Path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset(DataConfig("fashion-mnist", root=tmp_path))


def test_cifar_missing_says_how_to_fix(tmp_path: Path):
    with pytest.raises(DataError, match="--download"):
        load_dataset(DataConfig("cifar10", root=tmp_path))


def test_balanced_indices_are_seeded_and_even():
    labels = torch.arange(10).repeat_interleave(30)
    a = balanced_indices(labels, 25, torch.Generator().manual_seed(0))
    b = balanced_indices(labels, 25, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and len(a.unique()) == 25
    counts = labels[a].bincount(minlength=10)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 25


def test_augment_flips_some_images_and_keeps_others():
    images = torch.rand(64, 3, 8, 8)
    out = augment(images, torch.Generator().manual_seed(0), pad=0, hflip=True)
    same = [torch.equal(o, i) for i, o in zip(images, out, strict=False)]
    flipped = [torch.equal(o, i.flip(-1)) for i, o in zip(images, out, strict=False)]
    assert all(s or f for s, f in zip(same, flipped, strict=False))
    assert 10 < sum(flipped) < 54  # about half


def test_augment_crops_are_shifted_windows_of_the_padded_image():
    images = torch.rand(32, 1, 8, 8) + 1  # nonzero, so padding is recognisable
    out = augment(images, torch.Generator().manual_seed(0), pad=2, hflip=False)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    shifts = set()
    for k in range(len(images)):
        matches = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(out[k], padded[k, :, dy : dy + 8, dx : dx + 8])
        ]
        assert len(matches) == 1
        shifts.add(matches[0])
    assert len(shifts) > 5  # offsets differ per image


def test_iterate_batches_covers_split_once():
    data = load_dataset(DataConfig("fashion-mnist", train_subset=500, test_subset=100))
    seen = torch.cat([y for _, y in iterate_batches(data.test, 32)])
    assert torch.equal(seen, data.test.labels)
    batches = list(
        iterate_batches(
            data.train,
            64,
            gen=torch.Generator().manual_seed(0),
            shuffle=True,
            augment_hflip=False,
            drop_last=True,
        )
    )
    assert len(batches) == steps_per_epoch(len(data.train), 64) == 450 // 64
    x, _ = batches[0]
    assert x.dtype == torch.float32 and 0.0 <= x.min() and x.max() <= 1.0


@needs_cifar_jpeg
def test_imagefolder_cifar_jpeg_subset():
    data = load_dataset(
        DataConfig("imagefolder", root=CIFAR_JPEG, train_subset=200, test_subset=100)
    )
    assert data.channels == 3 and data.image_size == (32, 32)
    assert data.class_names[0] == "airplane" and data.num_classes == 10
    assert len(data.train) + len(data.val) == 200 and len(data.test) == 100
    assert data.hflip


def test_imagefolder_errors(tmp_path: Path):
    with pytest.raises(DataError, match="needs --data-root"):
        load_dataset(DataConfig("imagefolder"))
    with pytest.raises(DataError, match="train/ and test/"):
        load_dataset(DataConfig("imagefolder", root=tmp_path))


def test_validation_stays_held_out_across_train_subsets():
    # a teacher trained on 3,000 images and a student distilled on 1,000 (or all) share no image
    # between the student's validation split and the teacher's training images
    from ensc.data.splits import split_indices

    labels = torch.arange(10).repeat(2000)  # 20,000 images
    teacher_train, teacher_val = split_indices(
        labels, DataConfig("x", train_subset=3000), torch.Generator().manual_seed(0)
    )
    assert len(teacher_train) == 2700 and len(teacher_val) == 300
    for n in (1000, None):
        train, val = split_indices(
            labels, DataConfig("x", train_subset=n), torch.Generator().manual_seed(0)
        )
        assert not set(val.tolist()) & set(teacher_train.tolist())
        assert not set(val.tolist()) & set(train.tolist())
    _, full_val = split_indices(labels, DataConfig("x"), torch.Generator().manual_seed(0))
    assert len(full_val) == 2000 and set(teacher_val.tolist()) <= set(full_val.tolist())


def test_channel_stats_match_the_whole_split_at_once():
    """Chunked float64 passes give the mean and sample std of all the values of each channel."""
    from ensc.data.datasets import STATS_CHUNK, channel_stats

    images = torch.randint(0, 256, (STATS_CHUNK + 300, 3, 4, 4), dtype=torch.uint8)
    mean, std = channel_stats(images)
    values = images.double().div(255).transpose(0, 1).flatten(1)
    assert torch.allclose(
        torch.tensor(mean, dtype=torch.float64), values.mean(1), rtol=0, atol=1e-12
    )
    assert torch.allclose(torch.tensor(std, dtype=torch.float64), values.std(1), rtol=0, atol=1e-12)
    assert channel_stats(torch.zeros(1, 1, 2, 2, dtype=torch.uint8)) == ((0.0,), (1e-3,))  # floor
