"""Evaluation metrics of docs/method.md §9: ACC, NLL, Brier, ECE, temperature scaling, DEE,
diversity.

Conventions (shared by every function here):

- ``probs`` is a float tensor ``[N, K]`` of predictive probabilities (rows sum to 1);
- ``labels`` is an integer tensor ``[N]`` with values in ``[0, K)``;
- ``member_probs`` is ``[M, N, K]``: the predictive probabilities of M ensemble members.

All arithmetic is done in float64 and every function returns a Python ``float``. Accuracy and
agreement are in percent; NLL, Brier, ECE (a fraction, e.g. 0.008), KL and disagreement
(a fraction) are raw. Probabilities are clamped at ``EPS`` before a logarithm so an exact zero
gives a large finite penalty (−log 1e-12 ≈ 27.6) instead of ``inf``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

EPS = 1e-12  # floor applied to probabilities before taking a log
T_MIN, T_MAX = 0.05, 20.0  # range of fitted temperatures
_SUM_TOL = 1e-3  # how far a row of `probs` may sum from 1 before we suspect logits were passed
# The unit of each metric in a row (Metrics.to_dict, scores.Scorer.row) and in an OOD row
# (<score>_auroc, <score>_fpr95): `ensc eval --json` and report.json state them under "units".
UNITS = {
    "acc": "percent",
    "agreement": "percent (top-1 agreement with the teacher's DE-M)",
    "nll": "nats per image",
    "cnll": "nats per image",
    "bs": "squared error summed over classes, per image, in [0, 2]",
    "cbs": "squared error summed over classes, per image, in [0, 2]",
    "ece": "fraction in [0, 1] (15 bins)",
    "cece": "fraction in [0, 1] (15 bins)",
    "temperature": "none (log-probabilities are divided by it)",
    "dee": "teacher members (a number in [1, M], else the string '<1' or '>M')",
    "dee_members": "count (M of the curve the DEE is read from)",
    "kl_div": "nats (mean pairwise KL between the members)",
    "disagreement": "fraction in [0, 1] (mean pairwise argmax disagreement)",
    "auroc": "fraction in [0, 1] (every <score>_auroc of an OOD row; 0.5 is chance)",
    "fpr95": "fraction in [0, 1] (every <score>_fpr95 of an OOD row; 0 is perfect)",
}


# --------------------------------------------------------------------------- input checks


def _check_probs(probs: torch.Tensor, name: str = "probs") -> torch.Tensor:
    """Validate a ``[..., K]`` probability tensor and return it as float64."""
    if not torch.is_floating_point(probs):
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {probs.dtype}")
    p = probs.detach().to(torch.float64)
    if p.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(probs.shape)})")
    if bool((p < 0).any()) or bool(((p.sum(-1) - 1).abs() > _SUM_TOL).any()):
        raise ValueError(
            f"{name} must hold probabilities (non-negative, rows summing to 1); "
            "if you have logits, pass logits.softmax(-1)"
        )
    return p


def _check_labels(labels: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Validate integer labels ``[n]`` with values in ``[0, k)``."""
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if labels.shape != (n,):
        raise ValueError(
            f"labels must have shape ({n},) to match the predictions, got {tuple(labels.shape)}"
        )
    if bool((labels < 0).any()) or bool((labels >= k).any()):
        raise ValueError(
            f"labels must lie in [0, {k}), got range [{int(labels.min())}, {int(labels.max())}]"
        )
    return labels.to(torch.int64)


def _probs_and_labels(
    probs: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    if probs.ndim != 2:
        raise ValueError(f"probs must have shape [N, K], got {tuple(probs.shape)}")
    p = _check_probs(probs)
    n, k = p.shape
    return p, _check_labels(labels, n, k).to(p.device)


def _check_members(member_probs: torch.Tensor) -> torch.Tensor:
    if member_probs.ndim != 3:
        raise ValueError(f"member_probs must have shape [M, N, K], got {tuple(member_probs.shape)}")
    return _check_probs(member_probs, "member_probs")


# --------------------------------------------------------------------------- basic metrics


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent (ties go to the lowest class index, as ``argmax``)."""
    p, y = _probs_and_labels(probs, labels)
    return 100.0 * (p.argmax(-1) == y).to(torch.float64).mean().item()


def nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood ``mean_n −log p_n[y_n]`` (probabilities floored at EPS)."""
    p, y = _probs_and_labels(probs, labels)
    p_y = p.gather(1, y[:, None]).squeeze(1)  # [N]
    return -p_y.clamp_min(EPS).log().mean().item()


def brier(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Brier score: mean over examples of ``Σ_k (p_k − 1[y = k])²`` (summed over classes)."""
    p, y = _probs_and_labels(probs, labels)
    onehot = F.one_hot(y, p.shape[1]).to(torch.float64)  # [N, K]
    return (p - onehot).pow(2).sum(1).mean().item()


def reliability_bins(
    probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per bin of the confidence max_k p_k: (count, Σ confidence, Σ correct), float64 [n_bins].

    Bin ``b`` covers ``(b/n, (b+1)/n]`` (right-closed, as in Guo et al. 2017), so a confidence
    of exactly ``b/n`` falls in the lower bin and 1.0 in the last. A reliability diagram plots
    Σ correct / count against Σ confidence / count.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    p, y = _probs_and_labels(probs, labels)
    conf, pred = p.max(-1)  # [N], [N]
    correct = (pred == y).to(torch.float64)  # [N]
    # Upper edges b/n computed as a division so e.g. 12/15 is the same double as the literal 0.8.
    upper = torch.arange(1, n_bins + 1, dtype=torch.float64, device=p.device) / n_bins  # [n]
    bins = torch.bucketize(conf, upper, right=False).clamp_max(n_bins - 1)  # [N]
    count = torch.zeros(n_bins, dtype=torch.float64, device=p.device).index_add_(
        0, bins, torch.ones_like(conf)
    )
    sum_conf = torch.zeros_like(count).index_add_(0, bins, conf)
    sum_correct = torch.zeros_like(count).index_add_(0, bins, correct)
    return count, sum_conf, sum_correct


def ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """Expected calibration error over ``n_bins`` equal-width bins of the confidence (see
    :func:`reliability_bins`): Σ_b (|B_b|/N) · |acc(B_b) − conf(B_b)|, a fraction (not percent).
    """
    count, sum_conf, sum_correct = reliability_bins(probs, labels, n_bins)
    # Σ_b (|B_b|/N)·|acc_b − conf_b| = Σ_b |Σ_{B_b} correct − Σ_{B_b} conf| / N
    return ((sum_correct - sum_conf).abs().sum() / count.sum()).item()


def agreement(probs_a: torch.Tensor, probs_b: torch.Tensor) -> float:
    """Top-1 agreement in percent: how often two predictors have the same argmax."""
    if probs_a.shape != probs_b.shape or probs_a.ndim != 2:
        raise ValueError(
            f"agreement needs two [N, K] tensors of equal shape, got "
            f"{tuple(probs_a.shape)} and {tuple(probs_b.shape)}"
        )
    a, b = _check_probs(probs_a, "probs_a"), _check_probs(probs_b, "probs_b")
    return 100.0 * (a.argmax(-1) == b.argmax(-1)).to(torch.float64).mean().item()


# --------------------------------------------------------------------------- temperature


def _log_probs(probs: torch.Tensor) -> torch.Tensor:
    """``log(max(p, EPS))`` in float64: the input temperature scaling expects."""
    return _check_probs(probs).clamp_min(EPS).log()


def _nll_slope(z: torch.Tensor, z_y: torch.Tensor, beta: float) -> tuple[float, float]:
    """First and second derivative in β of ``mean_n [logsumexp(β z_n) − β z_n,y]``."""
    p = (beta * z).softmax(-1)  # [N, K]
    mean_z = (p * z).sum(-1)  # [N]: E_p[z]
    var_z = (p * (z - mean_z[:, None]).pow(2)).sum(-1)  # [N]: Var_p[z] >= 0
    return (mean_z - z_y).mean().item(), var_z.mean().item()


def fit_temperature(log_probs_val: torch.Tensor, labels_val: torch.Tensor) -> float:
    """Temperature T in [T_MIN, T_MAX] minimizing the NLL of ``softmax(log_probs_val / T)``.

    ``log_probs_val`` ``[N, K]`` are log-probabilities (for an ensemble, the log of the mean
    probability, as the [DM] code does; floor zeros first, e.g. ``p.clamp_min(EPS).log()``) or
    logits (softmax is shift-invariant). The NLL is convex in β = 1/T, so its minimizer is the
    root of the increasing derivative; we find it with Newton steps safeguarded by bisection
    (deterministic, converges to ~1e-10 relative in a handful of passes over the data).
    """
    if log_probs_val.ndim != 2 or not torch.is_floating_point(log_probs_val):
        raise ValueError(
            f"log_probs_val must be a float [N, K] tensor, got "
            f"{log_probs_val.dtype} {tuple(log_probs_val.shape)}"
        )
    z = log_probs_val.detach().to(torch.float64)
    if not bool(torch.isfinite(z).all()):
        raise ValueError(
            "log_probs_val contains NaN or inf; floor probabilities before the log, "
            "e.g. probs.clamp_min(1e-12).log()"
        )
    y = _check_labels(labels_val, z.shape[0], z.shape[1]).to(z.device)
    z = z - z.max(-1, keepdim=True).values  # [N, K]; shift per row, NLL unchanged
    z_y = z.gather(1, y[:, None]).squeeze(1)  # [N]

    lo, hi = 1.0 / T_MAX, 1.0 / T_MIN  # bracket on β
    if _nll_slope(z, z_y, lo)[0] >= 0:  # NLL still falling as T grows past T_MAX
        beta = lo
    elif _nll_slope(z, z_y, hi)[0] <= 0:  # NLL still falling as T shrinks below T_MIN
        beta = hi
    else:
        beta = 1.0
        for _ in range(100):
            grad, hess = _nll_slope(z, z_y, beta)
            if grad == 0:
                break
            if grad > 0:
                hi = beta
            else:
                lo = beta
            step = beta - grad / hess if hess > 0 else math.nan
            if not lo <= step <= hi:  # Newton left the bracket: bisect instead
                step = 0.5 * (lo + hi)
            converged = abs(step - beta) <= 1e-10 * beta or hi - lo <= 1e-12 * beta
            beta = step
            if converged:
                break
    t = 1.0 / beta
    if beta in (1.0 / T_MAX, 1.0 / T_MIN):
        logger.warning("fitted temperature %.4g hit the clamp range [%g, %g]", t, T_MIN, T_MAX)
    return t


def apply_temperature(log_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Return ``softmax(log_probs / T)`` (float64) — temperature-scaled probabilities."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return (log_probs.detach().to(torch.float64) / temperature).softmax(-1)


# --------------------------------------------------------------------------- DEE


def deep_ensemble_equivalent(nll_value: float, de_nlls: Sequence[float]) -> float:
    """Deep ensemble equivalent: the ensemble size m whose NLL matches ``nll_value``.

    ``de_nlls[m-1]`` is the NLL of the mean of the first m teacher members. The curve through
    the points (m, de_nlls[m-1]) is linear between nodes; the result is the m at which it first
    reaches ``nll_value`` (first bracketing segment, so non-monotone curves are fine).
    Returns a float in [1, M]; 0.0 when the model is worse than one member ("<1"); ``math.inf``
    when it is better than every point of the curve (">M").
    """
    curve = [float(v) for v in de_nlls]
    if not curve:
        raise ValueError("de_nlls is empty; pass the NLL of the first m members for m = 1..M")
    if not all(math.isfinite(v) for v in curve):
        raise ValueError(f"de_nlls must be finite, got {curve}")
    v = float(nll_value)
    if math.isnan(v):
        raise ValueError("nll_value is NaN")
    # Values within float round-off of a node count as reaching it: the same ensemble evaluated
    # twice (float32 vs float64 means) must get DEE = m, not ">M".
    tol = 1e-6 * max(1.0, abs(v))
    if v > curve[0] + tol:
        return 0.0
    for m, c0 in enumerate(curve, start=1):
        if abs(v - c0) <= tol:
            return float(m)
        if m < len(curve):
            c1 = curve[m]
            if min(c0, c1) < v < max(c0, c1):
                return m + (c0 - v) / (c0 - c1)
    return math.inf


def format_dee(value: float, members: int) -> str:
    """Render a DEE for a table: ``"2.47"``, ``"<1"`` (0.0) or ``">M"`` (inf)."""
    if value == 0.0:
        return "<1"
    if value == math.inf:
        return f">{members}"
    return f"{value:.2f}"


def dee_to_json(value: float, members: int) -> float | str:
    """DEE as a JSON-safe value: a number rounded to 3 decimals, else ``"<1"`` / ``">M"``."""
    if value == 0.0 or value == math.inf:
        return format_dee(value, members)
    if not 1.0 <= value <= members:
        raise ValueError(f"DEE {value} is outside [1, {members}] and not 0.0 or inf")
    return round(value, 3)


# --------------------------------------------------------------------------- diversity


def pairwise_kl(member_probs: torch.Tensor) -> float:
    """Mean over ordered pairs i ≠ j of ``mean_n KL(p_i ‖ p_j)``; 0.0 for a single member."""
    p = _check_members(member_probs)  # [M, N, K]
    m = p.shape[0]
    if m == 1:
        return 0.0
    logp = p.clamp_min(EPS).log()  # [M, N, K]
    neg_entropy = (p * logp).sum(-1)  # [M, N]:  Σ_k p_i log p_i
    cross = torch.einsum("ink,jnk->ijn", p, logp)  # [M, M, N]:  Σ_k p_i log p_j
    kl = (neg_entropy[:, None, :] - cross).mean(-1)  # [M, M]: KL(p_i ‖ p_j) averaged over n
    off_diag = ~torch.eye(m, dtype=torch.bool, device=p.device)
    return kl[off_diag].mean().item()


def disagreement(member_probs: torch.Tensor) -> float:
    """Mean over pairs i < j of the fraction of examples whose argmax differ; 0.0 for M = 1."""
    p = _check_members(member_probs)  # [M, N, K]
    m = p.shape[0]
    if m == 1:
        return 0.0
    pred = p.argmax(-1)  # [M, N]
    i, j = torch.triu_indices(m, m, offset=1, device=p.device)  # the M(M-1)/2 pairs i < j
    return (pred[i] != pred[j]).to(torch.float64).mean().item()


# --------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class Metrics:
    """All metrics of one predictor (docs/method.md §9); the optional ones None if not computed."""

    acc: float  # top-1 accuracy, percent
    nll: float  # mean −log p_y
    bs: float  # Brier score (summed over classes)
    ece: float  # 15-bin ECE, fraction
    cnll: float | None = None  # after temperature scaling fitted on validation
    cbs: float | None = None
    cece: float | None = None
    temperature: float | None = None  # the fitted T
    dee: float | None = None  # deep ensemble equivalent: [1, M], 0.0 = "<1", inf = ">M"
    dee_members: int | None = None  # M of the DE curve the DEE was read from
    kl_div: float | None = None  # mean pairwise KL between members
    disagreement: float | None = None  # mean pairwise argmax disagreement, fraction

    def to_dict(self) -> dict[str, float | int | str | None]:
        """JSON-safe dict (None → null; DEE as a rounded number or the "<1" / ">M" string)."""
        out: dict[str, float | int | str | None] = dataclasses.asdict(self)
        if self.dee is not None:
            if self.dee_members is None:
                raise ValueError("Metrics.dee is set but dee_members is None")
            out["dee"] = dee_to_json(self.dee, self.dee_members)
        return out


def evaluate_predictions(
    probs: torch.Tensor,
    labels: torch.Tensor,
    *,
    val_probs: torch.Tensor | None = None,
    val_labels: torch.Tensor | None = None,
    member_probs: torch.Tensor | None = None,
    de_nll_curve: Sequence[float] | None = None,
) -> Metrics:
    """Compute every metric available from the given predictions.

    - always: acc, nll, bs, ece of ``probs`` [N, K] against ``labels`` [N];
    - with ``val_probs``/``val_labels``: T fitted on ``log(val_probs)``, then cnll/cbs/cece of
      ``softmax(log(probs) / T)``;
    - with ``member_probs`` [M, N, K] (the members behind ``probs``): kl_div and disagreement;
    - with ``de_nll_curve`` (e.g. from :func:`ensemble_nll_curve`): DEE of cnll when a
      validation split was given, else of nll. The caller must pass a curve of the same kind
      (calibrated curve with validation data, uncalibrated without) on the same test set.
    """
    p, y = _probs_and_labels(probs, labels)
    fields: dict[str, float | int | None] = {
        "acc": accuracy(p, y),
        "nll": nll(p, y),
        "bs": brier(p, y),
        "ece": ece(p, y),
    }
    if (val_probs is None) != (val_labels is None):
        raise ValueError("pass both val_probs and val_labels, or neither")
    if val_probs is not None and val_labels is not None:
        if val_probs.ndim != 2 or val_probs.shape[1] != p.shape[1]:
            raise ValueError(
                f"val_probs must have shape [N_val, {p.shape[1]}], got {tuple(val_probs.shape)}"
            )
        t = fit_temperature(_log_probs(val_probs), val_labels)
        scaled = apply_temperature(_log_probs(p), t)
        fields.update(temperature=t, cnll=nll(scaled, y), cbs=brier(scaled, y), cece=ece(scaled, y))
    if member_probs is not None:
        if member_probs.ndim != 3 or member_probs.shape[1:] != p.shape:
            raise ValueError(
                f"member_probs must have shape [M, {p.shape[0]}, {p.shape[1]}], "
                f"got {tuple(member_probs.shape)}"
            )
        fields.update(kl_div=pairwise_kl(member_probs), disagreement=disagreement(member_probs))
    if de_nll_curve is not None:
        reference = fields["cnll"] if fields.get("cnll") is not None else fields["nll"]
        fields.update(
            dee=deep_ensemble_equivalent(reference, de_nll_curve), dee_members=len(de_nll_curve)
        )
    return Metrics(**fields)


def ensemble_nll_curve(
    member_probs: torch.Tensor,
    labels: torch.Tensor,
    *,
    val_member_probs: torch.Tensor | None = None,
    val_labels: torch.Tensor | None = None,
) -> list[float]:
    """NLL of the mean of the first m members, m = 1..M (the DE curve DEE is read from).

    With validation predictions ``val_member_probs`` [M, N_val, K] each prefix ensemble gets
    its own temperature, fitted on the log of its mean validation probability, so the curve is
    calibrated NLL (to pair with cnll in :func:`evaluate_predictions`).
    """
    p = _check_members(member_probs)  # [M, N, K]
    m, n, k = p.shape
    y = _check_labels(labels, n, k).to(p.device)
    counts = torch.arange(1, m + 1, dtype=torch.float64, device=p.device)  # [M]
    prefix_means = p.cumsum(0) / counts[:, None, None]  # [M, N, K]: mean of members 0..m-1
    if (val_member_probs is None) != (val_labels is None):
        raise ValueError("pass both val_member_probs and val_labels, or neither")
    if val_member_probs is None or val_labels is None:
        return [nll(prefix_means[i], y) for i in range(m)]

    vp = _check_members(val_member_probs)  # [M, N_val, K]
    if vp.shape[0] != m or vp.shape[2] != k:
        raise ValueError(
            f"val_member_probs must have shape [{m}, N_val, {k}], got {tuple(vp.shape)}"
        )
    val_prefix_means = vp.cumsum(0) / counts[:, None, None]  # [M, N_val, K]
    curve = []
    for i in range(m):
        t = fit_temperature(val_prefix_means[i].clamp_min(EPS).log(), val_labels)
        curve.append(nll(apply_temperature(prefix_means[i].clamp_min(EPS).log(), t), y))
    return curve
