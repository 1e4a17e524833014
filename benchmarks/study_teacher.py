"""Does the one network ensc makes beat one member and plain KD into one network? (issue 11)

Runs `ensc compress` exactly as a user would, on a real pretrained DE-4 (CIFAR-10 ResNet-20/32/44/56
from another codebase, loaded through a manifest and --code-path), once per row of a plan, and
keeps each finished row as JSON in the repository (``docs/study/<plan>/<row>.json``), so that an
interrupted study resumes where it stopped and nothing finished is recomputed:

    python benchmarks/study_teacher.py --plan search --workers 2        # settings, chosen on validation
    python benchmarks/study_teacher.py --plan main --workers 2          # the table of docs/results.md
    python benchmarks/study_teacher.py --plan main --render-only        # tables from the JSON rows

Runs go to ``--work`` (default ~/.cache/ensc/study); an interrupted run continues with --resume.
Each worker gets ``2 / workers`` torch threads; rows report their own wall time and s/step.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ensc import rundir

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
TEACHER_DIR = SHARED / "teachers-cifar10-resnet"
CIFAR_JPEG = SHARED / "cifar10-jpeg"
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
STUDENT = "resnet_cifar:resnet32"
ENSC = str(Path(sys.executable).with_name("ensc"))
log = logging.getLogger("study")


def row(prefix: str, steps: int, seed: int, flags: list[Any], extra: dict[str, Any]) -> dict:
    """A plan row: its name (prefix, budget, seed, extra flags) and its `ensc compress` flags."""
    name = f"{prefix}-s{steps}" + (f"-seed{seed}" if seed else "") + _suffix(extra)
    flags = [*flags, "--steps", steps, "--seed", seed, *_flags(extra)]
    return {"name": name, "flags": [str(f) for f in flags]}


def kd(steps: int, perturb: str, seed: int = 0, **extra: Any) -> dict[str, Any]:
    """Plain KD of the ensemble mean into one ResNet-32 (the baseline), settings spelled out."""
    return row(f"kd-{perturb}", steps, seed, ["--method", "kd-single", "--perturb", perturb], extra)


def be(
    steps: int, perturb: str, batch: str, targets: str, seed: int = 0, **extra: Any
) -> dict[str, Any]:
    """BE-4 student averaged into one ResNet-32 (the product), settings spelled out."""
    flags = ["--perturb", perturb, "--member-batch", batch, "--targets", targets]
    return row(f"be-{batch}-{targets}-{perturb}", steps, seed, flags, extra)


def product(steps: int, seed: int = 0, **extra: Any) -> dict[str, Any]:
    """`ensc compress` with its defaults and a step budget: the averaged network users get. The
    perturbation is TDiv-SDiv unless named: the rows before `--perturb auto` ran it (it was the
    default at every budget), and a long warm start's default is none now (warmstart.py), which
    the rows that want it name."""
    flags = [] if "perturb" in extra else ["--perturb", "tdiv-sdiv"]
    return row("ensc", steps, seed, flags, extra)


def versus(steps: int, seed: int = 0, **extra: Any) -> dict[str, Any]:
    """The product with both baselines beside it (`--baselines finetune,kd-single`): one row,
    three networks trained at the same budget and seed, compared in the run's own report."""
    return row("ensc", steps, seed, ["--baselines", "finetune,kd-single"], extra)


def finetune(steps: int, seed: int = 0, **extra: Any) -> dict[str, Any]:
    """`ensc compress --method finetune`: the start member on the labels alone, no teacher."""
    return row("finetune", steps, seed, ["--method", "finetune"], extra)


def baseline(steps: int, seed: int = 0, **extra: Any) -> dict[str, Any]:
    """`ensc compress --method kd-single` with the same defaults: plain KD into one network."""
    return row("kd", steps, seed, ["--method", "kd-single"], extra)


def _suffix(extra: dict[str, Any]) -> str:
    return "".join(f"-{k.replace('_', '')}{v}" for k, v in sorted(extra.items()))


def _flags(extra: dict[str, Any]) -> list[str]:
    return [x for k, v in sorted(extra.items()) for x in (f"--{k.replace('_', '-')}", str(v))]


PLANS: dict[str, list[dict[str, Any]]] = {
    # settings for the warm start, compared on the validation split only (report["val"])
    "search": [  # lr 0.1 (the default) unless said; ODS lost to none for both, so none after it
        kd(300, "none"),
        be(300, "none", "split", "mean"),
        be(300, "ods", "split", "mean"),
        kd(300, "ods"),
        be(300, "none", "split", "member"),
        kd(300, "none", lr=0.03),
        be(300, "none", "split", "mean", lr=0.03),
        kd(300, "none", lr=0.01),
        be(300, "none", "split", "mean", lr=0.01),
        be(300, "none", "repeat", "mean"),
    ],
    # the study of docs/results.md: ensc's defaults (chosen above) against KD into one network
    "main": [
        product(1000),
        baseline(1000),
        product(1000, seed=1),
        baseline(1000, seed=1),
        product(1000, seed=2),
        baseline(1000, seed=2),
        product(100),
        baseline(100),
        product(300),
        baseline(300),
        product(300, seed=1),
        baseline(300, seed=1),
        *(product(300, perturb=kind) for kind in ("gaussian", "ods", "confods", "tdiv-sdiv")),
        product(300, member_batch="repeat"),
        # control: the member fine-tuned on the labels alone (α = 0: no teacher), to separate what
        # the ensemble teaches from what training on the new data does by itself
        baseline(1000, alpha=0),
    ],
    # the question on a teacher in its own domain (issue 21): a DE-4 of ResNet-20s that
    # `ensc train` made on 10,000 CIFAR-10 JPEGs (benchmarks/teachers/, see its README), the
    # student a ResNet-20 warm-started from member 0, both baselines beside every product row;
    # the defaults were chosen on its validation split (indomain-v1, indomain-search)
    # (the rows ran before the calibration fold: their NLL and ECE are of the network as trained;
    # accuracy and cNLL do not depend on it)
    "indomain": [  # in the order they run (two at a time): the longest row first
        versus(1000),
        *(versus(300, seed=s) for s in (0, 1, 2)),
        *(versus(1000, seed=s) for s in (1, 2)),
    ],
    # T 4 with both baselines at T 4 too, 300 steps (what made T 4 wait: results.md §1, step 4)
    "indomain-t4-versus": [versus(300, seed=s, temperature=4) for s in (0, 1)],
    # T 4 with its step scaled back to T 1's (lr 0.03 / 4): what the demo teacher needed; KD into
    # one network at the same T and lr beside each seed, and the longer budget (longest first)
    "indomain-t4-lr": [
        product(1000, temperature=4, lr=0.0075),
        *(product(300, seed=s, temperature=4, lr=0.0075) for s in (0, 1, 2)),
        *(baseline(300, seed=s, temperature=4, lr=0.0075) for s in (0, 1, 2)),
        baseline(1000, temperature=4, lr=0.0075),
        # KD at its better lr at T 4 (seeds 0, 1 ran in indomain-t4-versus at lr 0.03)
        baseline(300, seed=2, temperature=4, lr=0.03),
        baseline(1000, temperature=4, lr=0.03),
        # at 1,000 steps KD at lr 0.03 beat the defaults: ensc at the same lr, and KD's seed 1
        product(1000, temperature=4, lr=0.03),
        baseline(1000, seed=1, temperature=4, lr=0.03),
        product(1000, seed=1, temperature=4, lr=0.03),
    ],
    # the same, run at the defaults before the in-domain choice (α 0.9, T 1, perturbation none):
    # each perturbation, the papers' member batch and member-wise targets, on validation
    "indomain-v1": [
        *(versus(300, seed=s) for s in (0, 1, 2)),
        versus(300, perturb="ods"),  # the papers' method, KD with the same perturbation beside it
        *(product(300, perturb=kind) for kind in ("confods", "gaussian", "tdiv-sdiv")),
        product(300, member_batch="repeat"),
        product(300, targets="member"),
    ],
    # the recipe on the in-domain DE-4 at the old defaults, chosen on its validation split
    # (TDiv-SDiv won in indomain-v1): alpha=1 with temperature=4 became the defaults
    "indomain-search": [
        product(300, perturb="tdiv-sdiv", alpha=1),
        product(300, perturb="tdiv-sdiv", temperature=4),
        product(300, perturb="tdiv-sdiv", step=4),
        product(300, perturb="tdiv-sdiv", lr=0.1),
        product(300, perturb="tdiv-sdiv", alpha=1, temperature=4),
        product(300, perturb="tdiv-sdiv", step=4, alpha=1),
    ],
    # mixing pairs of training images (--mix) before the perturbation, on validation; the
    # longest rows (TDiv-SDiv: its input gradient costs about as much as the rest of the step) first
    "indomain-mix": [
        product(300, mix="mixup"),
        product(300, mix="mixup", perturb="none"),
        product(300, mix="cutmix", perturb="none"),
        product(300, mix="cutmix"),
    ],
    # T 4 (with α 1: [WA]'s pair) had the best test numbers of indomain-search at seed 0: is it
    # more than that seed? Seeds 1 and 2 at the same flags, on validation and test
    "indomain-t4": [product(300, seed=s, temperature=4) for s in (1, 2)],
    # an exponential moving average of the weights (--ema, decay per step; a window of about the
    # last 100 of 300 steps) on the candidate recipe (T 4, lr 0.0075), KD with the same beside it
    "indomain-ema": [
        product(300, temperature=4, lr=0.0075, ema=0.99),
        baseline(300, temperature=4, lr=0.0075, ema=0.99),
    ],
    # member-wise targets (teacher m for student member m, the papers' setup) at T 4: the student's
    # members then differ, which TDiv-SDiv's student term needs (with mean targets they agree to
    # within 2 % and that term is about zero), at KD's better lr 0.03. It lost to mean targets on
    # validation by a point (78.92 % / 0.6050 against 80.00 / 0.5887), so the default lr was not run
    "indomain-targets": [product(300, temperature=4, lr=0.03, targets="member")],
    # members apart from step 0 while their average is the warm start (--init spread): member-wise
    # targets made the members diverse at 2,000 steps only from a start where they were identical.
    # A 300-step screen against indomain-t4-versus's seeds 0, 1 (the same settings, init ones)
    "indomain-spread": [
        product(300, seed=s, temperature=4, lr=0.03, init="spread") for s in (0, 1)
    ],
    # at KD's better lr 0.03 (T 4) ensc only tied KD: does its perturbation still help there
    # (none), and would a larger step (2/255)?
    "indomain-lr03": [
        product(300, temperature=4, lr=0.03, perturb="none"),
        product(300, temperature=4, lr=0.03, step=2),
    ],
    # bf16 autocast (--amp on) against float32 at ensc's defaults (T 4, lr 0.0075: the rows of
    # indomain-t4-lr, spelled out), same seeds, on a CPU with native bf16 (issue 23): whether
    # `--amp auto` may turn it on. Float32 at seed 0 again on that CPU (its kernels differ from
    # the AVX2 machine's that ran indomain-t4-lr) beside bf16's seed 0 (the first pair to run)
    "indomain-bf16": [
        product(300, temperature=4, lr=0.0075, amp="on"),
        product(300, temperature=4, lr=0.0075, amp="off"),
        *(product(300, seed=s, temperature=4, lr=0.0075, amp="on") for s in (1, 2)),
    ],
    # a longer budget (2,000 steps, 32 epochs of the 10,000 images): does the BatchEnsemble pull
    # ahead of KD into one network where they tied at 300 and 1,000 steps? Both at lr 0.03 (KD's
    # better lr, and ensc's at 1,000 steps), T 4, bf16 autocast (quality-neutral: indomain-bf16)
    "indomain-long": [
        product(2000, temperature=4, lr=0.03, amp="on"),
        baseline(2000, temperature=4, lr=0.03, amp="on"),
        # seed 0 put ensc ahead on both splits: the other seeds, and fine-tuning at that budget
        *(
            f(2000, seed=s, temperature=4, lr=0.03, amp="on")
            for s in (1, 2)
            for f in (product, baseline)
        ),
        finetune(2000, amp="on"),
        *(finetune(2000, seed=s, amp="on") for s in (1, 2)),  # the 3 seeds of each
        # ensc kept a lower cNLL than KD on every seed: the perturbation's share of it (half of
        # ensc's step time goes to TDiv-SDiv)
        *(product(2000, seed=s, temperature=4, lr=0.03, amp="on", perturb="none") for s in (0, 1)),
        # the papers' perturbations at the long budget (issue 21: show where ODS helps): TDiv-SDiv's
        # edge had shrunk from 1.2 points at 300 steps to none in accuracy at 2,000
        *(
            product(2000, temperature=4, lr=0.03, amp="on", perturb=kind)
            for kind in ("ods", "confods")
        ),
        # neither beat KD in accuracy (test 80.39 / 80.51 against 80.46): the members stay alike
        # on images they all fit. Member-wise targets (each student member distils its own
        # teacher member, both papers' setup) with the perturbations that seek disagreement
        *(
            product(2000, temperature=4, lr=0.03, amp="on", targets="member", perturb=kind)
            for kind in ("tdiv-sdiv", "confods")
        ),
    ],
    # the papers' regime on the in-domain DE-4: every network from scratch (--student-init
    # scratch: the papers' α 0.9, T 1, lr 0.1), 2,000 steps (the members had 3,120), bf16. From
    # a warm start ensc only tied KD in accuracy; the members of a cold start can explore
    # before their average is taken. "fine-tune" is then one ResNet-20 trained on the labels
    "indomain-scratch": [
        f(2000, seed=s, student_init="scratch", amp="on")
        for s in (0, 1)
        for f in (product, baseline, finetune)
    ],
    # from scratch (lr 0.1) ensc beat KD in accuracy on both seeds, from a warm start (lr 0.03)
    # it ties: a warm start at the cold start's lr 0.1, ensc and KD side by side (1,000 steps)
    "indomain-warm-lr01": [
        *(f(1000, temperature=4, lr=0.1, amp="on") for f in (product, baseline)),
        # KD at lr 0.1 beat KD at lr 0.03 at 1,000 steps: the same at 2,000 (ensc's strongest budget)
        baseline(2000, temperature=4, lr=0.1, amp="on"),
        # KD at lr 0.1 beat ensc's defaults at 2,000 steps (80.83 % / 0.5611 against 80.62 % /
        # 0.5690, seed 0): ensc at the same lr and budget, KD's other seeds, and KD's lr searched
        # one step further (0.2)
        product(2000, temperature=4, lr=0.1, amp="on"),
        *(baseline(2000, seed=s, temperature=4, lr=0.1, amp="on") for s in (1, 2)),
        baseline(2000, temperature=4, lr=0.2, amp="on"),
        # ensc at lr 0.1 (seed 0: 80.96 % / 0.5636, validation 81.38 / 0.5539) was above its lr
        # 0.03 on validation, as KD was: its other seeds, and fine-tuning at the same lr (the
        # default lr of a warm start is the same for every method)
        *(product(2000, seed=s, temperature=4, lr=0.1, amp="on") for s in (1, 2)),
        finetune(2000, lr=0.1, amp="on"),
        # KD at lr 0.2 was better still on validation (81.48 % / 0.5449 against 81.16 / 0.5519 at
        # 0.1): ensc at lr 0.2, and KD's lr one step further
        product(2000, temperature=4, lr=0.2, amp="on"),
        baseline(2000, temperature=4, lr=0.4, amp="on"),
        # at lr 0.1 the fast weights move far (up to 1.9 from 1) but the members stay alike (BE-4
        # 80.97 %, its average 80.96 %): what TDiv-SDiv adds at this lr, and [DM]'s fast weights
        # (half the lr and no decay for r, s, where [WA]'s × M makes their lr 0.4 at lr 0.1)
        product(2000, temperature=4, lr=0.1, amp="on", perturb="none"),
        product(2000, temperature=4, lr=0.1, amp="on", fast_weights="dm"),
        # without the perturbation ensc at lr 0.1 beat TDiv-SDiv and KD at lr 0.1 on seed 0
        # (80.96 % / 0.5594): its other seeds
        *(product(2000, seed=s, temperature=4, lr=0.1, amp="on", perturb="none") for s in (1, 2)),
        # KD's best lr was 0.2 (seed 0: 81.27 % / 0.5564, above ensc without the perturbation at
        # lr 0.1): KD's other seeds there, and ensc without the perturbation at the same lr
        product(2000, temperature=4, lr=0.2, amp="on", perturb="none"),
        *(baseline(2000, seed=s, temperature=4, lr=0.2, amp="on") for s in (1, 2)),
        *(product(2000, seed=s, temperature=4, lr=0.2, amp="on", perturb="none") for s in (1, 2)),
        # at lr 0.1 no perturbation beat TDiv-SDiv on validation at 2,000 steps (3 seeds: cNLL on
        # each, accuracy on the mean) without its input gradients: the same at 1,000 steps, where
        # a warm start's long-run defaults begin
        product(1000, temperature=4, lr=0.1, amp="on", perturb="none"),
        # at lr 0.2 ensc without the perturbation (80.99 % / 0.5614) stayed below KD at the same
        # lr (81.27 / 0.5564, seed 0). With fast weights frozen at 1 the averaged network would be
        # KD itself; [WA]'s × M step makes theirs 0.8 at lr 0.2: [DM]'s half-lr, no-decay ones
        product(2000, temperature=4, lr=0.2, amp="on", perturb="none", fast_weights="dm"),
        # KD at lr 0.2 beat lr 0.1 on validation on all 3 seeds at 2,000 steps (81.43 % / 0.5466
        # against 81.25 / 0.5493): the same at 1,000 steps, where the long-run lr begins
        baseline(1000, temperature=4, lr=0.2, amp="on"),
        # fine-tuning at the default lr of a long warm start: the 3 seeds of each baseline
        *(finetune(2000, seed=s, lr=0.1, amp="on") for s in (1, 2)),
    ],
    # from a warm start on the teacher's own 10,000 images KD at its best lr stayed above ensc on
    # every seed: there the members agree, so the ensemble has little to pass on. A user usually
    # has more images than labels: distil on all 45,000 training images but the held-out 5,000
    # (35,000 the teacher never saw; α 1, so no label is read), each method at its default lr
    "indomain-more-data": [
        product(2000, temperature=4, lr=0.1, amp="on", perturb="none", train_subset=50000),
        baseline(2000, temperature=4, lr=0.2, amp="on", train_subset=50000),
    ],
    # the embedded default in its own domain: a DE-4 of ResNet-8s on 1,000 Fashion-MNIST images
    # (one budget, seed 0: the defaults with both baselines, each other perturbation, the papers'
    # member batch, KD at the lr it preferred on CIFAR-10)
    "fmnist1k": [
        versus(300),
        *(product(300, perturb=kind) for kind in ("none", "gaussian", "ods", "confods")),
        product(300, member_batch="repeat"),
        baseline(300, lr=0.03),
        product(300, lr=0.03),  # KD preferred lr 0.03 here too: ensc at the same lr
    ],
    # the papers' regime in miniature: every network from scratch (--student-init scratch, the
    # papers' α/T/lr for a cold start) for about the members' own budget (60 epochs of 1,000
    # images), on the teacher of fmnist1k; "fine-tune" is then one network trained on the labels
    # alone. Warm-started, BE-averaging only tied KD: does it beat KD where the members can
    # diverge? 3 seeds of the product and both baselines, and the papers' recipe (ODS, member-wise
    # targets) once
    "fmnist1k-scratch": [
        *(
            f(500, seed=s, student_init="scratch")
            for s in (0, 1, 2)
            for f in (product, baseline, finetune)
        ),
        product(500, student_init="scratch", perturb="ods", targets="member"),
    ],
    # the first teacher again, with the fine-tune baseline: out of its domain on JPEGs
    "outdomain": [finetune(300), finetune(1000)],
    # the same question on a teacher ensc trains itself (ResNet-8 DE-4, all of Fashion-MNIST)
    "fmnist": [
        product(300),
        baseline(300),
        product(1000),
        baseline(1000),
        product(1000, seed=1),
        baseline(1000, seed=1),
        baseline(1000, alpha=0),
    ],
}


# plans whose rows ran at older defaults: their row flags would mean other runs now, so they are
# only rendered (each row's JSON keeps the command it ran)
FROZEN = {
    plan: "ran at the defaults before the in-domain choice (alpha 0.9, temperature 1, perturb none)"
    for plan in ("search", "main", "fmnist", "indomain-v1", "indomain-search")
}
FROZEN["indomain-mix"] = FROZEN["indomain-t4"] = (
    "ran at α 1, T 1 but for the flags named, before calibration"
)
FROZEN["indomain"] = FROZEN["indomain-t4-versus"] = (
    "ran at the warm-start defaults before T 4 (α 1, T 1, lr 0.03 unless named)"
)


def manifest(work: Path) -> Path:
    """The teacher as a user brings it: ensemble.json naming each file, architecture and normalization."""
    members = [
        {"path": str(path), "arch": f"resnet_cifar:{path.name.split('-')[0]}",
         "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
        for path in sorted((TEACHER_DIR / "checkpoints").glob("resnet*.th"))
    ]  # fmt: skip
    out = work / "ensemble.json"
    out.write_text(json.dumps({"members": members}, indent=1) + "\n")
    return out


def fmnist_teacher(work: Path) -> Path:
    """The second teacher: a DE-4 of ResNet-8s that `ensc train` makes on all of Fashion-MNIST
    (resumable: finished members are kept)."""
    out = work / "fmnist-teacher"
    cmd = [ENSC, "train", "--dataset", "fashion-mnist", "--arch", "resnet8", "--members", "4",
           "--epochs", "10", "--out", str(out), "--resume"]  # fmt: skip
    log.info("teacher: %s", " ".join(cmd[1:]))
    with open(work / "fmnist-teacher.log", "a") as log_file:
        subprocess.run(cmd, check=True, stdout=log_file, stderr=subprocess.STDOUT, cwd=work)
    return out


INDOMAIN_TEACHER = REPO / "benchmarks" / "teachers" / "cifar10jpeg-10k-resnet20"
FMNIST1K_TEACHER = REPO / "benchmarks" / "teachers" / "fmnist-1k-resnet8"


def in_domain(plan: str) -> bool:
    """Plans on the in-domain DE-4 of ResNet-20s (benchmarks/teachers/cifar10jpeg-10k-resnet20)."""
    return plan.startswith("indomain")


def on_fmnist1k(plan: str) -> bool:
    """Plans on the DE-4 of ResNet-8s on 1,000 Fashion-MNIST images (benchmarks/teachers/fmnist-1k-resnet8)."""
    return plan.startswith("fmnist1k")


def teacher_flags(plan: str, work: Path) -> list[str]:
    """How the plan's rows get their teacher, data and student architecture."""
    if plan == "fmnist":
        return ["--teacher", str(work / "fmnist-teacher"), "--arch", "resnet8"]
    if on_fmnist1k(plan):  # Fashion-MNIST comes from its Debian package: nothing to point at
        return ["--teacher", str(FMNIST1K_TEACHER), "--arch", "resnet8"]
    if in_domain(plan):  # the members record their data; only where it lies here differs
        return ["--teacher", str(INDOMAIN_TEACHER), "--arch", "resnet20",
                "--data-root", str(CIFAR_JPEG)]  # fmt: skip
    return [
        "--teacher", str(work / "ensemble.json"), "--code-path", str(TEACHER_DIR / "code"),
        "--dataset", "imagefolder", "--data-root", str(CIFAR_JPEG), "--arch", STUDENT,
    ]  # fmt: skip


def command(spec: dict[str, Any], run_dir: Path, work: Path, plan: str) -> list[str]:
    base = [ENSC, "compress", *teacher_flags(plan, work), "--max-acc-drop", "100",
            "--out", str(run_dir)]  # fmt: skip
    if (run_dir / rundir.MARKER).exists():
        base.append("--resume")  # an unfinished run (from its last finished epoch, if any)
    elif run_dir.exists():
        base.append("--force")  # anything else there (an older ensc's unfinished run) is replaced
    return base + spec["flags"]


def portable(value: Any, work: Path) -> Any:
    """``value`` with this machine's paths as a reader's clone has them: ``WORK`` for the study's
    folder, the repository's own files relative to it, the shared data as ``../shared/...``."""
    if isinstance(value, dict):
        return {k: portable(v, work) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v, work) for v in value]
    if not isinstance(value, str):
        return value
    return (value.replace(str(work), "WORK").replace(f"{REPO}/", "")
            .replace(f"{REPO.parent}/", "../"))  # fmt: skip


def summary(
    spec: dict[str, Any], report: dict[str, Any], cmd: list[str], wall: float, threads: int,
    work: Path,
) -> dict:  # fmt: skip
    """What a row keeps: its flags, validation and test metrics of every model, and its cost,
    with no path of this machine (:func:`portable`)."""
    keep = (
        "student_avg",
        "student_avg_alternative",
        "student_avg_no_recal",
        "student_be",
        "teacher",
    )
    return portable({
        "name": spec["name"],
        "flags": spec["flags"],
        "command": " ".join(Path(c).name if c.endswith("/ensc") else c for c in cmd),
        "val": report["val"],
        "test": {k: report[k] for k in keep if k in report},
        "teacher_members": report["teacher_members"],
        "fast_weights": report.get("fast_weights"),
        "bn_statistics": report.get("bn_statistics"),
        "init_member": report.get("init_member"),
        "gap_closed": report.get("gap_closed"),
        "train": report["train"],
        "baselines": report.get("baselines"),
        "settings": report.get("settings"),
        "wall_seconds": round(wall, 1),
        "threads": threads,
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                 capture_output=True, text=True).stdout.strip(),
    }, work)  # fmt: skip


RUNNING: set[subprocess.Popen] = set()  # rows in training, stopped with the study
STOPPING = threading.Event()  # set by SIGTERM/SIGINT: start no further row


def _stop_rows(signum: int, _frame: Any) -> None:
    """Stopping the study stops its rows too and starts no new one (rerun to resume)."""
    STOPPING.set()
    for proc in list(RUNNING):
        proc.terminate()


def run_row(spec: dict[str, Any], work: Path, plan: str, threads: int, commit: bool) -> str:
    out_dir = REPO / "docs" / "study" / plan
    result = out_dir / f"{spec['name']}.json"
    if result.exists():
        return f"{spec['name']}: done before"
    if STOPPING.is_set():
        return f"{spec['name']}: not started (stopping)"
    run_dir = work / "runs" / plan / spec["name"]
    cmd = command(spec, run_dir, work, plan)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    log.info("start %s: %s", spec["name"], " ".join(cmd[1:]))
    started = time.perf_counter()
    log_path = work / "runs" / plan / f"{spec['name']}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=work)
        RUNNING.add(proc)
        proc.wait()
        RUNNING.discard(proc)
    if STOPPING.is_set():
        return f"{spec['name']}: stopped"
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        return f"{spec['name']}: FAILED (exit {proc.returncode}), see {log_path}"
    report = json.loads((run_dir / "report.json").read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = result.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary(spec, report, cmd, wall, threads, work), indent=1) + "\n")
    tmp.rename(result)
    if commit:
        _commit(result, f"study: row {spec['name']}")
    avg = report["val"]["student_avg"]
    return f"{spec['name']}: val ACC {avg['acc']:.2f} cNLL {avg['cnll']:.4f} in {wall:.0f} s"


def _commit(path: Path, message: str) -> None:
    """Commit one result file (retrying while another git command holds the index lock)."""
    for _ in range(30):
        add = subprocess.run(["git", "add", str(path)], cwd=REPO, capture_output=True)
        done = add.returncode == 0 and subprocess.run(
            ["git", "commit", "-q", "-m", message, "--", str(path)], cwd=REPO, capture_output=True
        ).returncode == 0  # fmt: skip
        if done:
            return
        time.sleep(2)
    log.warning("could not commit %s", path)


def member_with_bn_reestimated(work: Path, plan: str, batches: int = 20) -> dict[str, Any]:
    """A reference that needs no training: the start member with its BatchNorm statistics
    re-estimated on (augmented) training batches of the new data, as ensc re-estimates them."""
    from ensc.compress.config import CompressConfig
    from ensc.compress.report import validation_metrics
    from ensc.compress.single import recalibrate_on_train
    from ensc.data.datasets import load_dataset
    from ensc.data.source import data_config_for
    from ensc.data.splits import DataConfig
    from ensc.engine.predict import predict_logits_many
    from ensc.engine.runtime import resolve_runtime
    from ensc.evaluation.metrics import evaluate_predictions
    from ensc.teachers.ensemble import load_teacher

    out = REPO / "docs" / "study" / plan / "_member-bn.json"
    if out.exists():
        return json.loads(out.read_text())
    own = (INDOMAIN_TEACHER, CIFAR_JPEG) if in_domain(plan) else (FMNIST1K_TEACHER, None)
    if in_domain(plan) or on_fmnist1k(plan):  # the data the members record, member 0
        teacher = load_teacher(own[0])
        data = load_dataset(data_config_for(teacher.spec, teacher.data_record, root=own[1]))
        member = teacher.members[0]
    elif plan in ("search", "main", "outdomain"):  # the shared DE-4's ResNet-32, on JPEGs
        data = load_dataset(DataConfig("imagefolder", root=CIFAR_JPEG))
        member = load_teacher(work / "ensemble.json", code_path=TEACHER_DIR / "code").members[1]
    else:
        sys.exit(f"--member-bn does not know plan {plan}'s start member")
    runtime = resolve_runtime("cpu")
    config = CompressConfig(teacher=work / "ensemble.json", arch=STUDENT, bn_recal_batches=batches)
    recalibrate_on_train(config, member, data, runtime)  # as `ensc compress` does it, seed 0
    splits = {"val": data.val, "test": data.test}
    probs = predict_logits_many([member], splits, runtime)[0]
    val, test = probs["val"].softmax(-1), probs["test"].softmax(-1)
    metrics = evaluate_predictions(
        test, data.test.labels, val_probs=val, val_labels=data.val.labels
    )
    result = {"name": "member, BN re-estimated (no training)", "batches": batches,
              "val": validation_metrics(val, data.val.labels), "test": metrics.to_dict()}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


TABLE = ("steps", "val_acc", "val_cnll", "acc", "nll", "cnll", "ece", "agreement", "gap_acc",
         "gap_cnll", "s_per_step", "wall_min")  # fmt: skip


def describe(flags: list[str], settings: dict[str, Any] | None = None) -> str:
    """A row's method in words, from its flags and the run's recorded ``settings`` (rows written
    before reports recorded them: that time's defaults, perturbation none, where a flag is absent)."""
    opts = dict(zip(flags[::2], flags[1::2], strict=False))
    perturb = (settings or {}).get("perturbation") or opts.get("--perturb", "none")
    extra = f", lr {opts['--lr']}" if "--lr" in opts else ""
    extra += f", step {opts['--step']}" if "--step" in opts else ""
    if opts.get("--alpha") == "0":
        extra += ", labels only (α 0)"
    elif settings and opts.get("--method") != "finetune":
        extra += f", α {settings['alpha']:g}, T {settings['temperature']:g}"
    else:
        extra += f", α {opts['--alpha']}" if "--alpha" in opts else ""
        extra += f", T {opts['--temperature']}" if "--temperature" in opts else ""
    extra += f", seed {opts['--seed']}" if opts.get("--seed", "0") != "0" else ""
    if opts.get("--method") == "kd-single":
        return f"KD into one network, {perturb}{extra}"
    if opts.get("--method") == "finetune":
        if opts.get("--student-init") == "scratch":
            return f"one network trained on the labels{extra}"
        return f"fine-tune on the labels{extra}"
    batch, targets = opts.get("--member-batch", "split"), opts.get("--targets", "mean")
    init = f", init {opts['--init']}" if "--init" in opts else ""
    return f"averaged BE-4 ({batch}, {targets} targets{init}), {perturb}{extra}"


def from_scratch(result: dict[str, Any]) -> bool:
    return "scratch" in result.get("flags", [])


def start_member(result: dict[str, Any]) -> dict[str, Any]:
    """Test metrics of the member the student started from (the ResNet-32, member 1, in rows
    written before the report named it); member 0 for a student from scratch."""
    k = result.get("init_member")
    if k is None:
        k = 0 if from_scratch(result) else 1
    return result["teacher_members"][k]


def kept_and_other(result: dict[str, Any]) -> tuple[str, str]:
    """Keys of the single network ensc keeps (the BN statistics with the lower validation NLL)
    and of the other; rows from before ensc chose by itself are chosen here by the same rule."""
    if "student_avg_no_recal" not in result["val"]:  # ensc chose (or a baseline's row)
        return "student_avg", "student_avg_alternative"
    val = result["val"]
    if val["student_avg_no_recal"]["nll"] < val["student_avg"]["nll"]:
        return "student_avg_no_recal", "student_avg"
    return "student_avg", "student_avg_no_recal"


def table_rows(
    results: list[dict[str, Any]], references: list[dict[str, Any]] = ()
) -> list[dict[str, Any]]:
    """One table row per result (the single network kept; the other BN statistics and the BE
    student below it), with the member, the ``references`` and the DE-4 first."""
    from ensc.compress.report import GAP_METRICS, gap_closed

    if not results:
        return []
    first = results[0]
    member, teacher = start_member(first), first["test"]["teacher"]

    def line(name: str, test: dict, val: dict | None, result: dict | None) -> dict[str, Any]:
        out = {"name": name, **{k: test.get(k) for k in ("acc", "nll", "cnll", "ece", "agreement")}}
        out.update({f"gap_{k}": gap_closed(test[k], member[k], teacher[k], k == "acc")
                    for k in GAP_METRICS})  # fmt: skip
        if val is not None:
            out.update(val_acc=val["acc"], val_cnll=val["cnll"])
        if result is not None:
            out.update(steps=result["train"]["steps"], s_per_step=result["train"]["s_per_step"],
                       wall_min=result["wall_seconds"] / 60)  # fmt: skip
        return out

    rows = [
        line(
            "member 0 (the gap's reference; the students start from scratch)"
            if from_scratch(first)
            else "the member the student starts from",
            member,
            None,
            None,
        ),  # fmt: skip
        *(line(r["name"], r["test"], r["val"], None) for r in references),
        line("DE-4 teacher (4 networks)", teacher, first["val"]["teacher"], None),
    ]
    for r in results:
        kept, other = kept_and_other(r)
        rows.append(
            line(describe(r["flags"], r.get("settings")), r["test"][kept], r["val"][kept], r)
        )
        bn = "re-estimated" if other == "student_avg" else "as trained"
        name = r["test"][other].get("name") if other.endswith("alternative") else None
        rows.append(line(f"  ↳ {name or f'BN {bn} (not kept)'}", r["test"][other], r["val"][other],
                         None))  # fmt: skip
        if "--method" not in r["flags"]:
            rows.append(line("  ↳ BE-4 student (4× the cost)", r["test"]["student_be"],
                             r["val"]["student_be"], None))  # fmt: skip
        for b in (r.get("baselines") or {}).get("rows", []):  # --baselines, beside the row
            rows.append(
                line(
                    f"  ↳ {b['name']}",
                    b,
                    None,
                    {"train": b["train"], "wall_seconds": b["train"]["seconds"]},
                )
            )
    return rows


def baseline_results(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``--baselines`` rows of a result, each shaped as a result of its own (its name: the
    baseline's method in place of the row's prefix, e.g. ``finetune-s300-seed1``)."""
    out = []
    for b in (result.get("baselines") or {}).get("rows", []):
        name = b["method"] + "-" + result["name"].split("-", 1)[1]
        settings = result.get("settings")
        if settings:  # the baseline's own perturbation (compress.baselines.baseline_config)
            kind = settings["perturbation"]
            none = b["method"] == "finetune" or kind == "tdiv-sdiv"
            settings = {**settings, "perturbation": "none" if none else kind}
        out.append({**result, "name": name, "flags": ["--method", b["method"]],
                    "test": {**result["test"], "student_avg": b}, "val": {}, "baselines": None,
                    "settings": settings})  # fmt: skip
    return out


def seed_summary(results: list[dict[str, Any]]) -> str:
    """Mean and spread (max − min) over seeds of each setting run with several seeds, on test."""
    from ensc.compress.report import gap_closed

    groups: dict[str, list[dict[str, Any]]] = {}
    expanded = [*results, *(b for result in results for b in baseline_results(result))]
    for r in expanded:
        groups.setdefault(re.sub(r"-seed\d+", "", r["name"]), []).append(r)
    lines = ["| setting | seeds | ACC % | cNLL | NLL | gap ACC % | gap cNLL % |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, rows in groups.items():
        if len(rows) < 2:
            continue
        member, teacher = start_member(rows[0]), rows[0]["test"]["teacher"]
        kept = [r["test"][kept_and_other(r)[0]] for r in rows]

        def stat(key: str, fmt: str, kept=kept) -> str:
            values = [m[key] for m in kept]
            mean = sum(values) / len(values)
            return f"{fmt.format(mean)} ± {fmt.format((max(values) - min(values)) / 2)}"

        gaps = [
            _percent(
                gap_closed(
                    sum(m[key] for m in kept) / len(kept), member[key], teacher[key], key == "acc"
                )
            )  # fmt: skip
            for key in ("acc", "cnll")
        ]
        flags = rows[0]["flags"]
        unseeded = [
            f for i, f in enumerate(flags) if "--seed" not in (f, flags[i - 1] if i else "")
        ]
        lines.append(f"| {describe(unseeded, rows[0].get('settings'))} ({name}) | {len(rows)} | "
                     f"{stat('acc', '{:.2f}')} | {stat('cnll', '{:.4f}')} | {stat('nll', '{:.4f}')} | "
                     f"{gaps[0]} | {gaps[1]} |")  # fmt: skip
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def _percent(share: float | None) -> str:
    """A gap share as a whole percent; "no gap" when the teacher does not beat the member."""
    return "no gap" if share is None else str(round(share))


def render(plan: str) -> str:
    from ensc.evaluation.table import markdown_table

    out_dir = REPO / "docs" / "study" / plan
    results = [json.loads(p.read_text()) for p in sorted(out_dir.glob("[!_]*.json"))]
    reference = out_dir / "_member-bn.json"
    by_name = {r["name"]: r for r in results}
    ordered = [by_name[s["name"]] for s in PLANS[plan] if s["name"] in by_name]
    extra = [json.loads(reference.read_text())] if reference.exists() else []
    table = markdown_table(table_rows(ordered, extra), TABLE, name_header="row") + "\n"
    seeds = seed_summary(ordered)
    return table + ("\nOver seeds (mean ± half the range):\n\n" + seeds if seeds else "")


def write_docs(plan: str, table: str) -> None:
    """Replace the plan's table in docs/results.md (between its markers) by ``table``."""
    path = REPO / "docs" / "results.md"
    text = path.read_text()
    start, end = f"<!-- {plan} table -->\n", "<!-- end -->"
    if start not in text:
        sys.exit(f"{path} has no '{start.strip()}' marker")
    head, rest = text.split(start, 1)
    path.write_text(head + start + "\n" + table + "\n" + end + rest.split(end, 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", choices=sorted(PLANS), required=True)
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "ensc" / "study")
    parser.add_argument("--workers", type=int, default=1, help="rows trained side by side")
    parser.add_argument(
        "--threads", type=int, help="torch threads per row (default: the cores / --workers)"
    )
    parser.add_argument("--only", help="comma-separated row names to run (default: the whole plan)")
    parser.add_argument("--commit", action="store_true", help="git-commit each finished row")
    parser.add_argument("--render-only", action="store_true", help="print the plan's table")
    parser.add_argument("--write-docs", action="store_true",
                        help="put the plan's table into docs/results.md, between "
                             "'<!-- PLAN table -->' and '<!-- end -->'")  # fmt: skip
    parser.add_argument("--member-bn", action="store_true",
                        help="measure the reference row: the member with BN re-estimated")  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.member_bn:
        log.info("%s", member_with_bn_reestimated(args.work, args.plan))
        return
    if args.render_only or args.write_docs:
        print(render(args.plan), end="")
        if args.write_docs:
            write_docs(args.plan, render(args.plan))
        return
    if args.plan in FROZEN:
        sys.exit(f"plan {args.plan} {FROZEN[args.plan]}: pass --render-only or --write-docs")
    on_fmnist = args.plan == "fmnist" or on_fmnist1k(args.plan)
    if not on_fmnist and not CIFAR_JPEG.exists():
        sys.exit(f"no data at {CIFAR_JPEG}: this study needs the shared CIFAR-10 JPEGs")
    if not on_fmnist and not in_domain(args.plan) and not TEACHER_DIR.exists():
        sys.exit(f"no teacher at {TEACHER_DIR}: this study needs the shared CIFAR-10 DE-4")
    if in_domain(args.plan) and not (INDOMAIN_TEACHER / "member3.pt").exists():
        sys.exit(f"no teacher at {INDOMAIN_TEACHER}: see its README.md to make it")
    args.work.mkdir(parents=True, exist_ok=True)
    manifest(args.work)
    specs = PLANS[args.plan]
    if args.only:
        wanted = set(args.only.split(","))
        specs = [s for s in specs if s["name"] in wanted]
    signal.signal(signal.SIGTERM, _stop_rows)
    signal.signal(signal.SIGINT, _stop_rows)
    if args.plan == "fmnist":
        fmnist_teacher(args.work)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    with ThreadPoolExecutor(args.workers) as pool:
        jobs = [pool.submit(run_row, s, args.work, args.plan, threads, args.commit) for s in specs]
        for job in jobs:
            log.info("%s", job.result())


if __name__ == "__main__":
    main()
