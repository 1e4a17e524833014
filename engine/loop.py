"""One training loop for teachers and students: SGD-Nesterov, warm-up + cosine, AMP, resumable.

The loop knows nothing about losses: the caller passes a ``step`` function that maps a batch to a
loss (and accuracy counts for the progress bar). State is saved atomically at every epoch end, so
an interrupted run resumes from its last finished epoch with the same data order.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from tqdm import tqdm

from ensc.data.datasets import Split, iterate_batches, steps_per_epoch
from ensc.engine.runtime import Runtime
from ensc.engine.schedule import default_warmup_epochs, scaled_lr, warmup_cosine
from ensc.engine.timing import NO_TIMER, PhaseTimer
from ensc.errors import ConfigError
from ensc.fileio import atomic_torch_save

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and schedule; defaults are the papers' recipe (SPEC.md §4)."""

    epochs: int = 30
    batch_size: int = 128
    lr: float | None = None  # None: 0.1 × batch_size / 128
    momentum: float = 0.9
    nesterov: bool = True  # [WA] uses Nesterov
    weight_decay: float = 5e-4
    warmup_epochs: float | None = None  # None: 5 for runs of ≥ 50 epochs, else 10 % of the run
    max_steps: int | None = None  # stop after this many optimizer steps (smoke runs)
    steps: int | None = None  # a step budget: warm-up + cosine fit these steps; overrides epochs

    @property
    def base_lr(self) -> float:
        return self.lr if self.lr is not None else scaled_lr(self.batch_size)

    def total_steps(self, n_train: int) -> int:
        steps = self.steps or self.epochs * steps_per_epoch(n_train, self.batch_size)
        return min(steps, self.max_steps) if self.max_steps else steps

    def num_epochs(self, n_train: int) -> int:
        """Passes over the data the loop starts: ``epochs``, or what a step budget needs."""
        if not self.steps:
            return self.epochs
        return math.ceil(self.steps / steps_per_epoch(n_train, self.batch_size))

    def warmup_steps(self, n_train: int) -> int:
        """``warmup_epochs`` of steps; by default 5 epochs for runs of ≥ 50, else 10 % of the run
        (a step budget counts as its length in epochs, so its warm-up fits inside it)."""
        per_epoch = steps_per_epoch(n_train, self.batch_size)
        if self.warmup_epochs is not None:
            return round(self.warmup_epochs * per_epoch)
        run_epochs = self.steps / per_epoch if self.steps else self.epochs
        return round(default_warmup_epochs(run_epochs) * per_epoch)


class StepResult(NamedTuple):
    """What a step function returns: the (detached) loss it minimized and top-1 counts for the bar."""

    loss: torch.Tensor
    correct: int
    count: int


BackwardFn = Callable[[torch.Tensor], None]
# step(images, labels, backward): computes its loss, calls backward(loss) on it (or on each part,
# so one part's graph is freed before the next part's forward), and returns a StepResult.
StepFn = Callable[[torch.Tensor, torch.Tensor, BackwardFn], StepResult]
LOG_EVERY_SECONDS = 60.0  # progress lines in the log, also when no terminal shows the bar


def make_optimizer(param_groups: Iterable[dict[str, Any]], config: OptimConfig) -> torch.optim.SGD:
    """SGD with momentum; groups may override ``lr`` (as a multiplier ``lr_scale``) and ``weight_decay``."""
    groups = []
    for group in param_groups:
        group = dict(group)
        group["lr"] = config.base_lr * group.pop("lr_scale", 1.0)
        group.setdefault("weight_decay", config.weight_decay)
        groups.append(group)
    return torch.optim.SGD(
        groups, lr=config.base_lr, momentum=config.momentum, nesterov=config.nesterov
    )


def train(
    model: nn.Module,
    step: StepFn,
    data: Split,
    config: OptimConfig,
    runtime: Runtime,
    *,
    param_groups: list[dict[str, Any]] | None = None,
    hflip: bool = True,
    seed: int = 0,
    state_path: Path | None = None,
    resume: bool = False,
    desc: str = "train",
    after_backward: Callable[[], None] | None = None,
    identity: dict[str, Any] | None = None,
    timer: PhaseTimer = NO_TIMER,
) -> dict[str, Any]:
    """Run the loop; returns a history dict (per-epoch loss/acc, steps, seconds, and the seconds
    of this session's first step, which :func:`steady_seconds_per_step` leaves out).

    ``step`` must run the model through ``runtime.wrap(model)`` so data-parallel runs average
    gradients; every process then trains on its share of each global batch of ``batch_size``.

    ``after_backward`` runs between backward and the optimizer step (e.g. gradient scaling of
    fast weights). ``identity`` is stored with the resumable state and must match on resume.
    ``timer`` collects seconds per phase (the step adds its own phases to the same timer).
    """
    if len(data) == 0:
        raise ConfigError("the training split is empty")
    optimizer = make_optimizer(param_groups or [{"params": list(model.parameters())}], config)
    total = config.total_steps(len(data))
    epochs = config.num_epochs(len(data))
    scheduler = warmup_cosine(optimizer, total, config.warmup_steps(len(data)))
    scaler = runtime.grad_scaler()
    gen = torch.Generator().manual_seed(seed)
    identity = {"config": asdict(config), **(identity or {})}
    history: dict[str, Any] = {"epochs": [], "steps": 0, "seconds": 0.0}

    start_epoch = 0
    if state_path is not None and resume and Path(state_path).exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state["identity"] != identity:
            raise ConfigError(
                f"{state_path} was saved by a run with different settings; use --force to start over"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        gen.set_state(state["generator"])
        history = state["history"]
        start_epoch = state["epoch"]
        history["resumed_steps"], history["resumed_seconds"] = history["steps"], history["seconds"]
        log.info("%s: resuming after epoch %d (%d steps done)", desc, start_epoch, history["steps"])

    bar = tqdm(
        total=total,
        initial=history["steps"],
        desc=desc,
        unit="step",
        dynamic_ncols=True,
        disable=None if runtime.is_main else True,
    )
    t0 = time.perf_counter() - history["seconds"]
    t_start = last_log = time.perf_counter()
    start_steps = history["steps"]

    def backward(loss: torch.Tensor) -> None:
        with torch.autocast(runtime.device.type, enabled=False), timer("student"):
            scaler.scale(loss).backward()

    for epoch in range(start_epoch, epochs):
        if history["steps"] >= total:
            break
        model.train()
        loss_sum, correct, count, n_steps = 0.0, 0, 0, 0
        batches = iterate_batches(
            data, config.batch_size, gen=gen, shuffle=True, augment_hflip=hflip, drop_last=True
        )
        while True:
            with timer("data"):
                batch = next(batches, None)
                if batch is None:
                    break
                images, labels = runtime.shard(*batch)  # data-parallel: this process's share
                images = runtime.to_device(images)
                labels = labels.to(runtime.device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with runtime.autocast():
                result = step(images, labels, backward)
            with timer("optimizer"):
                if after_backward is not None:
                    scaler.unscale_(optimizer)
                    after_backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
            loss_value = float(result.loss)
            if not math.isfinite(loss_value):
                raise FloatingPointError(
                    f"{desc}: loss became {loss_value} at step {history['steps']}; lower --lr"
                )
            loss_sum, correct, count, n_steps = (
                loss_sum + loss_value,
                correct + result.correct,
                count + result.count,
                n_steps + 1,
            )
            history["steps"] += 1
            if history["steps"] == start_steps + 1:  # includes one-off costs (allocator growth)
                history["first_step_seconds"] = time.perf_counter() - t_start
            if time.perf_counter() - last_log >= LOG_EVERY_SECONDS:
                last_log = time.perf_counter()
                _log_progress(desc, history["steps"], total, start_steps, last_log - t_start, timer)
            bar.update(1)
            bar.set_postfix(
                epoch=epoch + 1,
                loss=f"{loss_sum / n_steps:.3f}",
                acc=f"{100 * correct / max(1, count):.1f}",
                lr=f"{scheduler.get_last_lr()[0]:.3g}",
            )
            if history["steps"] >= total:
                break
        history["seconds"] = time.perf_counter() - t0
        history["epochs"].append(
            {
                "epoch": epoch + 1,
                "loss": loss_sum / max(1, n_steps),
                "acc": 100 * correct / max(1, count),
            }
        )
        log.info(
            "%s: epoch %d/%d loss %.4f acc %.2f%% (%.0fs)",
            desc,
            epoch + 1,
            epochs,
            loss_sum / max(1, n_steps),
            100 * correct / max(1, count),
            history["seconds"],
        )
        if state_path is not None and runtime.is_main:
            atomic_torch_save(
                {
                    "identity": identity,
                    "epoch": epoch + 1,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "generator": gen.get_state(),
                    "history": history,
                },
                Path(state_path),
            )
        runtime.barrier()  # others wait until rank 0's state file is complete
    bar.close()
    return history


def _log_progress(
    desc: str, steps: int, total: int, start_steps: int, seconds: float, timer: PhaseTimer
) -> None:
    """A progress line for logs (nohup, CI): the bar alone is invisible without a terminal."""
    rate = (steps - start_steps) / max(seconds, 1e-9)  # steps per second in this session
    eta = (total - steps) / rate if rate > 0 else float("inf")
    phases = timer.shares()
    log.info(
        "%s: step %d/%d, %.2f s/step, ETA %s%s",
        desc,
        steps,
        total,
        1 / rate if rate > 0 else float("inf"),
        _duration(eta),
        f" ({phases})" if phases else "",
    )


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def steady_seconds_per_step(history: dict[str, Any]) -> float | None:
    """Seconds per step after the first one of the last session (None if fewer than 2 steps)."""
    first = history.get("first_step_seconds")
    steps = history["steps"] - history.get("resumed_steps", 0)
    if first is None or steps < 2:
        return None
    return (history["seconds"] - first - history.get("resumed_seconds", 0.0)) / (steps - 1)
