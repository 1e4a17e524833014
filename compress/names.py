"""Names of the compression options, importable without torch so that `ensc --help` starts fast."""

from __future__ import annotations

# input perturbations during distillation (ensc.compress.perturb; docs/method.md §5)
PERTURBATIONS = ("none", "gaussian", "ods", "confods", "tdiv-sdiv")

# batchensemble: distill into BE-M and average it (the product); kd-single: plain KD into one
# network (the baseline), everything else the same
COMPRESS_METHODS = ("batchensemble", "kd-single")
