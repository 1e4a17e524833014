"""What an exported graph computes: one network, a teacher ensemble, or a BatchEns student.

Every wrapper takes ``images`` float32 ``(B, C, H, W)`` with pixels in [0, 1] (the networks
normalize inside themselves, docs/method.md §1) and returns ``(logits, probs)``, both ``(B, K)``:

- :class:`SingleNetwork`: the network's logits and their softmax.
- :class:`EnsembleMean` (DE-M teacher) and :class:`BatchEnsembleMean` (BE-M student): ``probs`` is
  the members' mean predictive distribution (docs/method.md §2), ``logits`` its logarithm, so that
  ``softmax(logits) == probs`` and argmax/top-1 are read the same way from every graph.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ensc.models.batchensemble import BatchEnsemble

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAMES",
    "BatchEnsembleMean",
    "EnsembleMean",
    "SingleNetwork",
    "mean_of_softmax",
]

INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "probs")


def mean_of_softmax(logits: Tensor) -> tuple[Tensor, Tensor]:
    """``(log p, p)`` with ``p = (1/M) Σ_m softmax(logits_m)`` for member logits ``(M, B, K)``.

    ``log p = logsumexp_m(log_softmax(logits_m)) − log M`` stays finite where a member's
    probability underflows, unlike ``log(mean(softmax))``.
    """
    m = logits.shape[0]
    log_probs = torch.logsumexp(logits.log_softmax(-1), dim=0) - math.log(m)  # [M, B, K] -> [B, K]
    return log_probs, log_probs.exp()


class SingleNetwork(nn.Module):
    """``(logits, softmax(logits))`` of one plain network."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.net(images)  # [B, K]
        return logits, logits.softmax(-1)


class EnsembleMean(nn.Module):
    """A DeepEns teacher as one graph: every member on the same batch, probabilities averaged."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("EnsembleMean needs at least one member network")
        self.members = nn.ModuleList(members)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        logits = torch.stack([member(images) for member in self.members])  # [M, B, K]
        return mean_of_softmax(logits)


class BatchEnsembleMean(nn.Module):
    """A BatchEns student as one graph: the batch is tiled M times inside, member probs averaged."""

    def __init__(self, be: BatchEnsemble) -> None:
        super().__init__()
        if not isinstance(be, BatchEnsemble):
            raise TypeError(f"BatchEnsembleMean needs a BatchEnsemble; got {type(be).__name__}")
        self.be = be

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.be.forward_members(images)  # [B, C, H, W] -> tiled [M*B, ...] -> [M, B, K]
        return mean_of_softmax(logits)
