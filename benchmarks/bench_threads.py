"""A training command beside one busy single-threaded process: threads chosen by ensc (auto),
all cores (torch's own default), OMP_NUM_THREADS=1, and all cores with a passive OpenMP wait
(issue 23, item 6).

    python benchmarks/bench_threads.py             # ~4 min on 2 cores
    python benchmarks/bench_threads.py --repeats 3

Torch's default (one OpenMP thread per core) stalls when another process holds a core: its
threads spin and wait for the one that is descheduled, at every parallel region. ``--threads
auto`` (ensc's default) counts the cores other processes keep busy at start and uses the rest.
This script starts one single-threaded busy process (a float32 matmul loop, as another training
job would be), then times the issue's command under each setting, alternating, ``--repeats``
times each, and once more on idle cores for reference. It writes ``docs/bench-threads.json`` and
``docs/bench-threads.md``. Run it on an otherwise idle machine (the load average is recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENSC = str(Path(sys.executable).parent / "ensc")
COMMAND = ["train", "--dataset", "fashion-mnist", "--arch", "resnet8", "--members", "1",
           "--epochs", "1", "--train-subset", "6000", "--max-steps", "40"]  # fmt: skip
BUSY = (
    "import torch, time; torch.set_num_threads(1); a = torch.rand(512, 512)\n"
    "while True: a = (a @ a).tanh()"
)


def settings(cores: int) -> dict[str, tuple[list[str], dict[str, str]]]:
    """name -> (extra flags, extra environment)."""
    return {
        "auto (ensc default)": ([], {}),
        f"--threads {cores} (torch default: all cores)": (["--threads", str(cores)], {}),
        "OMP_NUM_THREADS=1": ([], {"OMP_NUM_THREADS": "1"}),
        f"--threads {cores}, OMP_WAIT_POLICY=PASSIVE": (
            ["--threads", str(cores)],
            {"OMP_WAIT_POLICY": "PASSIVE"},
        ),
    }


def timed(work: Path, out: str, flags: list[str], env: dict[str, str]) -> float:
    environ = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS",)}
    start = time.perf_counter()
    subprocess.run([ENSC, *COMMAND, "--out", out, "--force", *flags], cwd=work,
                   env={**environ, **env}, check=True, capture_output=True, text=True)  # fmt: skip
    return time.perf_counter() - start


def measure(work: Path, cases: dict, repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for i, (name, (flags, env)) in enumerate(cases.items()):
            times[name].append(round(timed(work, f"t{i}", flags, env), 2))
    return times


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    cases = settings(cores)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        timed(work, "warm", ["--threads", "1"], {})  # dataset files into the page cache
        idle = measure(work, {"idle cores, auto": ([], {})}, 1)
        busy = subprocess.Popen([sys.executable, "-c", BUSY])
        try:
            time.sleep(2)
            times = measure(work, cases, args.repeats)
        finally:
            busy.kill()
    one = median(times["OMP_NUM_THREADS=1"])
    rows = [{"setting": name, "seconds": t, "median": median(t), "vs_omp1": median(t) / one}
            for name, t in {**idle, **times}.items()]  # fmt: skip
    result = {"command": "ensc " + " ".join(COMMAND), "cores": cores, "repeats": args.repeats,
              "load_before": load_before, "rows": rows}  # fmt: skip
    (REPO / "docs" / "bench-threads.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# A training command beside one busy process (`--threads`)",
        "",
        "    python benchmarks/bench_threads.py",
        "",
        f"`{result['command']}` on {cores} cores, with one single-threaded busy process beside "
        f"it (a matmul loop) except in the first row; median of {args.repeats} runs each, "
        f"alternating (1-minute load average before: {load_before:.2f}).",
        "",
        "| setting | seconds (each run) | median s | × OMP_NUM_THREADS=1 |",
        "|---|---|---:|---:|",
        *(
            f"| {r['setting']} | {', '.join(f'{s:.1f}' for s in r['seconds'])} | "
            f"{r['median']:.1f} | {r['vs_omp1']:.2f} |"
            for r in rows
        ),  # fmt: skip
        "",
    ]
    (REPO / "docs" / "bench-threads.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
