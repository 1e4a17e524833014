"""Names of the datasets ensc reads, importable without torch so that `ensc --help` starts fast."""

from __future__ import annotations

DATASETS = ("fashion-mnist", "cifar10", "cifar100", "imagefolder")
# what a model records as its dataset when its data was handed over from Python (torch datasets,
# ensc.compress_ensemble): ensc cannot load that again by name
PYTHON_DATA = "python"
