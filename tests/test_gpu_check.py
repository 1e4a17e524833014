"""The GPU check script runs on a CPU in its tiny form, so it cannot rot between GPU sessions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_gpu_check_passes_on_the_cpu_in_its_tiny_form(tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny",
         "--out", str(tmp_path / "check")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "check" / "gpu-check.json").read_text())
    assert summary["passed"] and len(summary["checks"]) == 7  # torchrun: not in --tiny
    assert all(row["passed"] for row in summary["checks"])
    assert "bit-identical" in summary["checks"][4]["detail"]
    assert summary["throughput"] and (tmp_path / "check" / "gpu-check.md").is_file()
