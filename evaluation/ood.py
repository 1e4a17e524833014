"""Out-of-distribution detection (docs/method.md §9): a score per input, AUROC and FPR@95.

A model's predictions on in-distribution test images and on images of another distribution are
turned into one score per input, then ranked:

- **max_prob**: max_k p_k, the confidence (higher = more in-distribution);
- **entropy**: predictive entropy −Σ_k p_k log p_k of the mean probability (higher = more OOD);
- **mutual_info**: for an ensemble of M > 1 members (DE-M, BE-M), the entropy of the mean minus
  the mean of the members' entropies, the members' disagreement (higher = more OOD).

The metrics treat in-distribution as the positive class and orient every score so that higher
means in-distribution (entropy and mutual information are negated):

- **AUROC**: the probability that a random in-distribution input scores higher than a random OOD
  input, ties counting one half (the Mann–Whitney U statistic from mid-ranks); 1 separates
  perfectly, 0.5 is chance (identical sets, constant scores);
- **FPR@95**: the fraction of OOD inputs accepted as in-distribution at the highest threshold
  that still accepts at least 95 % of the in-distribution inputs (inputs scoring at the threshold
  count as accepted); 0 is perfect.

Scores and metrics are computed in float64 with torch; no sklearn.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ensc.evaluation.metrics import EPS

SCORES = ("max_prob", "entropy", "mutual_info")
# +1: higher score = more in-distribution; -1: higher score = more OOD (negated before ranking)
_ORIENTATION = {"max_prob": 1.0, "entropy": -1.0, "mutual_info": -1.0}
TPR_LEVEL = 0.95
# the columns of the OOD table (evaluation/table.py COLUMNS)
TABLE_COLUMNS = tuple(f"{score}_{metric}" for score in SCORES for metric in ("auroc", "fpr95"))


def _float64(probs: torch.Tensor, ndim: int, name: str) -> torch.Tensor:
    if probs.ndim != ndim or not torch.is_floating_point(probs):
        shape = "[M, N, K]" if ndim == 3 else "[N, K]"
        raise ValueError(
            f"{name} must be a float {shape} tensor, got {probs.dtype} {tuple(probs.shape)}"
        )
    return probs.detach().to(torch.float64)


def max_prob(probs: torch.Tensor) -> torch.Tensor:
    """Confidence max_k p_k of each row of ``probs`` [N, K]: float64 [N]."""
    return _float64(probs, 2, "probs").max(-1).values


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Predictive entropy −Σ_k p_k log p_k (nats; 0 · log 0 = 0) of each row of ``probs`` [..., K]."""
    p = probs.detach().to(torch.float64)
    return -(p * p.clamp_min(EPS).log()).sum(-1)


def mutual_information(member_probs: torch.Tensor) -> torch.Tensor:
    """H(mean_m p_m) − mean_m H(p_m) per input, from member probabilities [M, N, K]: float64 [N].

    Never negative (Jensen); round-off below zero is clipped. Zero for a single member.
    """
    p = _float64(member_probs, 3, "member_probs")
    return (entropy(p.mean(0)) - entropy(p).mean(0)).clamp_min(0.0)


def scores(
    probs: torch.Tensor, member_probs: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Every score of one model's predictions: ``{"max_prob", "entropy"[, "mutual_info"]}`` → [N].

    ``probs`` [N, K] is the model's predictive probability (an ensemble's mean); with
    ``member_probs`` [M, N, K] of M > 1 members, mutual information is added.
    """
    out = {"max_prob": max_prob(probs), "entropy": entropy(_float64(probs, 2, "probs"))}
    if member_probs is not None and member_probs.shape[0] > 1:
        if member_probs.shape[1:] != probs.shape:
            raise ValueError(
                f"member_probs must have shape [M, {probs.shape[0]}, {probs.shape[1]}], "
                f"got {tuple(member_probs.shape)}"
            )
        out["mutual_info"] = mutual_information(member_probs)
    return out


def _check_scores(in_scores: torch.Tensor, out_scores: torch.Tensor) -> tuple[torch.Tensor, ...]:
    a, b = (
        torch.as_tensor(s).detach().to(torch.float64).flatten() for s in (in_scores, out_scores)
    )
    if a.numel() == 0 or b.numel() == 0:
        raise ValueError(
            f"AUROC and FPR@95 need in- and out-of-distribution scores, got {a.numel()} and {b.numel()}"
        )
    if not bool(torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("OOD scores must be finite")
    return a, b


def _mid_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``values``; tied values share the mean of the ranks they span."""
    order = values.argsort(stable=True)
    _, counts = torch.unique_consecutive(values[order], return_counts=True)
    ends = counts.cumsum(0).to(torch.float64)  # rank of the last element of each tie group
    group_rank = ends - (counts.to(torch.float64) - 1) / 2  # mean of first..last rank
    ranks = torch.empty_like(values)
    ranks[order] = group_rank.repeat_interleave(counts)
    return ranks


def auroc(in_scores: torch.Tensor, out_scores: torch.Tensor) -> float:
    """Area under the ROC curve, in-distribution positive, higher score = more in-distribution.

    P(s_in > s_out) + ½ P(s_in = s_out), from the mid-ranks of the pooled scores (Mann–Whitney U).
    """
    a, b = _check_scores(in_scores, out_scores)
    n_in, n_out = a.numel(), b.numel()
    ranks = _mid_ranks(torch.cat([a, b]))
    u = ranks[:n_in].sum().item() - n_in * (n_in + 1) / 2
    return u / (n_in * n_out)


def fpr_at_tpr(in_scores: torch.Tensor, out_scores: torch.Tensor, tpr: float = TPR_LEVEL) -> float:
    """Fraction of OOD inputs scoring at or above the highest threshold that keeps at least
    ``tpr`` of the in-distribution inputs at or above it (higher score = more in-distribution)."""
    if not 0 < tpr <= 1:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    a, b = _check_scores(in_scores, out_scores)
    k = math.ceil(round(tpr * a.numel(), 9))  # in-distribution inputs that must be accepted
    threshold = a.sort(descending=True).values[k - 1]
    return (b >= threshold).to(torch.float64).mean().item()


def paired_scores(
    in_probs: torch.Tensor,
    out_probs: torch.Tensor,
    in_members: torch.Tensor | None = None,
    out_members: torch.Tensor | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{score: (in-distribution scores [N], OOD scores [N'])}`` of one model (see :func:`scores`;
    mutual information when both member tensors are given and M > 1)."""
    have_members = in_members is not None and out_members is not None
    a = scores(in_probs, in_members if have_members else None)
    b = scores(out_probs, out_members if have_members else None)
    return {name: (a[name], b[name]) for name in a if name in b}


def detection(pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """``{"<score>_auroc", "<score>_fpr95"}`` for each ``score: (in, out)`` of :func:`paired_scores`,
    each score oriented so that higher means in-distribution."""
    row: dict[str, float] = {}
    for name in SCORES:
        if name in pairs:
            sign = _ORIENTATION[name]
            a, b = (sign * s.to(torch.float64) for s in pairs[name])
            row[f"{name}_auroc"] = auroc(a, b)
            row[f"{name}_fpr95"] = fpr_at_tpr(a, b)
    return row


def ood_section(
    models: Mapping[str, Mapping[str, tuple[torch.Tensor, torch.Tensor]]], *, data: str
) -> dict[str, Any]:
    """``result["ood"]`` of `ensc eval --ood-data`: one row per model, from its
    ``{score: (in, out)}`` (:func:`paired_scores`).

    Layout: ``{"data": <--ood-data>, "n_in", "n_out", "positive": "in-distribution",
    "models": [{"name", "max_prob_auroc", "max_prob_fpr95", "entropy_auroc", "entropy_fpr95"
    [, "mutual_info_auroc", "mutual_info_fpr95"]}, ...]}``: AUROC and FPR@95 are fractions in
    [0, 1]; mutual information only for ensembles.
    """
    if not models:
        raise ValueError("ood_section needs at least one model")
    first = next(iter(next(iter(models.values())).values()))
    return {
        "data": data,
        "n_in": int(first[0].numel()),
        "n_out": int(first[1].numel()),
        "positive": "in-distribution",
        "models": [{"name": name, **detection(pairs)} for name, pairs in models.items()],
    }
