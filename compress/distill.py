"""One distillation step of a BatchEns student from a DeepEns teacher, and its optimizer groups.

Per step (SPEC.md §4–§5): perturb the clean batch x into x̃ (using the frozen teachers, and the
student in eval mode for TDiv-SDiv), get the teachers' logits on x̃, run the student on x̃ (and on
x when α < 1, in the same forward so BatchNorm sees one batch), and return the loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ensc.compress.loop import StepResult
from ensc.compress.losses import DistillationLoss
from ensc.compress.perturb import MemberLogits, PerturbConfig, perturb
from ensc.models.batchensemble import BatchEnsemble

FAST_WEIGHT_REGIMES = ("wa", "dm")


@dataclass(frozen=True)
class DistillConfig:
    """Loss, perturbation and fast-weight treatment.

    Defaults: [WA]'s student (``ones`` init, fast weights decayed towards 1, gradients × M) and
    perturbation (TDiv-SDiv) with [DM]'s loss (α 0.9, T 1), which beat [WA]'s α 1, T 4 side by
    side (README, Compress).
    """

    alpha: float = 0.9  # weight of the KD term ([WA] 1.0; [DM] 0.9)
    temperature: float = 1.0  # KD temperature ([WA] 4; [DM] 1)
    # [WA]'s TDiv-SDiv: best or second-best averaged network in docs/results.md
    perturb: PerturbConfig = field(default_factory=lambda: PerturbConfig(kind="tdiv-sdiv"))
    fast_weights: str = "wa"  # "wa": decay r, s towards 1 with λ/M and scale their grads by M; "dm": no decay, half lr


def student_eval_logits_fn(student: BatchEnsemble) -> Callable[[torch.Tensor], torch.Tensor]:
    """x [B, ...] -> student member logits [Ms, B, K] with running BN statistics (for TDiv-SDiv)."""

    def logits(x: torch.Tensor) -> torch.Tensor:
        was_training = student.training
        student.eval()
        try:
            return student.forward_members(x).float()  # [Ms, B, K]
        finally:
            student.train(was_training)

    return logits


def make_distill_step(
    student: BatchEnsemble,
    teachers: list[nn.Module],
    config: DistillConfig,
    gen: torch.Generator,
    net: nn.Module | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], StepResult]:
    """The ``step`` function for :func:`ensc.compress.loop.train`.

    ``net`` is the student as trained (``runtime.wrap(student)``: DistributedDataParallel under
    torchrun); the perturbation's eval-mode pass uses ``student`` itself, since it needs no
    parameter gradients.
    """
    net = net if net is not None else student
    m = student.members
    loss_fn = DistillationLoss(config.alpha, config.temperature)
    teacher = MemberLogits(teachers)  # x [B, ...] -> [Mt, B, K]; gradients flow to x only
    student_eval = student_eval_logits_fn(student)
    need_clean = config.alpha < 1 and config.perturb.kind != "none"

    def step(x: torch.Tensor, labels: torch.Tensor) -> StepResult:
        b = x.shape[0]
        x_tilde = perturb(x, config.perturb, teacher=teacher, student=student_eval, gen=gen)
        with torch.no_grad():
            targets = teacher(x_tilde)  # [Mt, B, K]
        inputs = torch.cat([x_tilde, x]) if need_clean else x_tilde  # [B or 2B, C, H, W]
        tiled = inputs.repeat(
            m, *([1] * (inputs.dim() - 1))
        )  # [Ms*B', C, H, W]: M contiguous chunks
        logits = net(tiled).view(m, inputs.shape[0], -1)  # [Ms, B', K]
        on_perturbed = logits[:, :b]
        on_clean = logits[:, b:] if need_clean else on_perturbed
        loss = loss_fn(on_perturbed, targets, on_clean, labels)
        correct = int((on_clean.detach().float().softmax(-1).mean(0).argmax(-1) == labels).sum())
        return StepResult(loss, correct, b)

    return step


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
