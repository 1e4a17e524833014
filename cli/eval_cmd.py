"""`ensc eval`: metrics of a teacher's members and of its prefix ensembles."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ensc.cli.options import runtime_options

TEACHER_COLUMNS = ("acc", "nll", "bs", "ece", "cnll", "cece", "dee", "kl_div", "disagreement")


@click.command(
    "eval",
    epilog="""\b
Examples:
  ensc eval --teacher ckpts/
  ensc eval --teacher ckpts/ --test-subset 1000 --json teacher.json
""",
)
@click.option(
    "--teacher",
    type=click.Path(path_type=Path),
    required=True,
    help="Folder of member checkpoints.",
)
@click.option("--dataset", type=click.Choice(("fashion-mnist", "cifar10", "cifar100", "imagefolder")),
              help="Default: the dataset recorded in the checkpoints.")  # fmt: skip
@click.option(
    "--data-root",
    type=click.Path(path_type=Path, file_okay=False),
    help="Default: the recorded one.",
)
@click.option(
    "--test-subset",
    type=click.IntRange(min=1),
    help="Evaluate on a class-balanced subset of N test images.",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also write the results as JSON.",
)
@click.option("--force", is_flag=True, help="Overwrite an existing --json file.")
@runtime_options
def eval_cmd(
    teacher, dataset, data_root, test_subset, json_path, force, device, amp, channels_last
) -> None:
    """Evaluate each teacher member and DE-1 ... DE-M on the test split."""
    from ensc.compress.data import load_dataset
    from ensc.compress.datasource import check_compatible, data_config_for
    from ensc.compress.evaluate import evaluate_teacher
    from ensc.compress.fileio import atomic_write_text, refuse_overwrite
    from ensc.compress.runtime import resolve_runtime
    from ensc.compress.table import markdown_table
    from ensc.compress.teacher import load_teacher

    if json_path is not None:
        refuse_overwrite(json_path, force)
    ens = load_teacher(teacher)
    config = data_config_for(
        ens.spec, ens.infos[0].get("data"), name=dataset, root=data_root, test_subset=test_subset
    )
    data = load_dataset(config)
    check_compatible(ens.spec, data)
    result = evaluate_teacher(ens, data, resolve_runtime(device, amp, channels_last))
    click.echo(
        f"{data.name}: {result['n_test']} test images, T fitted on {result['n_val']} validation images"
    )
    click.echo(markdown_table(result["members"] + result["ensembles"], TEACHER_COLUMNS))
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(result, indent=2) + "\n")
        click.echo(f"wrote {json_path}")
