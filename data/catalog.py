"""Names of the datasets ensc reads, importable without torch so that `ensc --help` starts fast."""

from __future__ import annotations

DATASETS = ("fashion-mnist", "cifar10", "cifar100", "imagefolder")
