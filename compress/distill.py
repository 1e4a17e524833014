"""One distillation step of a BatchEns student from a DeepEns teacher, and its optimizer groups.

Per step ([DM] §3, [WA] §3): perturb the clean batch x into x̃ (using the frozen teachers, and the
student in eval mode for TDiv-SDiv), get the teachers' logits on x̃, run the student on x̃ and
backpropagate the KD term, then (when α < 1 and x̃ ≠ x) on x for the CE term.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ensc.compress.losses import TARGET_MODES, DistillationLoss
from ensc.compress.perturb import MemberLogits, PerturbConfig, perturb
from ensc.engine.loop import BackwardFn, StepFn, StepResult
from ensc.engine.runtime import Runtime
from ensc.engine.timing import NO_TIMER, PhaseTimer
from ensc.errors import ConfigError
from ensc.models.batchensemble import BatchEnsemble

log = logging.getLogger(__name__)

FAST_WEIGHT_REGIMES = ("wa", "dm")
# "repeat": every member sees the whole batch (M× the compute of one network; the papers' setup);
# "split": member m sees only the m-th 1/M of it (the compute of one network, as MIMO's and the
# original BatchEnsemble's training batches).
MEMBER_BATCH_MODES = ("repeat", "split")


@dataclass(frozen=True)
class DistillConfig:
    """Loss, perturbation and fast-weight treatment.

    Defaults: [WA]'s student (``ones`` init, fast weights decayed towards 1, gradients × M) with
    [DM]'s loss (α 0.9, T 1), which beat [WA]'s α 1, T 4 side by side (README, Compress); and the
    recipe that made the averaged network best on the validation split of the CIFAR-10 study
    (docs/results.md): every member distills the ensemble's mean prediction, on its own 1/M of
    the batch, without input perturbation (each perturbation cost accuracy there).
    """

    alpha: float = 0.9  # weight of the KD term ([WA] 1.0; [DM] 0.9)
    temperature: float = 1.0  # KD temperature ([WA] 4; [DM] 1)
    perturb: PerturbConfig = field(default_factory=PerturbConfig)  # kind "none"
    fast_weights: str = "wa"  # "wa": decay r, s towards 1 with λ/M and scale their grads by M; "dm": no decay, half lr
    member_batch: str = "split"  # one of MEMBER_BATCH_MODES
    targets: str = "mean"  # one of TARGET_MODES: teacher m for member m, or the ensemble mean

    def __post_init__(self) -> None:
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


def student_eval_logits_fn(student: BatchEnsemble) -> Callable[[torch.Tensor], torch.Tensor]:
    """x [B, ...] -> student member logits [Ms, B, K] with running BN statistics (for TDiv-SDiv).

    The student runs with detached parameters (``torch.func.functional_call``), so gradients
    reach x only and autograd keeps none of what parameter gradients would need.
    """

    def logits(x: torch.Tensor) -> torch.Tensor:
        was_training = student.training
        student.eval()
        try:
            state = {n: t.detach() for n, t in student.state_dict(keep_vars=True).items()}
            tiled = x.repeat(student.members, *([1] * (x.dim() - 1)))  # [Ms*B, ...]
            out = torch.func.functional_call(student, state, (tiled,))
            return out.unflatten(0, (student.members, -1)).float()  # [Ms, B, K]
        finally:
            student.train(was_training)

    return logits


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
    net = net if net is not None else student
    m = student.members
    loss_fn = DistillationLoss(config.alpha, config.temperature)
    teacher = MemberLogits(teachers)  # x [B, ...] -> [Mt, B, K]; gradients flow to x only
    student_eval = student_eval_logits_fn(student)
    need_clean = config.alpha < 1 and config.perturb.kind != "none"
    split = config.member_batch == "split"

    def member_inputs(x: torch.Tensor) -> torch.Tensor:
        """What the student's M members see: chunk m of x (split) or all of x, tiled (repeat)."""
        return x if split else x.repeat(m, *([1] * (x.dim() - 1)))  # [M*B', ...]

    member_wise = config.targets == "member" and len(teacher) == m  # else: the ensemble mean

    def targets_for(x_tilde: torch.Tensor) -> torch.Tensor:
        """Teacher logits [Mt or 1, B', K] for the student's [Ms, B', K] (B' = B/M when split)."""
        with torch.no_grad():
            if not member_wise:  # one target for every member: the ensemble's mean prediction
                mean = mean_prediction_logits(teacher(x_tilde), config.temperature)  # [B, K]
                return mean.unflatten(0, (m, -1)) if split else mean.unsqueeze(0)
            if not split:
                return teacher(x_tilde)  # [Mt, B, K]
            chunks = x_tilde.unflatten(0, (m, -1))  # teacher k only on student member k's chunk
            return torch.cat([teacher(chunks[k], members=[k]) for k in range(m)])

    def student_logits(x: torch.Tensor) -> torch.Tensor:
        logits = net(member_inputs(x))  # [Ms*B', K]
        return logits.view(m, -1, logits.shape[-1])  # [Ms, B', K]

    warned = False  # about cutting batches to a multiple of M, once

    def step(x: torch.Tensor, labels: torch.Tensor, backward: BackwardFn) -> StepResult:
        nonlocal warned
        if split and x.shape[0] % m:  # equal chunks: leave the last B mod M images out
            if not warned:
                log.warning(
                    "--member-batch split: batches of %d images are cut to %d, a multiple of "
                    "M=%d (a --batch-size that M divides uses every image)",
                    x.shape[0], x.shape[0] - x.shape[0] % m, m,
                )  # fmt: skip
                warned = True
            x, labels = _whole_chunks(x, labels, m)
        b = x.shape[0]
        member_labels = labels.view(m, -1) if split else labels  # [Ms, B/M] or [B]
        with timer("perturb"):
            x_tilde = perturb(x, config.perturb, teacher=teacher, student=student_eval, gen=gen)
        with timer("teacher"):
            targets = targets_for(x_tilde)
        if not need_clean:  # one pass: KD and CE on the same logits
            with timer("student"):
                logits = student_logits(x_tilde)
                loss = loss_fn(logits, targets, logits, member_labels)
            backward(loss)
            return StepResult(loss.detach(), _correct(logits, member_labels, split), b)
        first_pass = getattr(net, "no_sync", contextlib.nullcontext)  # DDP: reduce once, at the end
        with first_pass():
            with timer("student"):
                kd = config.alpha * loss_fn.kd(student_logits(x_tilde), targets)
            backward(kd)
        with timer("student"):
            on_clean = student_logits(x)
            ce = (1 - config.alpha) * loss_fn.ce(on_clean, member_labels)
        backward(ce)
        return StepResult(kd.detach() + ce.detach(), _correct(on_clean, member_labels, split), b)

    return step


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
    if (
        regime == "wa"
    ):  # decay towards 1 is applied in the gradient hook, not as plain decay towards 0
        groups = [{"params": shared}, {"params": fast, "weight_decay": 0.0}, {"params": bias}]
    else:  # [DM]: no weight decay and half the learning rate for the fast weights
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
