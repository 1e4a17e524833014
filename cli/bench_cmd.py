"""`ensc bench`: teacher vs BatchEns student vs single network, PyTorch vs onnxruntime, side by side."""

from __future__ import annotations

from pathlib import Path

import click

from ensc.cli.options import code_options, recorded_data_root_option, run_option

PROVIDERS = ("auto", "cpu", "cuda")  # = ensc.export.bench.PROVIDERS


def parse_batch_sizes(value: str) -> tuple[int, ...]:
    """``"1,8,64"`` -> ``(1, 8, 64)``; parsed in the body so the report shows what was typed."""
    try:
        sizes = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        sizes = ()
    if not sizes or any(b < 1 for b in sizes):
        raise click.BadParameter(
            f"expected comma-separated positive integers like 1,8,64; got {value!r}",
            param_hint="'--batch-sizes'",
        )
    return sizes


@click.command("bench", epilog="""\b
Examples:
  ensc bench
  ensc bench --batch-sizes 1,64 --repeats 200 --markdown bench.md --json bench.json
  ensc bench --run runs/resnet8-tdiv-sdiv-20250101-120000 --threads 1
""")  # fmt: skip
@run_option
@click.option(
    "--teacher", type=click.Path(path_type=Path), help="Teacher folder. Default: the run's."
)
@click.option(
    "--batch-sizes",
    default="1,8,64",
    show_default=True,
    help="Comma-separated batch sizes.",
)
@click.option(
    "--warmup",
    type=click.IntRange(min=0),
    default=5,
    show_default=True,
    help="Untimed calls per model and batch size.",
)
@click.option(
    "--repeats",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    help="Timed calls per model and batch size.",
)
@click.option(
    "--threads",
    default="auto",
    show_default=True,
    metavar="auto|N",
    help="Intra-op threads for both engines. auto: the cores other processes leave free at start "
    "(OMP_NUM_THREADS when set), as every ensc command chooses them.",
)
@click.option(
    "--provider",
    type=click.Choice(PROVIDERS),
    default="auto",
    show_default=True,
    help="onnxruntime execution provider (auto: CUDA when available, else CPU).",
)
@click.option(
    "--test-samples",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Test images for the accuracy column.",
)
@recorded_data_root_option
@click.option(
    "--json", "json_path", type=click.Path(path_type=Path), help="Also write the results as JSON."
)
@click.option(
    "--markdown", "md_path", type=click.Path(path_type=Path), help="Also write a Markdown report."
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(path_type=Path),
    help="Also draw images/s as a PNG (needs matplotlib).",
)
@click.option("--force", is_flag=True, help="Overwrite existing --json/--markdown/--plot files.")
@code_options
def bench_cmd(run, teacher, batch_sizes, warmup, repeats, threads, provider, test_samples, data_root,
              json_path, md_path, plot_path, force, code_path, unsafe_load) -> None:  # fmt: skip
    """Latency, throughput, size and accuracy of the teacher, the BE student and the single network."""
    from ensc.cli.options import command_line
    from ensc.export.bench import BenchConfig, run_bench
    from ensc.export.pipeline import check_writable
    from ensc.export.render import bench_json, bench_markdown, bench_text, plot_bench
    from ensc.fileio import atomic_write_text, refuse_overwrite

    batch_sizes = parse_batch_sizes(batch_sizes)
    outputs = [p for p in (json_path, md_path, plot_path) if p is not None]
    for path in outputs:
        check_writable(path)
        refuse_overwrite(path, force)
    config = BenchConfig(
        batch_sizes=batch_sizes, warmup=warmup, repeats=repeats, threads=threads, provider=provider,
        test_samples=test_samples, data_root=data_root,
    )  # fmt: skip
    command = command_line(click.get_current_context())
    result = run_bench(config, run=run, teacher=teacher, command=command, code_path=code_path,
                       unsafe_load=unsafe_load)  # fmt: skip
    click.echo(bench_text(result))
    if json_path is not None:
        atomic_write_text(json_path, bench_json(result))
        click.echo(f"wrote {json_path}")
    if md_path is not None:
        atomic_write_text(md_path, bench_markdown(result))
        click.echo(f"wrote {md_path}")
    if plot_path is not None:
        note = plot_bench(result, plot_path)
        click.echo(f"skipped {plot_path}: {note}" if note else f"wrote {plot_path}")
