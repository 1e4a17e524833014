"""One distillation step of a BatchEns student from a DeepEns teacher, and its optimizer groups.

Per step ([DM] §3, [WA] §3; docs/method.md §4, §5): mix pairs of images (--mix, none by
default) and perturb the batch into x̃ (using the frozen teachers, and the student in eval mode
for TDiv-SDiv), get the teachers' logits on x̃, run the student on x̃ and backpropagate the KD
term, then (when α < 1 and x̃ ≠ x) on x for the CE term.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ensc.compress.losses import DistillationLoss
from ensc.compress.mix import check_mix, mix_batch
from ensc.compress.names import FAST_WEIGHT_REGIMES, MEMBER_BATCH_MODES, TARGET_MODES
from ensc.compress.perturb import MemberLogits, PerturbConfig, perturb
from ensc.engine.loop import BackwardFn, StepFn, StepResult
from ensc.engine.runtime import Runtime
from ensc.engine.timing import NO_TIMER, PhaseTimer
from ensc.errors import ConfigError
from ensc.models.batchensemble import BE_LAYERS, BatchEnsemble
from ensc.models.modes import eval_mode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillConfig:
    """Loss, perturbation and fast-weight treatment.

    Defaults: [WA]'s student (``ones`` init, fast weights decayed towards 1, gradients × M);
    every member distills the ensemble's mean prediction, on its own 1/M of the batch (chosen on
    the validation split of the CIFAR-10 study, docs/results.md). ``alpha``/``temperature`` None
    (what `ensc compress` passes unless told): set by the student's start before training,
    :func:`ensc.compress.warmstart.loss_defaults`; the dataclass's own defaults are [DM]'s 0.9, 1.
    `ensc compress` also defaults the perturbation to tdiv-sdiv for the BatchEnsemble
    (names.DEFAULT_PERTURB); this dataclass keeps ``none``, the one every method can run.
    """

    alpha: float | None = 0.9  # weight of the KD term ([WA] 1.0; [DM] 0.9)
    temperature: float | None = 1.0  # KD temperature ([WA] 4; [DM] 1)
    perturb: PerturbConfig = field(default_factory=PerturbConfig)  # kind "none"
    # "wa" ([WA]): decay r, s towards 1 with λ/M and scale their gradients by M; "dm" ([DM]): no
    # decay and half the learning rate for r, s and member biases (docs/method.md §6)
    fast_weights: str = "wa"
    member_batch: str = "split"  # one of MEMBER_BATCH_MODES
    targets: str = "mean"  # one of TARGET_MODES: teacher m for member m, or the ensemble mean
    mix: str = "none"  # one of MIXES: pairs of images mixed before the perturbation (mix.py)

    def __post_init__(self) -> None:
        check_mix(self.mix)
        if self.member_batch not in MEMBER_BATCH_MODES:
            raise ValueError(
                f"unknown member batch mode {self.member_batch!r}: choose one of "
                f"{', '.join(MEMBER_BATCH_MODES)}"
            )
        if self.targets not in TARGET_MODES:
            raise ValueError(
                f"unknown target mode {self.targets!r}: choose one of {', '.join(TARGET_MODES)}"
            )


def fast_teachers(
    teachers: list[nn.Module], runtime: Runtime, probe: torch.Tensor
) -> list[nn.Module]:
    """The frozen teachers with BatchNorm folded into their convs, channels_last on CPUs.

    Same logits (checked on ``probe`` by :func:`ensc.engine.predict.eval_copy`, which keeps a
    member as it is when it cannot fold it), about a fifth less time for the targets and the
    perturbation gradients (``docs/eval-overhead.md``); input gradients still flow.
    """
    from ensc.engine.predict import eval_copy

    return [eval_copy(t, runtime, probe) for t in teachers]


def student_eval_logits_fn(student: BatchEnsemble) -> StudentMemberLogits:
    """x [B, ...] -> student member logits [Ms, B, K] with running BN statistics (for TDiv-SDiv)."""
    return StudentMemberLogits(student)


class StudentMemberLogits:
    """The BatchEns student in eval mode as a LogitsFn that can also run only some members.

    ``fn(x)`` gives every member's logits [Ms, B, K]; ``fn(x, members=[i, j])`` only theirs
    [2, B, K], from the rows i, j of each BE layer's fast weights, so TDiv-SDiv pays for two
    members' passes instead of M. The student runs with detached parameters
    (``torch.func.functional_call``), so gradients reach x only and autograd keeps none of what
    parameter gradients would need.
    """

    def __init__(self, student: BatchEnsemble) -> None:
        self.student = student
        self.layers = [
            (name, module) for name, module in student.named_modules()
            if isinstance(module, BE_LAYERS)
        ]  # fmt: skip

    def __len__(self) -> int:
        return self.student.members

    def __call__(self, x: torch.Tensor, members: list[int] | None = None) -> torch.Tensor:
        student = self.student
        chosen = list(range(student.members)) if members is None else list(members)
        state = {n: t.detach() for n, t in student.state_dict(keep_vars=True).items()}
        if members is not None:
            index = torch.tensor(chosen, device=x.device)
            for name, module in self.layers:
                for fast in ("r", "s", "member_bias"):
                    if getattr(module, fast, None) is not None:
                        key = f"{name}.{fast}"
                        state[key] = state[key].index_select(0, index)
        tiled = x.repeat(len(chosen), *([1] * (x.dim() - 1)))  # [len(chosen)*B, ...]
        with eval_mode(student), _member_count(student, self.layers, len(chosen)):
            out = torch.func.functional_call(student, state, (tiled,))
        return out.unflatten(0, (len(chosen), -1)).float()  # [len(chosen), B, K]


@contextlib.contextmanager
def _member_count(
    student: BatchEnsemble, layers: list[tuple[str, nn.Module]], count: int
) -> Iterator[None]:
    """The student and its BE layers chunk their batches into ``count`` members meanwhile."""
    modules = [student, *(module for _, module in layers)]
    saved = [module.members for module in modules]
    try:
        for module in modules:
            module.members = count
        yield
    finally:
        for module, members in zip(modules, saved, strict=True):
            module.members = members


def make_distill_step(
    student: BatchEnsemble,
    teachers: list[nn.Module],
    config: DistillConfig,
    gen: torch.Generator,
    net: nn.Module | None = None,
    timer: PhaseTimer = NO_TIMER,
) -> StepFn:
    """The ``step`` function for :func:`ensc.engine.loop.train`.

    ``net`` is the student as trained (``runtime.wrap(student)``: DistributedDataParallel under
    torchrun); the perturbation's eval-mode pass uses ``student`` itself, since it needs no
    parameter gradients.

    With α < 1 and a perturbation the student runs twice, on x̃ for the KD term and on x for the
    CE term, and each pass is backpropagated before the next one starts: the gradient is that of
    the sum, and only one pass's activations are held at a time (half the memory of one pass on
    both). BatchNorm sees the two batches separately, as in the papers' code.
    """
    return _DistillStep(student, teachers, config, gen, net if net is not None else student, timer)


class _DistillStep:
    """The step :func:`make_distill_step` returns: perturb, ask the teacher, run the student."""

    def __init__(
        self, student: BatchEnsemble, teachers: list[nn.Module], config: DistillConfig,
        gen: torch.Generator, net: nn.Module, timer: PhaseTimer,
    ) -> None:  # fmt: skip
        self.student, self.config, self.gen, self.net, self.timer = student, config, gen, net, timer
        self.m = student.members
        self.loss_fn = DistillationLoss(alpha=config.alpha, temperature=config.temperature)
        self.teacher = MemberLogits(teachers)  # x [B, ...] -> [Mt, B, K]; gradients flow to x only
        self.student_eval = student_eval_logits_fn(student)
        # the CE term runs on the clean batch when the KD term's input differs from it
        self.need_clean = config.alpha < 1 and (config.perturb.kind, config.mix) != ("none", "none")
        self.split = config.member_batch == "split"
        self.member_wise = config.targets == "member" and len(self.teacher) == self.m  # else: mean
        self.warned = False  # about cutting batches to a multiple of M, once

    def member_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """What the student's M members see: chunk m of x (split) or all of x, tiled (repeat)."""
        return x if self.split else x.repeat(self.m, *([1] * (x.dim() - 1)))  # [M*B', ...]

    def targets_for(self, x_tilde: torch.Tensor) -> torch.Tensor:
        """Teacher logits [Mt or 1, B', K] for the student's [Ms, B', K] (B' = B/M when split)."""
        m, teacher = self.m, self.teacher
        with torch.no_grad():
            if not self.member_wise:  # one target for every member: the ensemble's mean prediction
                mean = mean_prediction_logits(teacher(x_tilde), self.config.temperature)  # [B, K]
                return mean.unflatten(0, (m, -1)) if self.split else mean.unsqueeze(0)
            if not self.split:
                return teacher(x_tilde)  # [Mt, B, K]
            chunks = x_tilde.unflatten(0, (m, -1))  # teacher k only on student member k's chunk
            return torch.cat([teacher(chunks[k], members=[k]) for k in range(m)])

    def student_logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(self.member_inputs(x))  # [Ms*B', K]
        return logits.view(self.m, -1, logits.shape[-1])  # [Ms, B', K]

    def _equal_chunks(
        self, x: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Split mode needs equal chunks: leave the last B mod M images out (warn once)."""
        if not self.split or x.shape[0] % self.m == 0:
            return x, labels
        if not self.warned:
            log.warning(
                "--member-batch split: batches of %d images are cut to %d, a multiple of "
                "M=%d (a --batch-size that M divides uses every image)",
                x.shape[0], x.shape[0] - x.shape[0] % self.m, self.m,
            )  # fmt: skip
            self.warned = True
        return _whole_chunks(x, labels, self.m)

    def __call__(self, x: torch.Tensor, labels: torch.Tensor, backward: BackwardFn) -> StepResult:
        config, timer = self.config, self.timer
        x, labels = self._equal_chunks(x, labels)
        member_labels = labels.view(self.m, -1) if self.split else labels  # [Ms, B/M] or [B]
        with timer("perturb"):
            mixed = mix_batch(x, config.mix, self.gen)
            x_tilde = perturb(
                mixed, config.perturb, teacher=self.teacher, student=self.student_eval, gen=self.gen
            )
        with timer("teacher"):
            targets = self.targets_for(x_tilde)
        if self.need_clean:
            return self._two_passes(x, x_tilde, targets, member_labels, backward)
        with timer("student"):  # one pass: KD and CE on the same logits
            logits = self.student_logits(x_tilde)
            alpha, zero = self.config.alpha, logits.new_zeros(())
            kd = alpha * self.loss_fn.kd(logits, targets) if alpha > 0 else zero
            ce = (1 - alpha) * self.loss_fn.ce(logits, member_labels) if alpha < 1 else zero
            loss = kd + ce
        backward(loss)
        correct = _correct(logits, member_labels, self.split)
        return StepResult(loss.detach(), correct, x.shape[0], kd.detach(), ce.detach())

    def _two_passes(
        self, x: torch.Tensor, x_tilde: torch.Tensor, targets: torch.Tensor,
        member_labels: torch.Tensor, backward: BackwardFn,
    ) -> StepResult:  # fmt: skip
        """KD on x̃, then CE on x, each backpropagated before the next pass starts."""
        alpha, timer = self.config.alpha, self.timer
        first_pass = getattr(self.net, "no_sync", contextlib.nullcontext)  # DDP: reduce at the end
        with first_pass():
            with timer("student"):
                kd = alpha * self.loss_fn.kd(self.student_logits(x_tilde), targets)
            backward(kd)
        with timer("student"):
            on_clean = self.student_logits(x)
            ce = (1 - alpha) * self.loss_fn.ce(on_clean, member_labels)
        backward(ce)
        correct = _correct(on_clean, member_labels, self.split)
        return StepResult(kd.detach() + ce.detach(), correct, x.shape[0], kd.detach(), ce.detach())


def mean_prediction_logits(teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits [B, K] whose softmax at ``temperature`` is the mean of the teachers' [Mt, B, K]
    softmaxes at that temperature: T · log mean_t softmax(z_t / T)."""
    log_probs = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return temperature * (log_probs.logsumexp(0) - math.log(len(teacher_logits)))


def _whole_chunks(
    x: torch.Tensor, labels: torch.Tensor, m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first M·⌊B/M⌋ images and labels, so that each of the M members gets as many."""
    keep = x.shape[0] - x.shape[0] % m
    if keep == 0:
        raise ConfigError(
            f"--member-batch split gives each of the M={m} members its own share of the batch, "
            f"but a batch has {x.shape[0]} images; use a larger --batch-size or --member-batch repeat"
        )
    return x[:keep], labels[:keep]


def _correct(logits: torch.Tensor, labels: torch.Tensor, split: bool) -> int:
    """Top-1 hits for the progress bar: each member on its chunk (split), or the BE mean (repeat)."""
    logits = logits.detach().float()
    if split:
        return int((logits.argmax(-1) == labels).sum())
    return int((logits.softmax(-1).mean(0).argmax(-1) == labels).sum())


def param_groups(student: BatchEnsemble, regime: str, weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer groups: shared weights (decay λ), fast weights r, s and member biases ([WA] or [DM])."""
    if regime not in FAST_WEIGHT_REGIMES:
        raise ValueError(
            f"unknown fast-weight regime {regime!r}: choose one of {', '.join(FAST_WEIGHT_REGIMES)}"
        )
    fast = list(student.fast_weight_parameters())
    bias = list(student.member_bias_parameters())
    shared = list(student.shared_parameters())
    if regime == "wa":
        # [WA]: r, s get no plain decay towards 0; fast_weight_hook decays them towards 1
        groups = [{"params": shared}, {"params": fast, "weight_decay": 0.0}, {"params": bias}]
    else:  # [DM]: no weight decay and half the learning rate for fast weights and member biases
        groups = [
            {"params": shared},
            {"params": fast, "weight_decay": 0.0, "lr_scale": 0.5},
            {"params": bias, "weight_decay": 0.0, "lr_scale": 0.5},
        ]
    return [g for g in groups if g["params"]]


def fast_weight_hook(
    student: BatchEnsemble, regime: str, weight_decay: float
) -> Callable[[], None] | None:
    """[WA]'s treatment, run after backward: grad ← M·(grad + (λ/M)·(r − 1)) for r and s.

    The penalty (λ/2M)·Σ(1 − r)² keeps the fast weights near 1, where averaging them loses
    little; each member sees only 1/M of the batch, hence the factor M, which (as in the
    authors' code, cs-giung/distill-latentbe) scales the whole gradient, penalty included.
    Member biases get M·grad and ordinary weight decay.
    """
    if regime != "wa":
        return None
    m = student.members
    fast = list(student.fast_weight_parameters())
    bias = list(student.member_bias_parameters())

    @torch.no_grad()
    def hook() -> None:
        for p in fast:
            if p.grad is not None:
                p.grad.add_(p - 1.0, alpha=weight_decay / m).mul_(m)
        for p in bias:
            if p.grad is not None:
                p.grad.mul_(m)

    return hook
