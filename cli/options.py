"""Option groups shared by several commands, mapped onto the library's config dataclasses."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ensc.data.catalog import DATASETS

if TYPE_CHECKING:
    from ensc.data.datasets import DataConfig


def data_options(required: bool) -> Callable:
    """--dataset, --data-root, --val-size, --train-subset, --test-subset, --data-seed, --download."""

    def decorate(f: Callable) -> Callable:
        opts = [
            click.option("--dataset", type=click.Choice(DATASETS), required=required,
                         help="Dataset name." + ("" if required else " Default: the one recorded in the checkpoints.")),
            click.option("--data-root", type=click.Path(path_type=Path, file_okay=False),
                         help="Dataset folder (imagefolder: with train/ and test/). Default: the dataset's usual place."),
            click.option("--val-size", type=click.IntRange(min=1), help="Validation images carved from train. Default: 10 %, max 5,000."),
            click.option("--train-subset", type=click.IntRange(min=1), help="Use a class-balanced subset of N training images (validation included)."),
            click.option("--test-subset", type=click.IntRange(min=1), help="Use a class-balanced subset of N test images."),
            click.option("--data-seed", type=int, default=0, show_default=True, help="Seed of the validation split and the subsets."),
            click.option("--download", is_flag=True, help="Let torchvision download fashion-mnist/cifar when missing."),
        ]  # fmt: skip
        for opt in reversed(opts):
            f = opt(f)
        return f

    return decorate


def data_config(dataset: str, data_root: Path | None, val_size: int | None, train_subset: int | None,
                test_subset: int | None, data_seed: int, download: bool) -> DataConfig:  # fmt: skip
    from ensc.data.datasets import DataConfig

    return DataConfig(
        name=dataset,
        root=data_root,
        val_size=val_size,
        train_subset=train_subset,
        test_subset=test_subset,
        seed=data_seed,
        download=download,
    )


def runtime_options(f: Callable) -> Callable:
    """--device, --amp/--no-amp, --channels-last/--no-channels-last."""
    opts = [
        click.option(
            "--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."
        ),
        click.option(
            "--amp/--no-amp",
            default=None,
            help="Mixed precision. Default: on for CUDA, off for CPU.",
        ),
        click.option(
            "--channels-last/--no-channels-last",
            default=None,
            help="NHWC layout. Default: on for CUDA.",
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
