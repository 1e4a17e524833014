"""Fault injection for tests: ``ENSC_FAULT=<point>`` makes the process kill itself at that point.

A real crash (SIGKILL: no cleanup, no ``finally``) at a chosen place, so the fault-injection tests
can check that a rerun or ``--resume`` always ends with a complete, consistent run folder. Points
are named ``<command>.<where>`` (e.g. ``compress.step``), and ``save.<file name>`` is reached inside
every atomic write (:func:`ensc.fileio.atomic_write`, between the temp file and the rename);
``<point>:N`` fires on the N-th time the point is reached (default the first). Unset in normal
use: then :func:`point` is a dict lookup and nothing else.
"""

from __future__ import annotations

import os
import signal

ENV = "ENSC_FAULT"
_hits: dict[str, int] = {}


def point(name: str) -> None:
    """Kill this process with SIGKILL if ``ENSC_FAULT`` names ``name`` (and this is the N-th hit)."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    target, _, nth = wanted.partition(":")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
