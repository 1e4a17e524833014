"""Evaluate saved models: a DeepEns teacher (each member, DE-1 ... DE-M) and single networks.

The metrics are those of the README's "Make or evaluate a teacher" section (ACC, NLL, Brier, ECE,
their temperature-scaled versions, DEE and diversity).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ensc import rundir
from ensc.data.datasets import load_dataset
from ensc.data.source import check_compatible, data_config_for, ood_split
from ensc.data.splits import ImageDataset, Split, balanced_indices
from ensc.engine.predict import eval_copy, predict_logits_many, probe_batch
from ensc.engine.runtime import Runtime
from ensc.errors import ConfigError
from ensc.evaluation.corruptions import (
    CORRUPTIONS,
    METRIC_UNITS,
    METRICS,
    SEVERITIES,
    corrupted_split,
    summarize,
)
from ensc.evaluation.metrics import (
    EPS,
    UNITS,
    accuracy,
    apply_temperature,
    ece,
    fit_temperature,
    nll,
    reliability_bins,
)
from ensc.evaluation.ood import ood_section, paired_scores
from ensc.evaluation.scores import Scorer
from ensc.models.checkpoint import load_checkpoint
from ensc.teachers.ensemble import Teacher

log = logging.getLogger(__name__)


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


def evaluate(
    data: ImageDataset,
    runtime: Runtime,
    teacher: Teacher | None = None,
    students: dict[str, nn.Module] | None = None,
    *,
    ood: Split | None = None,
    ood_name: str = "ood",
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Metrics of each teacher member, of DE-m for m = 1..M, and of each single network in ``students``.

    With a teacher, DEE is read off the teacher's own calibrated curve and each student row gets
    its top-1 agreement with DE-M (percent). With ``ood`` images (shaped as the models take them,
    :func:`~ensc.data.source.ood_split`), ``result["ood"]`` holds each member's, DE-M's and each
    student's OOD detection (:func:`~ensc.evaluation.ood.ood_section`; ``ood_name`` names the
    data there). A ``details`` dict is filled with what pictures need and JSON does not hold
    (:func:`_details`).
    """
    result: dict[str, Any] = {
        "dataset": data.name,
        "n_val": len(data.val),
        "n_test": len(data.test),
        "metric_units": "acc and agreement in percent; nll, bs, ece (fraction) and the calibrated c* metrics raw",
        "units": dict(UNITS),
        "members": [],
        "ensembles": [],
        "students": [],
    }
    splits = {"val": data.val, "test": data.test, **({} if ood is None else {"ood": ood})}
    t_probs = (
        {k: v.softmax(-1) for k, v in member_logits(teacher, splits, runtime).items()}
        if teacher is not None
        else {}
    )
    val, test = t_probs.get("val"), t_probs.get("test")
    s_probs: dict[str, dict[str, torch.Tensor]] = {}
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
        (logits,) = predict_logits_many([model], splits, runtime)
        s_probs[name] = {k: v.softmax(-1) for k, v in logits.items()}
        result["students"].append(scorer.row(name, s_probs[name]["test"], s_probs[name]["val"]))
    if ood is not None or details is not None:
        _details(result, data, t_probs, s_probs, ood_name, {} if details is None else details)
    return result


def _details(
    result: dict[str, Any],
    data: ImageDataset,
    teacher: dict[str, torch.Tensor],
    students: dict[str, dict[str, torch.Tensor]],
    ood_name: str,
    details: dict[str, Any],
) -> None:
    """``result["ood"]`` when there are OOD predictions, and ``details`` for pictures:
    ``"reliability"``: {model: (count, Σ confidence, Σ correct)} of each member, DE-M and student
    on test (:func:`~ensc.evaluation.metrics.reliability_bins`); with OOD data, ``"ood_scores"``:
    {model: {score: (in-distribution [N], OOD [N'])}}."""
    models: dict[str, dict[str, torch.Tensor]] = {}  # name -> {"test", "ood"[, "members_*"]}
    if teacher:
        for k in range(len(teacher["test"])):
            models[f"member {k}"] = {split: probs[k] for split, probs in teacher.items()}
        models[f"DE-{len(teacher['test'])}"] = {
            **{split: probs.mean(0) for split, probs in teacher.items()},
            **{f"members_{split}": probs for split, probs in teacher.items()},
        }
    models.update(students)
    details["reliability"] = {
        name: reliability_bins(p["test"], data.test.labels) for name, p in models.items()
    }
    if models and all("ood" in p for p in models.values()):
        result["ood"], details["ood_scores"] = ood_detection(models, data=ood_name)


def ood_detection(
    models: Mapping[str, Mapping[str, torch.Tensor]], *, data: str
) -> tuple[dict[str, Any], dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]]:
    """`--ood-data` of `ensc eval` and `ensc compress`: ``result["ood"]``
    (:func:`~ensc.evaluation.ood.ood_section`) and each model's ``{score: (in, out)}`` for
    :func:`~ensc.evaluation.plots.ood_histograms`, from each model's probabilities
    ``{name: {"test": [N, K], "ood": [N', K]}}``; an ensemble also gives its members'
    ``"members_test"`` [M, N, K] and ``"members_ood"`` [M, N', K] (mutual information)."""
    scores = {
        name: paired_scores(p["test"], p["ood"], p.get("members_test"), p.get("members_ood"))
        for name, p in models.items()
    }
    return ood_section(scores, data=data), scores


def evaluate_corruptions(
    data: ImageDataset,
    runtime: Runtime,
    teacher: Teacher | None = None,
    students: Mapping[str, nn.Module] | None = None,
    *,
    ensembles: Mapping[str, Sequence[nn.Module]] | None = None,
    subset: int | None = None,
    temperatures: Mapping[str, float] | None = None,
    corruptions: Sequence[str] = CORRUPTIONS,
    seed: int = 0,
) -> dict[str, Any]:
    """Each teacher member, DE-M and each student under corruption: `ensc eval --corruptions`
    (and `ensc compress --corruptions`).

    The test split (a class-balanced subset of ``subset`` images drawn with ``seed``, when given)
    under each of ``corruptions`` at severities 1–5 (:mod:`ensc.evaluation.corruptions`, noise
    seeded with ``seed``, rounded to uint8 as CIFAR-10-C is stored). Every network runs once per
    corruption and severity (:func:`~ensc.engine.predict.predict_logits_many`, members as their
    fast copies); DE-M averages the members' probabilities, and so does each of ``ensembles``
    (``{row name: its member networks}``, e.g. a BatchEnsemble's members as plain networks: one
    row, the mean of its members, none per member). cNLL uses each model's temperature fitted on
    the clean validation split: ``temperatures`` by row name (``"member k"``, ``"DE-M"``, the
    ensembles' and students' names), as :func:`evaluate` reports them, else fitted here (one more
    pass over the validation split per network).

    Returns (JSON-ready; severities are the strings "1".."5"; units in ``metric_units``)::

        {"benchmark": ..., "corruptions": [names], "severities": [1, ..., 5], "n_test": N,
         "seed": seed, "metrics": ["acc", "nll", "cnll", "ece"], "metric_units": ...,
         "models": [{"name": "member 0" | "DE-M" | ensemble | student, "temperature": T,
                     "by_severity": {"1": {"acc", "nll", "cnll", "ece"}, ...},  # mean over corruptions
                     "mean": {...},  # over corruptions and severities (mCE-style, unnormalized)
                     "per_corruption": {"gaussian_noise": {"1": {...}, ...}, ...}}, ...]}

    in the order teacher members, DE-M, ``ensembles``, ``students``.
    """
    unknown = [c for c in corruptions if c not in CORRUPTIONS]
    if unknown or not corruptions:
        raise ConfigError(f"unknown corruptions {unknown}: choose from {', '.join(CORRUPTIONS)}")
    test = data.test
    if subset is not None and subset < len(test):
        gen = torch.Generator().manual_seed(seed)
        test = test.subset(balanced_indices(test.labels, subset, gen))
    test = test.take()  # decoded once (a streamed split), corrupted 50 times
    models = _ModelsUnderTest(runtime, probe_batch([test], runtime), teacher, students, ensembles)
    if temperatures is None:
        val = models.probs({"val": data.val})["val"]
        temperatures = {
            n: fit_temperature(p.clamp_min(EPS).log(), data.val.labels) for n, p in val.items()
        }
    per: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for corruption in corruptions:
        start = time.perf_counter()
        splits = {str(s): corrupted_split(test, corruption, s, seed=seed) for s in SEVERITIES}
        for severity, probs in models.probs(splits).items():
            for n, p in probs.items():
                per.setdefault(n, {}).setdefault(corruption, {})[severity] = _corrupted_metrics(
                    p, test.labels, temperatures[n]
                )
        log.info("corruption %s: %d images x 5 severities in %.1f s", corruption, len(test),
                 time.perf_counter() - start)  # fmt: skip
    return _corruption_result(per, temperatures, corruptions, len(test), seed)


def _corruption_result(
    per: dict[str, Any], temperatures: Mapping[str, float], corruptions: Sequence[str], n_test: int,
    seed: int,
) -> dict[str, Any]:  # fmt: skip
    """The JSON layout :func:`evaluate_corruptions` documents, from the per-model numbers."""
    return {
        "benchmark": "CIFAR-10-C corruptions (Hendrycks & Dietterich, ICLR 2019) made on the fly",
        "corruptions": list(corruptions),
        "severities": list(SEVERITIES),
        "n_test": n_test,
        "seed": seed,
        "metrics": list(METRICS),
        "metric_units": METRIC_UNITS,
        "models": [
            {
                "name": n,
                "temperature": temperatures[n],
                **summarize(by_corruption),
                "per_corruption": by_corruption,
            }
            for n, by_corruption in per.items()
        ],
    }


class _ModelsUnderTest:
    """The networks :func:`evaluate_corruptions` runs (fast copies) and the rows it reports: the
    teacher's members, DE-M (their mean), each ensemble (the mean of its members), each student."""

    def __init__(
        self, runtime: Runtime, probe: torch.Tensor | None, teacher: Teacher | None,
        students: Mapping[str, nn.Module] | None, ensembles: Mapping[str, Sequence[nn.Module]] | None,
    ) -> None:  # fmt: skip
        self.runtime = runtime

        def fast(model: nn.Module) -> nn.Module:
            return eval_copy(model, runtime, probe) if probe is not None else model

        self.nets: dict[Any, nn.Module] = {}  # every network run, by row name or (ensemble, k)
        self.members: list[str] = []  # the teacher's
        if teacher is not None:
            teacher.to(runtime.device)
            self.members = [f"member {k}" for k in range(len(teacher))]
            self.nets.update(
                (n, fast(m)) for n, m in zip(self.members, teacher.members, strict=True)
            )
        self.groups: dict[str, list[tuple[str, int]]] = {}  # ensemble row -> its members' keys
        for name, parts in (ensembles or {}).items():
            self.groups[name] = [(name, k) for k in range(len(parts))]
            self.nets.update(
                ((name, k), fast(runtime.prepare_model(m))) for k, m in enumerate(parts)
            )
        self.students = list(students or {})
        for name, model in (students or {}).items():
            self.nets[name] = fast(runtime.prepare_model(model))
        if not self.nets:
            raise ConfigError("nothing to evaluate under corruption: pass a teacher or a student")

    def probs(self, splits: dict[str, Split]) -> dict[str, dict[str, torch.Tensor]]:
        """``{split: {row name: probabilities}}``: one pass of every network over every split."""
        logits = predict_logits_many(list(self.nets.values()), splits, self.runtime)
        return {
            split: self._rows(
                {n: out[split].softmax(-1) for n, out in zip(self.nets, logits, strict=True)}
            )
            for split in splits
        }

    def _rows(self, probs: dict[Any, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {n: probs[n] for n in self.members}
        if self.members:
            out[f"DE-{len(self.members)}"] = torch.stack([probs[n] for n in self.members]).mean(0)
        for name, keys in self.groups.items():
            out[name] = torch.stack([probs[k] for k in keys]).mean(0)
        return {**out, **{n: probs[n] for n in self.students}}


def _corrupted_metrics(
    probs: torch.Tensor, labels: torch.Tensor, temperature: float
) -> dict[str, float]:
    """ACC, NLL, cNLL (at the clean validation split's temperature) and ECE of one model."""
    scaled = apply_temperature(probs.clamp_min(EPS).log(), temperature)
    return {"acc": accuracy(probs, labels), "nll": nll(probs, labels),
            "cnll": nll(scaled, labels), "ece": ece(probs, labels)}  # fmt: skip


def evaluate_saved(
    runtime: Runtime,
    teacher: Teacher | None = None,
    student_paths: Sequence[Path] = (),
    *,
    dataset: str | None = None,
    data_root: Path | None = None,
    test_subset: int | None = None,
    ood_data: str | None = None,
    details: dict[str, Any] | None = None,
    corruptions: bool = False,
    corruption_subset: int | None = None,
    data_mode: str | None = None,
    workers: int | None = None,
    image_size: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """`ensc eval`: :func:`evaluate` on the data the models were trained on (recorded in the
    teacher, else the first student) unless ``dataset`` / ``data_root`` say otherwise.

    ``ood_data`` (`--ood-data`, a dataset name or a folder of images) adds ``result["ood"]``:
    its images at the models' channels and size (:func:`~ensc.data.source.ood_split`), as many
    as ``test_subset`` when given.

    ``corruptions`` (`--corruptions`) adds ``result["corruptions"]``
    (:func:`evaluate_corruptions` on ``corruption_subset`` test images, all when None).
    ``data_mode``, ``workers``, ``image_size``: `--data-mode`, `--workers`, `--image-size`
    (:class:`~ensc.data.splits.DataConfig`; None keeps the recorded one).
    """
    for path in student_paths:  # not the checkpoint of an interrupted run
        rundir.check_not_unfinished(path)
    ckpts = {str(path): load_checkpoint(path) for path in student_paths}
    first = next(iter(ckpts.values()), None)
    if teacher is None and first is None:
        raise ConfigError("nothing to evaluate: pass a teacher, a student checkpoint, or both")
    spec, recorded = (
        (teacher.spec, teacher.data_record) if teacher else (first.spec, first.info.get("data"))
    )
    config = data_config_for(spec, recorded, name=dataset, root=data_root, test_subset=test_subset,
                             mode=data_mode, workers=workers, image_size=image_size)  # fmt: skip
    data = load_dataset(config)
    for model_spec in [
        *(c.spec for c in ckpts.values()),
        *([] if teacher is None else [teacher.spec]),
    ]:
        check_compatible(model_spec, data)
    models = {name: ckpt.build_model() for name, ckpt in ckpts.items()}
    ood = None
    if ood_data is not None:
        ood = ood_split(
            ood_data, data.channels, data.image_size, subset=test_subset, seed=config.seed
        )
    result = evaluate(data, runtime, teacher=teacher, students=models, ood=ood,
                      ood_name=ood_data or "ood", details=details)  # fmt: skip
    if corruptions:
        rows = [*result["members"], *result["ensembles"][-1:], *result["students"]]
        result["corruptions"] = evaluate_corruptions(
            data, runtime, teacher, models, subset=corruption_subset,
            temperatures={row["name"]: row["temperature"] for row in rows},
        )  # fmt: skip
    return result
