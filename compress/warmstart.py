"""``--student-init``: start the student from a teacher member's weights (auto, or member:K).

When member K has the student's architecture, copying its weights into the student's shared
weights (before conversion to BatchEns, so every member starts as member K) gives distillation a
head start: the cheap path to a good student on a CPU budget.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from ensc.compress.distill import DistillConfig
from ensc.compress.names import DEFAULT_PERTURB
from ensc.errors import ConfigError
from ensc.models.checkpoint import ModelSpec
from ensc.models.normalize import Normalize, NormalizedModel
from ensc.teachers.ensemble import Teacher

# Peak learning rate of a warm-started student (batch 128, warm-up + cosine over the step budget):
# the best of 0.1, 0.03 and 0.01 on the validation split of the CIFAR-10 study (docs/results.md),
# for both the averaged network and KD into one network, up to a few hundred steps.
WARM_START_LR = 0.03
# From LONG_RUN_STEPS on it is LONG_RUN_LR: the first epochs at 0.1 knock the student off its start
# (validation accuracy 74.5 → 66 % by epoch 3 in domain) and it needs several hundred steps to come
# back, but then ends higher. In domain on CIFAR-10 JPEGs, validation split (docs/results.md §1):
# at 1,000 steps ensc 80.58 % / cNLL 0.5687 against 80.48 / 0.5728 at lr 0.03, KD into one network
# 80.66 / 0.5646 against 80.16 / 0.5750; at 2,000 steps ensc 80.92-81.58 / 0.5479-0.5539 against
# 80.62-80.72 / 0.5610-0.5620, KD 81.16-81.36 / 0.5477-0.5519 against 80.44-80.52 / 0.5644-0.5656
# (3 seeds each), fine-tuning 79.16 / 0.6088 against 78.54 / 0.6330 (seed 0).
LONG_RUN_LR = 0.1
LONG_RUN_STEPS = 1000
# From LONGER_RUN_STEPS on, KD into one network takes KD_LONGER_RUN_LR, and a warm-started
# BatchEnsemble runs without a perturbation by default (start_perturbation). KD at 2,000 steps:
# 81.48/81.38/81.42 % and cNLL 0.5449/0.5472/0.5477 at lr 0.2 against 0.1's 81.16/81.36/81.22 % and
# 0.5519/0.5484/0.5477 (lr 0.4: 81.32 / 0.5477, seed 0); at 1,000 steps 0.2 was worse (80.32 /
# 0.5702 against 80.66 / 0.5646). The BatchEnsemble was not better at 0.2 (2,000 steps, seed 0:
# 80.96 / 0.5546 with TDiv-SDiv, 80.74 / 0.5433 without, against 81.38 / 0.5539 and 81.44 / 0.5480
# at 0.1). Each method at its own best, so that --baselines compares ensc with the KD a user who
# tuned it would have.
KD_LONGER_RUN_LR = 0.2
LONGER_RUN_STEPS = 2000

# The KD weight α and temperature T when --alpha/--temperature are not given. A warm-started
# student takes [WA]'s α 1 (KD only), T 4. On the in-domain study's validation split T 4 beat T 1
# in accuracy on each of 3 seeds (docs/results.md §1). Over-confidence at T 4 is removed by the
# folded temperature (docs/method.md §8). From random weights [WA]'s α 1, T 4 let the members drift
# apart and averaging lost 5-26 points (docs/results-wa-loss.md), so a student from scratch keeps
# [DM]'s 0.9, 1.
WARM_START_LOSS = {"alpha": 1.0, "temperature": 4.0}
SCRATCH_LOSS = {"alpha": 0.9, "temperature": 1.0}

# A BatchEnsemble's warm start over fewer steps than this takes lr / T (warm_start_lr). [WA]'s
# fast-weight treatment multiplies the gradient of r and s by M, and the KD term at T 4 makes a
# step about T times larger: at the undivided lr the first steps knock the student off its start,
# and a short run has no time to recover (Fashion-MNIST demo teacher, 94 steps: 78.40 % test at lr
# 0.03 against 82.45 % at 0.0075; with --fast-weights dm, which has no ×M, 81.90 %). From 300 steps
# on the undivided lr was as good or better wherever it was measured: in domain on CIFAR-10 JPEGs
# (300 steps, 3 seeds, validation 80.00/79.72/79.72 % and cNLL 0.5887/0.5892/0.5878 against
# 80.00/79.64/79.50 % and 0.5921/0.5941/0.5947; 1,000 steps: cNLL 0.5728 against 0.5829), on the
# Fashion-MNIST 1k teacher (300 steps: 81.69 % / 0.5156 test against 81.62 / 0.5216) and on the
# demo teacher at 375 steps (82.25 % / 0.4918 against 82.25 / 0.4902): docs/results.md.
SHORT_RUN_STEPS = 300


def warm_start_lr(
    method: str, alpha: float, temperature: float, batch_size: int, steps: int
) -> float:
    """The peak learning rate of a warm-started student when --lr is not given: WARM_START_LR ×
    batch/128 (LONG_RUN_LR × batch/128 for a schedule of LONG_RUN_STEPS ``steps`` or more, and
    KD_LONGER_RUN_LR × batch/128 for ``kd-single`` from LONGER_RUN_STEPS); a
    BatchEnsemble whose loss has a KD term (α > 0) takes it divided by T when its schedule has
    fewer than SHORT_RUN_STEPS steps.

    KD into one network (``kd-single``) keeps the undivided lr at every budget: at T 4 it beat
    lr / T on both in-domain teachers (CIFAR-10 JPEGs, 300 steps, 3 seeds: 79.65 % / cNLL 0.5981
    against 79.35 / 0.6076 on test; 1,000 steps: 80.15 / 0.5833 against 79.57 / 0.5974;
    Fashion-MNIST 1k: 81.77 / 0.5135 against 81.59 / 0.5200; docs/results.md), and on the demo
    teacher at 84 steps it kept its start (81.95 %). Fine-tuning on the labels has no KD term."""
    if method == "kd-single" and steps >= LONGER_RUN_STEPS:
        lr = KD_LONGER_RUN_LR
    else:
        lr = LONG_RUN_LR if steps >= LONG_RUN_STEPS else WARM_START_LR
    lr *= batch_size / 128
    short = steps < SHORT_RUN_STEPS
    return lr / temperature if method == "batchensemble" and alpha > 0 and short else lr


def start_perturbation(method: str, warm: bool, steps: int) -> str:
    """The perturbation of ``--perturb auto`` (the default): the method's DEFAULT_PERTURB, but none
    for a warm-started BatchEnsemble whose schedule has LONGER_RUN_STEPS ``steps`` or more.

    In domain on CIFAR-10 JPEGs at lr 0.1, 2,000 steps, validation split (docs/results.md §1):
    without a perturbation 81.44/81.04/81.50 % and cNLL 0.5480/0.5504/0.5406 against TDiv-SDiv's
    81.38/80.92/81.58 % and 0.5539/0.5523/0.5479 (seeds 0, 1, 2), without its input gradients
    (about 1.6× the time per step of none). At 1,000 steps TDiv-SDiv was still ahead in accuracy
    (80.58 % / 0.5687 against 80.28 / 0.5683, seed 0), and at 300 steps (lr 0.03) by more (80.00
    against 79.54 %), so shorter schedules and a cold start keep it."""
    if method == "batchensemble" and warm and steps >= LONGER_RUN_STEPS:
        return "none"
    return DEFAULT_PERTURB[method]


def loss_defaults(distill: DistillConfig, warm: bool) -> DistillConfig:
    """``distill`` with α and T that were left None set by the student's start (``warm``: from a
    teacher member), and the perturbation's temperature None set to the KD temperature."""
    chosen = WARM_START_LOSS if warm else SCRATCH_LOSS
    alpha = chosen["alpha"] if distill.alpha is None else distill.alpha
    temperature = chosen["temperature"] if distill.temperature is None else distill.temperature
    perturb = distill.perturb
    if perturb.temperature is None:
        perturb = replace(perturb, temperature=temperature)
    return replace(distill, alpha=alpha, temperature=temperature, perturb=perturb)


@torch.no_grad()
def init_from_member(student: nn.Module, spec: ModelSpec, teacher: Teacher, k: int) -> ModelSpec:
    """Copy member ``k``'s weights (and input normalization) into the plain ``student`` network.

    Returns ``spec`` with the member's mean/std, which the student now normalizes with. Raises
    :class:`ConfigError` naming the differing keys when member ``k`` has another architecture.
    """
    if not 0 <= k < len(teacher):
        raise ConfigError(
            f"--student-init member:{k}: the teacher has members 0 to {len(teacher) - 1}"
        )
    member = teacher.members[k]
    s_norm, s_core = _split(student)
    t_norm, t_core = _split(member)
    what = _difference(s_core, t_core)
    if what:
        raise ConfigError(
            f"--student-init member:{k}: member {k} ({teacher.specs[k].arch}) does not have the "
            f"student's architecture {spec.arch} ({what}); pick a member of that architecture "
            "or drop --student-init"
        )
    s_core.load_state_dict(t_core.state_dict())
    # the member's input normalization goes with its weights
    if s_norm is not None:
        s_norm.load_state_dict((t_norm or Normalize(s_norm.num_channels)).state_dict())
    elif t_norm is not None:
        own = getattr(s_core, "normalize", None)
        if not isinstance(own, Normalize):
            raise ConfigError(
                f"--student-init member:{k}: the student has no input normalization to take member {k}'s"
            )
        own.load_state_dict(t_norm.state_dict())
    norm = s_norm if s_norm is not None else getattr(s_core, "normalize", None)
    if not isinstance(norm, Normalize):
        return spec
    return replace(
        spec, mean=tuple(norm.mean.flatten().tolist()), std=tuple(norm.std.flatten().tolist())
    )


def matching_member(student: nn.Module, teacher: Teacher) -> int | None:
    """The first teacher member with the plain ``student``'s architecture (same weight names and
    shapes), or None: the member ``--student-init auto`` starts from."""
    _, s_core = _split(student)
    for k, member in enumerate(teacher.members):
        if not _difference(s_core, _split(member)[1]):
            return k
    return None


def _difference(student: nn.Module, member: nn.Module) -> str:
    """How the two networks' state_dicts differ ("" when names and shapes all match)."""
    ours, theirs = student.state_dict(), member.state_dict()
    missing = [key for key in ours if key not in theirs]
    unexpected = [key for key in theirs if key not in ours]
    shapes = [key for key in ours if key in theirs and ours[key].shape != theirs[key].shape]
    return ", ".join(
        f"{name} {', '.join(keys[:3])}{', …' if len(keys) > 3 else ''}"
        for name, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("other shapes", shapes),
        )
        if keys
    )


def _split(model: nn.Module) -> tuple[Normalize | None, nn.Module]:
    """(the wrapper's Normalize, the network inside) of a NormalizedModel; (None, model) otherwise."""
    if isinstance(model, NormalizedModel):
        return model.normalize, model.model
    return None, model
