"""Pictures (evaluation/plots.py): valid PNG files of the expected size from real predictions, the
no-overwrite rule, the compress report's pictures, and the one-line message without matplotlib."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ensc.data.datasets import load_dataset
from ensc.data.splits import DataConfig
from ensc.errors import ConfigError
from ensc.evaluation import corruptions, plots
from ensc.evaluation.metrics import accuracy as acc_of
from ensc.evaluation.metrics import (
    apply_temperature,
    ece,
    fit_temperature,
    nll,
    reliability_bins,
)
from ensc.evaluation.ood import paired_scores
from tests.conftest import TINY_COMPRESS, run_cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MISSING = "the pictures need matplotlib: pip install 'ensc[plot]'"
NO_MATPLOTLIB = ("matplotlib", "matplotlib.figure", "matplotlib.backends",
                 "matplotlib.backends.backend_agg")  # fmt: skip


def assert_png(path: Path, width_in: float, height_in: float) -> None:
    """A real PNG: the signature, more than a blank canvas's bytes, and matplotlib reads it back
    as an image of the figure's size at plots.DPI, with more than a few colours on it."""
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 10_000, (path, len(data))
    img = imread(path)
    assert img.shape == (round(height_in * plots.DPI), round(width_in * plots.DPI), 4), img.shape
    assert len(torch.from_numpy(img[..., :3]).reshape(-1, 3).unique(dim=0)) > 50


@pytest.fixture(scope="module")
def fmnist():
    pytest.importorskip("matplotlib")
    return load_dataset(DataConfig("fashion-mnist", train_subset=1000, test_subset=300))


def centroid_probs(data, images: torch.Tensor, scale: float) -> torch.Tensor:
    """A nearest-centroid classifier of the training images: softmax(−scale · squared distance)."""
    x = data.train.images.flatten(1).float() / 255
    centroids = torch.stack([x[data.train.labels == k].mean(0) for k in range(10)])
    d = torch.cdist(images.flatten(1).float() / 255, centroids).pow(2)
    return (-scale * d).softmax(-1).double()


def test_reliability_diagram_of_real_predictions(fmnist, tmp_path: Path):
    models = {
        f"centroids, scale {s}": reliability_bins(centroid_probs(fmnist, fmnist.test.images, s), fmnist.test.labels)
        for s in (0.05, 0.3, 2.0)
    }  # fmt: skip
    out = plots.reliability_diagram(models, tmp_path / "r.png")
    assert out == tmp_path / "r.png"
    assert_png(out, 5.2, 4.8)
    # lists (as JSON holds them) draw the same picture
    as_lists = {k: [t.tolist() for t in v] for k, v in models.items()}
    plots.reliability_diagram(as_lists, tmp_path / "l.png")
    assert (tmp_path / "l.png").read_bytes() == out.read_bytes()


def test_dee_curve_with_students_inside_and_outside_the_curve(tmp_path: Path):
    pytest.importorskip("matplotlib")
    curve = [0.62, 0.51, 0.47, 0.455]
    out = plots.dee_curve(curve, {"inside": 0.49, "worse": 0.7, "better": 0.4}, tmp_path / "d.png")
    assert_png(out, 5.6, 4.2)
    with pytest.raises(ValueError, match="at least one teacher member"):
        plots.dee_curve([], {}, tmp_path / "none.png")


def test_ood_histograms_of_real_scores(fmnist, tmp_path: Path):
    inverted = 255 - fmnist.test.images  # negatives of the garments: another distribution
    members_in = torch.stack([centroid_probs(fmnist, fmnist.test.images, s) for s in (0.1, 0.4)])
    members_out = torch.stack([centroid_probs(fmnist, inverted, s) for s in (0.1, 0.4)])
    models = {
        "one": paired_scores(members_in[0], members_out[0]),
        "both": paired_scores(members_in.mean(0), members_out.mean(0), members_in, members_out),
    }
    out = plots.ood_histograms(models, tmp_path / "o.png", out_name="inverted")
    assert_png(out, 3.3 * 3, 2.3 * 2 + 0.3)  # two models, three scores (MI of "both")


def test_corruption_curves_read_the_corruptions_layout(fmnist, tmp_path: Path):
    """result["corruptions"] as evaluation/corruptions.py summarizes it, from real corrupted
    images, drawn with the clean metrics as severity 0."""
    val = centroid_probs(fmnist, fmnist.val.images, 0.3)
    t = fit_temperature(val.clamp_min(1e-12).log(), fmnist.val.labels)
    labels = fmnist.test.labels

    def metrics(p: torch.Tensor) -> dict[str, float]:
        calibrated = apply_temperature(p.clamp_min(1e-12).log(), t)
        return {"acc": acc_of(p, labels), "nll": nll(p, labels), "cnll": nll(calibrated, labels),
                "ece": ece(p, labels)}  # fmt: skip

    per = {
        name: {
            str(s): metrics(centroid_probs(fmnist, corruptions.corrupted_split(fmnist.test, name, s).images, 0.3))
            for s in corruptions.SEVERITIES
        }
        for name in ("gaussian_noise", "contrast")
    }  # fmt: skip
    section = {"models": [{"name": "centroids", **corruptions.summarize(per)}]}
    clean = {"centroids": metrics(centroid_probs(fmnist, fmnist.test.images, 0.3))}
    out = plots.corruption_curves(section, tmp_path / "c.png", clean=clean)
    assert_png(out, 9.5, 3.8)
    with pytest.raises(ValueError, match="no model under corruption"):
        plots.corruption_curves({"models": []}, tmp_path / "none.png")


def test_pictures_refuse_existing_files_without_force(tmp_path: Path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "d.png"
    path.write_bytes(b"mine")
    with pytest.raises(ConfigError, match="d.png exists; pass --force"):
        plots.dee_curve([0.6, 0.5], {}, path)
    assert path.read_bytes() == b"mine"
    plots.dee_curve([0.6, 0.5], {}, path, force=True)
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    # eval_pictures checks every target before drawing any: nothing is written
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "dee.png").write_bytes(b"mine")
    result = {"de_cnll_curve": [0.6, 0.5], "students": []}
    details = {"reliability": {"m": [[10.0], [9.0], [8.0]]}}
    with pytest.raises(ConfigError, match="dee.png exists"):
        plots.eval_pictures(result, details, tmp_path / "pics")
    assert sorted(p.name for p in (tmp_path / "pics").iterdir()) == ["dee.png"]


def test_missing_matplotlib_is_one_line_without_traceback(tmp_path: Path):
    """`ensc eval --plot` in a Python where matplotlib cannot be imported (sys.modules entry
    None): exit 1, one line on stderr, and nothing evaluated or written."""
    code = (
        "import sys\n"
        f"for name in {NO_MATPLOTLIB!r}: sys.modules[name] = None\n"
        "from ensc.cli.main import cli\n"  # not main(): its re-exec under tcmalloc starts afresh
        "cli(sys.argv[1:], prog_name='ensc')\n"
    )
    args = ["eval", "--teacher", str(tmp_path / "no-teacher-needed"), "--plot", str(tmp_path / "p")]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == f"Error: {MISSING}\n"
    assert not (tmp_path / "p").exists()
    with pytest.MonkeyPatch.context() as mp:  # the library raises the same one line
        for name in NO_MATPLOTLIB:
            mp.setitem(sys.modules, name, None)
        with pytest.raises(Exception, match=r"^the pictures need matplotlib") as err:
            plots.require_matplotlib()
        assert str(err.value) == MISSING and type(err.value).__name__ == "MissingExtraError"


def test_compress_run_folder_has_linked_pictures(tiny_run: Path):
    pytest.importorskip("matplotlib")
    assert_png(tiny_run / "reliability.png", 5.2, 4.8)
    assert_png(tiny_run / "dee.png", 5.6, 4.2)
    md = (tiny_run / "report.md").read_text()
    assert "![reliability diagram](reliability.png)" in md and "![DEE curve](dee.png)" in md


def test_compress_without_matplotlib_says_so_and_succeeds(
    tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    for name in NO_MATPLOTLIB:
        monkeypatch.setitem(sys.modules, name, None)
    run = tmp_path / "runs" / "nompl"
    result = run_cli(
        "compress", "--teacher", str(tiny_teacher), *TINY_COMPRESS, "--out", str(run), cwd=tmp_path
    )
    assert result.exit_code == 0, result.output
    assert not list(run.glob("*.png"))
    lines = [line for line in (run / "report.md").read_text().splitlines() if "matplotlib" in line]
    assert lines == [f"No pictures: {MISSING}"]
    assert not (run / ".incomplete").exists()  # finished
