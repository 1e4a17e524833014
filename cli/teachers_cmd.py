"""`ensc teachers inspect`: what ensc finds in a teacher folder, and the options for reading teachers."""

from __future__ import annotations

from pathlib import Path

import click

from ensc.cli.options import json_object, runtime_options, teacher_options
from ensc.data.catalog import DATASETS


@click.group("teachers")
def teachers_cmd() -> None:
    """Look at teacher ensembles before compressing them."""


@teachers_cmd.command("inspect", epilog="""\b
Examples:
  ensc teachers inspect ckpts/
  ensc teachers inspect ckpts/ensemble.json --code-path src/
  ensc teachers inspect 'zoo/*.pth' --teacher-arch resnet20 --dataset cifar10 --data-root data/
""")  # fmt: skip
@click.argument("path", type=click.Path(path_type=Path))
@teacher_options
@click.option("--dataset", type=click.Choice(DATASETS),
              help="Also check each member's accuracy on 256 test images of this dataset.")  # fmt: skip
@click.option(
    "--data-root", type=click.Path(path_type=Path, file_okay=False), help="Dataset folder."
)
@runtime_options
def inspect_cmd(path, teacher_arch, teacher_arch_kwargs, code_path, unsafe_load, dataset, data_root,
                device, amp, channels_last, threads) -> None:  # fmt: skip
    """Per member: file, format, architecture, parameters, classes, input, normalization."""
    from ensc.engine.runtime import resolve_runtime
    from ensc.errors import plural
    from ensc.evaluation.table import render_table
    from ensc.teachers.ensemble import load_teacher
    from ensc.teachers.inspect import member_rows, spot_check

    teacher = load_teacher(
        path, arch=teacher_arch, arch_kwargs=json_object(teacher_arch_kwargs), code_path=code_path,
        unsafe_load=unsafe_load, dataset=dataset,
    )  # fmt: skip
    rows = member_rows(teacher)
    if dataset is not None:
        runtime = resolve_runtime(device, amp, channels_last, threads)
        for row, acc in zip(rows, spot_check(teacher, dataset, data_root, runtime), strict=True):
            row["acc@256"] = f"{acc:.1f} %"
    header = list(rows[0])
    click.echo(render_table(header, [[r[h] for h in header] for r in rows], "l" * len(header)))
    recorded = teacher.spec.dataset
    click.echo(
        f"{plural(len(teacher), 'member')}, {plural(teacher.num_classes, 'class', 'classes')}; "
        + (f"trained on {recorded} (recorded)" if recorded
           else "no dataset recorded: pass --dataset to `ensc compress` / `ensc eval`")
    )  # fmt: skip
