"""What the benchmarks ran on, recorded beside their numbers (imported by the benchmark scripts)."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any


def hardware() -> dict[str, Any]:
    """CPU model, cores, torch version and its CPU capabilities, intra-op threads, Python."""
    import torch

    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def entries_by_machine(
    path: Path, key: Callable[[dict[str, Any]], str], legacy_field: str
) -> dict[str, dict[str, Any]]:
    """The entries of a benchmark file that keeps one per kind of machine (``{"machines": {key:
    entry}}``); a file from before that format, one flat entry holding ``legacy_field``, is one."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return data.get("machines", {key(data): data} if legacy_field in data else {})
