"""Option groups shared by several commands, mapped onto the library's config dataclasses."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ensc.data.catalog import DATASETS
from ensc.data.mode import MODES as DATA_MODES
from ensc.engine.precision import AMP_CHOICES

if TYPE_CHECKING:
    from ensc.data.splits import DataConfig


val_root_option = click.option(
    "--val-root",
    type=click.Path(path_type=Path, file_okay=False),
    help="Validate on this folder of held-out images (one subfolder per class) instead of images "
    "carved from the training folder, which a teacher from elsewhere may have trained on.",
)


def data_options(required: bool) -> Callable:
    """--dataset, --data-root, --val-size, --val-root, --train-subset, --test-subset, --data-seed,
    --download."""

    def decorate(f: Callable) -> Callable:
        opts = [
            click.option("--dataset", type=click.Choice(DATASETS), required=required,
                         help="Dataset name." + ("" if required else " Default: the one recorded in the checkpoints.")),
            click.option("--data-root", type=click.Path(path_type=Path, file_okay=False),
                         help="Dataset folder (imagefolder: with train/ and test/). Default: the dataset's usual place."),
            click.option("--val-size", type=click.IntRange(min=1), help="Validation images carved from train. Default: 10 %, max 5,000."),
            val_root_option,
            click.option("--train-subset", type=click.IntRange(min=1), help="Use a class-balanced subset of N training images (including the validation images carved from them; with --val-root all N train)."),
            click.option("--test-subset", type=click.IntRange(min=1), help="Use a class-balanced subset of N test images."),
            click.option("--data-seed", type=int, default=0, show_default=True, help="Seed of the validation split and the subsets."),
            click.option("--download", is_flag=True, help="Let torchvision download fashion-mnist/cifar when missing."),
        ]  # fmt: skip
        for opt in reversed(opts):
            f = opt(f)
        return f

    return decorate


def data_config(dataset: str, data_root: Path | None, val_size: int | None, train_subset: int | None,
                test_subset: int | None, data_seed: int, download: bool, data_mode: str | None = None,
                workers: int | None = None, image_size: tuple[int, int] | None = None,
                val_root: Path | None = None) -> DataConfig:  # fmt: skip
    from ensc.data.splits import DataConfig

    return DataConfig(
        name=dataset,
        root=data_root,
        val_size=val_size,
        val_root=val_root,
        train_subset=train_subset,
        test_subset=test_subset,
        seed=data_seed,
        download=download,
        image_size=image_size,
        mode=data_mode or "auto",
        workers=workers,
    )


def data_mode_options(f: Callable) -> Callable:
    """--data-mode, --workers, --image-size: how image-folder data reaches the model."""
    opts = [
        click.option("--data-mode", type=click.Choice(DATA_MODES),
                     help="imagefolder: decode every image into memory, or stream them from disk in reader "
                          "processes (for data larger than memory, e.g. ImageNet). Default: auto (stream when "
                          "the decoded images would take over 25 % of the available memory; saved models: as recorded)."),
        click.option("--workers", type=click.IntRange(min=0), metavar="N",
                     help="--data-mode stream: reader processes (0: read in the main process). Default: one per core, at most 8."),
        click.option("--image-size", metavar="N|HxW", callback=parse_image_size,
                     help="imagefolder: the size images are brought to (e.g. 224 or 224x160). Default: the "
                          "size a saved model takes, else the most common size in the training split."),
    ]  # fmt: skip
    for opt in reversed(opts):
        f = opt(f)
    return f


def parse_image_size(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> tuple[int, int] | None:
    """Callback for ``--image-size``: ``N`` (square) or ``HxW`` as (H, W)."""
    if value is None:
        return None
    parts = re.fullmatch(r"\s*(\d+)\s*(?:[x×]\s*(\d+)\s*)?", value)
    if parts is None or int(parts[1]) < 1 or int(parts[2] or parts[1]) < 1:
        raise click.BadParameter(
            f"expected N or HxW in pixels (e.g. 224 or 224x160); got {value!r}"
        )
    return int(parts[1]), int(parts[2] or parts[1])


def runtime_options(f: Callable) -> Callable:
    """--device, --amp auto|on|off, --channels-last/--no-channels-last, --threads auto|N."""
    opts = [
        click.option(
            "--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."
        ),
        click.option(
            "--amp",
            type=click.Choice(AMP_CHOICES),
            default="auto",
            show_default=True,
            is_flag=False,
            flag_value="on",
            help="Mixed precision (a bare --amp means on). auto: float16 on CUDA; bfloat16 on a "
            "CPU only where it has native bf16 and a probe shows it faster (docs/bench-amp.md).",
        ),
        click.option(
            "--channels-last/--no-channels-last",
            default=None,
            help="NHWC layout. Default: on for CUDA.",
        ),
        click.option(
            "--threads",
            default="auto",
            show_default=True,
            metavar="auto|N",
            help="torch threads. auto: the cores other processes leave free at start "
            "(OMP_NUM_THREADS when set); docs/bench-threads.md.",
        ),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def run_option(f: Callable) -> Callable:
    """--run: the `ensc compress` run folder that export and bench read (default runs/latest)."""
    return click.option(
        "--run",
        type=click.Path(path_type=Path),
        help="Run folder of `ensc compress`. Default: runs/latest.",
    )(f)


def save_every_option(f: Callable) -> Callable:
    """--save-every: how often a long run saves its resumable state inside an epoch."""
    return click.option(
        "--save-every",
        type=click.IntRange(min=0),
        metavar="STEPS",
        help="Also save the resumable state every N optimizer steps (0: at epoch ends only). "
        "Default: about every 10 minutes of training, and at every epoch end.",
    )(f)


def recorded_data_root_option(f: Callable) -> Callable:
    """--data-root for commands that otherwise read the dataset location from the checkpoints."""
    return click.option(
        "--data-root",
        type=click.Path(path_type=Path, file_okay=False),
        help="Default: the recorded one.",
    )(f)


def command_line(ctx: click.Context) -> str:
    """The command as the user typed it (options given explicitly, in declaration order)."""
    from click.core import ParameterSource

    parts = ["ensc", ctx.info_name or ""]
    for param in ctx.command.params:
        if (
            not isinstance(param, click.Option)
            or ctx.get_parameter_source(param.name) != ParameterSource.COMMANDLINE
        ):
            continue
        value = ctx.params[param.name]
        if param.is_flag:
            flag = param.opts[0] if value else (param.secondary_opts or param.opts)[0]
            parts.append(flag)
        else:
            parts += [param.opts[0], str(value)]
    return shlex.join(parts)


def json_object(text: str | None) -> dict[str, Any]:
    """``--teacher-arch-kwargs`` as a dict (it stays a string in the recorded command line)."""
    return json.loads(text) if text else {}


def member_index(text: str) -> int | str:
    """``--student-init member:K`` as K; ``auto`` and ``scratch`` as they are."""
    return int(text.split(":", 1)[1]) if text.startswith("member:") else text


def _check_json_object(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as err:
        raise click.BadParameter(f"not valid JSON ({err}): {value!r}") from None
    if not isinstance(parsed, dict):
        raise click.BadParameter(
            f"""expected a JSON object such as '{{"num_classes": 100}}'; got {value!r}"""
        )
    return value


def check_member_ref(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Callback for ``--student-init``: accepts ``member:K``, ``auto`` or ``scratch``."""
    if value is not None and not re.fullmatch(r"member:\d+|auto|scratch", value.strip()):
        raise click.BadParameter(
            f"expected member:K (K a teacher member's index), auto or scratch; got {value!r}"
        )
    return None if value is None else value.strip()


def code_options(f: Callable) -> Callable:
    """--code-path, --unsafe-load: where user code may come from (architectures named
    package.module:callable, classes of pickled teacher files)."""
    opts = [
        click.option("--code-path", type=click.Path(path_type=Path, exists=True, file_okay=False),
                     help="Folder with your model code, put on the import path while models are built: "
                          "the only place package.module:callable architectures may come from."),
        click.option("--unsafe-load", is_flag=True,
                     help="Build architectures from any importable module and allow teacher files that hold "
                          "pickled Python objects (runs code from them: only what you trust)."),
    ]  # fmt: skip
    for opt in reversed(opts):
        f = opt(f)
    return f


def teacher_options(f: Callable) -> Callable:
    """--teacher-arch, --teacher-arch-kwargs, then :func:`code_options` (see `load_teacher`)."""
    opts = [
        click.option("--teacher-arch", help="Architecture of weight-only teacher files: registry name, torchvision:NAME, timm:NAME or package.module:callable."),
        click.option("--teacher-arch-kwargs", metavar="JSON", callback=_check_json_object,
                     help="""Arguments of that architecture, as JSON: '{"num_classes": 100}'."""),
    ]  # fmt: skip
    f = code_options(f)
    for opt in reversed(opts):
        f = opt(f)
    return f


def arch_kwargs_option(f: Callable) -> Callable:
    """--arch-kwargs: the --arch architecture's arguments, like --teacher-arch-kwargs."""
    return click.option("--arch-kwargs", metavar="JSON", callback=_check_json_object,
                        help="""Arguments of the --arch architecture, as JSON: '{"dropout": 0.3}'.""")(f)  # fmt: skip
