"""The pictures of docs/results.md from the study's rows (benchmarks/study_teacher.py).

    python benchmarks/study_plots.py --kd kd-none --avg be-split-mean-none

* ``docs/study/steps.png``: test cNLL and accuracy against the step budget, for KD into one network
  (rows ``<kd>-s<N>``) and the averaged network (rows ``<avg>-s<N>``), seed 0, with the member
  and the DE-4 as horizontal lines;
* ``docs/study/reliability.png``: reliability diagram of the member, KD, the averaged network and
  the DE-4 on the 10,000 test images, from the largest budget's run folders (in ``--work``); the
  bins are kept in ``docs/study/reliability.json`` so the picture can be redrawn without them.

Needs the ``plot`` extra (matplotlib).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_teacher import CIFAR_JPEG, REPO, TEACHER_DIR, kept_and_other, start_member  # noqa: E402

OUT = REPO / "docs" / "study"
N_BINS = 15


def budget_rows(plan: str, prefix: str) -> list[tuple[int, dict[str, Any]]]:
    """(steps, row) of ``<prefix>-s<N>.json`` (seed 0, default settings), sorted by steps."""
    rows = []
    for path in (OUT / plan).glob(f"{prefix}-s*.json"):
        match = re.fullmatch(rf"{re.escape(prefix)}-s(\d+)", path.stem)
        if match:
            rows.append((int(match.group(1)), json.loads(path.read_text())))
    return sorted(rows, key=lambda r: r[0])


def plot_steps(plan: str, kd: str, avg: str, plt: Any) -> Path:
    kd_rows, avg_rows = budget_rows(plan, kd), budget_rows(plan, avg)
    if not kd_rows or not avg_rows:
        raise SystemExit(f"no rows {kd}-s<N> / {avg}-s<N> in {OUT / plan}")
    first = kd_rows[0][1]
    member, teacher = start_member(first), first["test"]["teacher"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric, label in (
        (axes[0], "acc", "test accuracy (%)"),
        (axes[1], "cnll", "test cNLL"),
    ):
        for rows, name in ((kd_rows, "KD into one network"), (avg_rows, "averaged BE-4 (ensc)")):
            xs = [0] + [s for s, _ in rows]
            ys = [member[metric]] + [r["test"][kept_and_other(r)[0]][metric] for _, r in rows]
            ax.plot(xs, ys, marker="o", label=name)
        ax.axhline(member[metric], color="grey", linestyle=":", label="ResNet-32 member")
        ax.axhline(teacher[metric], color="black", linestyle="--", label="DE-4 teacher")
        ax.set_xlabel("step budget (batch 128)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    out = OUT / "steps.png"
    fig.savefig(out, dpi=110)
    return out


def reliability_data(plan: str, kd_row: str, avg_row: str, work: Path) -> dict[str, Any]:
    """Bins of the member, KD, averaged network and DE-4 on the test split (runs evaluated here)."""
    import torch

    from ensc.data.datasets import load_dataset
    from ensc.data.splits import DataConfig
    from ensc.engine.predict import predict_logits_many
    from ensc.engine.runtime import resolve_runtime
    from ensc.evaluation.metrics import reliability_bins
    from ensc.models.checkpoint import load_model
    from ensc.teachers.ensemble import load_teacher, user_code

    runtime = resolve_runtime("cpu")
    data = load_dataset(DataConfig("imagefolder", root=CIFAR_JPEG))
    with user_code(TEACHER_DIR / "code"):  # the students' architecture is the teacher's code
        teacher = load_teacher(work / "ensemble.json")
        students = [
            load_model(work / "runs" / plan / row / "student.pt")[0] for row in (kd_row, avg_row)
        ]
    logits = predict_logits_many([*teacher.members, *students], {"test": data.test}, runtime)
    probs = [out["test"].softmax(-1) for out in logits]
    models = {
        "ResNet-32 member": probs[1],
        "KD into one network": probs[-2],
        "averaged BE-4 (ensc)": probs[-1],
        "DE-4 teacher": torch.stack(probs[: len(teacher)]).mean(0),
    }
    out: dict[str, Any] = {"rows": {"kd": kd_row, "avg": avg_row}, "n_bins": N_BINS, "models": {}}
    for name, p in models.items():
        count, conf, correct = reliability_bins(p, data.test.labels, N_BINS)
        out["models"][name] = {"count": count.tolist(), "sum_conf": conf.tolist(),
                               "sum_correct": correct.tolist()}  # fmt: skip
    return out


def plot_reliability(data: dict[str, Any], plt: Any) -> Path:
    fig, ax = plt.subplots(figsize=(5, 4.6))
    ax.plot([0, 1], [0, 1], color="black", linewidth=0.8, label="perfect calibration")
    for name, bins in data["models"].items():
        pts = [(c / n, a / n) for n, c, a in zip(bins["count"], bins["sum_conf"],
                                                 bins["sum_correct"], strict=True) if n >= 20]  # fmt: skip
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=name)
    ax.set_xlabel("confidence (max probability)")
    ax.set_ylabel("accuracy")
    ax.set_title("reliability on the 10,000 test images (bins with ≥ 20 images)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = OUT / "reliability.png"
    fig.savefig(out, dpi=110)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", default="main")
    parser.add_argument("--kd", required=True, help="row prefix of KD into one network")
    parser.add_argument("--avg", required=True, help="row prefix of the averaged network")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "ensc" / "study")
    args = parser.parse_args()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("the pictures need matplotlib: pip install -e '.[plot]'") from None
    print(plot_steps(args.plan, args.kd, args.avg, plt))
    cache = OUT / "reliability.json"
    largest = max(s for s, _ in budget_rows(args.plan, args.avg))
    rows = (f"{args.kd}-s{largest}", f"{args.avg}-s{largest}")
    data = json.loads(cache.read_text()) if cache.exists() else None
    if data is None or tuple(data["rows"].values()) != rows:
        data = reliability_data(args.plan, *rows, args.work)
        cache.write_text(json.dumps(data, indent=1) + "\n")
    print(plot_reliability(data, plt))


if __name__ == "__main__":
    main()
