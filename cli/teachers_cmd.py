"""`ensc teachers inspect`: what ensc finds in a teacher folder, and the options for reading teachers."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ensc.cli.options import runtime_options
from ensc.data.catalog import DATASETS


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


def teacher_options(f: Callable) -> Callable:
    """--teacher-arch, --teacher-arch-kwargs, --code-path, --unsafe-load (see `load_teacher`)."""
    opts = [
        click.option("--teacher-arch", help="Architecture of weight-only teacher files: registry name or package.module:callable."),
        click.option("--teacher-arch-kwargs", metavar="JSON", callback=_check_json_object,
                     help="""Arguments of that architecture, as JSON: '{"num_classes": 100}'."""),
        click.option("--code-path", type=click.Path(path_type=Path, exists=True, file_okay=False),
                     help="Folder with your model code, put on the import path."),
        click.option("--unsafe-load", is_flag=True,
                     help="Allow teacher files that hold pickled Python objects (runs code from them: only files you trust)."),
    ]  # fmt: skip
    for opt in reversed(opts):
        f = opt(f)
    return f


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
                device, amp, channels_last) -> None:  # fmt: skip
    """Per member: file, format, architecture, parameters, classes, input, normalization."""
    from ensc.teachers.ensemble import load_teacher

    teacher = load_teacher(
        path, arch=teacher_arch, arch_kwargs=json_object(teacher_arch_kwargs), code_path=code_path,
        unsafe_load=unsafe_load, dataset=dataset,
    )  # fmt: skip
    rows = []
    for k, (model, spec, info, file) in enumerate(zip(teacher.members, teacher.specs, teacher.infos, teacher.paths, strict=True)):  # fmt: skip
        norm = info.get("normalization", "")
        norm = (
            "none added"
            if norm == "none"
            else f"{norm}: mean {_short(spec.mean)} std {_short(spec.std)}"
        )
        rows.append({
            "#": str(k), "file": file.name, "format": info["format"], "arch": spec.arch,
            "params": f"{sum(p.numel() for p in model.parameters()):,}",
            "classes": str(spec.num_classes), "input": f"{spec.in_channels}×{spec.image_size[0]}×{spec.image_size[1]}",
            "normalization": norm, "notes": "; ".join(info.get("notes", [])) or "-",
        })  # fmt: skip
    if dataset is not None:
        for row, acc in zip(
            rows, _accuracies(teacher, dataset, data_root, device, amp, channels_last), strict=True
        ):
            row["acc@256"] = f"{acc:.1f} %"
    click.echo(_table(rows))
    recorded = teacher.spec.dataset
    click.echo(
        f"{len(teacher)} members, {teacher.num_classes} classes; "
        + (f"trained on {recorded} (recorded)" if recorded
           else "no dataset recorded: pass --dataset to `ensc compress` / `ensc eval`")
    )  # fmt: skip


def _accuracies(teacher: Any, dataset: str, data_root: Path | None, device: str, amp: bool | None,
                channels_last: bool | None) -> list[float]:  # fmt: skip
    from ensc.data.datasets import DataConfig, load_dataset
    from ensc.data.source import check_compatible
    from ensc.engine.runtime import resolve_runtime
    from ensc.teachers.ensemble import sanity_check

    # the sanity pass needs 256 test images; a small train subset keeps image folders fast to read
    data = load_dataset(
        DataConfig(name=dataset, root=data_root, train_subset=1000, test_subset=256)
    )
    check_compatible(teacher.spec, data)
    runtime = resolve_runtime(device, amp, channels_last)
    teacher.to(runtime.device)
    return sanity_check(teacher, data.test, runtime)


def _short(values: tuple[float, ...]) -> str:
    return "[" + ", ".join(f"{v:.3g}" for v in values) + "]"


def _table(rows: list[dict[str, str]]) -> str:
    header = list(rows[0])
    widths = {h: max(len(h), *(len(r[h]) for r in rows)) for h in header}

    def line(cells: dict[str, str]) -> str:
        return "| " + " | ".join(cells[h].ljust(widths[h]) for h in header) + " |"

    rule = "|" + "|".join("-" * (widths[h] + 2) for h in header) + "|"
    return "\n".join([line({h: h for h in header}), rule, *(line(r) for r in rows)])
