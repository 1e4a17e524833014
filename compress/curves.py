"""Watch a run: validation of the averaged network during training, and its curves.

Each epoch's record (:func:`ensc.engine.loop.train`'s ``history["epochs"]``: loss with its KD and
CE parts, training accuracy, learning rate, seconds) gets the averaged network's validation
accuracy and NLL, and so does every ``--eval-every N`` steps (``history["evals"]``). The network
is the BE student averaged as it stands (its fold is exact, docs/method.md §8) with the running
BatchNorm statistics, evaluated as the final network is (BN folded, on the validation split), so
a bad setting shows on its curve early. The records go to ``curves.csv`` in the run folder as they
come (rewritten atomically, so a resumed run continues the same rows) and, at the end, to
``curves.png`` and report.json's ``curves``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ensc.compress.average import average
from ensc.data.splits import ImageDataset, take_subset
from ensc.engine.curves import COLUMNS, rows
from ensc.engine.predict import eval_copy, predict_logits_many, probe_batch
from ensc.engine.runtime import Runtime
from ensc.evaluation.metrics import accuracy, nll
from ensc.models.batchensemble import BatchEnsemble

# validation images of the curve (a fixed class-balanced subset): the fine-tune baseline's cheap
# steps spent 19-21 % of their time validating all 5,000 images once per epoch (79 steps of 128)
# in the in-domain study, the BE-4 run 3 %; 2,000 images cost 2/5 of that
CURVE_VAL_IMAGES = 2000


def validator(
    student: BatchEnsemble, data: ImageDataset, runtime: Runtime
) -> Callable[[], dict[str, float]]:
    """``evaluate()`` for the loop: the averaged network's validation accuracy (%) and NLL, on a
    fixed class-balanced subset of at most :data:`CURVE_VAL_IMAGES` validation images (the final
    evaluation uses all of them). The student is left as it is (averaging copies it)."""
    val = take_subset(data.val, CURVE_VAL_IMAGES, torch.Generator().manual_seed(0), "curve")
    splits = {"val": val}
    probe = probe_batch(splits.values(), runtime, n=64)

    def evaluate() -> dict[str, float]:
        net = eval_copy(average(student).to(runtime.device).eval(), runtime, probe)
        (logits,) = predict_logits_many([net], splits, runtime)
        probs = logits["val"].softmax(-1)
        return {"val_acc": accuracy(probs, val.labels), "val_nll": nll(probs, val.labels)}

    return evaluate


def report_section(history: dict[str, Any]) -> dict[str, Any]:
    """report["curves"]: the records, and what validating during training cost."""
    seconds = history.get("seconds", 0.0)
    spent = history.get("eval_seconds", 0.0)
    return {
        "columns": list(COLUMNS),
        "rows": [{k: r.get(k) for k in COLUMNS} for r in rows(history)],
        "eval_seconds": round(spent, 2),
        "eval_share": round(spent / seconds, 4) if seconds else None,  # of the training time
    }
