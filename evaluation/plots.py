"""Pictures of an evaluation as PNG files: reliability diagram, DEE curve, OOD score histograms,
accuracy and cNLL against corruption severity.

matplotlib is an optional extra (``pip install 'ensc[plot]'``), imported only when a picture is
drawn, and only its object-oriented API with the Agg canvas (no pyplot, no global backend
switch). Without it every function here raises :class:`~ensc.errors.MissingExtraError` with
:data:`MATPLOTLIB_MISSING`. Every file is written atomically (:func:`ensc.fileio.atomic_write`)
and an existing file is refused unless ``force``.

`ensc eval --plot DIR` writes :data:`EVAL_PICTURES` there (:func:`eval_pictures`); `ensc compress`
puts a reliability diagram and the DEE curve in the run folder, linked from report.md, and the OOD
histograms and corruption curves with ``--ood-data`` / ``--corruptions``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ensc.errors import MissingExtraError
from ensc.evaluation.metrics import deep_ensemble_equivalent, format_dee
from ensc.evaluation.ood import SCORES, detection
from ensc.fileio import atomic_write, refuse_overwrite

MATPLOTLIB_MISSING = "the pictures need matplotlib: pip install 'ensc[plot]'"
DPI = 110
# `ensc eval --plot DIR`: file name -> what it shows
EVAL_PICTURES = {
    "reliability.png": "reliability diagram of every model on the test split",
    "dee.png": "the teacher's prefix-ensemble cNLL curve, the students' cNLL as points",
    "ood_scores.png": "OOD score histograms, in- vs out-of-distribution, per model (--ood-data)",
    "corruptions.png": "accuracy and cNLL against corruption severity (--corruptions)",
}
_SCORE_LABELS = {
    "max_prob": "max probability",
    "entropy": "entropy (nats)",
    "mutual_info": "mutual information (nats)",
}

# (count, Σ confidence, Σ correct) per bin, as metrics.reliability_bins returns them (or lists)
Bins = Sequence[Any]


def require_matplotlib() -> None:
    """Raise :class:`MissingExtraError` (one line) unless matplotlib can be imported."""
    _figure_class()


def _figure_class() -> Any:
    """A function ``(width, height) in inches -> Figure`` drawing through the Agg canvas."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingExtraError(MATPLOTLIB_MISSING) from None

    def new(width: float, height: float) -> Any:
        fig = Figure(figsize=(width, height))
        FigureCanvasAgg(fig)  # attaches itself to fig: PNG through Agg
        return fig

    return new


def _save(fig: Any, path: Path, force: bool) -> Path:
    path = Path(path)
    refuse_overwrite(path, force)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI))
    return path


def _values(x: Any) -> list[float]:
    return [float(v) for v in (x.tolist() if isinstance(x, torch.Tensor) else x)]


def reliability_diagram(
    models: Mapping[str, Bins],
    path: Path,
    *,
    title: str = "reliability on the test split",
    min_count: int = 5,
    force: bool = False,
) -> Path:
    """Accuracy against confidence per bin, one line per model on one axes, with the diagonal.

    ``models`` maps a name to its (count, Σ confidence, Σ correct) per bin, as
    :func:`~ensc.evaluation.metrics.reliability_bins` returns them; bins with fewer than
    ``min_count`` images (too few to measure an accuracy) are left out.
    """
    fig = _figure_class()(5.2, 4.8)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="black", linewidth=0.8, label="perfect calibration")
    for name, (count, conf, correct) in models.items():
        pts = [
            (c / n, a / n)
            for n, c, a in zip(_values(count), _values(conf), _values(correct), strict=True)
            if n >= max(min_count, 1)
        ]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=name)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (max probability)", ylabel="accuracy")
    ax.set_title(f"{title} (bins with ≥ {min_count} images)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path, force)


def dee_curve(
    curve: Sequence[float],
    points: Mapping[str, float],
    path: Path,
    *,
    force: bool = False,
) -> Path:
    """The teacher's prefix-ensemble cNLL against m (DE-1 … DE-M), each of ``points`` (a model's
    cNLL) as a dashed level with a marker where it meets the curve, at its DEE (docs/method.md §9).
    """
    m = len(curve)
    if m == 0:
        raise ValueError("the DEE curve needs at least one teacher member")
    fig = _figure_class()(5.6, 4.2)
    ax = fig.add_subplot()
    xs = list(range(1, m + 1))
    ax.plot(xs, list(curve), marker="o", color="black", label=f"teacher DE-m, m = 1 … {m}")
    for i, (name, value) in enumerate(points.items()):
        dee = deep_ensemble_equivalent(value, curve)
        color = f"C{i}"
        label = f"{name}: cNLL {value:.4f}, DEE {format_dee(dee, m)}"
        ax.axhline(value, color=color, linestyle="--", linewidth=1, label=label)
        if 1 <= dee <= m:
            ax.plot([dee], [value], marker="*", markersize=11, color=color)
    ax.set_xticks(xs)
    ax.set(xlabel="teacher members averaged (m)", ylabel="test cNLL")
    ax.set_title("deep ensemble equivalent (DEE)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path, force)


def training_curves(
    rows: Sequence[Mapping[str, Any]],
    path: Path,
    *,
    lines: Mapping[str, float] | None = None,
    force: bool = False,
) -> Path:
    """Training of a run by step: loss (with its KD and CE parts), learning rate, and the
    network's validation accuracy, with ``lines`` (name -> validation accuracy, e.g. the teacher
    ensemble and the start member) as horizontal references."""
    fig = _figure_class()(11.0, 3.4)
    loss_ax, lr_ax, val_ax = (fig.add_subplot(1, 3, k) for k in (1, 2, 3))
    epochs = [r for r in rows if r.get("loss") is not None]
    steps = [r["step"] for r in epochs]
    loss_ax.plot(steps, [r["loss"] for r in epochs], marker="o", color="black", label="loss")
    for key, color in (("kd", "C0"), ("ce", "C1")):
        values = [r.get(key) or 0.0 for r in epochs]
        if any(values):
            loss_ax.plot(steps, values, marker=".", color=color, linestyle="--", label=key.upper())
    loss_ax.set(xlabel="step", ylabel="training loss (epoch mean)")
    with_lr = [r for r in rows if r.get("lr") is not None]
    lr_ax.plot([r["step"] for r in with_lr], [r["lr"] for r in with_lr], marker="o", color="C2")
    lr_ax.set(xlabel="step", ylabel="learning rate")
    val = [r for r in rows if r.get("val_acc") is not None]
    val_ax.plot([r["step"] for r in val], [r["val_acc"] for r in val], marker="o", color="C3",
                label="this network")  # fmt: skip
    for i, (name, value) in enumerate((lines or {}).items()):
        val_ax.axhline(value, color=f"C{4 + i}", linestyle="--", linewidth=1, label=name)
    val_ax.set(xlabel="step", ylabel="validation accuracy (%)")
    for ax in (loss_ax, lr_ax, val_ax):
        ax.grid(alpha=0.3)
    loss_ax.legend(fontsize=7)
    val_ax.legend(fontsize=7)
    return _save(fig, path, force)


def ood_histograms(
    models: Mapping[str, Mapping[str, tuple[torch.Tensor, torch.Tensor]]],
    path: Path,
    *,
    out_name: str = "OOD",
    force: bool = False,
) -> Path:
    """One row per model, one column per score (max probability, entropy, mutual information):
    histograms of the in-distribution and the OOD inputs' scores (densities, shared bins), each
    titled with its AUROC. ``models``: {name: {score: (in [N], out [N'])}}
    (:func:`~ensc.evaluation.ood.paired_scores`)."""
    if not models:
        raise ValueError("no models to draw OOD scores of")
    columns = [s for s in SCORES if any(s in pairs for pairs in models.values())]
    fig = _figure_class()(3.3 * len(columns), 2.3 * len(models) + 0.3)
    axes = fig.subplots(len(models), len(columns), squeeze=False)
    for row, (name, pairs) in zip(axes, models.items(), strict=True):
        aurocs = detection(pairs)
        for ax, score in zip(row, columns, strict=True):
            if score not in pairs:
                ax.axis("off")
                continue
            a, b = (s.to(torch.float64) for s in pairs[score])
            lo, hi = min(a.min().item(), b.min().item()), max(a.max().item(), b.max().item())
            edges = torch.linspace(lo, hi if hi > lo else lo + 1e-6, 31).tolist()
            ax.hist(a.numpy(), bins=edges, density=True, alpha=0.55, label="in-distribution")
            ax.hist(b.numpy(), bins=edges, density=True, alpha=0.55, label=out_name)
            ax.set_title(f"{name}: AUROC {aurocs[f'{score}_auroc']:.3f}", fontsize=8)
            ax.set_xlabel(_SCORE_LABELS[score], fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    return _save(fig, path, force)


def corruption_curves(
    corruptions: Mapping[str, Any],
    path: Path,
    *,
    clean: Mapping[str, Mapping[str, float]] | None = None,
    force: bool = False,
) -> Path:
    """Accuracy and cNLL against corruption severity, one line per model.

    ``corruptions`` is ``result["corruptions"]`` of `ensc eval --corruptions`
    (:mod:`ensc.evaluation.corruptions`): ``{"models": [{"name", "by_severity": {"1": {"acc",
    "cnll", ...}, ..., "5": {...}}}, ...]}``, each severity's metrics the mean over the
    corruptions. ``clean`` ({name: {"acc", "cnll"}}, the uncorrupted test split) adds severity 0
    to the models it names.
    """
    series = {}
    for model in corruptions.get("models", []):
        rows = sorted((int(s), m) for s, m in model["by_severity"].items())
        if clean and model["name"] in clean:
            rows.insert(0, (0, clean[model["name"]]))
        series[model["name"]] = rows
    if not series:
        raise ValueError("no model under corruption to draw")
    fig = _figure_class()(9.5, 3.8)
    axes = fig.subplots(1, 2)
    for ax, metric, label in ((axes[0], "acc", "accuracy (%)"), (axes[1], "cnll", "cNLL")):
        for name, rows in series.items():
            pts = [(s, m[metric]) for s, m in rows if m.get(metric) is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xticks(sorted({s for rows in series.values() for s, _ in rows}))
        ax.set(xlabel="corruption severity (0 = clean)", ylabel=label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _save(fig, path, force)


def eval_pictures(
    result: Mapping[str, Any], details: Mapping[str, Any], folder: Path, *, force: bool = False
) -> list[Path]:
    """Draw what ``result`` (of :func:`ensc.evaluation.evaluate.evaluate`) and its ``details``
    hold into ``folder``: the files of :data:`EVAL_PICTURES` that apply. Every target is checked
    before the first is written, so a refusal leaves the folder as it was."""
    folder = Path(folder)
    jobs: list[tuple[str, Callable[..., Path]]] = []
    if details.get("reliability"):
        jobs.append(("reliability.png", partial(reliability_diagram, details["reliability"])))
    if result.get("de_cnll_curve"):
        students = [r for r in result.get("students", []) if r.get("cnll") is not None]
        points = {r["name"]: r["cnll"] for r in students}
        jobs.append(("dee.png", partial(dee_curve, result["de_cnll_curve"], points)))
    if details.get("ood_scores"):
        out_name = str(result.get("ood", {}).get("data", "OOD"))
        draw = partial(ood_histograms, details["ood_scores"], out_name=out_name)
        jobs.append(("ood_scores.png", draw))
    if result.get("corruptions"):
        rows = [*result.get("members", []), *result.get("ensembles", []), *result.get("students", [])]  # fmt: skip
        # severity 0 only when the corrupted images are the clean test split's, not a subset
        same = result["corruptions"].get("n_test") == result.get("n_test")
        clean = {r["name"]: r for r in rows} if same else None
        draw = partial(corruption_curves, result["corruptions"], clean=clean)
        jobs.append(("corruptions.png", draw))
    if jobs:
        require_matplotlib()
    for name, _ in jobs:
        refuse_overwrite(folder / name, force)
    return [draw(folder / name, force=True) for name, draw in jobs]


def eval_picture_names(*, teacher: bool, ood: bool, corruptions: bool = False) -> list[str]:
    """The files :func:`eval_pictures` will write for an evaluation with these parts, to refuse
    existing ones before evaluating."""
    wanted = {"reliability.png": True, "dee.png": teacher, "ood_scores.png": ood,
              "corruptions.png": corruptions}  # fmt: skip
    return [name for name, on in wanted.items() if on]
