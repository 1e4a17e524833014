"""`ensc train`: train a DeepEns teacher, one checkpoint per member."""

from __future__ import annotations

from pathlib import Path

import click

from ensc.cli.options import (
    arch_kwargs_option,
    code_options,
    data_config,
    data_mode_options,
    data_options,
    json_object,
    runtime_options,
    save_every_option,
)


@click.command(
    "train",
    epilog="""\b
Example:
  ensc train --dataset fashion-mnist --arch resnet20 --members 4 --epochs 30 --out ckpts/
""",
)
@data_options(required=True)
@data_mode_options
@click.option(
    "--arch",
    required=True,
    help="Architecture: resnet20, wrn28x10, ..., torchvision:NAME, timm:NAME or package.module:callable.",
)
@arch_kwargs_option
@click.option(
    "--members", type=click.IntRange(min=1), default=4, show_default=True, help="Ensemble size M."
)
@click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    help="Peak learning rate. Default: 0.1 × batch/128.",
)
@click.option("--weight-decay", type=click.FloatRange(min=0), default=5e-4, show_default=True)
@click.option(
    "--warmup-epochs",
    type=click.FloatRange(min=0),
    help="Default: 5 for runs of ≥ 50 epochs, else 10 % of the run.",
)
@click.option(
    "--max-steps",
    type=click.IntRange(min=1),
    help="Stop each member after N optimizer steps (smoke runs).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Member k uses seed + k.")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Folder for member0.pt ... member{M-1}.pt.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Retrain every member. The old members wait in OUT/.replaced until every new one "
    "exists, and come back if the training fails.",
)
@click.option(
    "--resume", is_flag=True, help="Keep finished members and continue an interrupted one."
)
@save_every_option
@click.option(
    "--tensorboard",
    type=click.Path(path_type=Path, file_okay=False),
    help="Also write each member's training curves (loss, accuracy, lr, validation per epoch) "
    "as TensorBoard event files into DIR/member<k> (needs the 'ensc[tensorboard]' extra).",
)
@code_options
@runtime_options
def train_cmd(dataset, data_root, val_size, val_root, train_subset, test_subset, data_seed, download, data_mode, workers,
              image_size, arch, arch_kwargs, members,
              epochs, batch_size, lr, weight_decay, warmup_epochs, max_steps, seed, out, force, resume,
              save_every, tensorboard, code_path, unsafe_load, device, amp, channels_last, threads) -> None:  # fmt: skip
    """Train a deep-ensemble teacher of M independently seeded members."""
    from ensc.engine.loop import OptimConfig
    from ensc.engine.runtime import resolve_runtime
    from ensc.errors import plural
    from ensc.teachers.train import TeacherTrainConfig, train_teacher

    config = TeacherTrainConfig(
        arch=arch,
        arch_kwargs=json_object(arch_kwargs),
        data=data_config(dataset, data_root, val_size, train_subset, test_subset, data_seed, download,
                         data_mode, workers, image_size, val_root),
        out=out,
        members=members,
        optim=OptimConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                          warmup_epochs=warmup_epochs, max_steps=max_steps),
        seed=seed,
        force=force,
        resume=resume,
        code_path=code_path,
        unsafe_load=unsafe_load,
        save_every=save_every,
        tensorboard=tensorboard,
    )  # fmt: skip
    runtime = resolve_runtime(device, amp, channels_last, threads)
    paths = train_teacher(config, runtime)
    if runtime.is_main:
        click.echo(f"teacher with {plural(len(paths), 'member')} in {out}")
