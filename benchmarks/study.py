"""The seed table at CPU scale: DE-4 teacher → BE-4 students (KD, +Gaussian, +ODS, +ConfODS, +TDiv-SDiv),
each averaged into one network, against a single network trained alone. Writes docs/results-resnet8.md.

    python benchmarks/study.py --datasets fashion-mnist,cifar10-jpeg --epochs 5 --train-subset 8000

Every stage is resumable: rerun the same command after an interruption and finished runs are
reused (delete the --out folder to start over).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ensc import rundir
from ensc.compress.average import average, fast_weight_spread
from ensc.compress.config import compress_config
from ensc.compress.distill import DistillConfig
from ensc.compress.pipeline import run_compress
from ensc.data.datasets import load_dataset
from ensc.data.splits import DataConfig
from ensc.engine.loop import OptimConfig
from ensc.engine.runtime import resolve_runtime
from ensc.evaluation.evaluate import evaluate
from ensc.evaluation.table import markdown_table
from ensc.fileio import atomic_write_text
from ensc.models.checkpoint import load_checkpoint
from ensc.teachers.ensemble import load_teacher
from ensc.teachers.train import TeacherTrainConfig, train_teacher

REPO = Path(__file__).resolve().parents[1]
DATASETS = {
    "fashion-mnist": DataConfig("fashion-mnist"),
    "cifar10-jpeg": DataConfig(
        "imagefolder", root=REPO.parent / "shared" / "data" / "cifar10-jpeg"
    ),
}
METHODS = {
    "KD": "none",
    "KD + Gaussian": "gaussian",
    "KD + ODS": "ods",
    "KD + ConfODS": "confods",
    "KD + TDiv-SDiv": "tdiv-sdiv",
}
COLUMNS = (
    "acc",
    "nll",
    "bs",
    "ece",
    "cnll",
    "dee",
    "disagreement",
    "agreement",
    "fast_weight_spread",
)
log = logging.getLogger("study")


def run_dataset(name: str, args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out) / name
    data_config = replace(
        DATASETS[name], train_subset=args.train_subset, test_subset=args.test_subset
    )
    data = load_dataset(data_config)
    runtime = resolve_runtime(args.device)
    optim = OptimConfig(epochs=args.epochs, batch_size=args.batch_size)
    timings: dict[str, float] = {}

    def timed(key: str, fn):
        t0 = time.perf_counter()
        result = fn()
        timings[key] = round(time.perf_counter() - t0, 1)
        return result

    teacher_dir, single_dir = out / "teacher", out / "single"
    for folder, members, seed in ((teacher_dir, 4, 0), (single_dir, 1, 100)):
        config = TeacherTrainConfig(
            args.arch, data_config, folder, members=members, optim=optim, seed=seed, resume=True
        )
        train_teacher(config, runtime, data)  # resumes: finished members are kept
        # training time as recorded in the members (also right when they were trained earlier)
        timings[folder.name] = round(
            sum(
                load_checkpoint(p).metrics.get("train_seconds", 0.0)
                for p in folder.glob("member*.pt")
            ),
            1,
        )

    rows: list[dict[str, Any]] = []
    missing: list[str] = []
    chosen = args.methods.split(",")
    for label, kind in METHODS.items():
        if kind not in chosen:
            continue
        run_dir = out / kind
        if args.only_finished and rundir.state_of(run_dir) != "finished":
            missing.append(label)  # render what has finished; the missing methods are listed
            continue
        if rundir.state_of(run_dir) != "finished":
            config = compress_config(
                teacher=teacher_dir, arch=args.arch, train_subset=args.train_subset, test_subset=args.test_subset,
                epochs=args.epochs, batch_size=args.batch_size, perturb=kind, alpha=args.alpha,
                temperature=args.temperature, max_acc_drop=100.0, out=run_dir, runs_dir=out / "runs",
                resume=(run_dir / rundir.MARKER).exists(),  # else anything there is replaced
                force=run_dir.exists() and not (run_dir / rundir.MARKER).exists(),
                command=f"ensc compress --teacher {teacher_dir} --arch {args.arch} --perturb {kind} --epochs {args.epochs} --alpha {args.alpha} --temperature {args.temperature}",
            )  # fmt: skip
            timed(kind, lambda c=config: run_compress(c, runtime))
        report = json.loads((run_dir / "report.json").read_text())
        timings.setdefault(kind, report["wall_seconds"])
        student_be = load_checkpoint(run_dir / "student_be.pt").build_batchensemble()
        spread = fast_weight_spread(student_be)["max_member_spread"]
        rows.append({**report["student_be"], "name": f"BE-4 {label}", "fast_weight_spread": spread})
        rows.append({**report["student_avg"], "name": f"  ↳ averaged (1 net, BN recal.) {label}"})
        # the averaged network with the BE student's BN statistics (`--no-recalibrate-bn`)
        rows.append({"name": f"  ↳ averaged, no BN recal. {label}", "model": average(student_be)})

    single = load_checkpoint(single_dir / "member0.pt").build_model()
    extra = {r["name"]: r.pop("model") for r in rows if "model" in r}
    base = evaluate(
        data,
        runtime,
        teacher=load_teacher(teacher_dir),
        students={"single network trained alone": single, **extra},
    )
    measured = {r["name"]: r for r in base["students"]}
    rows = [measured[r["name"]] if r["name"] in measured else r for r in rows]
    de = {**base["ensembles"][-1], "name": "DE-4 teacher", "agreement": 100.0}
    return {
        "dataset": name,
        "n_train": len(data.train),
        "n_val": len(data.val),
        "n_test": len(data.test),
        "rows": [de, measured["single network trained alone"], *rows],
        "timings_seconds": timings,
        "not_run": missing,
        "teacher_members": base["members"],
    }


def render(results: list[dict[str, Any]], args: argparse.Namespace, wall: float) -> str:
    cpu = subprocess.run(
        ["sh", "-c", "lscpu | grep 'Model name' | cut -d: -f2"], capture_output=True, text=True
    ).stdout.strip()
    wall_text = (
        "Wall time: the per-stage times under each table (training, and each student's whole run); "
        f"this tabulation of finished runs took {wall / 60:.0f} min{args.note}."
        if args.only_finished
        else f"Wall time of the whole study: {wall / 60:.0f} min{args.note}."
    )
    lines = [
        "# Results: ensemble distillation at CPU scale",
        "",
        "Measured by",
        "",
        f"    python benchmarks/study.py --datasets {','.join(r['dataset'] for r in results)} "
        f"--epochs {args.epochs} --train-subset {args.train_subset} --arch {args.arch} "
        f"--alpha {args.alpha:g} --temperature {args.temperature:g}",
        "",
        f"Hardware: {cpu or platform.processor()}, {os.cpu_count()} logical CPUs, CPU only; "
        f"torch {torch.__version__}. {wall_text}",
        "",
        f"Setup: DE-4 teacher of {args.arch} members (seeds 0–3) and BE-4 {args.arch} students, all trained "
        f"{args.epochs} epochs on the same {args.train_subset}-image class-balanced training subset (batch "
        f"{args.batch_size}, SGD-Nesterov, lr 0.1 × batch/128, warm-up + cosine). Students: `ones` "
        f"fast-weight init, fast-weight decay towards 1 with gradients × M ([WA]), α = {args.alpha:g}, "
        f"T = {args.temperature:g}, perturbation step 1/255 (both papers' value). The single network trained alone is one more member (seed 100) "
        "with the teacher's recipe. Test metrics on the full test split; cNLL after temperature scaling on "
        "the validation split; DEE against the teacher's calibrated DE-m curve; agreement = top-1 "
        "agreement with DE-4 (%); disagreement = pairwise member disagreement (fraction); r,s spread = "
        "max |r_m − r̄| over the BE student's fast weights (how far apart the members are when averaged).",
        "",
    ]
    for r in results:
        lines += [
            f"## {r['dataset']} ({r['n_train']} train / {r['n_val']} val / {r['n_test']} test)",
            "",
        ]
        lines += [markdown_table(r["rows"], COLUMNS, name_header="model"), ""]
        if r.get("not_run"):
            lines += [f"Not run yet (the session's time ran out): {', '.join(r['not_run'])}.", ""]
        lines += [acceptance_line(r["rows"]), ""]
        t = r["timings_seconds"]
        lines += ["Wall time per stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in t.items()), ""]
    return "\n".join(lines)


def acceptance_line(rows: list[dict[str, Any]]) -> str:
    """The issue's bar, computed: does the best averaged network beat the single one on NLL while
    staying within 1 accuracy point of its BE student?"""
    by_name = {r["name"]: r for r in rows}
    single = by_name["single network trained alone"]
    done = [label for label in METHODS if f"BE-4 {label}" in by_name]
    if not done:
        return "No student finished yet."
    best = min(done, key=lambda label: by_name[f"  ↳ averaged (1 net, BN recal.) {label}"]["nll"])
    avg = by_name[f"  ↳ averaged (1 net, BN recal.) {best}"]
    be = by_name[f"BE-4 {best}"]
    beats = avg["nll"] < single["nll"]
    gap = be["acc"] - avg["acc"]
    return (
        f"Best averaged network (lowest NLL): {best}, NLL {avg['nll']:.4f} vs {single['nll']:.4f} for "
        f"the single network trained alone ({'beats it' if beats else 'does not beat it'}); accuracy "
        f"{avg['acc']:.2f} %, {-gap:+.2f} points vs its BE-4 student "
        f"({'within' if gap <= 1.0 else 'outside'} 1 point)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="fashion-mnist,cifar10-jpeg")
    parser.add_argument("--arch", default="resnet8")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-subset", type=int, default=8000)
    parser.add_argument("--test-subset", type=int, default=None)
    parser.add_argument("--alpha", type=float, default=DistillConfig().alpha, help="KD weight α")
    parser.add_argument(
        "--temperature", type=float, default=DistillConfig().temperature, help="KD T"
    )
    parser.add_argument(
        "--methods", default=",".join(METHODS.values()), help="perturbations to run"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--note", default="", help="appended to the wall time, e.g. ' (shared machine)'"
    )
    parser.add_argument("--out", default=str(REPO / "runs" / "study"))
    parser.add_argument("--markdown", default=str(REPO / "docs" / "results-resnet8.md"))
    parser.add_argument(
        "--only-finished", action="store_true", help="train nothing new; tabulate the finished runs"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started = time.perf_counter()
    results = []
    for name in args.datasets.split(","):
        results.append(run_dataset(name, args))
        atomic_write_text(Path(args.out) / "results.json", json.dumps(results, indent=2) + "\n")
        atomic_write_text(Path(args.markdown), render(results, args, time.perf_counter() - started))
        log.info("wrote %s", args.markdown)


if __name__ == "__main__":
    main()
