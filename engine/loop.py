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
from ensc.errors import ConfigError, DivergenceError, plural
from ensc.fileio import atomic_torch_save, torch_load
from ensc.models.checkpoint import non_finite

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and schedule; defaults are the papers' recipe (docs/method.md §7)."""

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
    after_epoch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run the loop; returns a history dict (per-epoch loss/acc, steps, seconds, and the seconds
    of this session's first step, which :func:`steady_seconds_per_step` leaves out).

    ``step`` must run the model through ``runtime.wrap(model)`` so data-parallel runs average
    gradients; every process then trains on its share of each global batch of ``batch_size``.

    ``after_backward`` runs between backward and the optimizer step (e.g. gradient scaling of
    fast weights). ``identity`` is stored with the resumable state and must match on resume.
    ``timer`` collects seconds per phase (the step adds its own phases to the same timer).
    ``after_epoch(epochs_done)`` runs once an epoch's state is saved.

    Raises :class:`DivergenceError` when the loss, or at an epoch's end a parameter or buffer of
    ``model`` (e.g. BatchNorm statistics), is NaN or infinite.
    """
    if len(data) == 0:
        raise ConfigError("the training split is empty")
    optimizer = make_optimizer(param_groups or [{"params": list(model.parameters())}], config)
    loop = _Loop(
        model, step, data, config, runtime, optimizer, hflip=hflip, seed=seed, desc=desc,
        after_backward=after_backward, timer=timer, after_epoch=after_epoch,
    )  # fmt: skip
    identity = {"config": asdict(config), **(identity or {})}
    if state_path is not None and resume and Path(state_path).exists():
        loop.resume(Path(state_path), identity)
    return loop.run(Path(state_path) if state_path is not None else None, identity)


class _Loop:
    """The pieces of one training run (optimizer, schedule, scaler, data order, history) and the
    epochs over them; :func:`train` is its one user."""

    def __init__(
        self, model: nn.Module, step: StepFn, data: Split, config: OptimConfig, runtime: Runtime,
        optimizer: torch.optim.Optimizer, *, hflip: bool, seed: int, desc: str,
        after_backward: Callable[[], None] | None, timer: PhaseTimer,
        after_epoch: Callable[[int], None] | None = None,
    ) -> None:  # fmt: skip
        self.model, self.step, self.data, self.config, self.runtime = (
            model,
            step,
            data,
            config,
            runtime,
        )
        self.optimizer, self.hflip, self.desc, self.timer = optimizer, hflip, desc, timer
        self.after_backward, self.after_epoch = after_backward, after_epoch
        self.total = config.total_steps(len(data))
        self.epochs = config.num_epochs(len(data))
        self.scheduler = warmup_cosine(optimizer, self.total, config.warmup_steps(len(data)))
        self.scaler = runtime.grad_scaler()
        self.gen = torch.Generator().manual_seed(seed)
        self.history: dict[str, Any] = {"epochs": [], "steps": 0, "seconds": 0.0}
        self.start_epoch = 0

    def _parts(self) -> dict[str, Any]:
        return {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler,
                "scaler": self.scaler}  # fmt: skip

    def resume(self, state_path: Path, identity: dict[str, Any]) -> None:
        """Continue from the state saved at the end of the last finished epoch."""
        state = torch_load(state_path)
        if state["identity"] != identity:
            raise ConfigError(
                f"{state_path} was saved by a run with different settings; use --force to start over"
            )
        for name, part in self._parts().items():
            part.load_state_dict(state[name])
        self.gen.set_state(state["generator"])
        history = self.history = state["history"]
        self.start_epoch = state["epoch"]
        history["resumed_steps"], history["resumed_seconds"] = history["steps"], history["seconds"]
        log.info(
            "%s: resuming after epoch %d (%s done)",
            self.desc,
            self.start_epoch,
            plural(history["steps"], "step"),
        )

    def _save(self, state_path: Path, identity: dict[str, Any], epochs_done: int) -> None:
        state = {name: part.state_dict() for name, part in self._parts().items()}
        state.update(identity=identity, epoch=epochs_done, generator=self.gen.get_state(),
                     history=self.history)  # fmt: skip
        atomic_torch_save(state, state_path)

    def run(self, state_path: Path | None, identity: dict[str, Any]) -> dict[str, Any]:
        history = self.history
        self.bar = tqdm(
            total=self.total, initial=history["steps"], desc=self.desc, unit="step",
            dynamic_ncols=True, disable=None if self.runtime.is_main else True,
        )  # fmt: skip
        t0 = time.perf_counter() - history["seconds"]
        self.t_start = self.last_log = time.perf_counter()
        self.start_steps = history["steps"]
        for epoch in range(self.start_epoch, self.epochs):
            if history["steps"] >= self.total:
                break
            loss, acc = self._epoch(epoch)
            self._check_finite(epoch)
            history["seconds"] = time.perf_counter() - t0
            history["epochs"].append({"epoch": epoch + 1, "loss": loss, "acc": acc})
            log.info("%s: epoch %d/%d loss %.4f acc %.2f%% (%.0fs)",
                     self.desc, epoch + 1, self.epochs, loss, acc, history["seconds"])  # fmt: skip
            if state_path is not None and self.runtime.is_main:
                self._save(state_path, identity, epoch + 1)
            self.runtime.barrier()  # others wait until rank 0's state file is complete
            if self.after_epoch is not None:
                self.after_epoch(epoch + 1)
        self.bar.close()
        return history

    def _check_finite(self, epoch: int) -> None:
        """A finite loss can still leave NaN/inf in the weights or BatchNorm statistics: refuse
        to go on (or to save them)."""
        bad = non_finite(self.model.state_dict())
        if bad:
            more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
            raise DivergenceError(
                f"{self.desc}: {bad[0]}{more} became NaN or infinite in epoch {epoch + 1} "
                f"(step {self.history['steps']}); lower --lr"
            )

    def _backward(self, loss: torch.Tensor) -> None:
        with torch.autocast(self.runtime.device.type, enabled=False), self.timer("student"):
            self.scaler.scale(loss).backward()

    def _epoch(self, epoch: int) -> tuple[float, float]:
        """One pass over the shuffled data (or what is left of the step budget): mean loss and
        accuracy (percent) of its steps."""
        runtime, history, timer = self.runtime, self.history, self.timer
        self.model.train()
        loss_sum, correct, count, n_steps = 0.0, 0, 0, 0
        batches = iterate_batches(self.data, self.config.batch_size, gen=self.gen, shuffle=True,
                                  augment_hflip=self.hflip, drop_last=True)  # fmt: skip
        while history["steps"] < self.total:
            with timer("data"):
                batch = next(batches, None)
                if batch is None:
                    break
                images, labels = runtime.shard(*batch)  # data-parallel: this process's share
                images = runtime.to_device(images)
                labels = labels.to(runtime.device, non_blocking=True)
            result = self._optimizer_step(images, labels)
            loss_sum, correct, count, n_steps = (loss_sum + float(result.loss),
                correct + result.correct, count + result.count, n_steps + 1)  # fmt: skip
            self._after_step(epoch, loss_sum / n_steps, 100 * correct / max(1, count))
        return loss_sum / max(1, n_steps), 100 * correct / max(1, count)

    def _optimizer_step(self, images: torch.Tensor, labels: torch.Tensor) -> StepResult:
        self.optimizer.zero_grad(set_to_none=True)
        with self.runtime.autocast():
            result = self.step(images, labels, self._backward)
        with self.timer("optimizer"):
            if self.after_backward is not None:
                self.scaler.unscale_(self.optimizer)
                self.after_backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
        loss_value = float(result.loss)
        if not math.isfinite(loss_value):
            raise DivergenceError(
                f"{self.desc}: loss became {loss_value} at step {self.history['steps']}; lower --lr"
            )
        return result

    def _after_step(self, epoch: int, loss: float, acc: float) -> None:
        """Count the step; bar, progress line every LOG_EVERY_SECONDS, first-step time."""
        history = self.history
        history["steps"] += 1
        now = time.perf_counter()
        if history["steps"] == self.start_steps + 1:  # includes one-off costs (allocator growth)
            history["first_step_seconds"] = now - self.t_start
        if now - self.last_log >= LOG_EVERY_SECONDS:
            self.last_log = now
            _log_progress(self.desc, history["steps"], self.total, self.start_steps,
                          now - self.t_start, self.timer)  # fmt: skip
        self.bar.update(1)
        self.bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.3f}", acc=f"{acc:.1f}",
                             lr=f"{self.scheduler.get_last_lr()[0]:.3g}")  # fmt: skip


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
