"""`ensc bench` on a tiny real run: measurement bookkeeping, MACs by hand, the JSON schema."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from ensc.export.bench import Candidate, count_macs, measure
from ensc.export.onnx import read_metadata, save_onnx, set_metadata
from ensc.export.quantize import to_int8
from ensc.export.sources import load_check_images
from ensc.export.validate import make_session, run_onnx
from ensc.export.wrappers import EnsembleMean, SingleNetwork
from ensc.models.checkpoint import load_checkpoint
from ensc.teachers.ensemble import load_teacher
from tests.conftest import run_cli

ROW_KEYS = {
    "name", "family", "engine", "precision", "batch_size", "p50_ms", "p90_ms", "p99_ms", "mean_ms",
    "images_per_s", "calls", "params", "macs", "file_bytes", "accuracy", "speedup_vs_teacher", "source",
}  # fmt: skip
BENCH = (
    "bench",
    "--batch-sizes",
    "1,4",
    "--warmup",
    "1",
    "--repeats",
    "3",
    "--test-samples",
    "64",
    "--threads",
    "1",
)


def test_measure_interleaves_candidates_and_tiles_batches():
    calls: list[tuple[str, int]] = []

    def candidate(name: str) -> Candidate:
        def predict(images: np.ndarray) -> np.ndarray:
            calls.append((name, images.shape[0]))
            return np.zeros((images.shape[0], 3), np.float32)

        return Candidate(name, "student", "onnxruntime", "fp32", predict, 0, 0, 0, "")

    latency = measure(
        [candidate(n) for n in "abc"],
        np.zeros((5, 1, 2, 2), np.float32),
        [1, 8],
        warmup=2,
        repeats=4,
    )
    assert set(latency) == {(i, b) for i in range(3) for b in (1, 8)}
    big = [name for name, b in calls if b == 8]  # 8 > 5 images: the batch is tiled, not cut
    assert len(big) == 3 * (2 + 4)
    timed = big[3 * 2 :]  # after the warm-up calls, every round starts with the next candidate
    assert [timed[3 * r] for r in range(4)] == ["a", "b", "c", "a"]
    for (_, b), lat in latency.items():
        assert lat.calls == 4 and 0 < lat.p50_ms <= lat.p90_ms <= lat.p99_ms
        assert lat.images_per_s == pytest.approx(b / lat.p50_ms * 1e3)


def test_count_macs_by_hand():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    by_hand = 4 * 1 * 3 * 3 * 8 * 8 + 256 * 10  # conv: C_out·C_in·k·k·H·W; linear: in·out
    x = torch.rand(1, 1, 8, 8)
    assert count_macs(SingleNetwork(net), x) == by_hand
    assert count_macs(EnsembleMean([net, net, net]), x) == 3 * by_hand


def copy_run(run: Path, cwd: Path) -> Path:
    shutil.copytree(run, cwd / "runs" / "r")
    os.symlink("r", cwd / "runs" / "latest")
    return cwd / "runs" / "r"


@pytest.fixture(scope="module")
def benched(tiny_run: Path, tmp_path_factory) -> tuple[Path, str]:
    """A copy of the tiny run with teacher.onnx, student.onnx, student.int8.onnx, then `ensc bench`."""
    cwd = tmp_path_factory.mktemp("bench")
    run = copy_run(tiny_run, cwd)
    for what in ("teacher", "student"):
        result = run_cli("export", "--onnx", "--what", what, "--check-samples", "64", cwd=cwd)
        assert result.exit_code == 0, result.output
    # an int8 file without a second export: quantize the fp32 graph directly
    ckpt = load_checkpoint(run / "student.pt")
    calib = load_check_images(
        ckpt.spec, ckpt.info["data"], test_samples=1, calib_samples=64
    ).calib_images
    fp32 = onnx.load(run / "student.onnx")
    int8 = set_metadata(
        to_int8(fp32, calib), {**{p.key: p.value for p in fp32.metadata_props}, "precision": "int8"}
    )
    save_onnx(int8, run / "student.int8.onnx")
    result = run_cli(*BENCH, "--json", "b.json", "--markdown", "b.md", "--plot", "b.png", cwd=cwd)
    assert result.exit_code == 0, result.output
    return cwd, result.output


def test_teacher_graph_is_the_members_mean(benched, tiny_teacher: Path):
    cwd, _ = benched
    x = torch.rand(5, 1, 28, 28)
    teacher = load_teacher(tiny_teacher)
    with torch.no_grad():
        expected = torch.stack([m(x).softmax(-1) for m in teacher.members]).mean(0)  # [B, K]
    path = cwd / "runs" / "r" / "teacher.onnx"
    _, probs = run_onnx(make_session(str(path)), x)
    np.testing.assert_allclose(probs, expected.numpy(), atol=1e-5)
    meta = read_metadata(onnx.load(path))
    assert meta["what"] == "teacher" and meta["members"] == 2 and len(meta["source"]) == 2


def test_bench_json_schema_and_invariants(benched):
    cwd, output = benched
    result = json.loads((cwd / "b.json").read_text())
    assert result["schema"] == "ensc-bench/1" and result["command"].startswith(
        "ensc bench --batch-sizes 1,4"
    )
    assert {"cpu", "logical_cpus", "threads", "torch", "onnxruntime"} <= set(result["environment"])
    assert result["environment"]["threads"] == 1 and result["config"]["threads"] == 1
    assert result["config"]["batch_sizes"] == [1, 4] and result["n_test"] == 64
    rows = result["rows"]
    assert all(set(r) == ROW_KEYS for r in rows)
    kinds = {(r["family"], r["engine"], r["precision"]) for r in rows}
    assert kinds == {
        ("teacher", "pytorch", "fp32"), ("teacher", "onnxruntime", "fp32"),
        ("student-be", "pytorch", "fp32"), ("student-be", "onnxruntime", "fp32"),
        ("student", "pytorch", "fp32"), ("student", "onnxruntime", "fp32"), ("student", "onnxruntime", "int8"),
    }  # fmt: skip
    assert len(rows) == 2 * len(kinds)
    for r in rows:
        assert r["calls"] == 3 and 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["images_per_s"] == pytest.approx(r["batch_size"] / r["p50_ms"] * 1e3)
        assert 0 <= r["accuracy"] <= 100 and r["file_bytes"] > 0

    def row(family: str, engine: str, precision: str = "fp32", batch: int = 4) -> dict:
        return next(
            r for r in rows
            if (r["family"], r["engine"], r["precision"], r["batch_size"]) == (family, engine, precision, batch)
        )  # fmt: skip

    student, teacher, be = (
        row("student", "onnxruntime"),
        row("teacher", "onnxruntime"),
        row("student-be", "onnxruntime"),
    )
    assert teacher["speedup_vs_teacher"] == 1.0
    assert student["speedup_vs_teacher"] == pytest.approx(teacher["p50_ms"] / student["p50_ms"])
    assert teacher["params"] == 2 * student["params"] and teacher["macs"] == 2 * student["macs"]
    assert (
        be["macs"] == 2 * student["macs"] and student["params"] < be["params"] < teacher["params"]
    )
    # fp32 parity: same predictions on both engines
    for family in ("teacher", "student-be", "student"):
        assert row(family, "pytorch")["accuracy"] == row(family, "onnxruntime")["accuracy"]
    assert row("student", "onnxruntime", "int8")["file_bytes"] < 0.5 * student["file_bytes"]
    # student_be.onnx was not in the run: exported for the benchmark, not written into the run
    assert any("student_be.onnx" in n for n in result["notes"])
    assert not (cwd / "runs" / "r" / "student_be.onnx").exists()
    assert "| DE-2 teacher (resnet8)" in output and "vs teacher" in output


def test_bench_writes_markdown_and_plot_or_a_note(benched):
    cwd, output = benched
    md = (cwd / "b.md").read_text()
    assert (
        "`ensc bench --batch-sizes 1,4" in md
        and "| averaged student (resnet8)" in md
        and "## Latency" in md
    )
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert (
            "skipped b.png: matplotlib is not installed" in output and not (cwd / "b.png").exists()
        )
    else:
        assert (cwd / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_refuses_to_overwrite_before_measuring(benched):
    cwd, _ = benched
    before = (cwd / "b.json").read_text()
    result = run_cli(*BENCH, "--json", "b.json", cwd=cwd)
    assert result.exit_code != 0 and "--force" in result.output and "p50" not in result.output
    assert (cwd / "b.json").read_text() == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("bench",), "no run found"),
        (("bench", "--run", "{run}", "--batch-sizes", "1,x"), "comma-separated positive integers"),
        (("bench", "--run", "{run}", "--batch-sizes", "0"), "comma-separated positive integers"),
        (("bench", "--run", "{run}", "--json", "{file}/b.json"), "cannot write"),
        (("bench", "--run", "{tmp}/empty"), "has no student.pt"),
        (("bench", "--run", "{run}", "--threads", "0"), "--threads must be auto or a whole number"),
        (
            ("bench", "--run", "{run}", "--threads", "two"),
            "--threads must be auto or a whole number",
        ),
        # input alone of hundreds of GiB: a raw MemoryError before
        (("bench", "--run", "{run}", "--batch-sizes", "1,100000000"), "use smaller --batch-sizes"),
    ],
)
def test_bench_bad_input_is_one_line(args, message, tiny_run: Path, tmp_path: Path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("")
    fields = {"run": tiny_run, "file": tmp_path / "file", "tmp": tmp_path}
    result = run_cli(*[a.format(**fields) for a in args], cwd=tmp_path)
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and message in errors[0], result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_bench_cuda_without_gpu_is_one_line(tiny_run: Path):
    result = run_cli("bench", "--run", str(tiny_run), "--provider", "cuda")
    assert result.exit_code == 1 and "Error: --provider cuda needs onnxruntime-gpu" in result.output


def test_int8_uses_7_bit_weights_only_where_the_cpu_lacks_vnni():
    from ensc.export.quantize import reduce_range_here

    assert reduce_range_here({"avx2", "fma"})  # U8S8 could saturate: 7-bit weights
    assert not reduce_range_here({"avx2", "avx512_vnni"})
    assert not reduce_range_here({"avx2", "avx_vnni"})
