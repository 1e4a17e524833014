"""``--amp auto|on|off``: whether training and teacher inference run under autocast.

- CUDA: auto means on (float16 with loss scaling).
- CPU: bfloat16 autocast pays only where the CPU has native bf16 arithmetic (AMX or AVX512-BF16;
  elsewhere oneDNN emulates it and a step gets slower: docs/bench-amp.md). auto turns it on only
  where the CPU reports native bf16, a same-run probe (a small conv network's training step, both
  ways) shows it faster, and its quality against float32 on the in-domain benchmark has been
  measured (``CPU_BF16_QUALITY_MEASURED``; not yet: then auto stays off and says why).
  On a CPU, bf16 speeds training (student and teacher passes of the step) and the evaluation of
  the networks a run reports but does not ship (teacher and BE members:
  ``Runtime.for_reference``); the shipped network's evaluation and prediction stay float32, so
  what a run reports for it is the float32 file users get (``Runtime.eval_amp``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ensc.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where it is used: the CLI's --help reads AMP_CHOICES
    import torch

log = logging.getLogger(__name__)

AMP_CHOICES = ("auto", "on", "off")
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
MIN_SPEEDUP = 1.15  # the probe must show bf16 at least this much faster to count
# bf16 autocast keeps CPU training within noise of float32 on the in-domain study: measured on
# an AVX512-BF16 CPU, 3 seeds, test 79.58 % / cNLL 0.6031 against float32's 79.55 / 0.6032
# (docs/bench-amp.md, study plan indomain-bf16)
CPU_BF16_QUALITY_MEASURED = True


@dataclass(frozen=True)
class AmpChoice:
    on: bool
    reason: str
    probed: bool = False  # the same-run speed probe ran (a CPU with native bf16)


def parse_amp(value: bool | str | None) -> str:
    """True/False/None (the API's older spelling) or auto|on|off -> auto|on|off."""
    if value is None:
        return "auto"
    if isinstance(value, bool):
        return "on" if value else "off"
    if value not in AMP_CHOICES:
        raise ConfigError(f"--amp must be one of auto, on, off; got {value!r}")
    return value


def cpu_flags(path: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is not readable)."""
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def native_bf16(flags: set[str] | None = None) -> bool:
    """Whether the CPU computes bf16 natively (AMX tiles or AVX512-BF16)."""
    flags = cpu_flags() if flags is None else flags
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def _probe_step_seconds(bf16: bool, repeats: int = 3) -> float:
    """Median seconds of one forward+backward of a small conv network at batch 64, 32x32."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip
    x = torch.rand(64, 3, 32, 32)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = net(x).float().logsumexp(1).mean()
        loss.backward()
        if i:  # the first is warm-up (oneDNN primitive creation)
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def bf16_speedup() -> float:
    """float32 seconds / bf16 seconds of the probe step on this CPU, measured now."""
    return _probe_step_seconds(False) / _probe_step_seconds(True)


def choose_amp(value: bool | str | None, device: torch.device) -> AmpChoice:
    """Whether autocast is on for ``value`` on ``device``, and why (for the log and report)."""
    mode = parse_amp(value)
    if mode != "auto":
        return AmpChoice(mode == "on", f"--amp {mode}")
    if device.type == "cuda":
        return AmpChoice(True, "auto: float16 on CUDA")
    if not native_bf16():
        return AmpChoice(False, "auto: this CPU has no native bf16 (AMX/AVX512-BF16)")
    speedup = bf16_speedup()
    if speedup < MIN_SPEEDUP:
        return AmpChoice(False, f"auto: bf16 only {speedup:.2f}x float32 on this CPU", True)
    if not CPU_BF16_QUALITY_MEASURED:
        return AmpChoice(
            False,
            f"auto: bf16 is {speedup:.2f}x float32 here, but its accuracy against float32 is not "
            "measured yet (docs/bench-amp.md): --amp on to use it",
            True,
        )
    return AmpChoice(True, f"auto: native bf16, {speedup:.2f}x float32 on this CPU", True)
