"""Torch datasets handed over from Python, streamed (ensc.data.from_torch, ensc.data.torch_stream):
memory or stream chosen as `--data-mode` chooses, a generic Dataset read item by item with batches
that do not depend on the number of workers or on where an epoch resumes, a torchvision
ImageFolder read from its files by StreamSplit, and both through ensc.compress_ensemble."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

import ensc
from ensc.data.batches import augment, iterate_batches
from ensc.data.datasets import load_dataset
from ensc.data.from_torch import dataset_from_torch
from ensc.data.splits import DataConfig, Split
from ensc.data.stream import StreamSplit, batch_seed
from ensc.data.torch_stream import TorchStreamSplit
from ensc.errors import ConfigError, DataError
from ensc.teachers.ensemble import load_teacher
from tests.test_api import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


class OnTheFly(Dataset):
    """Fashion-MNIST images made into [0, 1] float tensors as they are asked for; no ``.targets``."""

    def __init__(self, split: Split) -> None:
        self.images, self.labels = split.images, split.labels
        self.calls = 0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        self.calls += 1
        return self.images[i].float() / 255, int(self.labels[i])


class WithTargets(OnTheFly):
    """The same, with a ``.targets`` list: no pass over the items for their labels."""

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()


@pytest.fixture(scope="module")
def fmnist() -> tuple[Split, Split]:
    data = load_dataset(DataConfig("fashion-mnist", train_subset=400, test_subset=200))
    return data.train, data.test


def streamed(train: Dataset, test: Dataset, workers: int = 0, **kw) -> object:
    return dataset_from_torch(train, test, config=DataConfig("python", mode="stream",
                                                             workers=workers, **kw))  # fmt: skip


def epoch(split, start: int = 0) -> tuple[list, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    batches = list(iterate_batches(split, 32, gen=gen, shuffle=True, augment_hflip=True,
                                   drop_last=True, start=start))  # fmt: skip
    return batches, gen.get_state()


def test_generic_dataset_streams_the_pixels_and_splits_memory_holds(fmnist, caplog):
    caplog.set_level(logging.INFO)
    train, test = OnTheFly(fmnist[0]), WithTargets(fmnist[1])
    data = streamed(train, test)
    memory = dataset_from_torch(train, test, config=DataConfig("python", mode="memory"))
    assert data.config.mode == "stream" and memory.config.mode == "memory"
    assert all(isinstance(getattr(data, p), TorchStreamSplit) for p in ("train", "val", "test"))
    assert "train_data has no .targets: reading its 360 items once" in caplog.text
    assert "test_data has no .targets" not in caplog.text  # its labels came from .targets
    assert data.val.dataset is train  # validation: indices into train_data, not a copy
    assert (data.channels, data.image_size, data.num_classes) == (1, (28, 28), 10)
    for part in ("train", "val", "test"):
        want, got = getattr(memory, part), getattr(data, part)
        assert torch.equal(got.labels, want.labels)
        assert torch.equal(got.take().images, want.images)
    assert data.mean == pytest.approx(memory.mean) and data.std == pytest.approx(memory.std)


def test_batches_do_not_depend_on_workers_and_start_jumps(fmnist):
    train = streamed(WithTargets(fmnist[0]), WithTargets(fmnist[1])).train
    base, state = epoch(train)
    n_batches = len(train) // 32
    assert len(base) == n_batches and all(x.shape == (32, 1, 28, 28) for x, _ in base)
    for workers, start in ((2, 0), (2, 3), (0, n_batches - 1)):
        got, got_state = epoch(replace(train, workers=workers), start)
        assert torch.equal(got_state, state)  # the caller's generator ends where it always does
        assert len(got) == n_batches - start
        for (x, y), (x0, y0) in zip(got, base[start:], strict=True):
            assert torch.equal(x, x0) and torch.equal(y, y0)
    # the draws a StreamSplit makes: order, epoch seed, then batch k's seed from (seed, k)
    replay = torch.Generator().manual_seed(3)
    order = torch.randperm(len(train), generator=replay)
    seed = int(torch.randint(0, 2**62, (), generator=replay))
    idx = order[32:64]
    want = augment(train.take(idx).images, torch.Generator().manual_seed(batch_seed(seed, 1)))
    assert torch.equal(base[1][0], want.float() / 255) and torch.equal(
        base[1][1], train.labels[idx]
    )
    # a jump reads no skipped batch
    train.dataset.calls = 0
    epoch(train, start=n_batches - 2)
    assert train.dataset.calls == 2 * 32


def test_auto_mode_chooses_and_records_the_mode(fmnist, monkeypatch, caplog):
    import ensc.data.mode as mode

    caplog.set_level(logging.INFO)
    train, test = WithTargets(fmnist[0]), OnTheFly(fmnist[1])
    data = dataset_from_torch(train, test, config=DataConfig("python"))
    assert isinstance(data.train, Split) and data.config == DataConfig("python", mode="memory")
    assert "reading 560 images into memory: 0.4 MB decoded, within 25 %" in caplog.text
    monkeypatch.setattr(mode, "available_memory", lambda: 1000)
    data = dataset_from_torch(train, test, config=DataConfig("python", workers=0))
    assert isinstance(data.train, TorchStreamSplit) and data.config.mode == "stream"
    assert "streaming 560 images: decoded they would take 0.4 MB" in caplog.text
    assert 'data_mode="memory" to read them into memory anyway' in caplog.text
    with pytest.raises(ConfigError, match="unknown data_mode 'disk'"):
        dataset_from_torch(train, test, config=DataConfig("python", mode="disk"))


class OddOne(OnTheFly):
    """Item 37 is 30×30."""

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = super().__getitem__(i)
        return (torch.zeros(1, 30, 30) if i == 37 else image), label


def test_an_image_of_another_size_is_named(fmnist):
    with pytest.raises(DataError, match=r"train_data\[37\] is 1×30×30 \(C×H×W\) but") as err:
        streamed(OddOne(fmnist[0]), OnTheFly(fmnist[1]))
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="28×28 \\(W×H\\) but image_size= asks for 32×32"):
        streamed(OnTheFly(fmnist[0]), OnTheFly(fmnist[1]), image_size=(32, 32))


def test_fingerprint_is_stable_and_covers_the_items(fmnist):
    from ensc.evaluation.logits_cache import split_sha256

    test = streamed(WithTargets(fmnist[0]), WithTargets(fmnist[1])).test
    again = streamed(WithTargets(fmnist[0]), WithTargets(fmnist[1])).test
    assert split_sha256(test) == split_sha256(again)
    assert split_sha256(test) != split_sha256(test.subset(torch.arange(10)))
    brighter = Split(fmnist[1].images // 2, fmnist[1].labels)  # other pixels, same labels
    assert split_sha256(test) != split_sha256(streamed(WithTargets(fmnist[0]),
                                                       WithTargets(brighter)).test)  # fmt: skip


def test_generic_datasets_compress_through_the_api(tiny_teacher, fmnist, tmp_path):
    train, test = OnTheFly(fmnist[0]), WithTargets(fmnist[1])
    result = ensc.compress_ensemble(tiny_teacher, "resnet8", train_data=train, test_data=test,
                                    data_mode="stream", workers=0, out=tmp_path / "run",
                                    **TINY)  # fmt: skip
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"]["mode"] == "stream" and result.report["n_test"] == 200
    assert result.report["train"]["steps"] == 2


# --- a torchvision ImageFolder ----------------------------------------------------------------


@pytest.fixture(scope="module")
def png_folder(tmp_path_factory, fmnist) -> Path:
    """Fashion-MNIST as grayscale PNGs: train/ 60 (6 a class), test/ 30, in class folders."""
    from PIL import Image

    root = tmp_path_factory.mktemp("pngs")
    for part, split, per_class in (("train", fmnist[0], 6), ("test", fmnist[1], 3)):
        for k in range(10):
            folder = root / part / f"class{k}"
            folder.mkdir(parents=True)
            for j, i in enumerate((split.labels == k).nonzero().flatten()[:per_class].tolist()):
                Image.fromarray(split.images[i, 0].numpy()).save(folder / f"{j}.png")
    return root


class Gray(nn.Module):
    """RGB to the single channel the tiny teacher's members take (the PNGs are gray)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1, keepdim=True)


def test_image_folder_streams_from_its_files(png_folder, tiny_teacher, caplog):
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    caplog.set_level(logging.INFO)
    # a Normalize the memory path would refuse: streamed, the folder's transform is not applied
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    train = ImageFolder(str(png_folder / "train"), transform=transform)
    test = ImageFolder(str(png_folder / "test"), transform=transform)
    data = streamed(train, test)
    assert all(isinstance(getattr(data, p), StreamSplit) for p in ("train", "val", "test"))
    assert (data.channels, data.image_size, len(data.test)) == (3, (28, 28), 30)
    assert "own transform is not applied" in caplog.text and "at 28×28 (W×H)" in caplog.text
    assert data.class_names == tuple(f"class{k}" for k in range(10))
    pixels = data.test.take(torch.arange(3)).images
    assert torch.equal(pixels[:, 0], pixels[:, 2])  # the gray PNGs, as RGB
    part = streamed(Subset(train, list(range(0, 60, 2))), test).train  # through a Subset
    assert isinstance(part, StreamSplit) and len(part) + 3 == 30
    teachers = [nn.Sequential(Gray(), m) for m in load_teacher(tiny_teacher).members]
    result = ensc.compress_ensemble(teachers, "resnet8", train_data=train, test_data=test,
                                    data_mode="stream", workers=0, **{**TINY, "steps": 2})  # fmt: skip
    assert result.report["n_test"] == 30 and result.report["train"]["steps"] == 2
    assert isinstance(result._files.test_split, StreamSplit)
