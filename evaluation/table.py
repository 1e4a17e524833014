"""Render result rows as a Markdown table: readable in a terminal, pasteable into an issue."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# column key -> (header, format); values missing from a row print as "-"
COLUMNS: dict[str, tuple[str, str]] = {
    "acc": ("ACC %", "{:.2f}"),
    "nll": ("NLL", "{:.4f}"),
    "bs": ("BS", "{:.4f}"),
    "ece": ("ECE", "{:.4f}"),
    "cnll": ("cNLL", "{:.4f}"),
    "cbs": ("cBS", "{:.4f}"),
    "cece": ("cECE", "{:.4f}"),
    "dee": ("DEE", "{:.2f}"),
    "kl_div": ("KL div", "{:.4f}"),
    "disagreement": ("disagr.", "{:.4f}"),
    "agreement": ("agree DE %", "{:.2f}"),
    "max_prob_auroc": ("AUROC maxP", "{:.3f}"),
    "max_prob_fpr95": ("FPR95 maxP", "{:.3f}"),
    "entropy_auroc": ("AUROC H", "{:.3f}"),
    "entropy_fpr95": ("FPR95 H", "{:.3f}"),
    "mutual_info_auroc": ("AUROC MI", "{:.3f}"),
    "mutual_info_fpr95": ("FPR95 MI", "{:.3f}"),
    "fast_weight_spread": ("r,s spread", "{:.2f}"),
    "val_acc": ("val ACC %", "{:.2f}"),
    "val_cnll": ("val cNLL", "{:.4f}"),
    "gap_acc": ("gap ACC %", "{:.0f}"),
    "gap_cnll": ("gap cNLL %", "{:.0f}"),
    "steps": ("steps", "{:d}"),
    "s_per_step": ("s/step", "{:.2f}"),
    "wall_min": ("wall min", "{:.1f}"),
}


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return fmt.format(value)


def markdown_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str], name_header: str = "model"
) -> str:
    """One row per dict (its ``name`` first), the given metric columns after it."""
    header = [name_header] + [COLUMNS[c][0] for c in columns]
    body = [[str(r["name"])] + [_cell(r.get(c), COLUMNS[c][1]) for c in columns] for r in rows]
    return render_table(header, body)


def render_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None
) -> str:
    """A Markdown table of text cells; ``align`` has one letter per column, ``l`` or ``r``.

    The default aligns the first column left and the others right; columns are padded to their
    widest cell so the table also reads well in a terminal.
    """
    align = align or "l" + "r" * (len(header) - 1)
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]

    def line(values: Sequence[str]) -> str:
        padded = [
            v.ljust(w) if a == "l" else v.rjust(w)
            for v, w, a in zip(values, widths, align, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = "|".join(
        "-" * (w + 1) + (":" if a == "r" else "-") for w, a in zip(widths, align, strict=True)
    )
    return "\n".join([line(header), f"|{rule}|", *(line(r) for r in rows)])
