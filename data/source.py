"""Which data a saved model is evaluated on: the split it was trained with, unless overridden."""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from ensc.data.datasets import DataConfig, ImageDataset
from ensc.errors import ConfigError, DataError
from ensc.models.checkpoint import ModelSpec


def data_config_for(
    spec: ModelSpec, recorded: dict[str, Any] | None, **overrides: Any
) -> DataConfig:
    """The recorded training DataConfig (same validation split), with non-None ``overrides`` applied.

    Reusing the recorded seed, validation size and train subset keeps the validation split held
    out from the model's training data, which temperature scaling relies on. A model trained by
    ensc (its spec records its dataset) also fixes ``image_size``: image-folder images are resized
    to the size it was trained on. Other models leave it None (the most common size in the
    training split).
    """
    known = {f.name for f in fields(DataConfig)}
    base = {k: v for k, v in (recorded or {}).items() if k in known}
    base.setdefault("name", spec.dataset or overrides.get("name"))
    if not base.get("name"):
        raise ConfigError(
            "the checkpoints record no dataset (those from other code never do); pass --dataset"
        )
    base["root"] = Path(base["root"]) if base.get("root") else None
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
