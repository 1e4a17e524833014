"""Learning-rate schedule of both papers: linear warm-up, then cosine decay to zero.

See docs/method.md §7.
"""

from __future__ import annotations

import math

import torch


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule: lr rises linearly over ``warmup_steps``, then follows a half cosine to 0."""
    total_steps = max(1, total_steps)
    warmup_steps = min(max(0, warmup_steps), total_steps - 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def default_warmup_epochs(epochs: float) -> float:
    """The papers' 5 warm-up epochs for long runs; 10 % of the run for short ones (< 50 epochs)."""
    return 5.0 if epochs >= 50 else 0.1 * epochs


def scaled_lr(batch_size: int, base: float = 0.1) -> float:
    """The papers' base lr 0.1 at batch 128, scaled linearly with the batch size."""
    return base * batch_size / 128
