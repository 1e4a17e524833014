"""``--tensorboard DIR``: a run's curves as TensorBoard event files (``torch.utils.tensorboard``).

The same scalars as ``curves.csv`` (:mod:`ensc.engine.curves`), written as each record comes:
``train/loss``, ``train/kd``, ``train/ce``, ``train/acc``, ``train/lr`` at every epoch's end and
``val/acc``, ``val/nll`` wherever the averaged network was validated, by optimizer step; the
run's command and settings as text at the start; at the end the settings as hparams with the
final test metrics. A resumed run writes only the records after the step it resumed from. The
``tensorboard`` package is an optional extra (``pip install 'ensc[tensorboard]'``).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from ensc.engine.curves import rows
from ensc.errors import MissingExtraError

MISSING = "--tensorboard needs the tensorboard package: pip install 'ensc[tensorboard]'"
TRAIN = ("loss", "kd", "ce", "acc", "lr")
VAL = {"val_acc": "val/acc", "val_nll": "val/nll"}


def require_tensorboard() -> None:
    """One line (:class:`MissingExtraError`) unless TensorBoard's writer can be used."""
    if importlib.util.find_spec("tensorboard") is None:
        raise MissingExtraError(MISSING)


class TensorBoardLog:
    """An event-file writer in ``log_dir`` that takes the loop's history as it grows."""

    def __init__(self, log_dir: Path) -> None:
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.done_step = -1  # records up to this step are written

    def text(self, tag: str, text: str) -> None:
        self.writer.add_text(tag, text)
        self.writer.flush()

    def records(self, history: dict[str, Any]) -> None:
        """Every record of ``history`` not written yet (a resumed run: from where it resumed)."""
        if self.done_step < 0 and history.get("resumed_steps"):
            self.done_step = history["resumed_steps"]
        for record in rows(history):
            step = record["step"]
            if step <= self.done_step:
                continue
            if record.get("loss") is not None:
                for key in TRAIN:
                    if record.get(key) is not None:
                        self.writer.add_scalar(f"train/{key}", record[key], step)
            for key, tag in VAL.items():
                if record.get(key) is not None:
                    self.writer.add_scalar(tag, record[key], step)
            self.done_step = step
        self.writer.flush()

    def hparams(self, settings: dict[str, Any], metrics: dict[str, float]) -> None:
        """The run's settings (numbers, strings, booleans) with its final metrics."""
        params = {k: v if isinstance(v, int | float | str | bool) else json.dumps(v)
                  for k, v in settings.items() if v is not None}  # fmt: skip
        self.writer.add_hparams(params, metrics, run_name=".")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
