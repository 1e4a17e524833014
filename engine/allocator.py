"""Keep freed tensor memory in the process instead of handing it back to the OS every step.

glibc's malloc serves allocations above a (dynamic, at most 32 MiB) threshold with ``mmap`` and
returns them with ``munmap`` on free. A training step allocates and frees hundreds of activation
buffers of that size, so every step maps fresh pages and takes a minor page fault per 4 KiB page:
on a 2-core machine a BE-4 ResNet-32 step at 256 images spent 9 of its 10.7 s in the kernel
(``docs/bench-distill.md``). Two remedies, the first one available wins:

1. tcmalloc keeps freed memory in size classes: the step took 4.9 s at the same peak memory.
   It must be loaded before Python starts, so the ``ensc`` command re-executes itself once with
   ``LD_PRELOAD`` when the library is installed (Debian/Ubuntu: ``libtcmalloc-minimal4``), as
   PyTorch's own CPU launcher (``torch.backends.xeon.run_cpu``) does.
2. Otherwise glibc is told (``mallopt``) to serve everything from its heap and never trim it:
   4.6 s, but freed holes fragment the heap, so peak memory is up to 1.5× higher.

``ENSC_MALLOC=system`` opts out of both; an allocator the user preloaded is left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

# mallopt parameters from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1  # the largest int: keep free memory at the top of the heap

_applied: str | None = None
_REEXEC_MARK = "_ENSC_MALLOC_REEXEC"  # set in the re-executed process, so it happens once
PRELOADED = ("tcmalloc", "jemalloc", "mimalloc")


def _preloaded(env: dict[str, str] | os._Environ = os.environ) -> list[str]:
    entries = env.get("LD_PRELOAD", "").replace(":", " ").split()
    return [lib for lib in entries if any(name in lib for name in PRELOADED)]


def tcmalloc_library() -> str | None:
    """The tcmalloc shared library's name when it is installed (Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    return ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")


def preload_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with tcmalloc added to LD_PRELOAD when it helps."""
    env = dict(os.environ if env is None else env)
    lib = tcmalloc_library()
    if lib is None or env.get("ENSC_MALLOC", "").lower() == "system" or _preloaded(env):
        return env
    env["LD_PRELOAD"] = " ".join(filter(None, [env.get("LD_PRELOAD", ""), lib]))
    return env


def reexec_with_tcmalloc(argv: list[str]) -> None:
    """Replace this process by ``python -m ensc.cli argv[1:]`` under tcmalloc, if installed.

    Only for the command-line entry point, before anything is allocated; returns (doing
    nothing) when tcmalloc is missing, already loaded, opted out of, or exec fails.
    """
    if os.environ.get(_REEXEC_MARK):
        return
    env = preload_env()
    if env.get("LD_PRELOAD") == os.environ.get("LD_PRELOAD"):
        return
    env[_REEXEC_MARK] = "1"
    try:
        os.execve(sys.executable, [sys.executable, "-m", "ensc.cli", *argv[1:]], env)
    except OSError as err:  # keep going with glibc (mallopt below)
        log.debug("could not re-execute under tcmalloc: %s", err)


def tune_malloc() -> str:
    """Apply the malloc settings once; returns what is in effect (for logs and benchmarks).

    One of ``"glibc: mmap off, no trim"``, ``"preloaded <lib>"``, ``"system (ENSC_MALLOC)"`` or
    ``"system (not glibc)"``.
    """
    global _applied
    if _applied is not None:
        return _applied
    preloaded = _preloaded()
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
