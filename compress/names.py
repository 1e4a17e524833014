"""Names of the compression options, importable without torch so that `ensc --help` starts fast."""

from __future__ import annotations

# input perturbations during distillation (ensc.compress.perturb; docs/method.md §5)
PERTURBATIONS = ("none", "gaussian", "ods", "confods", "tdiv-sdiv")
