"""`ensc compress --ood-data` and `--corruptions`: the run's models measured as `ensc eval` measures
them, by `ensc eval`'s own functions (:func:`~ensc.evaluation.evaluate.ood_detection`,
:func:`~ensc.evaluation.evaluate.evaluate_corruptions`).

The models are the teacher's members, DE-M, the BE-M student (the mean of its members, with
mutual information among them for OOD detection), the averaged single network and, when there
is one, the averaged network with the other BatchNorm statistics. Their rows carry the names of
report.md's table (``teacher 0``, ``DE-M teacher``, ``BE-M student``, ...); the sections have the
layout of `ensc eval --json`'s ``"ood"`` and ``"corruptions"`` (docs/report-json.md).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ensc.compress.report import Predictions
from ensc.data.splits import ImageDataset
from ensc.engine.runtime import Runtime
from ensc.evaluation.evaluate import evaluate_corruptions, ood_detection
from ensc.models.batchensemble import BatchEnsemble
from ensc.models.fold import member_network
from ensc.teachers.ensemble import Teacher

OodScores = dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]


def ood_report(
    report: dict[str, Any], preds: Predictions, *, data: str
) -> tuple[dict[str, Any], OodScores]:
    """``report["ood"]`` and each model's ``{score: (in, out)}`` (for the histograms), from the
    test and OOD probabilities in ``preds`` (``teacher_ood`` ... must be set)."""
    t_test, t_ood, s_test, s_ood = preds.teacher_test, preds.teacher_ood, preds.student_test, preds.student_ood  # fmt: skip
    assert t_ood is not None and s_ood is not None and preds.avg_ood is not None
    models: dict[str, dict[str, torch.Tensor]] = {
        row["name"]: {"test": t_test[k], "ood": t_ood[k]}
        for k, row in enumerate(report["teacher_members"])
    }
    models[report["teacher"]["name"]] = _ensemble(t_test, t_ood)
    models[report["student_be"]["name"]] = _ensemble(s_test, s_ood)
    models[report["student_avg"]["name"]] = {"test": preds.avg_test, "ood": preds.avg_ood}
    if "student_avg_alternative" in report and preds.alt_test is not None:
        assert preds.alt_ood is not None
        models[report["student_avg_alternative"]["name"]] = {
            "test": preds.alt_test, "ood": preds.alt_ood
        }  # fmt: skip
    return ood_detection(models, data=data)


def _ensemble(test: torch.Tensor, ood: torch.Tensor) -> dict[str, torch.Tensor]:
    """An ensemble's OOD inputs from its members' probabilities [M, N, K] and [M, N', K]."""
    return {"test": test.mean(0), "ood": ood.mean(0), "members_test": test, "members_ood": ood}


def corruption_report(
    report: dict[str, Any],
    data: ImageDataset,
    runtime: Runtime,
    *,
    teacher: Teacher,
    student: BatchEnsemble,
    averaged: nn.Module,
    other: nn.Module | None,
    subset: int | None,
) -> dict[str, Any]:
    """``report["corruptions"]``: :func:`~ensc.evaluation.evaluate.evaluate_corruptions` of the
    teacher (members and DE-M), the BE student (its members as plain networks, one row for their
    mean), the averaged network and ``other`` (the averaged network with the BatchNorm statistics
    not kept), on ``subset`` test images (all when None), with noise seed 0 as `ensc eval` uses.
    cNLL uses each row's temperature of the report (fitted on the clean validation split)."""
    members = report["teacher_members"]
    teacher_rows = {f"member {k}": row for k, row in enumerate(members)}
    teacher_rows[f"DE-{len(members)}"] = report["teacher"]
    singles = {report["student_avg"]["name"]: averaged}
    rows = [report["student_be"], report["student_avg"]]
    if other is not None and "student_avg_alternative" in report:
        singles[report["student_avg_alternative"]["name"]] = other
        rows.append(report["student_avg_alternative"])
    be = [member_network(student, m) for m in range(student.members)]
    section = evaluate_corruptions(
        data, runtime, teacher, singles, ensembles={report["student_be"]["name"]: be},
        subset=subset,
        temperatures={**{n: r["temperature"] for n, r in teacher_rows.items()},
                      **{r["name"]: r["temperature"] for r in rows}},
    )  # fmt: skip
    for model in section["models"]:  # the teacher's rows as report.md's table names them
        model["name"] = teacher_rows.get(model["name"], model)["name"]
    return section
