"""A training run's record as a table: ``curves.csv`` (compress/curves.py, teachers/train.py).

:func:`ensc.engine.loop.train` keeps each epoch's record in ``history["epochs"]`` (step, loss
with its KD and CE parts, training accuracy, learning rate, seconds, and the validation metrics
when it was given ``evaluate``) and the validations between epochs in ``history["evals"]``.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from ensc.fileio import atomic_write_text

COLUMNS = ("step", "epoch", "loss", "kd", "ce", "acc", "lr", "seconds", "val_acc", "val_nll")


def rows(history: dict[str, Any]) -> list[dict[str, Any]]:
    """The records in step order: epoch ends (every column) and evaluations between them."""
    records = [*history.get("epochs", []), *history.get("evals", [])]
    return sorted(records, key=lambda r: (r["step"], "loss" not in r))


def write_csv(records: list[dict[str, Any]], path: Path) -> None:
    """``curves.csv``: one row per record (:func:`rows`), empty cells where it has no value."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({k: _cell(record.get(k)) for k in COLUMNS})
    atomic_write_text(path, out.getvalue())


def _cell(value: Any) -> Any:
    return "" if value is None else round(value, 6) if isinstance(value, float) else value
