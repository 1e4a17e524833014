"""`ensc compress` end to end: DE teacher → BatchEns student → averaged single network → report.

Everything a user needs afterwards goes into one run folder (its layout: :mod:`ensc.rundir`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ensc import faults, rundir
from ensc.compress.average import fast_weight_spread
from ensc.compress.baselines import baseline_section, run_baselines, teacher_warning
from ensc.compress.config import (
    CompressConfig,
    check_config,
    is_single_network,
    with_recorded_data_mode,
)
from ensc.compress.curves import report_section, validator
from ensc.compress.distill import (
    fast_teachers,
    fast_weight_hook,
    make_distill_step,
    param_groups,
)
from ensc.compress.finetune import make_label_step
from ensc.compress.identity import check_same_data, data_sha256, run_identity
from ensc.compress.report import REPORT_UNITS, Predictions, build_report, gaps_closed, parity
from ensc.compress.rerun import check_data, check_teacher
from ensc.compress.robustness import OodScores, corruption_report, ood_report
from ensc.compress.run_report import (
    draw_pictures,
    name_single_rows,
    render_run_report,
    timing_line,
)
from ensc.compress.single import SingleNetwork, single_network, validation_record
from ensc.compress.warmstart import (
    WARM_START_LR,
    init_from_member,
    loss_defaults,
    matching_member,
)
from ensc.data.datasets import load_dataset
from ensc.data.source import check_compatible, data_config_for, ood_split
from ensc.data.splits import DataConfig, ImageDataset, Split
from ensc.engine.curves import rows, write_csv
from ensc.engine.loop import BackwardFn, StepResult, steady_seconds_per_step, train
from ensc.engine.predict import probe_batch
from ensc.engine.runtime import Runtime
from ensc.engine.seeding import seeded
from ensc.engine.tensorboard import TensorBoardLog
from ensc.engine.timing import PhaseTimer, StageClock
from ensc.errors import CheckpointError, CompressParityError, ConfigError, one_line, plural
from ensc.evaluation.metrics import accuracy
from ensc.fileio import atomic_write_text, jsonable
from ensc.models.batchensemble import BatchEnsemble, to_batchensemble
from ensc.models.checkpoint import ModelSpec, save_checkpoint
from ensc.teachers.ensemble import Teacher, load_teacher, sanity_check, user_code

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sources:
    """What the Python API hands over in place of paths (:func:`ensc.compress_ensemble`): teacher
    networks already loaded, data already made, and a student builder; None = from the config."""

    teacher: Teacher | None = None
    data: ImageDataset | None = None
    data_config: DataConfig | None = None  # what ``data`` records itself as
    # instead of spec.build(): the network and the spec that describes it
    build_student: Callable[[ModelSpec], tuple[torch.nn.Module, ModelSpec]] | None = None


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
        run = _set_up(with_recorded_data_mode(config, run_dir), runtime, sources)
        record = _config_record(run, identity)
        if writer is not None or config.expected:  # the images (the API's are in identity)
            record["data_sha256"] = identity.get("data_sha256") or data_sha256(run.data)
            check_data(config.expected, record["data_sha256"])  # --config: the recorded images
            if writer is not None and config.resume:
                check_same_data(writer.path, record["data_sha256"])
        if writer is not None:
            atomic_write_text(writer.path / rundir.CONFIG, json.dumps(record, indent=2) + "\n")
        faults.point("compress.after_config")
        history = _distill(
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
    run: _Run, runtime: Runtime, history: dict[str, Any], identity: dict[str, Any],
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
    report["curves"] = {**report_section(history), "lines": _reference_lines(run, preds, data)}
    _add_run_facts(report, run, averaged, single.fold_diff, history)
    _add_baselines(report, run)
    report["teacher_logits_cache"] = single.teacher_cache
    report["settings"] = _settings(run, runtime)
    report["units"] = dict(REPORT_UNITS)
    ood_scores = _robustness(report, run, single, runtime, clock)
    clock.stop()
    report["timing"] = {"train_seconds": round(history["seconds"], 1), **clock.rounded()}
    if run.baselines:
        report["timing"]["baselines_seconds"] = round(run.baseline_seconds, 1)
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    log.info("after training: %s", timing_line(report["timing"], single.teacher_cache))
    if config.tensorboard is not None:
        _final_hparams(report, config)
    be_spec = replace(run.spec, kind="batchensemble", members=run.members,
                      arch_kwargs={**run.spec.arch_kwargs})  # fmt: skip
    info = {"seed": config.seed, "data": jsonable(asdict(run.data_config)), "source": "ensc compress",
            "teacher": _teacher_label(config, run.teacher),
            "recalibrated_bn": single.bn_statistics == "re-estimated"}  # fmt: skip
    files = _RunFiles(
        spec=run.spec, be_spec=be_spec, info=info, be_info={"seed": config.seed, "init": config.init},
        record=record, identity=identity, preds=preds,
        test_split=data.test, teacher=run.teacher, ood_scores=ood_scores,
    )  # fmt: skip
    md = render_run_report(report, Path(config.out or "compress"))
    return CompressResult(averaged, run.student, report, md, None, files)


def _reference_lines(run: _Run, preds: Predictions, data: ImageDataset) -> dict[str, float]:
    """Validation accuracies a run's curve is read against: the teacher ensemble's and that of
    the member the student started from (when it did)."""
    m = len(run.teacher.members)
    lines = {f"DE-{m} teacher": accuracy(preds.teacher_val.mean(0), data.val.labels)}
    if run.init_member is not None:
        member = preds.teacher_val[run.init_member]
        lines[f"start: member {run.init_member}"] = accuracy(member, data.val.labels)
    return lines


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
    run: _Run, config: CompressConfig, runtime: Runtime, sources: Sources, run_dir: Path | None,
    write: bool,
) -> _Run:  # fmt: skip
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


def _add_baselines(report: dict[str, Any], run: _Run) -> None:
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


def _robustness(
    report: dict[str, Any], run: _Run, single: SingleNetwork, runtime: Runtime, clock: StageClock
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


@dataclass(frozen=True)
class _Run:
    """What a run works on, once set up: teacher, data, student, and the config as resolved."""

    config: CompressConfig  # with the warm-start learning rate filled in
    teacher: Teacher
    data_config: DataConfig
    data: ImageDataset
    members: int  # the student's M (1 for kd-single and finetune)
    student: BatchEnsemble
    spec: ModelSpec  # of one student network
    init_member: int | None  # the teacher member the student starts from
    ood: Split | None = None  # the --ood-data images, shaped as the models take them
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)  # report.json by method
    baseline_seconds: float = 0.0  # what training (or reading) them took
    baselines_written: bool = False  # each in its folder RUN/baselines/<method> (write=True)


def _set_up(config: CompressConfig, runtime: Runtime, sources: Sources) -> _Run:
    """Load teacher and data (or take them from ``sources``) and build the student."""
    teacher = sources.teacher or load_teacher(
        config.teacher, arch=config.teacher_arch, arch_kwargs=config.teacher_arch_kwargs,
        code_path=config.code_path, unsafe_load=config.unsafe_load,
        dataset=config.data_overrides.get("name"),
    )  # fmt: skip
    if sources.data is not None:
        data, data_config = sources.data, sources.data_config or DataConfig(name=sources.data.name)
    else:
        data_config = data_config_for(teacher.spec, teacher.data_record, **config.data_overrides)
        data = load_dataset(data_config)
    data_config = data.config or data_config  # with the mode --data-mode auto chose
    check_compatible(teacher.spec, data)
    members = 1 if is_single_network(config.method) else config.members or len(teacher)
    with user_code(config.code_path, unsafe=config.unsafe_load):  # the student may be user code
        student, spec, init_member = _build_student(
            config, teacher, data, members, runtime, sources.build_student
        )
    config = with_start_defaults(config, init_member is not None)
    teacher.to(runtime.device)
    ood = None
    if runtime.is_main and config.ood_data is not None:  # before training: a wrong path fails now
        ood = ood_split(config.ood_data, data.channels, data.image_size,
                        subset=data_config.test_subset, seed=data_config.seed)  # fmt: skip
        log.info("--ood-data %s: %d images", config.ood_data, len(ood))
    if runtime.is_main:  # validation, not test: test labels stay unseen until the report
        sanity_check(teacher, data.val, runtime)
    return _Run(config, teacher, data_config, data, members, student, spec, init_member, ood)


def _add_run_facts(
    report: dict[str, Any], run: _Run, averaged: torch.nn.Module, fold_diff: float,
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


def _settings(run: _Run, runtime: Runtime) -> dict[str, Any]:
    """report["settings"]: what report.md's header says was run (all of it: config.json)."""
    config, distill = run.config, run.config.distill
    return {
        "command": config.command,
        "teacher": _teacher_label(config, run.teacher),
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
        "amp": str(runtime.amp_dtype).removeprefix("torch.") if runtime.amp else "off",
        "amp_reason": runtime.amp_reason,
        "threads": torch.get_num_threads(),
    }


def with_start_defaults(config: CompressConfig, warm: bool) -> CompressConfig:
    """The settings that depend on the student's start: α and T unless given (loss_defaults), and
    the peak learning rate: a warm-started student fine-tunes at :data:`WARM_START_LR` ×
    batch/128 unless ``--lr`` was given (from scratch: the papers' 0.1 × batch/128)."""
    distill = loss_defaults(config.distill, warm)
    if distill != config.distill:
        log.info("%s start: alpha %g, temperature %g (--alpha/--temperature to change them)",
                 "warm" if warm else "scratch", distill.alpha, distill.temperature)  # fmt: skip
        config = replace(config, distill=distill)
    if not warm or config.optim.lr is not None:
        return config
    lr = WARM_START_LR * config.optim.batch_size / 128
    log.info("warm start: peak learning rate %g (--lr to change it)", lr)
    return replace(config, optim=replace(config.optim, lr=lr))


def _distill(
    config: CompressConfig,
    runtime: Runtime,
    student: BatchEnsemble,
    teacher: Teacher,
    data: ImageDataset,
    run_dir: Path | None,
    identity: dict[str, Any],
) -> dict[str, Any]:
    """Train the BatchEns student on the teachers (resumable from ``run_dir``); the loop's history."""
    gen = torch.Generator().manual_seed(config.seed + 10_000)
    wd = config.optim.weight_decay
    timer = PhaseTimer(synchronize=runtime.device.type == "cuda")  # phase shares in the log
    if config.method == "finetune":  # the labels alone: no teacher runs in the step
        distill_step = make_label_step(runtime.wrap(student), timer=timer)
    else:
        teachers = fast_teachers(teacher.members, runtime, probe_batch([data.val], runtime))
        distill_step = make_distill_step(
            student, teachers, config.distill, gen, net=runtime.wrap(student), timer=timer
        )

    def step(images: torch.Tensor, labels: torch.Tensor, backward: BackwardFn) -> StepResult:
        result = distill_step(images, labels, backward)
        faults.point("compress.step")  # ENSC_FAULT=compress.step:N kills after the N-th step
        return result

    state_path = run_dir / rundir.STATE if run_dir is not None else None  # None: not resumable
    board = _tensorboard(config, runtime)

    def on_record(history: dict[str, Any]) -> None:
        if run_dir is not None:
            write_csv(rows(history), run_dir / rundir.CURVES_CSV)
        if board is not None:
            board.records(history)

    try:
        history = train(
            student, step, data.train, config.optim, runtime,
            param_groups=param_groups(student, config.distill.fast_weights, wd), hflip=data.hflip,
            seed=config.seed, state_path=state_path, resume=config.resume,
            desc="fine-tune" if config.method == "finetune" else f"distill BE-{student.members}",
            after_backward=fast_weight_hook(student, config.distill.fast_weights, wd),
            identity={"teacher": identity["teacher_files"], "arch": config.arch, "members": student.members,
                      "distill": asdict(config.distill), "init": config.init, "n_train": len(data.train)},
            timer=timer, save_every=config.save_every, generators=[gen],  # perturbations resume too
            after_save=lambda steps: faults.point("compress.step_saved"),
            evaluate=validator(student, data, runtime), eval_every=config.eval_every,
            on_record=on_record,
        )  # fmt: skip
        # where this process's steps spent their time (data, perturb, teacher, student, ...)
        return {**history, "phase_seconds": dict(timer.seconds)}
    except CheckpointError as err:  # .state.pt does not load (the folder's check only sees a zip)
        if not (config.resume and str(state_path) in str(err)):
            raise
        raise CheckpointError(
            f"{state_path} is damaged ({one_line(err.__cause__ or err)}), so {run_dir} cannot be "
            "resumed: pass --force to start it over"
        ) from err
    finally:
        if board is not None:
            board.close()


def _tensorboard(config: CompressConfig, runtime: Runtime) -> TensorBoardLog | None:
    """``--tensorboard DIR``'s writer (on the main process), with the run's command as text."""
    if config.tensorboard is None or not runtime.is_main:
        return None
    board = TensorBoardLog(config.tensorboard)
    board.text("command", config.command or "ensc.compress_ensemble (Python)")
    return board


def _final_hparams(report: dict[str, Any], config: CompressConfig) -> None:
    """The settings with the single network's test metrics, as TensorBoard hparams."""
    board = TensorBoardLog(Path(config.tensorboard))  # type: ignore[arg-type]
    avg = report["student_avg"]
    board.hparams(report["settings"], {f"test/{k}": avg[k] for k in ("acc", "nll", "cnll", "ece")})
    board.close()


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


def _build_student(
    config: CompressConfig, teacher: Teacher, data: ImageDataset, members: int, runtime: Runtime,
    build: Callable[[ModelSpec], tuple[torch.nn.Module, ModelSpec]] | None = None,
) -> tuple[BatchEnsemble, ModelSpec, int | None]:  # fmt: skip
    """The student (BatchEns of ``members``), its spec, and the teacher member it starts from;
    ``build(spec)`` makes the network when the student was handed over from Python."""
    spec = ModelSpec.for_data(
        config.arch,
        data,
        class_names=teacher.spec.class_names,
        data_root=teacher.spec.data_root,
        arch_kwargs=config.arch_kwargs,
    )
    with seeded(config.seed):  # weight init (and fast weights' random init) from the run's seed
        net, spec = (spec.build(), spec) if build is None else build(spec)
        k = config.student_init
        if k == "auto":
            k = matching_member(net, teacher)
            if k is not None:
                log.info(
                    "student starts from teacher member %d (%s), which has its architecture; "
                    "--student-init scratch starts from random weights", k, teacher.paths[k].name,
                )  # fmt: skip
        if isinstance(k, int):
            spec = init_from_member(net, spec, teacher, k)
        probe = data.val.take(torch.arange(min(2, len(data.val)))).images.float().div(255)
        # layers the network never calls (their weight used directly) stay shared
        student = to_batchensemble(net, members=members, init=config.init, example=probe)
    if is_single_network(config.method):  # one member, r = s = 1 frozen: the plain network itself
        for p in student.fast_weight_parameters():
            p.requires_grad_(False)
    return runtime.prepare_model(student), spec, k if isinstance(k, int) else None


def _open_run_dir(
    config: CompressConfig, identity: dict[str, Any]
) -> contextlib.AbstractContextManager[rundir.RunWriter]:
    if config.out is not None:
        run_dir = Path(config.out)
    elif config.resume:
        run_dir = rundir.latest_to_resume(config.runs_dir)
    else:
        kind = f"{config.method}-" if is_single_network(config.method) else ""
        run_dir = rundir.default_run_dir(
            config.runs_dir, f"{kind}{config.arch}-{config.distill.perturb.kind}"
        )
    return rundir.open_run(run_dir, identity, force=config.force, resume=config.resume)


def _config_record(run: _Run, identity: dict[str, Any]) -> dict[str, Any]:
    """config.json: every setting as resolved, the data, and the teacher files --resume checks."""
    record = jsonable(asdict(run.config))
    record.update(members=run.members, data=jsonable(asdict(run.data_config)))
    if run.config.teacher is not None:  # where export/bench find it, from any folder
        record["teacher_path"] = str(Path(run.config.teacher).resolve())
    record["teacher_files"] = identity["teacher_files"]
    return record


def _teacher_label(config: CompressConfig, teacher: Teacher) -> str:
    """The teacher as the report names it: its path, or what was handed over from Python."""
    if config.teacher is not None:
        return str(config.teacher)
    return f"{plural(len(teacher), 'network')} from Python ({teacher.arch_summary})"
