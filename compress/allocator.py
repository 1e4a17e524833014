"""Keep freed tensor memory in the process instead of handing it back to the OS every step.

glibc's malloc serves allocations above a (dynamic, at most 32 MiB) threshold with ``mmap`` and
returns them with ``munmap`` on free. A training step allocates and frees hundreds of activation
buffers of that size, so every step maps fresh pages and takes a minor page fault per 4 KiB page:
on a 2-core machine a BE-4 ResNet-32 step at 256 images spent 9 of its 10.7 s in the kernel
(``docs/bench-distill.md``). Turning ``mmap`` off for malloc and never trimming the heap makes
the same step take 4.6 s. tcmalloc (``LD_PRELOAD``) gets the same speed with less resident
memory; when it (or jemalloc) is preloaded we leave it alone.

Call :func:`tune_malloc` once at start-up, before the large allocations; ``ENSC_MALLOC=system``
opts out.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

# mallopt parameters from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1  # the largest int: keep free memory at the top of the heap

_applied: str | None = None


def tune_malloc() -> str:
    """Apply the malloc settings once; returns what is in effect (for logs and benchmarks).

    One of ``"glibc: mmap off, no trim"``, ``"preloaded <lib>"``, ``"system (ENSC_MALLOC)"`` or
    ``"system (not glibc)"``.
    """
    global _applied
    if _applied is not None:
        return _applied
    preloaded = [
        lib
        for lib in os.environ.get("LD_PRELOAD", "").replace(":", " ").split()
        if "tcmalloc" in lib or "jemalloc" in lib or "mimalloc" in lib
    ]
    if os.environ.get("ENSC_MALLOC", "").lower() == "system":
        _applied = "system (ENSC_MALLOC)"
    elif preloaded:
        _applied = f"preloaded {os.path.basename(preloaded[0])}"
    elif not sys.platform.startswith("linux") or not _is_glibc():
        _applied = "system (not glibc)"
    else:
        libc = ctypes.CDLL(None)
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM) == 1
        _applied = "glibc: mmap off, no trim" if ok else "system (mallopt refused)"
    log.debug("memory allocator: %s", _applied)
    return _applied


def _is_glibc() -> bool:
    try:
        return bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (ValueError, OSError):
        return False
