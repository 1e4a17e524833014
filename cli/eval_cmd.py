"""`ensc eval`: metrics of a teacher's members, its prefix ensembles and single networks."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ensc.cli.options import data_mode_options, json_object, runtime_options, teacher_options
from ensc.data.catalog import DATASETS

COLUMNS = ("acc", "nll", "bs", "ece", "cnll", "cece", "dee", "kl_div", "disagreement")


@click.command("eval", epilog="""\b
Examples:
  ensc eval --teacher ckpts/
  ensc eval --teacher ckpts/ --test-subset 1000 --json teacher.json
  ensc eval --teacher ckpts/ --student runs/latest/student.pt
  ensc eval --teacher ckpts/ --corruptions --corruption-subset 2000
  ensc eval --teacher ckpts/ --ood-data cifar10 --plot pictures/
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
@data_mode_options
@click.option("--corruptions", is_flag=True,
              help="Also evaluate under the CIFAR-10-C corruptions (10 kinds, severities 1-5), made from the test split.")  # fmt: skip
@click.option("--corruption-subset", type=click.IntRange(min=1),
              help="With --corruptions: use a class-balanced subset of N test images for them (50 passes per network).")  # fmt: skip
@click.option(
    "--json",
    "json_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also write the results as JSON.",
)
@click.option("--ood-data", metavar="DIR_OR_NAME",
              help="Out-of-distribution images: a folder of images or a dataset name (its test split); adds AUROC and FPR@95 per model.")  # fmt: skip
@click.option("--plot", "plot_dir", metavar="DIR", type=click.Path(path_type=Path, file_okay=False),
              help="Also draw PNG pictures into DIR (needs matplotlib: pip install 'ensc[plot]').")  # fmt: skip
@click.option("--force", is_flag=True, help="Overwrite an existing --json file or --plot pictures.")
@teacher_options
@runtime_options
def eval_cmd(teacher, students, dataset, data_root, test_subset, json_path, ood_data, plot_dir, force, teacher_arch, teacher_arch_kwargs,
             code_path, unsafe_load, device, amp, channels_last, threads, corruptions, corruption_subset,
             data_mode, workers, image_size) -> None:  # fmt: skip
    """Evaluate teacher members, DE-1 ... DE-M and single networks on the test split."""
    from ensc.engine.runtime import resolve_runtime
    from ensc.errors import plural
    from ensc.evaluation.evaluate import evaluate_saved
    from ensc.evaluation.table import markdown_table
    from ensc.fileio import atomic_write_text, refuse_overwrite
    from ensc.teachers.ensemble import load_teacher, user_code

    if teacher is None and not students:
        raise click.UsageError("pass --teacher DIR, --student FILE, or both")
    if corruption_subset is not None and not corruptions:
        raise click.UsageError("--corruption-subset needs --corruptions")
    if json_path is not None:
        refuse_overwrite(json_path, force)
    if plot_dir is not None:  # before the evaluation: refuse early
        from ensc.evaluation import plots

        plots.require_matplotlib()
        for name in plots.eval_picture_names(
            teacher=teacher is not None, ood=ood_data is not None, corruptions=corruptions
        ):
            refuse_overwrite(plot_dir / name, force)
    details = {} if plot_dir is not None else None
    ens = load_teacher(
        teacher, arch=teacher_arch, arch_kwargs=json_object(teacher_arch_kwargs), code_path=code_path,
        unsafe_load=unsafe_load, dataset=dataset,
    ) if teacher is not None else None  # fmt: skip
    with user_code(code_path, unsafe=unsafe_load):  # students of a user architecture
        result = evaluate_saved(
            resolve_runtime(device, amp, channels_last, threads), ens, students,
            dataset=dataset, data_root=data_root, test_subset=test_subset,
            ood_data=ood_data, details=details,
            corruptions=corruptions, corruption_subset=corruption_subset,
            data_mode=data_mode, workers=workers, image_size=image_size,
        )  # fmt: skip
    click.echo(
        f"{result['dataset']}: {plural(result['n_test'], 'test image')}, "
        f"T fitted on {plural(result['n_val'], 'validation image')}"
    )
    columns = COLUMNS + (("agreement",) if ens and students else ())
    click.echo(
        markdown_table(result["members"] + result["ensembles"] + result["students"], columns)
    )
    if "ood" in result:
        from ensc.evaluation.ood import TABLE_COLUMNS

        ood = result["ood"]
        click.echo(f"\nOOD detection: {plural(ood['n_in'], 'test image')} (positive) vs "
                   f"{plural(ood['n_out'], 'image')} of {ood['data']}")  # fmt: skip
        click.echo(markdown_table(ood["models"], TABLE_COLUMNS))
    if "corruptions" in result:
        from ensc.evaluation.corruptions import corruption_table

        section = result["corruptions"]
        click.echo(f"\nunder corruption: {len(section['corruptions'])} corruptions of "
                   f"{plural(section['n_test'], 'test image')}, mean over corruptions per severity")  # fmt: skip
        click.echo(corruption_table(section))
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(result, indent=2) + "\n")
        click.echo(f"wrote {json_path}")
    if plot_dir is not None:
        for path in plots.eval_pictures(result, details, plot_dir, force=force):
            click.echo(f"wrote {path}")
