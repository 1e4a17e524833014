"""The single network of a run: the BatchEns student averaged (folded) into one plain network, its
BatchNorm statistics re-estimated or kept, and every model's predictions on validation and test.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from ensc.compress.average import average, fold_max_abs_diff, recalibrate_bn
from ensc.compress.calibrate import calibrate
from ensc.compress.config import CompressConfig
from ensc.compress.report import Predictions
from ensc.data.batches import iterate_batches
from ensc.data.catalog import PYTHON_DATA
from ensc.data.splits import DataConfig, ImageDataset, Split
from ensc.engine.predict import (
    eval_copy,
    eval_member_networks,
    predict_logits_many,
    predict_member_logits,
    probe_batch,
)
from ensc.engine.runtime import Runtime
from ensc.engine.timing import StageClock
from ensc.evaluation.evaluate import member_logits
from ensc.evaluation.logits_cache import cache_dir_for, cached_teacher_logits
from ensc.evaluation.metrics import EPS, nll
from ensc.models.batchensemble import BatchEnsemble
from ensc.teachers.ensemble import Teacher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SingleNetwork:
    """The averaged network and every model's predictions (:func:`single_network`)."""

    averaged: torch.nn.Module  # kept: student.pt
    other: torch.nn.Module | None  # with the other BN statistics (reported beside it), if any
    fold_diff: float  # the fold's max |Δlogit| against the BE student
    preds: Predictions
    bn_statistics: str  # which the kept network has: "re-estimated" or "as trained"
    teacher_cache: str  # whether the teacher's logits came from the cache
    calibration: dict[str, float | bool] | None  # the temperature folded into it (--calibrate)


def single_network(
    config: CompressConfig,
    teacher: Teacher,
    student: BatchEnsemble,
    data: ImageDataset,
    runtime: Runtime,
    clock: StageClock,
    ood: Split | None = None,
) -> SingleNetwork:
    """Average the student into one network and evaluate every model on validation and test
    (and on ``ood``, the --ood-data images, when given).

    Of the averaged network's BN statistics as trained and re-estimated (``--recalibrate-bn``),
    the one with the lower validation NLL is kept; the other is reported beside it. With
    ``--calibrate`` the temperature fitted on validation is then folded into the kept network.
    """
    with clock("average_seconds"):
        averaged, fold_diff = average_student(student, data, runtime)
    raw = copy.deepcopy(averaged) if config.recalibrate_bn else None  # reported side by side
    with clock("bn_recal_seconds"):
        if config.recalibrate_bn:
            recalibrate_on_train(config, averaged, data, runtime)
    with clock("eval_seconds"):
        preds, teacher_cache = predict_all(
            config, teacher, student, averaged, data, runtime, raw, ood
        )
    bn_statistics = "re-estimated" if config.recalibrate_bn else "as trained"
    if raw is not None and keeps_trained_bn(preds, data.val.labels):
        averaged, raw, bn_statistics = raw, averaged, "as trained"
        preds = replace(preds, avg_val=preds.alt_val, avg_test=preds.alt_test, avg_ood=preds.alt_ood,
                        alt_val=preds.avg_val, alt_test=preds.avg_test, alt_ood=preds.avg_ood,
                        alt_name="averaged, BN re-estimated (not kept)")  # fmt: skip
    calibration = None
    if config.calibrate:
        with clock("eval_seconds"):
            probe = probe_batch([data.val], runtime, n=64)
            calibration = calibrate(averaged, preds.avg_val, data.val.labels, probe)
            if calibration["folded"]:
                t = calibration["temperature"]
                preds = predict_again(preds, averaged, t, data, runtime, ood)
    return SingleNetwork(averaged, raw, fold_diff, preds, bn_statistics, teacher_cache, calibration)


def average_student(
    student: BatchEnsemble, data: ImageDataset, runtime: Runtime
) -> tuple[torch.nn.Module, float]:
    """The folded single network (eval mode) and the fold's max |Δlogit| against the BE student."""
    averaged = average(student).to(runtime.device)
    probe = probe_batch([data.test], runtime, n=64)  # a streamed split decodes only these
    fold_diff = fold_max_abs_diff(student, averaged, probe)
    return averaged.eval(), fold_diff


def recalibrate_on_train(
    config: CompressConfig, averaged: torch.nn.Module, data: ImageDataset, runtime: Runtime
) -> None:
    """Re-estimate the averaged network's BN statistics on shuffled training batches, in place.

    Shuffled with a fixed seed, so that a bounded number of batches is a random sample of the
    training split (an ImageFolder split is sorted by class), and augmented as in training (crop,
    flip): the weights were learned against statistics of augmented batches, and statistics of
    plain images cost the averaged CIFAR-10 ResNet-32 of ``docs/results.md`` 3 points of
    validation accuracy (86.7 vs 89.9 %).
    """
    gen = torch.Generator().manual_seed(config.seed + 20_000)
    batches = iterate_batches(
        data.train, config.optim.batch_size, gen=gen, shuffle=True, drop_last=True,
        augment_hflip=data.hflip,
    )  # fmt: skip
    seen = 0

    def images():
        nonlocal seen
        for x, _ in batches:
            seen += len(x)
            yield x

    started = time.perf_counter()
    recalibrate_bn(
        averaged, images(), device=runtime.device, max_batches=config.bn_recal_batches,
        channels_last=runtime.device.type == "cpu" or runtime.channels_last,
    )  # fmt: skip
    averaged.eval()
    log.info(
        "BN statistics of the averaged network re-estimated on %d training images in %.1f s",
        seen, time.perf_counter() - started,
    )  # fmt: skip


def keeps_trained_bn(preds: Predictions, val_labels: torch.Tensor) -> bool:
    """Whether the averaged network's BN statistics as trained (``preds.alt_*``) beat the
    re-estimated ones on validation NLL: ensc keeps the better of the two, chosen without test.
    (Re-estimating fixes statistics that describe a mix of members; where there was no mix to
    fix, a 20-batch estimate can be the noisier one.)"""
    assert preds.alt_val is not None
    return nll(preds.alt_val, val_labels) < nll(preds.avg_val, val_labels)


def predict_all(
    config: CompressConfig,
    teacher: Teacher,
    student: BatchEnsemble,
    averaged: torch.nn.Module,
    data: ImageDataset,
    runtime: Runtime,
    raw: torch.nn.Module | None = None,
    ood: Split | None = None,
) -> tuple[Predictions, str]:
    """Every model's probabilities on validation and test (and ``ood``, when given), each from
    one pass per split.

    ``raw`` is the averaged network before BN recalibration, evaluated too when given.

    The teachers' logits come from the cache when an earlier run computed them on the same data;
    the BE student's members and the averaged network run as fast evaluation copies (BatchNorm
    folded into the convolutions, checked against the originals on a probe batch), side by side
    on a CPU (``predict_logits_many``). The second value says whether the teacher cache was used
    (see ``cached_teacher_logits``).
    """
    splits = {"val": data.val, "test": data.test}
    # keyed by the member files: teachers handed over from Python have none
    cached = config.cache_teacher_logits and config.teacher is not None
    cache_dir = cache_dir_for(config.runs_dir) if cached else None
    reference = runtime.for_reference()  # the networks not shipped: autocast where trained so
    t_logits, cache = cached_teacher_logits(teacher, splits, reference, cache_dir)
    probe = probe_batch(splits.values(), runtime)
    assert probe is not None  # the data loader refuses empty splits
    if ood is not None:  # not cached: the OOD images are the user's choice of the day
        t_logits["ood"] = member_logits(teacher, {"ood": ood}, reference)["ood"]
        splits = {**splits, "ood": ood}
    singles = [eval_copy(averaged, runtime, probe)]
    if raw is not None:
        singles.append(eval_copy(raw, runtime, probe))
    a_logits, *rest = predict_logits_many(singles, splits, runtime)  # float32: what ships
    r_logits = rest[0] if raw is not None else None
    s_logits = student_member_logits(student, splits, reference, probe)

    def probs(logits: dict[str, torch.Tensor] | None, split: str) -> torch.Tensor | None:
        return None if logits is None or split not in logits else logits[split].softmax(-1)

    return Predictions(
        teacher_val=t_logits["val"].softmax(-1),
        teacher_test=t_logits["test"].softmax(-1),
        student_val=s_logits["val"].softmax(-1),
        student_test=s_logits["test"].softmax(-1),
        avg_val=a_logits["val"].softmax(-1),
        avg_test=a_logits["test"].softmax(-1),
        alt_val=probs(r_logits, "val"),
        alt_test=probs(r_logits, "test"),
        alt_name="averaged, BN as trained (not kept)",
        teacher_ood=probs(t_logits, "ood"),
        student_ood=probs(s_logits, "ood"),
        avg_ood=probs(a_logits, "ood"),
        alt_ood=probs(r_logits, "ood"),
    ), cache


def student_member_logits(
    student: BatchEnsemble, splits: dict[str, Split], runtime: Runtime, probe: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The BE student's members' logits ``{split: [M, N, K]}``: as plain networks, side by side
    (one BE forward per batch where they do not match it)."""
    nets = eval_member_networks(student, runtime, probe)
    if nets is None:
        return {
            name: predict_member_logits(student, split, runtime) for name, split in splits.items()
        }
    outs = predict_logits_many(nets, splits, runtime)
    return {name: torch.stack([per_net[name] for per_net in outs]) for name in splits}


def predict_again(
    preds: Predictions, averaged: torch.nn.Module, temperature: float, data: ImageDataset,
    runtime: Runtime, ood: Split | None,
) -> Predictions:  # fmt: skip
    """``preds`` with the averaged network's probabilities after ``temperature`` was folded
    into it: on test (and ``ood``) from its current weights, computed as :func:`predict_all`
    computes them, so that those numbers are the shipped file's (``ensc eval`` gives the same);
    on validation, which only the report's validation columns use, as the softmax of the
    earlier log-probabilities over ``temperature`` (equal up to float round-off, one pass less)."""
    splits = {"test": data.test, **({"ood": ood} if ood is not None else {})}
    probe = probe_batch(splits.values(), runtime)
    (logits,) = predict_logits_many([eval_copy(averaged, runtime, probe)], splits, runtime)
    val = (preds.avg_val.clamp_min(EPS).log() / temperature).softmax(-1)
    return replace(
        preds, avg_val=val, avg_test=logits["test"].softmax(-1),
        avg_ood=logits["ood"].softmax(-1) if ood is not None else None,
    )  # fmt: skip


def validation_record(config: DataConfig, dataset: str, teacher: Teacher) -> dict[str, Any]:
    """report["validation"]: where the validation images come from, and a warning when they were
    carved from the training images of a teacher ensc did not train (which may have trained on
    them: it then looks better there than on held-out images, and whatever is chosen or fitted
    on validation favours copying it)."""
    if config.val_root is not None:
        return {"source": "val_root", "path": str(config.val_root), "warning": None}
    if dataset == PYTHON_DATA:
        return {"source": "python", "path": None, "warning": None}
    warning = None
    if teacher.data_record is None:  # not trained by ensc: nothing says which images it saw
        warning = (
            "the validation images are carved from the training images, and the teacher was not "
            "trained by ensc, so it may have trained on them: its validation numbers look better "
            "than on held-out images, and the BN choice and the temperatures fitted there favour "
            "copying it; pass --val-root DIR with held-out images"
        )
    return {"source": "carved from train", "path": None, "warning": warning}
