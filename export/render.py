"""Render export and bench results: Markdown tables (readable in a terminal), JSON, a PNG plot."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ensc.errors import plural
from ensc.evaluation.table import render_table
from ensc.fileio import atomic_write

if TYPE_CHECKING:
    from ensc.export.bench import BenchResult
    from ensc.export.validate import ParityReport

MATPLOTLIB_MISSING = "matplotlib is not installed, so no plot was drawn (pip install matplotlib)"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def human_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def human_count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)


# --- export ---------------------------------------------------------------------------------


def parity_table(reports: Sequence[ParityReport]) -> str:
    """One row per validated precision: differences, agreement, accuracies and the verdict."""
    rows = []
    for r in reports:
        gate = []
        if r.tolerance.atol is not None:
            gate.append(f"Δlogit ≤ {r.tolerance.atol:g}")
        if r.tolerance.min_agreement is not None:
            gate.append(f"agree ≥ {r.tolerance.min_agreement:g} %")
        if r.tolerance.max_acc_drop is not None:
            gate.append(f"Δacc ≤ {r.tolerance.max_acc_drop:g}")
        rows.append([
            r.precision, str(r.n_images), _num(r.max_abs_logit_diff, "{:.2e}"), _num(r.max_abs_prob_diff, "{:.2e}"),
            _num(r.agreement, "{:.2f}"), _num(r.acc_pytorch, "{:.2f}"), _num(r.acc_onnx, "{:.2f}"),
            _num(r.acc_drop, "{:+.2f}"), ", ".join(gate), "ok" if r.passed else "FAILED",
        ])  # fmt: skip
    header = ["precision", "images", "max Δlogit", "max Δprob", "agree %", "acc PyTorch %",
              "acc ONNX %", "Δacc", "gate", "result"]  # fmt: skip
    return render_table(header, rows, "lrrrrrrrll")


# --- bench ----------------------------------------------------------------------------------


def latency_table(result: BenchResult) -> str:
    """Latency percentiles, throughput and speed-up, one row per candidate and batch size."""
    rows = [
        [r.name, r.engine, r.precision, str(r.batch_size), f"{r.p50_ms:.2f}", f"{r.p90_ms:.2f}", f"{r.p99_ms:.2f}",
         f"{r.images_per_s:,.0f}", _num(r.speedup_vs_teacher, "{:.2f}×")]
        for r in result.rows
    ]  # fmt: skip
    header = [
        "model",
        "engine",
        "prec.",
        "batch",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "images/s",
        "vs teacher",
    ]
    return render_table(header, rows, "lllrrrrrr")


def model_table(result: BenchResult) -> str:
    """What each candidate costs and how accurate it is (one row per candidate)."""
    seen, rows = set(), []
    for r in result.rows:
        key = (r.name, r.engine, r.precision)
        if key in seen:
            continue
        seen.add(key)
        rows.append([r.name, r.engine, r.precision, human_count(r.params), human_count(r.macs),
                     human_bytes(r.file_bytes), f"{r.accuracy:.2f}"])  # fmt: skip
    header = ["model", "engine", "prec.", "params", "MACs/image", "file", "test acc %"]
    return render_table(header, rows, "lllrrrr")


def environment_lines(result: BenchResult) -> list[str]:
    env = result.environment
    load = env.get("loadavg_1min") or {}
    device = env.get("gpu") or f"{env.get('cpu')} ({env.get('logical_cpus')} logical CPUs)"
    return [
        f"hardware: {device}; {plural(env.get('threads'), 'thread')} for both engines",
        f"software: torch {env.get('torch')}, onnxruntime {env.get('onnxruntime')} "
        f"({', '.join(env.get('onnxruntime_providers', []))}), Python {env.get('python')}, {env.get('platform')}",
        f"timing: {result.config.get('warmup')} warm-up + {result.config.get('repeats')} timed calls per model "
        f"and batch size, interleaved round-robin; 1-min load average {load.get('before')} → {load.get('after')}",
        f"accuracy: {result.n_test} {result.dataset} test images",
    ]


def bench_text(result: BenchResult) -> str:
    """The terminal rendering: both tables, then notes."""
    parts = [latency_table(result), "", model_table(result), ""]
    parts += [f"- {line}" for line in environment_lines(result)]
    parts += [f"- note: {n}" for n in result.notes]
    return "\n".join(parts)


def bench_markdown(result: BenchResult, title: str = "ensc bench") -> str:
    parts = [f"# {title}", ""]
    if result.command:
        parts += [f"`{result.command}`", ""]
    parts += [f"- {line}" for line in environment_lines(result)]
    parts += ["", "## Latency", "", latency_table(result), "",
              "p50/p90/p99: per-call wall time of one batch; images/s = batch / p50; "
              "vs teacher = teacher p50 / p50 on the same engine and batch size.", "",
              "## Models", "", model_table(result), ""]  # fmt: skip
    if result.notes:
        parts += ["## Notes", "", *[f"- {n}" for n in result.notes], ""]
    return "\n".join(parts)


def bench_json(result: BenchResult) -> str:
    return json.dumps(result.to_dict(), indent=2) + "\n"


def plot_bench(result: BenchResult, path: Path) -> str | None:
    """Images/s per model and batch size as a grouped bar chart (PNG); returns a note when skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return MATPLOTLIB_MISSING
    batch_sizes = sorted({r.batch_size for r in result.rows})
    labels = list(dict.fromkeys(f"{r.name}\n{r.engine} {r.precision}" for r in result.rows))
    fig, axes = plt.subplots(
        1, len(batch_sizes), figsize=(4 * len(batch_sizes), 0.45 * len(labels) + 1.5)
    )
    axes = [axes] if len(batch_sizes) == 1 else list(axes)
    for ax, b in zip(axes, batch_sizes, strict=True):
        values = {
            f"{r.name}\n{r.engine} {r.precision}": r.images_per_s
            for r in result.rows
            if r.batch_size == b
        }
        ax.barh(range(len(labels)), [values.get(label, 0) for label in labels])
        ax.set_yticks(
            range(len(labels)), labels if ax is axes[0] else [""] * len(labels), fontsize=7
        )
        ax.invert_yaxis()
        ax.set_title(f"batch {b}")
        ax.set_xlabel("images/s")
    fig.tight_layout()

    def write(f) -> None:
        fig.savefig(f, format="png", dpi=120)

    atomic_write(Path(path), write)
    plt.close(fig)
    return None
