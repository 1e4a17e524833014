"""Whether an image folder is decoded into memory or streamed from disk (``--data-mode``).

``auto`` streams when the decoded splits would take more than :data:`MEMORY_SHARE` of the memory
available now (MemAvailable in /proc/meminfo, else the free pages sysconf reports), and says
which it chose and why in one log line. The named datasets (Fashion-MNIST, CIFAR) are small and
always held in memory. The choice is made once per model: ``load_dataset`` returns it in
``ImageDataset.config``, which is what a model records, and ``data.source.data_config_for``
reuses a recorded mode, so later loads (eval, a student's teacher data, --resume) do not choose
again from the memory free then.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ensc.errors import ConfigError

log = logging.getLogger(__name__)

MODES = ("auto", "memory", "stream")
MEMORY_SHARE = 0.25  # auto: stream when the decoded images would need more than this share


def available_memory() -> int | None:
    """Bytes of memory available to new allocations now; None when the system does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_mode(mode: str, dataset: str) -> None:
    """Refuse a mode that does not exist, and streaming for anything but an image folder."""
    if mode not in MODES:
        raise ConfigError(f"unknown --data-mode {mode!r}: choose one of {', '.join(MODES)}")
    if mode == "stream" and dataset != "imagefolder":
        raise ConfigError(
            f"--data-mode stream reads image folders; {dataset} is small and always held in "
            "memory: drop --data-mode or pass --dataset imagefolder"
        )


def choose_mode(mode: str, n_images: int, image_bytes: int) -> str:
    """``memory`` or ``stream`` for ``n_images`` decoded images of ``image_bytes`` each."""
    if mode != "auto":
        return mode
    need = n_images * image_bytes
    choice, available = auto_mode(need)
    gib = 2**30
    if available is None:
        log.info("data: decoding %d images into memory (%.2f GiB; available memory unknown; "
                 "--data-mode stream to read them from disk instead)", n_images, need / gib)  # fmt: skip
        return "memory"
    if choice == "stream":
        log.info("data: streaming %d images from disk: decoded they would take %.2f GiB, more than "
                 "%d %% of the %.1f GiB available (--data-mode memory to decode them anyway)",
                 n_images, need / gib, round(100 * MEMORY_SHARE), available / gib)  # fmt: skip
        return "stream"
    log.info("data: decoding %d images into memory: %.2f GiB, within %d %% of the %.1f GiB "
             "available (--data-mode stream to read them from disk instead)",
             n_images, need / gib, round(100 * MEMORY_SHARE), available / gib)  # fmt: skip
    return "memory"


def auto_mode(need: int) -> tuple[str, int | None]:
    """What ``auto`` chooses for ``need`` bytes of decoded images (``stream`` above
    :data:`MEMORY_SHARE` of the memory available), and the bytes available (None: unknown)."""
    available = available_memory()
    if available is not None and need > MEMORY_SHARE * available:
        return "stream", available
    return "memory", available
