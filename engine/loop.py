"""One training loop for teachers and students: SGD-Nesterov, warm-up + cosine, AMP, resumable.

The loop knows nothing about losses: the caller passes a ``step`` function that maps a batch to a
loss (and accuracy counts for the progress bar). Resumable state is saved atomically (by rank 0) at
every epoch end and, inside an epoch, every ``save_every`` optimizer steps (by default about every
:data:`SAVE_EVERY_SECONDS` of training): model, optimizer, schedule, loss scaler, history, the
data-order generator as it was at the epoch's start with the number of batches done and the
epoch's running loss/accuracy sums, the step's own generators (e.g. perturbations) and torch's
global RNG (dropout; CPU, and CUDA when available). A killed run resumes from its last save and
continues as the uninterrupted run would: the same batches, augmentations and random draws
(data-parallel: every process gets rank 0's global RNG state). Restoring that RNG on resume is the
one place library code sets it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from ensc.data.batches import iterate_batches, steps_per_epoch
from ensc.data.splits import Split
from ensc.engine.runtime import Runtime
from ensc.engine.schedule import default_warmup_epochs, scaled_lr, warmup_cosine
from ensc.engine.timing import NO_TIMER, PhaseTimer
from ensc.errors import ConfigError, DivergenceError, plural
from ensc.fileio import atomic_torch_save, torch_load
from ensc.models.checkpoint import non_finite

log = logging.getLogger(__name__)


FLOAT32_MAX = 3.4028234663852886e38  # torch keeps lr and weight decay as float32 in places


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
    ema: float = 0.0  # decay of an exponential moving average of the weights (0: none), kept

    def __post_init__(self) -> None:
        # the CLIs and the API check their ranges first; this is the bound torch itself sets
        # (--lr 1e300 ended in a raw "cannot be converted to type float without overflow")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"--ema must be a decay in [0, 1) (0: off); got {self.ema!r}")
        for name, value in (("lr", self.lr), ("weight_decay", self.weight_decay)):
            if value is not None and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be a finite number ≤ {FLOAT32_MAX:g} "
                    f"(torch keeps it as float32); got {value!r}"
                )

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
    # the loss's parts, when it has two: the KD term and the CE term (weighted as in the loss)
    kd: torch.Tensor | None = None
    ce: torch.Tensor | None = None


BackwardFn = Callable[[torch.Tensor], None]
# step(images, labels, backward): computes its loss, calls backward(loss) on it (or on each part,
# so one part's graph is freed before the next part's forward), and returns a StepResult.
StepFn = Callable[[torch.Tensor, torch.Tensor, BackwardFn], StepResult]
LOG_EVERY_SECONDS = 60.0  # progress lines in the log, also when no terminal shows the bar
SAVE_EVERY_SECONDS = 600.0  # default mid-epoch saves: about every 10 minutes of training


def optim_identity(config: OptimConfig) -> dict[str, Any]:
    """The optimizer settings a resumable state records and must match on resume (``ema`` only
    when on, so that runs without an average keep the identity they had before ``--ema``)."""
    settings = asdict(config)
    if not config.ema:
        del settings["ema"]
    return settings


def moving_average(model: nn.Module, decay: float) -> AveragedModel | None:
    """An exponential moving average of ``model``'s parameters and buffers (BatchNorm statistics
    too, so it needs no re-estimation), updated after every optimizer step; None for decay 0."""
    if not decay:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _val_text(record: dict[str, Any]) -> str:
    """ ", val acc 81.20% nll 0.5812" when the record has a validation, else ""."""
    if "val_acc" not in record:
        return ""
    return f", val acc {record['val_acc']:.2f}% nll {record['val_nll']:.4f}"


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
    save_every: int | None = None,
    generators: Sequence[torch.Generator] = (),
    after_save: Callable[[int], None] | None = None,
    evaluate: Callable[[], dict[str, float]] | None = None,
    eval_every: int | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the loop; returns a history dict (per-epoch loss/acc, steps, seconds, and the seconds
    of this session's first step, which :func:`steady_seconds_per_step` leaves out).

    ``step`` must run the model through ``runtime.wrap(model)`` so data-parallel runs average
    gradients; every process then trains on its share of each global batch of ``batch_size``.

    ``after_backward`` runs between backward and the optimizer step (e.g. gradient scaling of
    fast weights). ``identity`` is stored with the resumable state and must match on resume.
    ``timer`` collects seconds per phase (the step adds its own phases to the same timer).
    ``after_epoch(epochs_done)`` runs once an epoch's state is saved.

    ``save_every``: a mid-epoch state every N optimizer steps (when the step count is a multiple
    of N), 0 for epoch ends only, None for about every :data:`SAVE_EVERY_SECONDS`; it is not part
    of the state's identity. ``generators``: the step's own generators (e.g. perturbations), saved
    and restored with the state. ``after_save(steps)`` runs once a mid-epoch state is saved.

    ``evaluate()`` (on the main process) returns validation metrics, merged into each epoch's
    record and also taken every ``eval_every`` steps (``history["evals"]``); it must leave the
    model as it found it. ``on_record(history)`` runs after each record (e.g. to write curves).
    Each epoch's record (``history["epochs"]``) holds its step count, mean loss with its ``kd``
    and ``ce`` parts, accuracy, learning rate and seconds.

    Raises :class:`DivergenceError` when the loss, or at an epoch's end a parameter or buffer of
    ``model`` (e.g. BatchNorm statistics), is NaN or infinite.
    """
    if len(data) == 0:
        raise ConfigError("the training split is empty")
    if save_every is not None and save_every < 0:
        raise ConfigError(f"--save-every must be 0 or more steps; got {save_every}")
    optimizer = make_optimizer(param_groups or [{"params": list(model.parameters())}], config)
    loop = _Loop(
        model, step, data, config, runtime, optimizer, hflip=hflip, seed=seed, desc=desc,
        after_backward=after_backward, timer=timer, after_epoch=after_epoch,
        save_every=save_every, generators=generators, after_save=after_save,
    )  # fmt: skip
    loop.evaluate, loop.eval_every, loop.on_record = evaluate, eval_every, on_record
    identity = {"config": optim_identity(config), **(identity or {})}
    if state_path is not None and resume and Path(state_path).exists():
        loop.resume(Path(state_path), identity)
    return loop.run(Path(state_path) if state_path is not None else None, identity)


class _Sums(NamedTuple):
    """An epoch's running totals so far (saved with a mid-epoch state, so its mean is exact)."""

    loss: float = 0.0
    correct: int = 0
    count: int = 0
    steps: int = 0
    kd: float = 0.0  # the parts' totals (0 when the step does not report them)
    ce: float = 0.0

    def add(self, result: StepResult) -> _Sums:
        """These totals with one more step's."""
        kd = self.kd + (float(result.kd) if result.kd is not None else 0.0)
        ce = self.ce + (float(result.ce) if result.ce is not None else 0.0)
        return _Sums(self.loss + float(result.loss), self.correct + result.correct,
                     self.count + result.count, self.steps + 1, kd, ce)  # fmt: skip

    def record(self) -> dict[str, float]:
        """The epoch's means: loss, its KD and CE parts, accuracy (percent)."""
        steps = max(1, self.steps)
        return {"loss": self.loss / steps, "kd": self.kd / steps, "ce": self.ce / steps,
                "acc": 100 * self.correct / max(1, self.count)}  # fmt: skip


class _SaveClock:
    """When a mid-epoch save is due: at step counts that are multiples of ``every``, or (``every``
    None) once about :data:`SAVE_EVERY_SECONDS` passed since the last save, as rank 0's clock
    says, so every data-parallel process saves at the same step."""

    def __init__(self, every: int | None, runtime: Runtime) -> None:
        self.every, self.runtime = every, runtime
        self.saved(0)

    def saved(self, steps: int) -> None:
        """A state was saved (or a session started) after ``steps`` steps."""
        self.since_steps, self.since, self.next_check = steps, time.perf_counter(), steps + 1

    def due(self, steps: int) -> bool:
        """Whether to save now, after ``steps`` steps; with time, checked only when the steps
        done so far say the interval may be over (one broadcast per check when data-parallel)."""
        if steps <= self.since_steps:  # nothing new since the last save (or the resumed one)
            return False
        if self.every is not None:
            return self.every > 0 and steps % self.every == 0
        if steps < self.next_check:
            return False
        elapsed = time.perf_counter() - self.since
        per_step = max(elapsed / max(1, steps - self.since_steps), 1e-6)
        wait = max(0, math.ceil((SAVE_EVERY_SECONDS - elapsed) / per_step))
        wait = self.runtime.broadcast(wait)  # rank 0 decides for every process
        self.next_check = steps + wait
        return wait == 0


class _Loop:
    """The pieces of one training run (optimizer, schedule, scaler, data order, history) and the
    epochs over them; :func:`train` is its one user."""

    def __init__(
        self, model: nn.Module, step: StepFn, data: Split, config: OptimConfig, runtime: Runtime,
        optimizer: torch.optim.Optimizer, *, hflip: bool, seed: int, desc: str,
        after_backward: Callable[[], None] | None, timer: PhaseTimer,
        after_epoch: Callable[[int], None] | None = None, save_every: int | None = None,
        generators: Sequence[torch.Generator] = (), after_save: Callable[[int], None] | None = None,
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
        self.epoch_gen = self.gen.get_state()  # the data-order generator at the epoch's start
        self.generators, self.after_save = tuple(generators), after_save
        self.clock = _SaveClock(save_every, runtime)
        self.average = moving_average(model, config.ema)
        self.history: dict[str, Any] = {"epochs": [], "steps": 0, "seconds": 0.0}
        self.start_epoch, self.start_batch, self.start_sums = 0, 0, _Sums()
        self.state_path: Path | None = None
        self.identity: dict[str, Any] = {}
        self.last_save_log = -math.inf
        self.evaluate: Callable[[], dict[str, float]] | None = None
        self.eval_every: int | None = None
        self.on_record: Callable[[dict[str, Any]], None] | None = None

    def _parts(self) -> dict[str, Any]:
        parts = {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler,
                 "scaler": self.scaler}  # fmt: skip
        return parts if self.average is None else {**parts, "average": self.average}

    def resume(self, state_path: Path, identity: dict[str, Any]) -> None:
        """Continue from the last saved state: an epoch's end, or a step inside an epoch."""
        state = torch_load(state_path)
        if state["identity"] != identity:
            raise ConfigError(
                f"{state_path} was saved by a run with different settings; use --force to start over"
            )
        for name, part in self._parts().items():
            part.load_state_dict(state[name])
        self.gen.set_state(state["generator"])
        self._restore_randomness(state, state_path)
        history = self.history = state["history"]
        self.start_epoch, self.start_batch = state["epoch"], state.get("batches", 0)
        self.start_sums = _Sums(*state.get("sums", ()))
        history["resumed_steps"], history["resumed_seconds"] = history["steps"], history["seconds"]
        if self.start_batch:
            log.info("%s: resuming at step %d (epoch %d, after batch %d of %d)", self.desc,
                     history["steps"], self.start_epoch + 1, self.start_batch, self._per_epoch())  # fmt: skip
        else:
            log.info("%s: resuming after epoch %d (%s done)", self.desc, self.start_epoch,
                     plural(history["steps"], "step"))  # fmt: skip

    def _restore_randomness(self, state: dict[str, Any], state_path: Path) -> None:
        """The step's generators and torch's global RNG as they were saved."""
        saved = state.get("generators")
        if saved is None:  # saved before the state held them
            if self.generators:
                log.warning("%s: %s holds no generator states; the step's random draws restart "
                            "from their seed", self.desc, state_path)  # fmt: skip
        elif len(saved) != len(self.generators):
            raise ConfigError(
                f"{state_path} holds {len(saved)} generator states, this run uses "
                f"{len(self.generators)}; use --force to start over"
            )
        for gen, gen_state in zip(self.generators, saved or (), strict=False):
            gen.set_state(gen_state)
        if "rng" in state:
            torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") and torch.cuda.is_available():
            for device, rng in enumerate(state["cuda_rng"][: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(rng, device)

    def _save(self, epoch: int, batches: int, sums: _Sums) -> None:
        """``epoch`` epochs and ``batches`` batches of the next one done (with their ``sums``)."""
        state = {name: part.state_dict() for name, part in self._parts().items()}
        state.update(
            identity=self.identity, epoch=epoch, batches=batches, sums=list(sums),
            generator=self.epoch_gen if batches else self.gen.get_state(),
            generators=[gen.get_state() for gen in self.generators],
            rng=torch.get_rng_state(), history=self.history,
            amp=self.runtime.precision(self.runtime.amp),  # a --resume under auto keeps it
        )  # fmt: skip
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        assert self.state_path is not None
        atomic_torch_save(state, self.state_path)

    def _per_epoch(self) -> int:
        """Batches in a full epoch (for log lines)."""
        return steps_per_epoch(len(self.data), self.config.batch_size)

    def run(self, state_path: Path | None, identity: dict[str, Any]) -> dict[str, Any]:
        history = self.history
        self.state_path, self.identity = state_path, identity
        self.bar = tqdm(
            total=self.total, initial=history["steps"], desc=self.desc, unit="step",
            dynamic_ncols=True, disable=None if self.runtime.is_main else True,
        )  # fmt: skip
        self.t0 = time.perf_counter() - history["seconds"]
        self.t_start = self.last_log = time.perf_counter()
        self.start_steps = history["steps"]
        self.clock.saved(self.start_steps)
        for epoch in range(self.start_epoch, self.epochs):
            if history["steps"] >= self.total:
                break
            sums = self._epoch(epoch)
            self._check_finite(epoch)
            record = {"epoch": epoch + 1, "step": history["steps"], **sums.record(),
                      "lr": self.optimizer.param_groups[0]["lr"]}  # fmt: skip
            record.update(self._validate())
            history["seconds"] = record["seconds"] = time.perf_counter() - self.t0
            history["epochs"].append(record)
            log.info("%s: epoch %d/%d loss %.4f acc %.2f%%%s (%.0fs)", self.desc, epoch + 1,
                     self.epochs, record["loss"], record["acc"], _val_text(record),
                     history["seconds"])  # fmt: skip
            if self.on_record is not None and self.runtime.is_main:
                self.on_record(history)
            if state_path is not None and self.runtime.is_main:
                self._save(epoch + 1, 0, _Sums())
            self.runtime.barrier()  # others wait until rank 0's state file is complete
            self.clock.saved(history["steps"])
            if self.after_epoch is not None:
                self.after_epoch(epoch + 1)
        self.bar.close()
        if self.average is not None:  # the run's result is the average
            self.model.load_state_dict(self.average.module.state_dict())
        return history

    def _save_step(self, epoch: int, batches: int, sums: _Sums) -> None:
        """The mid-epoch state after ``batches`` batches of ``epoch`` (0-based), on every process
        at the same step (rank 0 writes, the others wait)."""
        self._check_finite(epoch)
        history = self.history
        history["seconds"] = time.perf_counter() - self.t0
        if self.runtime.is_main:
            with self.timer("checkpoint"):
                self._save(epoch, batches, sums)
            self._log_save(epoch, batches)
        self.runtime.barrier()
        self.clock.saved(history["steps"])
        if self.after_save is not None:
            self.after_save(history["steps"])

    def _log_save(self, epoch: int, batches: int) -> None:
        """One line per mid-epoch save: info at most once per LOG_EVERY_SECONDS, else debug."""
        now = time.perf_counter()
        level = logging.INFO if now - self.last_save_log >= LOG_EVERY_SECONDS else logging.DEBUG
        if level == logging.INFO:
            self.last_save_log = now
        log.log(level, "%s: state saved at step %d (epoch %d, batch %d of %d)", self.desc,
                self.history["steps"], epoch + 1, batches, self._per_epoch())  # fmt: skip

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

    def _epoch(self, epoch: int) -> _Sums:
        """One pass over the shuffled data (or what is left of the step budget): its totals."""
        runtime, history, timer = self.runtime, self.history, self.timer
        self.model.train()
        sums, start = self.start_sums, self.start_batch  # what a resumed epoch had done
        self.start_sums, self.start_batch = _Sums(), 0
        self.epoch_gen = self.gen.get_state()
        batches = iterate_batches(self.data, self.config.batch_size, gen=self.gen, shuffle=True,
                                  augment_hflip=self.hflip, drop_last=True, start=start)  # fmt: skip
        while history["steps"] < self.total:
            with timer("data"):
                batch = next(batches, None)
                if batch is None:
                    break
                images, labels = runtime.shard(*batch)  # data-parallel: this process's share
                images = runtime.to_device(images)
                labels = labels.to(runtime.device, non_blocking=True)
            if sums.steps and self.state_path is not None and self.clock.due(history["steps"]):
                self._save_step(epoch, sums.steps, sums)  # before a step: never at an end
            result = self._optimizer_step(images, labels)
            sums = sums.add(result)
            self._after_step(epoch, sums.loss / sums.steps, 100 * sums.correct / max(1, sums.count))
            if self._eval_due() and not self._epoch_ends(sums.steps + start):
                self._record_eval(epoch)
        return sums

    def _eval_due(self) -> bool:
        steps = self.history["steps"]
        return bool(self.eval_every) and steps % self.eval_every == 0 and steps < self.total

    def _epoch_ends(self, batches: int) -> bool:
        """Whether ``batches`` batches end the epoch (its record then holds the evaluation)."""
        return batches >= self._per_epoch() or self.history["steps"] >= self.total

    def _validate(self) -> dict[str, float]:
        """The evaluation's metrics (on the main process), its seconds counted apart; the model
        back in training mode."""
        if self.evaluate is None or not self.runtime.is_main:
            return {}
        started = time.perf_counter()
        with self.timer("validate"):
            metrics = dict(self.evaluate())
        self.history["eval_seconds"] = self.history.get("eval_seconds", 0.0) + (
            time.perf_counter() - started
        )
        self.model.train()
        return metrics

    def _record_eval(self, epoch: int) -> None:
        """A validation between epochs (every ``eval_every`` steps) into ``history["evals"]``."""
        metrics = self._validate()
        if not metrics:
            return
        history = self.history
        history.setdefault("evals", []).append({
            "epoch": epoch + 1, "step": history["steps"], "lr": self.optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - self.t0, **metrics,
        })  # fmt: skip
        if self.on_record is not None:
            self.on_record(history)

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
            if self.average is not None:
                self.average.update_parameters(self.model)
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
