"""One row of metrics per model, the same for `ensc eval` and the compression report.

A :class:`Scorer` holds what every row is measured against: the labels, and optionally a teacher's
predictions (DEE is read off its calibrated prefix-ensemble NLL curve; ``agreement`` is the top-1
agreement with its DE-M, in percent).
"""

from __future__ import annotations

from typing import Any

import torch

from ensc.evaluation.metrics import agreement, ensemble_nll_curve, evaluate_predictions


class Scorer:
    """Metric rows for predictions on one validation/test split pair (probabilities, CPU tensors)."""

    def __init__(
        self,
        val_labels: torch.Tensor,
        test_labels: torch.Tensor,
        teacher_val: torch.Tensor | None = None,  # [M, Nv, K] member probabilities
        teacher_test: torch.Tensor | None = None,  # [M, N, K]
    ) -> None:
        self.val_labels, self.test_labels = val_labels, test_labels
        self.curve: list[float] | None = None
        self.de_test: torch.Tensor | None = None
        if teacher_val is not None and teacher_test is not None:
            self.curve = ensemble_nll_curve(
                teacher_test, test_labels, val_member_probs=teacher_val, val_labels=val_labels
            )
            self.de_test = teacher_test.mean(0)

    def row(
        self,
        name: str,
        test: torch.Tensor,
        val: torch.Tensor,
        members: torch.Tensor | None = None,
        *,
        with_agreement: bool = True,
    ) -> dict[str, Any]:
        """``{"name", acc, nll, ..., "agreement"}`` of a model (``members``: an ensemble's parts,
        for diversity; ignored when there is only one)."""
        metrics = evaluate_predictions(
            test, self.test_labels, val_probs=val, val_labels=self.val_labels,
            member_probs=members if members is not None and len(members) > 1 else None,
            de_nll_curve=self.curve,
        ).to_dict()  # fmt: skip
        row = {"name": name, **metrics}
        if with_agreement and self.de_test is not None:
            row["agreement"] = agreement(test, self.de_test)
        return row
