"""`ensc compress` end to end: DE teacher → BatchEns student → averaged single network → report.

Everything a user needs afterwards goes into one run folder (its layout: :mod:`ensc.rundir`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ensc import faults, rundir
from ensc.compress.baselines import run_baselines
from ensc.compress.config import (
    CompressConfig,
    check_config,
    is_single_network,
    with_recorded_amp,
    with_recorded_data_mode,
)
from ensc.compress.curves import report_section
from ensc.compress.facts import (
    add_baselines,
    add_run_facts,
    config_record,
    final_hparams,
    reference_lines,
    settings,
    teacher_label,
)
from ensc.compress.identity import check_same_data, data_sha256, run_identity
from ensc.compress.report import REPORT_UNITS, Predictions, build_report
from ensc.compress.rerun import check_data, check_teacher
from ensc.compress.robustness import OodScores, corruption_report, ood_report
from ensc.compress.run_report import (
    draw_pictures,
    render_run_report,
    timing_line,
)
from ensc.compress.setup import Run, Sources, set_up
from ensc.compress.single import SingleNetwork, single_network
from ensc.compress.train_student import train_student
from ensc.data.splits import Split
from ensc.engine.curves import write_csv
from ensc.engine.runtime import Runtime
from ensc.engine.timing import StageClock
from ensc.errors import CompressParityError, ConfigError
from ensc.fileio import atomic_write_text, jsonable
from ensc.models.batchensemble import BatchEnsemble
from ensc.models.checkpoint import ModelSpec, save_checkpoint
from ensc.teachers.ensemble import Teacher

log = logging.getLogger(__name__)


@dataclass
class CompressResult:
    """A finished compression: the averaged network, the BE student, the report (report.json's
    dict), and what :meth:`save` needs to write the run folder `ensc compress` writes."""

    network: torch.nn.Module  # the averaged single network (student.pt), eval mode
    student: BatchEnsemble  # the BatchEns student as trained (student_be.pt)
    report: dict[str, Any]
    report_md: str
    run_dir: Path | None  # where it was written; None until saved
    _files: _RunFiles

    def save(self, path: Path | str, *, force: bool = False) -> Path:
        """Write the run folder `ensc compress` writes (student.pt, student_be.pt, report.json,
        report.md, config.json, pictures) into ``path``; an existing run needs ``force``."""
        files = self._files
        with rundir.open_run(Path(path), files.identity, force=force, resume=False) as writer:
            atomic_write_text(
                writer.path / rundir.CONFIG, json.dumps(files.record, indent=2) + "\n"
            )
            self.report_md = _write_results(self, writer.path)
            writer.commit(None)
        self.run_dir = writer.path
        return writer.path

    def check(self) -> None:
        """Raise CompressParityError when the parity gate failed (the averaged network lost the
        BE student's accuracy, or the fold is not exact)."""
        _enforce_gate(self.report["parity"], self.run_dir)


@dataclass(frozen=True)
class _RunFiles:
    """What a run folder holds besides the networks and the report."""

    spec: ModelSpec  # of one student network
    be_spec: ModelSpec
    info: dict[str, Any]  # provenance written into student.pt
    be_info: dict[str, Any]
    record: dict[str, Any]  # config.json
    identity: dict[str, Any]  # the run's identity (rundir marker)
    preds: Predictions  # for the pictures
    test_split: Split  # the report's test images (pictures, export checks)
    teacher: Teacher  # (ensc.benchmark of a result)
    ood_scores: OodScores | None


def run_compress(
    config: CompressConfig,
    runtime: Runtime,
    sources: Sources | None = None,
    *,
    write: bool = True,
    latest: bool = True,
) -> CompressResult | None:
    """Distill, average and evaluate; with ``write``, into the run folder ``config`` names, which
    stays unfinished (and locked) until every file is written, then is committed
    (:mod:`ensc.rundir`). The parity gate is the caller's: :meth:`CompressResult.check`.

    Without ``write`` nothing touches the disk (no resumable state either): the result holds
    everything, and :meth:`CompressResult.save` writes the same folder. Returns None on the
    non-main processes of a data-parallel run. ``latest``: point ``runs/latest`` at the finished
    run (not for the ``--baselines`` runs inside it). The baselines train after the run's own
    training, before its evaluation (:mod:`ensc.compress.baselines`).
    """
    started = time.perf_counter()
    check_config(config)
    if not write:  # nothing on disk, the teacher-logits cache included
        if config.resume:
            raise ConfigError("resume needs the run folder to resume: pass out= (--out)")
        config = replace(config, cache_teacher_logits=False)
    sources = sources or Sources()
    identity = run_identity(config, sources.teacher, sources.data)
    check_teacher(config.expected, identity["teacher_files"])  # --config: the recorded teacher
    with contextlib.ExitStack() as stack:
        writer = None
        if write and runtime.is_main:
            writer = stack.enter_context(_open_run_dir(config, identity))
        run_dir = runtime.broadcast(writer.path if writer is not None else None) if write else None
        stack.enter_context(rundir.run_log(writer.path if writer is not None else None))
        runtime = with_recorded_amp(runtime, config, run_dir)  # resumed: the run's precision
        run = set_up(with_recorded_data_mode(config, run_dir), runtime, sources)
        record = {**config_record(run, identity), "amp": runtime.precision(runtime.amp)}
        if writer is not None or config.expected:  # the images (the API's are in identity)
            record["data_sha256"] = identity.get("data_sha256") or data_sha256(run.data)
            check_data(config.expected, record["data_sha256"])  # --config: the recorded images
            if writer is not None and config.resume:
                check_same_data(writer.path, record["data_sha256"])
        if writer is not None:
            atomic_write_text(writer.path / rundir.CONFIG, json.dumps(record, indent=2) + "\n")
        faults.point("compress.after_config")
        history = train_student(
            run.config, runtime, run.student, run.teacher, run.data, run_dir, identity
        )
        run.student.eval()
        run = _with_baselines(run, config, runtime, sources, run_dir, write)
        if not runtime.is_main:  # rank 0 evaluates, reports and writes the run folder
            return None
        result = _evaluate(run, runtime, history, identity, record, started)
        if writer is not None:
            result.report_md = _write_results(result, writer.path)
            faults.point("compress.before_commit")
            # finished: the marker goes, runs/latest points here (not at a run that failed its
            # parity gate: plain `ensc export` / `ensc bench` would ship it without a word)
            passed = result.report["parity"]["passed"]
            writer.commit(config.runs_dir if latest and passed else None)
            result.run_dir = writer.path
        return result


def _evaluate(
    run: Run, runtime: Runtime, history: dict[str, Any], identity: dict[str, Any],
    record: dict[str, Any], started: float,
) -> CompressResult:  # fmt: skip
    """Average the trained student, evaluate every model and build the report."""
    config, data = run.config, run.data
    clock = StageClock()
    single = single_network(config, run.teacher, run.student, data, runtime, clock, run.ood)
    averaged, preds = single.averaged, single.preds
    clock.start("report_seconds")
    report = build_report(preds, data.val.labels, data.test.labels)
    report["bn_statistics"] = single.bn_statistics  # of the kept network (student.pt)
    report["calibration"] = single.calibration  # the temperature folded into it, or None
    report["curves"] = {**report_section(history), "lines": reference_lines(run, preds, data)}
    add_run_facts(report, run, averaged, single.fold_diff, history)
    add_baselines(report, run)
    report["teacher_logits_cache"] = single.teacher_cache
    report["settings"] = settings(run, runtime)
    report["units"] = dict(REPORT_UNITS)
    ood_scores = _robustness(report, run, single, runtime, clock)
    clock.stop()
    report["timing"] = {"train_seconds": round(history["seconds"], 1), **clock.rounded()}
    if run.baselines:
        report["timing"]["baselines_seconds"] = round(run.baseline_seconds, 1)
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    log.info("after training: %s", timing_line(report["timing"], single.teacher_cache))
    if config.tensorboard is not None:
        final_hparams(report, config)
    be_spec = replace(run.spec, kind="batchensemble", members=run.members,
                      arch_kwargs={**run.spec.arch_kwargs})  # fmt: skip
    info = {"seed": config.seed, "data": jsonable(asdict(run.data_config)), "source": "ensc compress",
            "teacher": teacher_label(config, run.teacher),
            "recalibrated_bn": single.bn_statistics == "re-estimated"}  # fmt: skip
    files = _RunFiles(
        spec=run.spec, be_spec=be_spec, info=info, be_info={"seed": config.seed, "init": config.init},
        record=record, identity=identity, preds=preds,
        test_split=data.test, teacher=run.teacher, ood_scores=ood_scores,
    )  # fmt: skip
    md = render_run_report(report, Path(config.out or "compress"))
    return CompressResult(averaged, run.student, report, md, None, files)


def _write_results(result: CompressResult, run_dir: Path) -> str:
    """The networks, the pictures, report.json and report.md into ``run_dir``; returns report.md."""
    files, report = result._files, result.report
    save_checkpoint(run_dir / rundir.STUDENT_BE, result.student, files.be_spec, info=files.be_info)
    metrics = {k: report["student_avg"][k] for k in ("acc", "nll", "bs", "ece")}
    save_checkpoint(run_dir / rundir.STUDENT, result.network, files.spec, metrics=metrics,
                    info=files.info)  # fmt: skip
    write_csv(report["curves"]["rows"], run_dir / rundir.CURVES_CSV)  # also when none was written
    md = render_run_report(report, run_dir)
    faults.point("compress.before_report")
    md += draw_pictures(run_dir, files.preds, files.test_split.labels, report, files.ood_scores)
    atomic_write_text(run_dir / rundir.REPORT_JSON, json.dumps(report, indent=2) + "\n")
    atomic_write_text(run_dir / rundir.REPORT_MD, md)
    return md


def _with_baselines(
    run: Run, config: CompressConfig, runtime: Runtime, sources: Sources, run_dir: Path | None,
    write: bool,
) -> Run:  # fmt: skip
    """``--baselines``: each trained (or reused) as a run of its own inside ``run_dir``."""
    if not config.baselines:
        return run
    started = time.perf_counter()

    def train_one(sub: CompressConfig) -> dict[str, Any] | None:
        result = run_compress(sub, runtime, sources, write=write, latest=False)
        return None if result is None else result.report

    reports = run_baselines(config, run_dir, train_one, run.data_config.mode, runtime.broadcast)
    seconds = time.perf_counter() - started
    return replace(run, baselines=reports, baseline_seconds=seconds, baselines_written=write)


def _robustness(
    report: dict[str, Any], run: Run, single: SingleNetwork, runtime: Runtime, clock: StageClock
) -> dict[str, Any] | None:
    """``--ood-data`` and ``--corruptions`` into ``report``; returns the OOD scores (pictures)."""
    config, ood_scores = run.config, None
    if run.ood is not None:
        report["ood"], ood_scores = ood_report(report, single.preds, data=str(config.ood_data))
    if config.corruptions:
        with clock("corruptions_seconds"):
            report["corruptions"] = corruption_report(
                report, run.data, runtime, teacher=run.teacher, student=run.student,
                averaged=single.averaged, other=single.other, subset=config.corruption_subset,
            )  # fmt: skip
        clock.start("report_seconds")
    return ood_scores


def _enforce_gate(gate: dict[str, Any], run_dir: Path | None) -> None:
    """Raise CompressParityError (after the report is written) when the parity gate failed."""
    if gate["passed"]:
        return
    reason = (
        f"the averaged network is {gate['acc_drop_vs_student_be']:.2f} points below the BE student "
        f"(allowed {gate['max_acc_drop']})" if not gate["acc_gate_passed"]
        else f"the fold is not exact (max |Δlogit| {gate['fold_max_abs_diff']:.2e})"
    )  # fmt: skip
    where = f"; see {run_dir / rundir.REPORT_MD}" if run_dir is not None else ""
    raise CompressParityError(f"parity gate failed: {reason}{where}")


def _open_run_dir(
    config: CompressConfig, identity: dict[str, Any]
) -> contextlib.AbstractContextManager[rundir.RunWriter]:
    if config.out is not None:
        run_dir = Path(config.out)
    elif config.resume:
        run_dir = rundir.latest_to_resume(config.runs_dir)
    else:
        kind = f"{config.method}-" if is_single_network(config.method) else ""
        perturb = config.distill.perturb.kind  # "auto" is set later, by the student's start
        name = f"{kind}{config.arch}" + ("" if perturb == "auto" else f"-{perturb}")
        run_dir = rundir.default_run_dir(config.runs_dir, name)
    return rundir.open_run(run_dir, identity, force=config.force, resume=config.resume)
