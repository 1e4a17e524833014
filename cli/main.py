"""The `ensc` command: a click group whose commands live one per module in this package."""

from __future__ import annotations

import logging
import os
import sys

import click

from ensc import __version__
from ensc.cli.bench_cmd import bench_cmd
from ensc.cli.compress_cmd import compress_cmd
from ensc.cli.eval_cmd import eval_cmd
from ensc.cli.export_cmd import export_cmd
from ensc.cli.teachers_cmd import teachers_cmd
from ensc.cli.train_cmd import train_cmd

EPILOG = """\b
Examples:
  ensc train --dataset fashion-mnist --arch resnet20 --members 4 --epochs 30 --out ckpts/
  ensc eval --teacher ckpts/ --json teacher.json
  ensc compress --teacher ckpts/ --arch wrn28x5
  ensc export --onnx
  ensc bench
"""


class EnscGroup(click.Group):
    """Turns library errors into one-line messages and exit code 1 (tracebacks only with --debug)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            click.echo(
                "interrupted; a run resumes with --resume from its last save (epoch ends and "
                "about every 10 minutes); one stopped before its first save has nothing to "
                "resume: run it again",
                err=True,
            )
            sys.exit(130)
        except Exception as err:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            from ensc.errors import EnscError, one_line

            message = one_line(err)
            if not isinstance(err, (EnscError, ValueError)):
                message = f"{type(err).__name__}: {message} (rerun with --debug for the traceback)"
            raise click.ClickException(message) from None


@click.group(cls=EnscGroup, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ensc")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr.")
@click.pass_context
def cli(ctx: click.Context, debug: bool, quiet: bool) -> None:
    """Compress a deep ensemble into one network that costs what one member costs."""
    ctx.obj = {"debug": debug}
    secondary = os.environ.get("RANK", "0") != "0"  # torchrun: only rank 0 talks
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING if quiet or secondary else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
        force=True,
    )
    from ensc.engine.allocator import tune_malloc

    tune_malloc()  # before any tensor is allocated: see ensc/compress/allocator.py


cli.add_command(train_cmd)
cli.add_command(eval_cmd)
cli.add_command(compress_cmd)
cli.add_command(export_cmd)
cli.add_command(bench_cmd)
cli.add_command(teachers_cmd)


def main() -> None:
    from ensc.engine.allocator import reexec_with_tcmalloc

    reexec_with_tcmalloc(sys.argv)  # faster, leaner memory reuse: see ensc/compress/allocator.py
    cli(prog_name="ensc")
