"""Wall-clock time per phase of a training step (data, perturbation, teacher, student, optimizer).

The loop and the distillation step mark their phases with ``with timer("teacher"): ...``; the
default :data:`NO_TIMER` does nothing, so timing costs nothing unless a benchmark or a log asks.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator

import torch


class PhaseTimer:
    """Accumulates seconds per phase name; ``synchronize`` waits for CUDA kernels at each edge."""

    def __init__(self, synchronize: bool = False) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.synchronize = synchronize and torch.cuda.is_available()

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if self.synchronize:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.synchronize:
                torch.cuda.synchronize()
            self.seconds[phase] += time.perf_counter() - start

    def reset(self) -> None:
        self.seconds.clear()

    def shares(self) -> str:
        """E.g. ``student 71% teacher 18% perturb 8% data 2% optimizer 1%``."""
        total = sum(self.seconds.values()) or 1.0
        ordered = sorted(self.seconds.items(), key=lambda kv: -kv[1])
        return " ".join(f"{name} {100 * s / total:.0f}%" for name, s in ordered)


class _NoTimer:
    """Times nothing and has no phases to report (what the loop gets unless a caller asks)."""

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        yield

    def reset(self) -> None:
        pass

    def shares(self) -> str:
        return ""


NO_TIMER: PhaseTimer = _NoTimer()  # type: ignore[assignment]


class StageClock:
    """Seconds per stage: ``with clock("eval_seconds"): ...`` or ``start(name)`` ... ``stop()``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._open: tuple[str, float] | None = None

    def start(self, name: str) -> None:
        self.stop()
        self._open = (name, time.perf_counter())

    def stop(self) -> None:
        if self._open is not None:
            name, since = self._open
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - since
            self._open = None

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.start(name)
        try:
            yield
        finally:
            self.stop()

    def rounded(self) -> dict[str, float]:
        return {name: round(s, 2) for name, s in self.seconds.items()}
