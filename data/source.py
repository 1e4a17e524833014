"""Which data a saved model is evaluated on: the split it was trained with, unless overridden,
and the out-of-distribution images of `ensc eval --ood-data`."""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from ensc.data.builtin import FASHION_MNIST_SYSTEM_DIR, default_data_root
from ensc.data.catalog import DATASETS, PYTHON_DATA
from ensc.data.datasets import load_test_split
from ensc.data.imagefolder import load_image_files, to_input_shape
from ensc.data.splits import DataConfig, ImageDataset, Split
from ensc.errors import ConfigError, DataError
from ensc.fileio import not_a_folder
from ensc.models.checkpoint import ModelSpec


def data_config_for(
    spec: ModelSpec, recorded: dict[str, Any] | None, **overrides: Any
) -> DataConfig:
    """The recorded training DataConfig (same validation split), with non-None ``overrides`` applied.

    Reusing the recorded seed, validation size and train subset keeps the validation split held
    out from the model's training data, which temperature scaling relies on. A model trained by
    ensc (its spec records its dataset) also fixes ``image_size``: image-folder images are resized
    to the size it was trained on. Other models leave it None (the most common size in the
    training split). The recorded ``mode`` (memory or stream: the one ``load_dataset`` used,
    which ``ImageDataset.config`` gives to whoever records it) is kept unless ``mode`` overrides
    it, so a model is evaluated, checked and resumed with the preprocessing it was trained with;
    only a model recorded before ensc resolved the mode says ``auto``, chosen again at each load.
    The number of reader processes is not kept: it belongs to the machine, not to the data.
    """
    known = {f.name for f in fields(DataConfig)} - {"workers"}
    base = {k: v for k, v in (recorded or {}).items() if k in known}
    base.setdefault("name", spec.dataset or overrides.get("name"))
    if not base.get("name"):
        raise ConfigError(
            "the checkpoints record no dataset (those from other code never do); pass --dataset"
        )
    if base["name"] == PYTHON_DATA and not overrides.get("name"):
        raise DataError(
            "this model was trained on torch datasets handed over from Python, which ensc cannot "
            "load again: pass --dataset (and --data-root), or use ensc.export_onnx / ensc.benchmark "
            "from Python with the CompressResult"
        )
    base["root"] = Path(base["root"]) if base.get("root") else None
    base["val_root"] = Path(base["val_root"]) if base.get("val_root") else None
    base["image_size"] = tuple(base["image_size"]) if base.get("image_size") else None
    config = DataConfig(**base)
    changes = {k: v for k, v in overrides.items() if v is not None}
    if "name" in changes and changes["name"] != config.name:  # another dataset: its own defaults
        config = DataConfig(name=changes["name"], seed=config.seed)
    if spec.dataset:  # an ensc checkpoint: image_size is the size it was trained on
        changes.setdefault("image_size", tuple(spec.image_size))
    return replace(config, **changes)


def check_compatible(spec: ModelSpec, data: ImageDataset) -> None:
    """Models and data must agree on classes and channels."""
    if spec.num_classes != data.num_classes:
        raise DataError(
            f"the model predicts {spec.num_classes} classes but {data.name} has {data.num_classes}; "
            "pass the --dataset it was trained on"
        )
    if spec.in_channels != data.channels:
        raise DataError(
            f"the model takes {spec.in_channels}-channel images but {data.name} has {data.channels}"
        )


def ood_split(
    source: str,
    in_channels: int,
    image_size: tuple[int, int],
    *,
    subset: int | None = None,
    seed: int = 0,
) -> Split:
    """The images of `ensc eval --ood-data`, shaped as the model takes them; labels are ignored.

    ``source`` is a dataset name (fashion-mnist, cifar10, cifar100: its test split, from the
    default location) or a folder of images (an ImageFolder's class folders or a flat folder;
    write ``./cifar10`` for a folder that has a dataset's name). Images are brought to
    ``in_channels`` × ``image_size`` by :func:`~ensc.data.imagefolder.to_input_shape` (grayscale to
    RGB repeats the channel, RGB to grayscale takes the luminance, other sizes are resized);
    ``subset`` keeps that many images (seeded; class-balanced for a dataset).
    """
    if source in DATASETS and source != "imagefolder":
        try:
            split = load_test_split(DataConfig(name=source, test_subset=subset, seed=seed))
        except DataError as err:
            if "not found" not in str(err):  # there, but damaged: say so as the loader does
                raise DataError(f"--ood-data {source}: {err}") from err
            where = FASHION_MNIST_SYSTEM_DIR if source == "fashion-mnist" else default_data_root()
            raise DataError(
                f"--ood-data {source}: not found in {where}, where ensc looks for it; "
                "pass a folder of its images instead"
            ) from err
    elif source == "imagefolder":
        raise DataError("--ood-data takes the image folder itself (e.g. --ood-data photos/test)")
    else:
        folder = Path(source)
        if not folder.is_dir():
            names = ", ".join(d for d in DATASETS if d != "imagefolder")
            raise DataError(
                f"--ood-data {source} {not_a_folder(folder)}: pass a folder of images or one of {names}"
            )
        split = load_image_files(folder, tuple(image_size), subset=subset, seed=seed)
    return Split(to_input_shape(split.images, in_channels, tuple(image_size)), split.labels)
