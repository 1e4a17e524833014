"""Shared fixtures: real data locations and a tiny teacher trained once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ENSC_SHARED", REPO.parent / "shared"))
CIFAR_JPEG = SHARED / "data" / "cifar10-jpeg"

needs_cifar_jpeg = pytest.mark.skipif(
    not (CIFAR_JPEG / "train").is_dir(),
    reason=f"CIFAR-10 JPEG folder not found at {CIFAR_JPEG} (only in the team workspace; set ENSC_SHARED)",
)
# `ensc compress` flags of the tiny run: resnet8 student, 2 steps on 400 training images
TINY_COMPRESS = ("--arch", "resnet8", "--epochs", "1", "--batch-size", "32", "--train-subset", "400",
                 "--test-subset", "200", "--max-steps", "2", "--perturb", "none", "--max-acc-drop", "100")  # fmt: skip


def run_cli(*args: str, cwd: Path | None = None):
    """Invoke `ensc` in-process; returns click's Result (exit_code, output)."""
    from ensc.cli.main import cli

    runner = CliRunner()
    if cwd is None:
        return runner.invoke(cli, list(args), catch_exceptions=False)
    old = Path.cwd()
    os.chdir(cwd)
    try:
        return runner.invoke(cli, list(args), catch_exceptions=False)
    finally:
        os.chdir(old)


def png_folder_teacher(root: Path) -> tuple[Path, Path]:
    """An image folder of random 16×16 PNGs (train: 2 × 30, test: 2 × 6) under ``root/data`` and
    a 2-member resnet8 teacher trained on it for one step; returns (data folder, teacher)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for part, n in (("train", 30), ("test", 6)):
        for cls in ("a", "b"):
            (root / "data" / part / cls).mkdir(parents=True)
            for k in range(n):
                pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / "data" / part / cls / f"{k}.png")
    result = run_cli("train", "--dataset", "imagefolder", "--data-root", str(root / "data"),
                     "--arch", "resnet8", "--members", "2", "--epochs", "1", "--batch-size", "16",
                     "--max-steps", "1", "--out", str(root / "teacher"))  # fmt: skip
    assert result.exit_code == 0, result.output
    return root / "data", root / "teacher"


def rewrite_pngs(folder: Path, seed: int = 1) -> None:
    """Every PNG in ``folder`` rewritten with other random pixels, under the same name."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for image in sorted(folder.glob("*.png")):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(image)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """A 2-member resnet8 Fashion-MNIST teacher trained for a few steps (seconds on a CPU)."""
    out = tmp_path_factory.mktemp("teacher") / "ckpts"
    result = run_cli(
        "train", "--dataset", "fashion-mnist", "--arch", "resnet8", "--members", "2", "--epochs", "1",
        "--train-subset", "600", "--batch-size", "64", "--max-steps", "4", "--out", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def tiny_run(tiny_teacher: Path, tmp_path_factory) -> Path:
    """A finished `ensc compress` run folder of the tiny teacher (resnet8 student, 2 steps).

    Tests that write into a run (exports) copy it first; this folder stays pristine.
    """
    cwd = tmp_path_factory.mktemp("tiny_run")
    run = cwd / "runs" / "tiny"
    result = run_cli(
        "compress", "--teacher", str(tiny_teacher), *TINY_COMPRESS, "--out", str(run), cwd=cwd
    )
    assert result.exit_code == 0, result.output
    return run


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a test module (``pytestmark = pytest.mark.usefixtures("one_thread")``),
    the caller's thread count restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
