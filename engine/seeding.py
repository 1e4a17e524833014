"""Seeded randomness without touching the caller's: library code never reseeds the global RNG."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block on torch's CPU RNG seeded with ``seed`` (e.g. weight init); restore the
    caller's RNG state afterwards. Data order and perturbations use explicit ``torch.Generator``s."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
