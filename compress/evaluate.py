"""Evaluate a DeepEns teacher: every member and every prefix ensemble DE-1 ... DE-M (SPEC.md §7)."""

from __future__ import annotations

from typing import Any

import torch

from ensc.compress.data import ImageDataset
from ensc.compress.metrics import ensemble_nll_curve, evaluate_predictions
from ensc.compress.predict import predict_probs
from ensc.compress.runtime import Runtime
from ensc.compress.teacher import Teacher


def member_probs(
    teacher: Teacher, data: ImageDataset, runtime: Runtime
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each member's probabilities on the validation and test splits: two [M, N, K] tensors."""
    teacher.to(runtime.device)
    val = torch.stack([predict_probs(m, data.val, runtime) for m in teacher.members])
    test = torch.stack([predict_probs(m, data.test, runtime) for m in teacher.members])
    return val, test


def evaluate_teacher(teacher: Teacher, data: ImageDataset, runtime: Runtime) -> dict[str, Any]:
    """Metrics of each member and of DE-m for m = 1..M, with DEE against the teacher's own curve."""
    val, test = member_probs(teacher, data, runtime)
    curve = ensemble_nll_curve(
        test, data.test.labels, val_member_probs=val, val_labels=data.val.labels
    )

    def metrics(
        test_probs: torch.Tensor, val_probs: torch.Tensor, members: torch.Tensor | None
    ) -> dict[str, Any]:
        return evaluate_predictions(
            test_probs, data.test.labels, val_probs=val_probs, val_labels=data.val.labels,
            member_probs=members, de_nll_curve=curve,
        ).to_dict()  # fmt: skip

    members = [
        {"name": f"member {k}", "path": str(teacher.paths[k]), **metrics(test[k], val[k], None)}
        for k in range(len(teacher))
    ]
    ensembles = [
        {
            "name": f"DE-{m}",
            **metrics(test[:m].mean(0), val[:m].mean(0), test[:m] if m > 1 else None),
        }
        for m in range(1, len(teacher) + 1)
    ]
    return {
        "dataset": data.name,
        "n_val": len(data.val),
        "n_test": len(data.test),
        "metric_units": "acc in percent; nll, bs, ece (fraction) and the calibrated c* metrics raw",
        "de_cnll_curve": curve,
        "members": members,
        "ensembles": ensembles,
    }
