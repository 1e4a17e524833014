"""Member-wise ensemble distillation loss ([DM] NeurIPS 2021 §3, [WA] ICML 2022 §3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DistillationLoss(nn.Module):
    """L = (1 − α)·L_ce + α·L_kd, member-wise ([DM] NeurIPS 2021, [WA] ICML 2022).

    L_kd = T² · mean_{m,b} [ −Σ_k softmax(t_m(x̃)/T)_k · log_softmax(s_m(x̃)/T)_k ]
    L_ce = mean_{m,b} [ −log softmax(s_m(x))_y ]

    Student member m learns from teacher member m when the ensembles have the same size, else
    every student member learns from the teacher ensemble's mean prediction. Teacher logits are
    treated as constants.

    ``alpha`` and ``temperature`` have no defaults here: the configured ones live in one place,
    :class:`ensc.compress.distill.DistillConfig` (and the CLI, which fills it).
    """

    def __init__(self, alpha: float, temperature: float) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.alpha = alpha
        self.temperature = temperature

    def kd(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """T²-scaled cross-entropy to the teacher targets; student [Ms, B, K], teacher [Mt, B, K]."""
        t = self.temperature
        targets = F.softmax(teacher_logits.detach().float() / t, dim=-1)  # [Mt, B, K]
        if targets.shape[0] != student_logits.shape[0]:
            targets = targets.mean(0, keepdim=True)  # ensemble mean, broadcast to every member
        log_probs = F.log_softmax(student_logits.float() / t, dim=-1)  # [Ms, B, K]
        return t * t * -(targets * log_probs).sum(-1).mean()

    @staticmethod
    def ce(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of every member on its labels; student [Ms, B, K], labels [B] (shared by
        all members) or [Ms, B] (each member its own examples)."""
        m, b, k = student_logits.shape
        labels = labels.reshape(m * b) if labels.dim() == 2 else labels.repeat(m)
        return F.cross_entropy(student_logits.float().reshape(m * b, k), labels)

    def forward(
        self,
        student_perturbed: torch.Tensor,
        teacher_perturbed: torch.Tensor,
        student_clean: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The combined loss; ``student_clean``/``labels`` are needed only when α < 1."""
        loss = self.alpha * self.kd(student_perturbed, teacher_perturbed) if self.alpha > 0 else 0.0
        if self.alpha < 1:
            if student_clean is None or labels is None:
                raise ValueError(
                    "alpha < 1 needs the student's logits on clean inputs and the labels"
                )
            loss = loss + (1 - self.alpha) * self.ce(student_clean, labels)
        return loss
