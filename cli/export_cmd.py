"""`ensc export --onnx`: the averaged network (or teacher, or BE student) as a verified ONNX file."""

from __future__ import annotations

from pathlib import Path

import click

from ensc.cli.options import code_options, recorded_data_root_option, run_option

# copies of ensc.export.sources.WHATS, ensc.export.quantize.PRECISIONS and
# ensc.export.onnx.DEFAULT_OPSET: importing those modules would import torch for `ensc --help`
WHATS = ("student", "student-be", "teacher")
PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_OPSET = 20


@click.command("export", epilog="""\b
Examples:
  ensc export --onnx
  ensc export --onnx --precision int8 --calib-samples 512
  ensc export --onnx --what teacher
  ensc export --onnx --model ckpts/member0.pt --out member0.onnx
""")  # fmt: skip
@click.option("--onnx", "to_onnx", is_flag=True, help="Export to ONNX (the only format so far).")
@run_option
@click.option(
    "--model",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Export this ensc checkpoint instead of a run (student.pt, student_be.pt, a teacher member).",
)
@click.option(
    "--what",
    type=click.Choice(WHATS),
    help="From the run: student (the averaged single network, default), student-be, or teacher "
    "(the ensemble as one graph, probs = members' mean).",
)
@click.option(
    "--teacher",
    type=click.Path(path_type=Path),
    help="Teacher folder for --what teacher. Default: the run's.",
)
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default="fp32",
    show_default=True,
    help="fp16: float16 weights; int8: static QDQ quantization. Inputs/outputs stay float32.",
)
@click.option(
    "--opset",
    type=click.IntRange(min=18),
    default=DEFAULT_OPSET,
    show_default=True,
    help="ONNX opset.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="Output file. Default: next to the source, e.g. runs/latest/student.int8.onnx.",
)
@click.option(
    "--check-samples",
    type=click.IntRange(min=1),
    default=512,
    show_default=True,
    help="Test images compared between onnxruntime and PyTorch.",
)
@click.option(
    "--calib-samples",
    type=click.IntRange(min=1),
    default=512,
    show_default=True,
    help="Training images that calibrate int8 activation ranges.",
)
@click.option(
    "--max-acc-drop",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="fp16/int8: fail when test accuracy drops more than this many points below fp32.",
)
@click.option(
    "--atol",
    type=click.FloatRange(min=0),
    default=1e-3,
    show_default=True,
    help="fp32: fail when max |Δlogit| onnxruntime vs PyTorch exceeds this (or top-1 agreement < 99.9 %).",
)
@recorded_data_root_option
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@code_options
def export_cmd(to_onnx, run, model, what, teacher, precision, opset, out, check_samples, calib_samples,
               max_acc_drop, atol, data_root, force, code_path, unsafe_load) -> None:  # fmt: skip
    """Export a network to ONNX and verify it against PyTorch on real test images.

    A file that fails the check is kept as FILE.failed and the command exits with an error.
    """
    from ensc.errors import ExportParityError, plural
    from ensc.export.pipeline import ExportConfig, run_export
    from ensc.export.render import human_bytes, parity_table

    if not to_onnx:
        raise click.UsageError("choose the format: --onnx (the only one so far)")
    config = ExportConfig(
        what=what, run=run, model=model, teacher=teacher, precision=precision, opset=opset, out=out,
        check_samples=check_samples, calib_samples=calib_samples, atol=atol, max_acc_drop=max_acc_drop,
        data_root=data_root, force=force, code_path=code_path, unsafe_load=unsafe_load,
    )  # fmt: skip
    try:
        result = run_export(config)
    except ExportParityError as err:
        if err.result is not None:
            click.echo(parity_table(err.result.parity))
        raise click.ClickException(str(err)) from None
    click.echo(
        f"parity on {plural(result.parity[0].n_images, f'{result.dataset} test image')} "
        "(onnxruntime vs PyTorch):"
    )
    click.echo(parity_table(result.parity))
    click.echo(
        f"wrote {result.path} ({result.what}, {result.precision}, {human_bytes(result.size_bytes)}, "
        f"opset {result.opset}; input 'images' float32 {result.metadata['input_shape']} in [0, 1])"
    )
