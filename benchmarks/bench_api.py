"""The Python API against the CLI: the same compression, side by side (issue 22).

    python benchmarks/bench_api.py                # ~3 min on 2 cores
    python benchmarks/bench_api.py --steps 20

A newcomer measured the README's API example at 5.6 s/step against 1.1 s/step for the CLI on the
same machine. Both paths now share one implementation and one set-up (the API applies the CLI's
malloc settings; only tcmalloc, which must be preloaded before Python starts, is the `ensc`
command's alone). This script trains a small Fashion-MNIST teacher once, then runs the same
`compress` twice in fresh processes, one after the other under the same load: ``ensc compress``
and ``ensc.compress_ensemble`` with the same options, each with one torch thread. It writes
``docs/bench-api.json`` and ``docs/bench-api.md`` (seconds per step of each, and their ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENSC = str(Path(sys.executable).parent / "ensc")
OPTIONS = {"arch": "resnet8", "train_subset": 6000, "test_subset": 500, "batch_size": 64,
           "max_acc_drop": 100.0}  # fmt: skip


def flags(options: dict) -> list[str]:
    return [x for k, v in options.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def run(cmd: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True, text=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run([ENSC, "train", "--dataset", "fashion-mnist", "--arch", "resnet8", "--members", "4",
             "--epochs", "1", "--train-subset", "3000", "--max-steps", "20", "--out", "ckpts"], work)  # fmt: skip
        options = {**OPTIONS, "steps": args.steps}
        run([ENSC, "compress", "--teacher", "ckpts", *flags(options), "--out", "cli"], work)
        code = (
            "import ensc, json, sys; o = json.loads(sys.argv[1]); "
            "ensc.compress_ensemble('ckpts', o.pop('arch'), out='api', **o)"
        )
        run([sys.executable, "-c", code, json.dumps(options)], work)
        rows = {}
        for name in ("cli", "api"):
            report = json.loads((work / name / "report.json").read_text())
            rows[name] = {"s_per_step": report["train"]["s_per_step"],
                          "steps": report["train"]["steps"]}  # fmt: skip
    ratio = rows["api"]["s_per_step"] / rows["cli"]["s_per_step"]
    result = {"command": f"python benchmarks/bench_api.py --steps {args.steps}", "options": options,
              "threads": 1, "rows": rows, "api_over_cli": round(ratio, 3)}  # fmt: skip
    (REPO / "docs" / "bench-api.json").write_text(json.dumps(result, indent=1) + "\n")
    md = [
        "# The Python API against the CLI",
        "",
        f"`{result['command']}`: the same `compress` of a Fashion-MNIST DE-4 of ResNet-8s into a "
        "ResNet-8 (tdiv-sdiv, batch 64), one torch thread each, one after the other.",
        "",
        "| path | steps | s/step |",
        "|---|---:|---:|",
        *(f"| {n} | {r['steps']} | {r['s_per_step']:.3f} |" for n, r in rows.items()),
        "",
        f"API / CLI: {ratio:.2f}×.",
        "",
    ]
    (REPO / "docs" / "bench-api.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
