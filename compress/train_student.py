"""Training the student of a compress run: the distillation (or fine-tune) step in the engine's loop,
resumable from the run folder, with its curves and TensorBoard record."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ensc import faults, rundir
from ensc.compress.config import (
    CompressConfig,
)
from ensc.compress.curves import validator
from ensc.compress.distill import (
    fast_teachers,
    fast_weight_hook,
    make_distill_step,
    param_groups,
)
from ensc.compress.finetune import make_label_step
from ensc.data.splits import ImageDataset
from ensc.engine.curves import rows, write_csv
from ensc.engine.loop import BackwardFn, StepResult, train
from ensc.engine.predict import probe_batch
from ensc.engine.runtime import Runtime
from ensc.engine.tensorboard import TensorBoardLog
from ensc.engine.timing import PhaseTimer
from ensc.errors import CheckpointError, one_line
from ensc.models.batchensemble import BatchEnsemble
from ensc.teachers.ensemble import Teacher

log = logging.getLogger(__name__)


def train_student(
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
