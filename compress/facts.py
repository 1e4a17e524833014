"""What report.json records about a run besides the metrics: the parity gate, gaps closed, sizes,
training time, settings, baselines, and config.json's record."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ensc.compress.average import fast_weight_spread
from ensc.compress.baselines import baseline_section, teacher_warning
from ensc.compress.config import (
    CompressConfig,
    is_single_network,
)
from ensc.compress.report import Predictions, gaps_closed, parity
from ensc.compress.run_report import (
    name_single_rows,
)
from ensc.compress.setup import Run
from ensc.compress.single import validation_record
from ensc.data.splits import ImageDataset
from ensc.engine.loop import steady_seconds_per_step
from ensc.engine.runtime import Runtime
from ensc.engine.tensorboard import TensorBoardLog
from ensc.errors import plural
from ensc.evaluation.metrics import accuracy
from ensc.fileio import jsonable
from ensc.teachers.ensemble import Teacher

log = logging.getLogger(__name__)


def add_run_facts(
    report: dict[str, Any], run: Run, averaged: torch.nn.Module, fold_diff: float,
    history: dict[str, Any],
) -> None:  # fmt: skip
    """The parity gate, gaps closed, fast-weight spread, sizes and training time, into ``report``."""
    config = run.config
    if is_single_network(config.method):  # one network, no members: name the rows for what they are
        name_single_rows(report, config.method)
    report["parity"] = parity(report, config.max_acc_drop, fold_diff, config.fold_tolerance)
    report["init_member"] = run.init_member
    report["gap_closed"] = gaps_closed(report, run.init_member)
    report["fast_weights"] = fast_weight_spread(run.student)
    report["params"] = {
        "teacher": sum(p.numel() for m in run.teacher.members for p in m.parameters()),
        "student_be": sum(p.numel() for p in run.student.parameters()),
        "student_avg": sum(p.numel() for p in averaged.parameters()),
    }
    steady = steady_seconds_per_step(history)  # leaves the first step's one-off costs out
    phases = {name: round(s, 2) for name, s in history.get("phase_seconds", {}).items()}
    report["train"] = {"steps": history["steps"], "seconds": round(history["seconds"], 1),
                       "s_per_step": None if steady is None else round(steady, 3),
                       "phase_seconds": phases}  # fmt: skip
    report["dataset"] = run.data.name
    report["n_train"] = len(run.data.train)
    report["validation"] = validation_record(run.data_config, run.data.name, run.teacher)
    report["method"] = config.method


def settings(run: Run, runtime: Runtime) -> dict[str, Any]:
    """report["settings"]: what report.md's header says was run (all of it: config.json)."""
    config, distill = run.config, run.config.distill
    return {
        "command": config.command,
        "teacher": teacher_label(config, run.teacher),
        "teacher_arch": run.teacher.arch_summary,
        "student_arch": config.arch,
        "members": run.members,
        "init": config.init,
        "perturbation": distill.perturb.kind,
        "perturbation_step": distill.perturb.step,
        "mix": distill.mix,
        "alpha": distill.alpha,
        "temperature": distill.temperature,
        "ema": config.optim.ema,
        "device": str(runtime.device),
        "amp": runtime.precision(runtime.amp),
        "amp_reason": runtime.amp_reason,
        "eval_amp": runtime.precision(runtime.eval_amp),
        "reference_amp": runtime.precision(runtime.for_reference().eval_amp),
        "threads": torch.get_num_threads(),
    }


def reference_lines(run: Run, preds: Predictions, data: ImageDataset) -> dict[str, float]:
    """Validation accuracies a run's curve is read against: the teacher ensemble's and that of
    the member the student started from (when it did)."""
    m = len(run.teacher.members)
    lines = {f"DE-{m} teacher": accuracy(preds.teacher_val.mean(0), data.val.labels)}
    if run.init_member is not None:
        member = preds.teacher_val[run.init_member]
        lines[f"start: member {run.init_member}"] = accuracy(member, data.val.labels)
    return lines


def add_baselines(report: dict[str, Any], run: Run) -> None:
    """report["baselines"] (rows and verdict, or a note that none ran) and the teacher warning."""
    method = run.config.method
    report["baselines"] = baseline_section(
        report, method, run.baselines, run.baselines_written, run.config.baseline_of
    )
    report["teacher_warning"] = teacher_warning(report, method)
    if report["baselines"]["methods"]:
        log.info("verdict: %s", report["baselines"]["note"])
    if report["teacher_warning"]:
        log.warning("%s", report["teacher_warning"])


def final_hparams(report: dict[str, Any], config: CompressConfig) -> None:
    """The settings with the single network's test metrics, as TensorBoard hparams."""
    board = TensorBoardLog(Path(config.tensorboard))  # type: ignore[arg-type]
    avg = report["student_avg"]
    board.hparams(report["settings"], {f"test/{k}": avg[k] for k in ("acc", "nll", "cnll", "ece")})
    board.close()


def config_record(run: Run, identity: dict[str, Any]) -> dict[str, Any]:
    """config.json: every setting as resolved, the data, and the teacher files --resume checks."""
    record = jsonable(asdict(run.config))
    record.update(members=run.members, data=jsonable(asdict(run.data_config)))
    if run.config.teacher is not None:  # where export/bench find it, from any folder
        record["teacher_path"] = str(Path(run.config.teacher).resolve())
    record["teacher_files"] = identity["teacher_files"]
    return record


def teacher_label(config: CompressConfig, teacher: Teacher) -> str:
    """The teacher as the report names it: its path, or what was handed over from Python."""
    if config.teacher is not None:
        return str(config.teacher)
    return f"{plural(len(teacher), 'network')} from Python ({teacher.arch_summary})"
