"""How many intra-op threads torch gets: the cores that are free when the command starts.

By default torch uses one OpenMP thread per core. On a machine where another process already
keeps a core busy, those threads wait on each other at every parallel region, and a training step
runs several times slower than with fewer threads (docs/bench-threads.md measures it). So
``--threads auto`` (the default) counts the cores this process may use (its CPU affinity),
subtracts the ones other processes kept busy over a short sample of ``/proc/stat``, and gives
torch the rest (at least 1). ``--threads N`` (or ``OMP_NUM_THREADS`` in the environment, when no
``--threads`` is given) is used as it is. From Python, a thread count the program already set
with ``torch.set_num_threads`` (other than one per core) is kept under auto.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from ensc.errors import ConfigError

log = logging.getLogger(__name__)

SAMPLE_SECONDS = 0.3  # long enough to see a busy core, short beside any command's start-up


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    cores: int  # the cores this process may run on
    busy: float | None  # cores other processes kept busy during the sample; None: not measured
    reason: str  # "auto", "--threads" or "OMP_NUM_THREADS"

    def describe(self) -> str:
        if self.reason != "auto":
            return f"threads: {self.threads} ({self.reason})"
        busy = "" if self.busy is None else f", {self.busy:.1f} busy with other work"
        return f"threads: {self.threads} of {self.cores} cores{busy} (--threads N to override)"


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already inside user/nice
    return total - idle, total


def busy_cores(seconds: float = SAMPLE_SECONDS) -> float | None:
    """How many cores of the machine other processes kept busy over ``seconds`` (this process
    sleeps meanwhile); None where /proc/stat is not available."""
    first = _cpu_times()
    if first is None:
        return None
    time.sleep(seconds)
    second = _cpu_times()
    if second is None or second[1] <= first[1]:
        return None
    share = (second[0] - first[0]) / (second[1] - first[1])
    return share * (os.cpu_count() or 1)


def parse_threads(value: str | int | None) -> int | None:
    """``"auto"``/None -> None (choose at run time); a positive integer -> itself."""
    if value is None or value == "auto":
        return None
    try:
        threads = int(value)
    except (TypeError, ValueError):
        threads = 0
    if threads < 1 or str(value).strip() != str(threads):
        raise ConfigError(f"--threads must be auto or a whole number >= 1; got {value!r}")
    return threads


def choose_threads(value: str | int | None = "auto") -> ThreadChoice:
    """The thread count for ``value`` (auto | N), without applying it."""
    cores = usable_cores()
    requested = parse_threads(value)
    if requested is not None:
        return ThreadChoice(requested, cores, None, "--threads")
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        return ThreadChoice(int(env), cores, None, "OMP_NUM_THREADS")
    busy = busy_cores()
    if busy is None:
        return ThreadChoice(cores, cores, None, "auto")
    free = cores - min(float(cores), busy)
    return ThreadChoice(max(1, min(cores, round(free))), cores, busy, "auto")


_auto: ThreadChoice | None = None  # the first auto choice of this process


def apply_threads(value: str | int | None = "auto") -> ThreadChoice:
    """Choose torch's intra-op thread count and set it. auto is chosen once per process and kept
    (in a notebook or a test session, later samples would count this process's own threads)."""
    global _auto
    import torch

    auto = parse_threads(value) is None
    now, ours = torch.get_num_threads(), {usable_cores(), *([_auto.threads] if _auto else [])}
    if auto and now not in ours and not os.environ.get("OMP_NUM_THREADS", "").strip():
        # the program called torch.set_num_threads itself (a script, a notebook, a test): keep it
        return ThreadChoice(now, usable_cores(), None, "set by the program (torch.set_num_threads)")
    choice = _auto if auto and _auto is not None else choose_threads(value)
    if auto and _auto is None:
        _auto = choice
    if torch.get_num_threads() != choice.threads:
        torch.set_num_threads(choice.threads)
    log.info(choice.describe())
    return choice
