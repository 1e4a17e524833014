"""Evaluate saved models: a DeepEns teacher (each member, DE-1 ... DE-M) and single networks.

The metrics are those of the README's "Make or evaluate a teacher" section (ACC, NLL, Brier, ECE,
their temperature-scaled versions, DEE and diversity).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ensc.data.datasets import ImageDataset, Split, load_dataset
from ensc.data.source import check_compatible, data_config_for
from ensc.engine.predict import eval_copy, predict_logits_many, probe_batch
from ensc.engine.runtime import Runtime
from ensc.errors import ConfigError
from ensc.evaluation.scores import Scorer
from ensc.models.checkpoint import load_checkpoint
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
    val, test = member_probs(teacher, data, runtime) if teacher is not None else (None, None)
    scorer = Scorer(data.val.labels, data.test.labels, val, test)
    if teacher is not None:
        result["de_cnll_curve"] = scorer.curve
        result["members"] = []
        for k in range(len(teacher)):
            row = scorer.row(f"member {k}", test[k], val[k], with_agreement=False)
            result["members"].append({"name": row["name"], "path": str(teacher.paths[k]), **row})
        result["ensembles"] = [
            scorer.row(f"DE-{m}", test[:m].mean(0), val[:m].mean(0), test[:m], with_agreement=False)
            for m in range(1, len(teacher) + 1)
        ]
    probe = probe_batch([data.test, data.val], runtime)
    for name, model in (students or {}).items():
        model = runtime.prepare_model(model)
        if probe is not None:
            model = eval_copy(model, runtime, probe)
        (logits,) = predict_logits_many([model], {"test": data.test, "val": data.val}, runtime)
        result["students"].append(
            scorer.row(name, logits["test"].softmax(-1), logits["val"].softmax(-1))
        )
    return result


def evaluate_saved(
    runtime: Runtime,
    teacher: Teacher | None = None,
    student_paths: Sequence[Path] = (),
    *,
    dataset: str | None = None,
    data_root: Path | None = None,
    test_subset: int | None = None,
) -> dict[str, Any]:
    """`ensc eval`: :func:`evaluate` on the data the models were trained on (recorded in the
    teacher, else the first student) unless ``dataset`` / ``data_root`` say otherwise."""
    ckpts = {str(path): load_checkpoint(path) for path in student_paths}
    first = next(iter(ckpts.values()), None)
    if teacher is None and first is None:
        raise ConfigError("nothing to evaluate: pass a teacher, a student checkpoint, or both")
    spec, recorded = (
        (teacher.spec, teacher.data_record) if teacher else (first.spec, first.info.get("data"))
    )
    config = data_config_for(spec, recorded, name=dataset, root=data_root, test_subset=test_subset)
    data = load_dataset(config)
    for model_spec in [
        *(c.spec for c in ckpts.values()),
        *([] if teacher is None else [teacher.spec]),
    ]:
        check_compatible(model_spec, data)
    models = {name: ckpt.build_model() for name, ckpt in ckpts.items()}
    return evaluate(data, runtime, teacher=teacher, students=models)
