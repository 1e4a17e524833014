"""Modes for the length of a ``with`` block (eval mode, float32 without TF32); restored afterwards."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put ``models`` in eval mode inside the block; restore each one's mode on exit, errors too."""
    modes = [model.training for model in models]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for model, mode in zip(models, modes, strict=True):
            model.train(mode)


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """Float32 convolutions and matrix products without TF32 inside the block, restored on exit.

    cuDNN runs float32 convolutions in TF32 by default on GPUs that have it (10-bit mantissa:
    logits differ by ~1e-3), so checks that compare two computations to float32 round-off (the
    fold, the fused evaluation copy) run in here. CPUs have no TF32: nothing changes there.
    """
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = saved
