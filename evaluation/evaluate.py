"""Evaluate saved models: a DeepEns teacher (each member, DE-1 ... DE-M) and single networks.

The metrics are those of the README's "Make or evaluate a teacher" section (ACC, NLL, Brier, ECE,
their temperature-scaled versions, DEE and diversity).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ensc.data.datasets import ImageDataset, Split
from ensc.engine.predict import eval_copy, predict_logits_many, probe_batch
from ensc.engine.runtime import Runtime
from ensc.evaluation.metrics import agreement, ensemble_nll_curve, evaluate_predictions
from ensc.teachers.ensemble import Teacher


def member_logits(
    teacher: Teacher, splits: Mapping[str, Split], runtime: Runtime
) -> dict[str, torch.Tensor]:
    """Each member's logits on each split, ``{name: [M, N, K]}``: one pass per member and split.

    Members run as their fast evaluation copies (:func:`~ensc.engine.predict.eval_copy`),
    side by side on a CPU (:func:`~ensc.engine.predict.predict_logits_many`).
    """
    teacher.to(runtime.device)
    probe = probe_batch(splits.values(), runtime)
    fast = [eval_copy(m, runtime, probe) if probe is not None else m for m in teacher.members]
    logits = predict_logits_many(fast, splits, runtime)
    return {name: torch.stack([per_model[name] for per_model in logits]) for name in splits}


def member_probs(
    teacher: Teacher, data: ImageDataset, runtime: Runtime
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each member's probabilities on the validation and test splits: two [M, N, K] tensors."""
    logits = member_logits(teacher, {"val": data.val, "test": data.test}, runtime)
    return logits["val"].softmax(-1), logits["test"].softmax(-1)


def evaluate(
    data: ImageDataset,
    runtime: Runtime,
    teacher: Teacher | None = None,
    students: dict[str, nn.Module] | None = None,
) -> dict[str, Any]:
    """Metrics of each teacher member, of DE-m for m = 1..M, and of each single network in ``students``.

    With a teacher, DEE is read off the teacher's own calibrated curve and each student row gets
    its top-1 agreement with DE-M (percent).
    """
    result: dict[str, Any] = {
        "dataset": data.name,
        "n_val": len(data.val),
        "n_test": len(data.test),
        "metric_units": "acc and agreement in percent; nll, bs, ece (fraction) and the calibrated c* metrics raw",
        "members": [],
        "ensembles": [],
        "students": [],
    }
    labels, val_labels = data.test.labels, data.val.labels
    curve, de_test = None, None
    if teacher is not None:
        val, test = member_probs(teacher, data, runtime)
        curve = ensemble_nll_curve(test, labels, val_member_probs=val, val_labels=val_labels)
        de_test = test.mean(0)
        result["de_cnll_curve"] = curve

    def metrics(
        test_probs: torch.Tensor, val_probs: torch.Tensor, members: torch.Tensor | None = None
    ) -> dict[str, Any]:
        return evaluate_predictions(
            test_probs, labels, val_probs=val_probs, val_labels=val_labels,
            member_probs=members, de_nll_curve=curve,
        ).to_dict()  # fmt: skip

    if teacher is not None:
        result["members"] = [
            {"name": f"member {k}", "path": str(teacher.paths[k]), **metrics(test[k], val[k])}
            for k in range(len(teacher))
        ]
        result["ensembles"] = [
            {
                "name": f"DE-{m}",
                **metrics(test[:m].mean(0), val[:m].mean(0), test[:m] if m > 1 else None),
            }
            for m in range(1, len(teacher) + 1)
        ]
    probe = probe_batch([data.test, data.val], runtime)
    for name, model in (students or {}).items():
        model = runtime.prepare_model(model)
        if probe is not None:
            model = eval_copy(model, runtime, probe)
        (logits,) = predict_logits_many([model], {"test": data.test, "val": data.val}, runtime)
        s_test, s_val = logits["test"].softmax(-1), logits["val"].softmax(-1)
        row = {"name": name, **metrics(s_test, s_val)}
        if de_test is not None:
            row["agreement"] = agreement(s_test, de_test)
        result["students"].append(row)
    return result
