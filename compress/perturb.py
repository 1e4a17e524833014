"""Input perturbations that carry the teachers' diversity into distillation (docs/method.md §5).

Every perturbation maps a clean batch x ∈ [0, 1]^(B×D) to x̃ = clip(x + ε, 0, 1), with ε per
example and "step" in units of 1/255. The gradient-based kinds share one scaling
(:func:`l2_direction`):  ε = (step/255) · √D · g / ‖g‖₂.

- ``none``       ε = 0.
- ``gaussian``   ε ~ N(0, (step/255)²) per pixel.
- ``ods``        Output-Diversified Sampling [DM]: one teacher j for the batch, w ~ Unif[−1, 1]^K
                 per example, g = ∇_x Σ_k w_k · softmax(t_j(x)/T)_k.
- ``confods``    [DM]: ``ods`` with ε multiplied per example by max_k softmax(t_j(x)/T)_k.
- ``tdiv-sdiv``  [WA]: members i ≠ j (the same pair in teacher and student),
                 g = ∇_x [CE(t_i ← t_j) − CE(s_i ← s_j)],
                 CE(a ← b) = −Σ_k stopgrad(softmax(b)_k) · log_softmax(a)_k:
                 raise the teachers' disagreement while lowering the student's.

[DM] Nam, Yoon, Lee, Lee. Diversity Matters When Learning From Ensembles. NeurIPS 2021.
     https://arxiv.org/abs/2110.14149
[WA] Nam, Lee, Heo, Lee. Improving Ensemble Distillation With Weight Averaging and Diversifying
     Perturbation. ICML 2022. https://arxiv.org/abs/2206.15047

Random draws (teacher index, w, the pair i, j, Gaussian noise) are made on the CPU with the given
generator and then moved to x's device, so one seed gives the same draws on any device. Input
gradients are taken with ``torch.autograd.grad`` with respect to a leaf copy of x only, so no
model parameter's ``.grad`` is touched.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ensc.compress.names import PERTURB_CHOICES, PERTURBATIONS

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # x [B, C, H, W] -> member logits [M, B, K]


class MemberLogits:
    """The frozen members as a LogitsFn that can also run only some of them.

    ``fn(x)`` gives all members' logits [M, B, K]; ``fn(x, members=[j])`` only those asked for,
    so ODS (one teacher) and TDiv-SDiv (two) do not pay for forward/backward passes of all M.
    """

    def __init__(self, modules: list[torch.nn.Module]) -> None:
        self.modules = modules

    def __len__(self) -> int:
        return len(self.modules)

    def __call__(self, x: torch.Tensor, members: list[int] | None = None) -> torch.Tensor:
        chosen = self.modules if members is None else [self.modules[i] for i in members]
        return torch.stack([m(x) for m in chosen]).float()  # [len(chosen), B, K]


_NORM_EPS = 1e-12  # guards ‖g‖₂ = 0 (then ε = 0); same floor as F.normalize


@dataclass(frozen=True)
class PerturbConfig:
    """Which perturbation to apply and how large it is."""

    kind: str = "none"  # one of PERTURBATIONS, or "auto" until the run's start is known
    # Size in units of 1/255. 1.0 is both papers' value: [DM] "we fix ODS step-size η to 1/255
    # across all settings" (also the --kd-method-step-size default, shared by gaussian, in
    # cs-giung/giung2 projects/Diversity-Matters/scripts/train_student.py); [WA] hard-codes
    # 1/255 in cs-giung/distill-latentbe scripts/train_KD_LatentBE_TDivSDiv.py.
    step: float = 1.0
    # T in softmax(t_j(x)/T) for ods/confods (unused by the other kinds). [DM]'s code reuses the
    # KD temperature here; 1.0 is [DM]'s published CIFAR-100 / TinyImageNet setting. None: the KD
    # temperature, set with it before training (ensc.compress.warmstart.loss_defaults).
    temperature: float | None = 1.0

    def __post_init__(self) -> None:
        if self.kind not in PERTURB_CHOICES:
            raise ValueError(
                f"unknown perturbation {self.kind!r}: choose one of {', '.join(PERTURB_CHOICES)}"
            )
        if not (math.isfinite(self.step) and self.step >= 0):
            raise ValueError(
                f"perturbation step must be a finite number >= 0 (units of 1/255), got {self.step}"
            )
        if self.temperature is not None and not (
            math.isfinite(self.temperature) and self.temperature > 0
        ):
            raise ValueError(f"perturbation temperature must be > 0, got {self.temperature}")


class OdsDirection(NamedTuple):
    """The ODS input gradient and the random draws behind it."""

    grad: torch.Tensor  # g [B, C, H, W]
    teacher: int  # j, the teacher used for the whole batch
    weights: torch.Tensor  # w [B, K] ~ Unif[−1, 1]
    confidence: torch.Tensor  # max_k softmax(t_j(x)/T)_k [B], detached (ConfODS scale)


class TDivSDivDirection(NamedTuple):
    """The TDiv-SDiv input gradient and the member pair behind it."""

    grad: torch.Tensor  # g [B, C, H, W]
    i: int  # member whose prediction is moved ...
    j: int  # ... relative to this member's (stop-gradient) prediction


def l2_direction(g: torch.Tensor, step: float) -> torch.Tensor:
    """Scale each example's g to L2 length (step/255)·√D (docs/method.md §5).

    ε = (step/255)·√D·g/‖g‖₂, where g is [B, ...] with D = the number of elements per example;
    an all-zero g gives ε = 0.
    """
    if g.dim() < 2:
        raise ValueError(f"g must be batched as [B, ...], got shape {tuple(g.shape)}")
    if not step >= 0:
        raise ValueError(f"step must be >= 0 (units of 1/255), got {step}")
    b = g.shape[0]
    flat = g.reshape(b, -1)  # [B, D]
    norm = flat.norm(dim=1).clamp_min(_NORM_EPS)  # [B]
    scale = (step / 255.0) * math.sqrt(flat.shape[1]) / norm  # [B]
    return g * scale.view(b, *([1] * (g.dim() - 1)))


def _member_logits(fn: LogitsFn, x: torch.Tensor, who: str) -> torch.Tensor:
    logits = fn(x)
    if logits.dim() != 3 or logits.shape[1] != x.shape[0]:
        raise ValueError(
            f"{who}(x) must return member logits [M, B={x.shape[0]}, K], got shape "
            f"{tuple(logits.shape)}; stack the members' outputs along a new first axis"
        )
    return logits


def ods_direction(
    x: torch.Tensor, teacher: LogitsFn, temperature: float, gen: torch.Generator | None = None
) -> OdsDirection:
    """g = ∇_x Σ_b Σ_k w_bk · softmax(t_j(x_b)/T)_k, j ~ Unif{0..Mt−1}, w ~ Unif[−1, 1]^(B×K) [DM].

    Draws j then w from ``gen`` on the CPU. The sum over the batch leaves each example's gradient
    its own (the teachers are in eval mode, so examples do not interact).
    """
    with torch.enable_grad():
        x_leaf = x.detach().requires_grad_()
        if isinstance(teacher, MemberLogits):  # run only the chosen teacher
            j = int(torch.randint(len(teacher), (1,), generator=gen))
            logits_j = _member_logits(lambda v: teacher(v, members=[j]), x_leaf, "teacher")[0]
        else:
            logits = _member_logits(teacher, x_leaf, "teacher")  # [Mt, B, K]
            j = int(torch.randint(logits.shape[0], (1,), generator=gen))
            logits_j = logits[j]  # [B, K]
        b, k = logits_j.shape
        w = (torch.rand(b, k, generator=gen) * 2 - 1).to(x.device, logits_j.dtype)  # [B, K]
        probs = F.softmax(logits_j / temperature, dim=-1)  # [B, K]
        (grad,) = torch.autograd.grad((w * probs).sum(), x_leaf)
    return OdsDirection(grad, j, w, probs.detach().amax(dim=-1))


def _cross_entropy(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """CE(a ← b) = −Σ_k stopgrad(softmax(b)_k)·log_softmax(a)_k, summed over the batch."""
    return -(F.softmax(b.detach(), dim=-1) * F.log_softmax(a, dim=-1)).sum()


def tdiv_sdiv_direction(
    x: torch.Tensor,
    teacher: LogitsFn,
    student: LogitsFn,
    gen: torch.Generator | None = None,
) -> TDivSDivDirection:
    """g = ∇_x [CE(t_i ← t_j) − CE(s_i ← s_j)], (i, j) a uniform ordered pair with i ≠ j [WA].

    The pair is drawn from ``gen`` over the first min(Mt, Ms) members. The CE terms are summed
    (not averaged) over the batch so each example's gradient is not scaled by 1/B. The student
    should be in eval mode (running BN statistics, as in [WA]); the caller arranges that.
    """
    with torch.enable_grad():
        x_leaf = x.detach().requires_grad_()
        subset = isinstance(teacher, MemberLogits)  # then run only teachers i and j
        t = None if subset else _member_logits(teacher, x_leaf, "teacher")  # [Mt, B, K]
        mt = len(teacher) if subset else t.shape[0]
        # a student that can run only some members (StudentMemberLogits) runs only i and j
        s = None if hasattr(student, "__len__") else _member_logits(student, x_leaf, "student")
        ms = len(student) if s is None else s.shape[0]
        n = min(mt, ms)
        if n < 2:
            raise ValueError(
                f"tdiv-sdiv needs at least 2 teacher and 2 student members, got {mt} "
                f"teacher(s) and {ms} student member(s); use ods or gaussian instead"
            )
        i, j = (int(v) for v in torch.randperm(n, generator=gen)[:2])
        t_i, t_j = (
            _member_logits(lambda v: teacher(v, members=[i, j]), x_leaf, "teacher")
            if subset
            else (t[i], t[j])
        )
        s_i, s_j = (
            _member_logits(lambda v: student(v, members=[i, j]), x_leaf, "student")
            if s is None
            else (s[i], s[j])
        )
        objective = _cross_entropy(t_i, t_j) - _cross_entropy(s_i, s_j)
        (grad,) = torch.autograd.grad(objective, x_leaf)
    return TDivSDivDirection(grad, i, j)


def epsilon(
    x: torch.Tensor,
    config: PerturbConfig,
    *,
    teacher: LogitsFn,
    student: LogitsFn | None = None,
    gen: torch.Generator | None = None,
) -> torch.Tensor:
    """The unclipped, detached offset ε of ``config.kind`` for the batch x [B, C, H, W].

    See docs/method.md §5.
    """
    kind, step = config.kind, config.step
    if kind == "none":
        return torch.zeros_like(x)
    if kind == "gaussian":
        noise = torch.randn(x.shape, generator=gen)  # drawn on the CPU for reproducibility
        return noise.to(x.device, x.dtype) * (step / 255.0)
    if kind in ("ods", "confods"):
        d = ods_direction(x, teacher, config.temperature, gen)
        eps = l2_direction(d.grad, step)
        if kind == "confods":
            eps = eps * d.confidence.view(-1, *([1] * (x.dim() - 1))).to(eps.dtype)
        return eps
    # tdiv-sdiv
    if student is None:
        raise ValueError(
            "tdiv-sdiv needs the student's member logits: pass student=<x -> [Ms, B, K]> "
            "(student in eval mode), or choose another perturbation"
        )
    return l2_direction(tdiv_sdiv_direction(x, teacher, student, gen).grad, step)


def perturb(
    x: torch.Tensor,
    config: PerturbConfig,
    *,
    teacher: LogitsFn,
    student: LogitsFn | None = None,
    gen: torch.Generator | None = None,
) -> torch.Tensor:
    """x̃ = clip(x + ε, 0, 1), detached, same shape/dtype/device as x; ``none`` returns x itself.

    ``teacher(x)`` gives the frozen teachers' logits [Mt, B, K] and must let gradients flow to x
    (do not wrap it in ``no_grad``). ``student(x)`` gives the BatchEns student's member logits
    [Ms, B, K] and is needed only by ``tdiv-sdiv``; put the student in eval mode for it.
    """
    if config.kind == "none":
        return x
    if config.kind not in PERTURBATIONS:  # "auto" is set before training (warmstart.py)
        raise ValueError(f"perturbation {config.kind!r} was not resolved before training")
    eps = epsilon(x, config, teacher=teacher, student=student, gen=gen)
    return (x.detach() + eps).clamp_(0.0, 1.0)
