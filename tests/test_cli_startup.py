"""`ensc --help` must not pay for importing torch: the CLI imports heavy modules inside commands."""

from __future__ import annotations

import subprocess
import sys


def test_cli_module_imports_without_torch() -> None:
    code = "import sys, ensc.cli.main; print(sorted(m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"ensc.cli.main imported {out.stdout.strip()}"
