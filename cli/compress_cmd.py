"""`ensc compress`: distill a DeepEns teacher into one network, verify parity, write a run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ensc.cli.options import (
    arch_kwargs_option,
    check_member_ref,
    command_line,
    data_mode_options,
    json_object,
    member_index,
    runtime_options,
    save_every_option,
    teacher_options,
    val_root_option,
)
from ensc.compress.names import (
    COMPRESS_METHODS,
    FAST_WEIGHT_REGIMES,
    MEMBER_BATCH_MODES,
    MIXES,
    PERTURB_CHOICES,
    TARGET_MODES,
)
from ensc.data.catalog import DATASETS


def given_here(ctx: click.Context, name: str) -> bool:
    """Whether the option ``name`` was on the command line (not its default)."""
    return ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE


@click.command(
    "compress",
    epilog="""\b
Examples:
  ensc compress --teacher ckpts/ --arch wrn28x5
  ensc compress --teacher ckpts/ --arch resnet20 --steps 1000 --baselines finetune,kd-single
  ensc compress --teacher ckpts/ --arch resnet8 --epochs 1 --train-subset 2000 --test-subset 1000
  ensc compress --teacher ckpts/ --arch resnet20 --perturb ods --step 2 --alpha 0.9 --temperature 1 --init normal
  ensc compress --teacher zoo/ensemble.json --code-path src/ --dataset cifar10 --arch resnet20 --student-init member:0
  ensc compress --teacher ckpts/ --arch resnet20 --corruptions --corruption-subset 2000 --ood-data cifar100
""",
)
@click.option(
    "--teacher",
    type=click.Path(path_type=Path),
    help="Teacher members: a folder (with or without ensemble.json), a manifest, a file or a "
    "quoted glob. Required unless --config.",
)
@click.option(
    "--arch",
    help="Student architecture: registry name, torchvision:NAME, timm:NAME or "
    "package.module:callable. Required unless --config.",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    help="Rerun the run whose folder (or config.json) this is, with the settings it recorded; "
    "the flags given here override them one by one. Its teacher files and images must be the "
    "recorded ones unless a flag names others.",
)
@arch_kwargs_option
@click.option(
    "--members",
    type=click.IntRange(min=2),
    help="BatchEns size M. Default: the number of teachers.",
)
@click.option("--dataset", type=click.Choice(DATASETS), help="Default: the teachers' dataset.")
@click.option(
    "--data-root",
    type=click.Path(path_type=Path, file_okay=False),
    help="Default: the teachers' data root.",
)
@click.option(
    "--train-subset", type=click.IntRange(min=1), help="Class-balanced subset of N training images."
)
@click.option(
    "--test-subset", type=click.IntRange(min=1), help="Class-balanced subset of N test images."
)
@val_root_option
@data_mode_options
@click.option("--epochs", type=click.IntRange(min=1), default=200, show_default=True)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=128,
    show_default=True,
    help="Images per step (--member-batch split: each member sees 1/M of them; repeat: all).",
)
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    help="Peak learning rate. Default: 0.03 × batch/128 for a warm-started student, 0.1 × "
    "batch/128 when its schedule has 1,000 steps or more (kd-single: 0.2 × batch/128 from 2,000 "
    "steps; each chosen on validation, docs/method.md §7), "
    "divided by T (the KD temperature) for a BatchEnsemble whose schedule is under 300 steps; "
    "0.1 × batch/128 from scratch.",
)
@click.option("--weight-decay", type=click.FloatRange(min=0), default=5e-4, show_default=True)
@click.option(
    "--max-steps", type=click.IntRange(min=1), help="Stop after N optimizer steps (smoke runs)."
)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    help="Step budget: warm-up and cosine decay fit N optimizer steps (overrides --epochs).",
)
@click.option(
    "--ema",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.0,
    show_default=True,
    help="Keep an exponential moving average of the student's weights with this decay per step "
    "(e.g. 0.99) and ship it (torch.optim.swa_utils); 0: off.",
)
@click.option(
    "--perturb",
    type=click.Choice(PERTURB_CHOICES),
    help="Input perturbation meant to carry the teachers' diversity ([DM], [WA]). Default "
    "(auto): tdiv-sdiv for the BatchEnsemble (best on validation in the in-domain study at 300 "
    "steps, docs/results.md; about 1.6x the time of none per step), but none for a warm start whose "
    "schedule has 2,000 steps or more (better there on validation); none for kd-single and "
    "finetune.",
)
@click.option(
    "--step",
    type=click.FloatRange(min=0),
    help="Perturbation size in units of 1/255. Default: 1, both papers' step (docs/method.md §5).",
)
@click.option(
    "--alpha",
    type=click.FloatRange(0, 1),
    help="Weight of the KD term ([WA] 1.0, [DM] 0.9). Default: 1 when the student starts from a "
    "teacher member, 0.9 from scratch (docs/method.md §10).",
)
@click.option(
    "--temperature",
    type=click.FloatRange(min=0, min_open=True),
    help="KD temperature ([WA] 4, [DM] 1). Default: 4 when the student starts from a teacher "
    "member, 1 from scratch (docs/method.md §10).",
)
@click.option(
    "--init",
    type=click.Choice(("ones", "normal", "spread")),
    default="ones",
    show_default=True,
    help="Fast-weight init ([WA] ones, [DM] normal N(1, 0.5²); spread: members 0.1 apart around "
    "1, their mean exactly 1, so the averaged network starts as the warm start).",
)
@click.option(
    "--fast-weights",
    type=click.Choice(FAST_WEIGHT_REGIMES),
    help="Fast-weight regularization. Default: dm for --init normal, else wa.",
)
@click.option(
    "--method",
    type=click.Choice(COMPRESS_METHODS),
    default="batchensemble",
    show_default=True,
    help="batchensemble: distill into BE-M and average it into one network; the baselines, one "
    "network of --arch with the same data, init, steps and evaluation: kd-single, plain KD of the "
    "ensemble's mean prediction; finetune, the labels alone (no teacher in the step).",
)
@click.option(
    "--baselines",
    metavar="LIST",
    help="Also train these baselines at this run's budget and seed (comma-separated: finetune, "
    "kd-single), each in RUN/baselines/<name>/, and compare the single network with them in the "
    "report (rows and a verdict).",
)
@click.option(
    "--member-batch",
    type=click.Choice(MEMBER_BATCH_MODES),
    default="split",
    show_default=True,
    help="repeat: every member sees the whole batch (M x the compute of one network, the papers' "
    "setup); split: member m sees its own 1/M of the batch (the compute of one network).",
)
@click.option(
    "--targets",
    type=click.Choice(TARGET_MODES),
    default="mean",
    show_default=True,
    help="What each student member distills: member = teacher m for member m ([DM], [WA]); "
    "mean = the ensemble's mean prediction, the target the averaged network should match.",
)
@click.option(
    "--mix",
    type=click.Choice(MIXES),
    default="none",
    show_default=True,
    help="Mix pairs of training images before the perturbation, and distill on the mixed images "
    "(mixup: a weighted sum; cutmix: a pasted box); the teachers agree less there than on their "
    "own training images (docs/method.md §5).",
)
@click.option(
    "--recalibrate-bn/--no-recalibrate-bn",
    default=True,
    show_default=True,
    help="Re-estimate BatchNorm statistics of the averaged network on training data (the BE "
    "student's running statistics describe a mix of its members, not their average).",
)
@click.option(
    "--bn-recal-batches",
    type=click.IntRange(min=0),
    default=20,
    show_default=True,
    help="Shuffled training batches for the BN recalibration; 0 = the whole training split.",
)
@click.option(
    "--tensorboard",
    type=click.Path(path_type=Path, file_okay=False),
    help="Also write the training curves (loss, KD/CE parts, accuracy, lr, validation) as "
    "TensorBoard event files into DIR, the settings as text and hparams (needs the "
    "'ensc[tensorboard]' extra).",
)
@click.option(
    "--calibrate/--no-calibrate",
    default=True,
    show_default=True,
    help="Fold the temperature fitted on the validation images into the single network's last "
    "layer, so that its probabilities are calibrated as shipped (accuracy unchanged).",
)
@click.option(
    "--teacher-cache/--no-teacher-cache",
    default=True,
    show_default=True,
    help="Keep the teacher's validation/test logits in <runs>/.cache (keyed by the member files "
    "and the data), so later runs on the same teacher and data skip that evaluation.",
)
@click.option(
    "--max-acc-drop",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Fail if the averaged network is this many points below the BE student.",
)
@click.option("--corruptions", is_flag=True,
              help="Also evaluate every model under the CIFAR-10-C corruptions (10 kinds, severities 1-5, "
                   "as ensc eval --corruptions): report.json/report.md and corruptions.png. Costs 50 passes per network.")  # fmt: skip
@click.option("--corruption-subset", type=click.IntRange(min=1),
              help="With --corruptions: a class-balanced subset of N test images for them.")  # fmt: skip
@click.option("--ood-data", metavar="DIR_OR_NAME",
              help="Also measure out-of-distribution detection (as ensc eval --ood-data) against a folder of "
                   "images or a dataset name (its test split): report.json/report.md and ood_scores.png.")  # fmt: skip
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="Run folder. Default: runs/<arch>-<perturb>-<time> (runs/<arch>-<time> without "
    "--perturb).",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue an interrupted run (--out, else the newest unfinished one in runs/) with the "
    "flags it was started with.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace an existing run folder, all of it (ONNX files too). A finished run waits in "
    "RUN/.replaced until the new one finishes, and comes back if it fails.",
)
@save_every_option
@click.option(
    "--eval-every",
    type=click.IntRange(min=1),
    help="Also validate the averaged network every N steps (it is validated at every epoch's "
    "end anyway): rows of curves.csv / curves.png in the run folder.",
)
@teacher_options
@click.option("--student-init", metavar="auto|scratch|member:K", default="auto", show_default=True,
              callback=check_member_ref,
              help="Start the student from a teacher member's weights: auto = the first member with the "
                   "student's architecture (else random weights), member:K, or scratch.")  # fmt: skip
@runtime_options
@click.pass_context
def compress_cmd(ctx: click.Context, device: str, amp: str, channels_last: bool | None, threads: str,
                 arch_kwargs: str | None, teacher_arch_kwargs: str | None, student_init: str,
                 **flags: Any) -> None:  # fmt: skip
    """Distill a teacher ensemble into a BatchEns student and average it into one network."""
    from ensc.api import compress_ensemble

    config_path = flags.pop("config_path")
    flags.update(arch_kwargs=json_object(arch_kwargs), student_init=member_index(student_init),
                 teacher_arch_kwargs=json_object(teacher_arch_kwargs))  # fmt: skip
    if config_path is None:
        for name in ("teacher", "arch"):
            if flags[name] is None:
                raise click.UsageError(
                    f"Missing option '--{name}' (or --config RUN to rerun a run)."
                )
    else:  # only what the command line says: the rest comes from the recorded run
        flags = {k: v for k, v in flags.items() if given_here(ctx, k) or k == "out"}
    result = compress_ensemble(
        flags.pop("teacher", None), flags.pop("arch", None), config=config_path,
        out=flags.pop("out"), save=True, device=device, amp=amp, channels_last=channels_last,
        threads=threads, command=command_line(ctx), **flags,
    )  # fmt: skip
    if result is None:  # a non-main process of a torchrun launch: rank 0 reports
        return
    click.echo(result.report_md)
    latest = Path("runs") / "latest"
    points_here = latest.exists() and latest.resolve() == Path(result.run_dir).resolve()
    click.echo(
        f"run folder: {result.run_dir}" + (" (runs/latest points here)" if points_here else "")
    )
