"""The fine-tune baseline's step: one network trained on the labels alone, no teacher in the step.

`ensc compress --method finetune` is what a user does without ensc: fine-tune the member the
student starts from on the labels, with the same data, augmentation, schedule and evaluation as
the product. The teachers are still evaluated for the report (from the logits cache when there is
one), but they never run inside a training step, so a step costs one network's forward and
backward and nothing else (its phases: data, student, optimizer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ensc.engine.loop import BackwardFn, StepFn, StepResult
from ensc.engine.timing import NO_TIMER, PhaseTimer


def make_label_step(net: nn.Module, timer: PhaseTimer = NO_TIMER) -> StepFn:
    """The ``step`` for :func:`ensc.engine.loop.train`: cross-entropy of ``net``'s logits
    ([B, K]; a one-member BatchEnsemble is the plain network) on the labels."""

    def step(images: torch.Tensor, labels: torch.Tensor, backward: BackwardFn) -> StepResult:
        with timer("student"):
            logits = net(images)
            loss = F.cross_entropy(logits.float(), labels)
        backward(loss)
        correct = int((logits.detach().argmax(-1) == labels).sum())
        loss = loss.detach()
        return StepResult(loss, correct, images.shape[0], loss.new_zeros(()), loss)

    return step
