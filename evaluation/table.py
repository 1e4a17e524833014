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
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=False))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule, *(line(b) for b in body)])
