"""Batched inference: a model's predictive probabilities over a whole split."""

from __future__ import annotations

import torch
from torch import nn

from ensc.compress.data import Split, iterate_batches
from ensc.compress.runtime import Runtime


@torch.inference_mode()
def predict_logits(
    model: nn.Module, split: Split, runtime: Runtime, batch_size: int = 512
) -> torch.Tensor:
    """Logits of ``model`` (eval mode) on every image of ``split``: float32 [N, K] on the CPU."""
    was_training = model.training
    model.eval()
    out = []
    for images, _ in iterate_batches(split, batch_size):
        with runtime.autocast():
            out.append(model(runtime.to_device(images)).float().cpu())
    model.train(was_training)
    return torch.cat(out)


def predict_probs(
    model: nn.Module, split: Split, runtime: Runtime, batch_size: int = 512
) -> torch.Tensor:
    """Softmax probabilities of ``model`` on ``split``: float32 [N, K]."""
    return predict_logits(model, split, runtime, batch_size).softmax(-1)


@torch.inference_mode()
def predict_member_probs(
    student: nn.Module, split: Split, runtime: Runtime, batch_size: int = 256
) -> torch.Tensor:
    """Each BatchEns member's probabilities on ``split``: float32 [M, N, K] on the CPU."""
    was_training = student.training
    student.eval()
    out = []
    for images, _ in iterate_batches(split, batch_size):
        with runtime.autocast():
            out.append(
                student.forward_members(runtime.to_device(images)).float().softmax(-1).cpu()
            )  # [M, B, K]
    student.train(was_training)
    return torch.cat(out, dim=1)
