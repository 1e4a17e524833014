"""`ensc eval`: metrics of a teacher's members, its prefix ensembles and single networks."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ensc.cli.options import json_object, runtime_options, teacher_options
from ensc.data.catalog import DATASETS

COLUMNS = ("acc", "nll", "bs", "ece", "cnll", "cece", "dee", "kl_div", "disagreement")


@click.command("eval", epilog="""\b
Examples:
  ensc eval --teacher ckpts/
  ensc eval --teacher ckpts/ --test-subset 1000 --json teacher.json
  ensc eval --teacher ckpts/ --student runs/latest/student.pt
""")  # fmt: skip
@click.option("--teacher", type=click.Path(path_type=Path),
              help="Teacher members: a folder (with or without ensemble.json), a manifest, a file or a quoted glob.")  # fmt: skip
@click.option("--student", "students", multiple=True, type=click.Path(path_type=Path),
              help="A single-network ensc checkpoint (e.g. runs/latest/student.pt); repeatable.")  # fmt: skip
@click.option(
    "--dataset",
    type=click.Choice(DATASETS),
    help="Default: the dataset recorded in the checkpoints.",
)
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
@teacher_options
@runtime_options
def eval_cmd(teacher, students, dataset, data_root, test_subset, json_path, force, teacher_arch, teacher_arch_kwargs,
             code_path, unsafe_load, device, amp, channels_last) -> None:  # fmt: skip
    """Evaluate teacher members, DE-1 ... DE-M and single networks on the test split."""
    from ensc.engine.runtime import resolve_runtime
    from ensc.errors import plural
    from ensc.evaluation.evaluate import evaluate_saved
    from ensc.evaluation.table import markdown_table
    from ensc.fileio import atomic_write_text, refuse_overwrite
    from ensc.teachers.ensemble import load_teacher, user_code

    if teacher is None and not students:
        raise click.UsageError("pass --teacher DIR, --student FILE, or both")
    if json_path is not None:
        refuse_overwrite(json_path, force)
    ens = load_teacher(
        teacher, arch=teacher_arch, arch_kwargs=json_object(teacher_arch_kwargs), code_path=code_path,
        unsafe_load=unsafe_load, dataset=dataset,
    ) if teacher is not None else None  # fmt: skip
    with user_code(code_path, unsafe=unsafe_load):  # students of a user architecture
        result = evaluate_saved(
            resolve_runtime(device, amp, channels_last), ens, students,
            dataset=dataset, data_root=data_root, test_subset=test_subset,
        )  # fmt: skip
    click.echo(
        f"{result['dataset']}: {plural(result['n_test'], 'test image')}, "
        f"T fitted on {plural(result['n_val'], 'validation image')}"
    )
    columns = COLUMNS + (("agreement",) if ens and students else ())
    click.echo(
        markdown_table(result["members"] + result["ensembles"] + result["students"], columns)
    )
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(result, indent=2) + "\n")
        click.echo(f"wrote {json_path}")
