"""bfloat16 autocast against float32 on this CPU: why `--amp auto` is on or off (issue 23).

    python benchmarks/bench_amp.py          # ~1 min on 2 cores

Times, alternating and side by side, the training step (forward + backward + SGD) of a ResNet-20
at batch 128 on 32x32 images in float32 and under bf16 autocast, and the small probe that
``--amp auto`` runs at start (ensc/engine/precision.py), and records whether the CPU has native
bf16 (AMX or AVX512-BF16) and what auto decides. Machines differ between sessions: each keeps its
own entry in ``docs/bench-amp.json`` (keyed by CPU capability and bf16 flags), and
``docs/bench-amp.md`` shows them all. Quality is read from the committed study rows of plan
indomain-bf16 against float32 at the same flags and seeds (benchmarks/study_teacher.py).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ensc.engine import precision
from ensc.fileio import atomic_write_text
from ensc.models import build_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import entries_by_machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
JSON_PATH, MD_PATH = REPO / "docs" / "bench-amp.json", REPO / "docs" / "bench-amp.md"
STUDY = REPO / "docs" / "study"
# the quality rows: ensc's defaults (T 4, lr 0.0075) at 300 steps on the in-domain DE-4, seeds
# 0-2, as (label, plan, row name with {seed}); float32 ran on a 2-core AVX2 CPU (plan
# indomain-t4-lr) and, seed 0, again on the native-bf16 CPU beside bf16 (plan indomain-bf16)
QUALITY_ROWS = (
    ("float32", "indomain-t4-lr", "ensc-s300{seed}-lr0.0075-temperature4"),
    ("float32, bf16 CPU", "indomain-bf16", "ensc-s300{seed}-ampoff-lr0.0075-temperature4"),
    ("bf16", "indomain-bf16", "ensc-s300{seed}-ampon-lr0.0075-temperature4"),
)
SEEDS = (0, 1, 2)


def step_seconds(model: torch.nn.Module, bf16: bool, x: torch.Tensor, y: torch.Tensor) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return time.perf_counter() - start


def measure(repeats: int) -> dict[str, Any]:
    """This CPU's entry: the ResNet-20 step both ways (median of alternating steps), the probe,
    and what ``--amp auto`` decides here."""
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10)
    x, y = torch.rand(128, 3, 32, 32), torch.randint(0, 10, (128,))
    times: dict[str, list[float]] = {"float32": [], "bf16": []}
    for bf16 in (False, True):  # warm-up: oneDNN builds its primitives once per precision
        step_seconds(model, bf16, x, y)
    for _ in range(repeats):
        for name in times:
            times[name].append(step_seconds(model, name == "bf16", x, y))
    med = {k: statistics.median(v) for k, v in times.items()}
    flags = precision.cpu_flags()
    auto = precision.choose_amp("auto", torch.device("cpu"))
    return {
        "cpu": platform.processor() or platform.machine(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": precision.native_bf16(flags),
        "flags_found": sorted(f for f in precision.NATIVE_BF16_FLAGS if f in flags),
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "resnet20_step_s": {k: round(v, 4) for k, v in med.items()},
        "resnet20_speedup": round(med["float32"] / med["bf16"], 3),
        "probe_speedup": round(precision.bf16_speedup(), 3),
        "auto": {"on": auto.on, "reason": auto.reason},
        "quality_measured": precision.CPU_BF16_QUALITY_MEASURED,
        "date": time.strftime("%Y-%m-%d"),
    }


def machine_key(entry: dict[str, Any]) -> str:
    return f"{entry['capability']} ({', '.join(entry['flags_found']) or 'no native bf16'})"


def quality_rows() -> list[dict[str, Any]]:
    """Each committed quality row: label, seed, validation and test accuracy / cNLL, s/step."""
    rows = []
    for label, plan, name in QUALITY_ROWS:
        for seed in SEEDS:
            path = STUDY / plan / (name.format(seed=f"-seed{seed}" if seed else "") + ".json")
            if not path.is_file():
                continue
            result = json.loads(path.read_text())
            val, test = result["val"]["student_avg"], result["test"]["student_avg"]
            rows.append({
                "label": label, "seed": seed, "row": f"{plan}/{path.stem}",
                "val_acc": val["acc"], "val_cnll": val["cnll"],
                "test_acc": test["acc"], "test_cnll": test["cnll"],
                "s_per_step": result["train"]["s_per_step"],
            })  # fmt: skip
    return rows


def quality_verdict(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """bf16 against float32 (the AVX2 rows) over the seeds both ran: the mean difference on
    test, and float32's own spread over seeds (max − min) as the noise it is read against."""
    by = {(r["label"], r["seed"]): r for r in rows}
    seeds = [s for s in SEEDS if ("bf16", s) in by and ("float32", s) in by]
    if len(seeds) < 2:
        return None
    out: dict[str, Any] = {"seeds": seeds}
    for metric in ("test_acc", "test_cnll", "val_acc", "val_cnll"):
        fp32 = [by["float32", s][metric] for s in seeds]
        bf16 = [by["bf16", s][metric] for s in seeds]
        out[metric] = {
            "float32": statistics.mean(fp32), "bf16": statistics.mean(bf16),
            "difference": statistics.mean(bf16) - statistics.mean(fp32),
            "float32_spread": max(fp32) - min(fp32),
        }  # fmt: skip
    worse_acc = -out["test_acc"]["difference"] > out["test_acc"]["float32_spread"]
    worse_cnll = out["test_cnll"]["difference"] > out["test_cnll"]["float32_spread"]
    out["within_noise"] = not (worse_acc or worse_cnll)
    return out


def render(machines: dict[str, dict[str, Any]], rows: list[dict[str, Any]], verdict) -> str:
    lines = [
        "# bf16 autocast against float32 on the CPU (`--amp auto`)", "",
        "    python benchmarks/bench_amp.py   # adds or refreshes this CPU's row", "",
        "## Speed, per CPU", "",
        "ResNet-20 training step (forward + backward + SGD), batch 128, 32×32, median of "
        "alternating steps; the probe is `--amp auto`'s start-up check "
        "(ensc/engine/precision.py).", "",
        "| CPU | measured | threads | float32 s/step | bf16 s/step | bf16 speed-up | probe | "
        "`--amp auto` |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]  # fmt: skip
    for key, m in sorted(machines.items()):
        step = m["resnet20_step_s"]
        lines.append(
            f"| {key} | {m.get('date', 'before 2026-12-04')} | {m['threads']} | "
            f"{step['float32']:.3f} | {step['bf16']:.3f} | {m['resnet20_speedup']:.2f}× | "
            f"{m['probe_speedup']:.2f}× | {'on' if m['auto']['on'] else 'off'}: "
            f"{m['auto']['reason'].removeprefix('auto: ')} |"
        )
    lines += ["", "## Quality against float32", "",
              "ensc's defaults (T 4, lr 0.0075, TDiv-SDiv) at 300 steps on the in-domain DE-4 "
              "(docs/results.md), same flags and seeds, 1 thread per row; every number is the "
              "float32 network the run ships (a CPU run evaluates in float32 also when it trained "
              "in bf16). Rows:", "",
              "    python benchmarks/study_teacher.py --plan indomain-bf16 --workers 2 --threads 1",
              "",
              "| precision | seed | val ACC % | val cNLL | test ACC % | test cNLL | s/step | row |",
              "|---|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['seed']} | {r['val_acc']:.2f} | {r['val_cnll']:.4f} | "
            f"{r['test_acc']:.2f} | {r['test_cnll']:.4f} | {r['s_per_step']:.2f} | {r['row']} |"
        )
    lines += [
        "",
        "s/step is each row's own, measured beside the other rows of its plan (two, at "
        "times three, on 2 cores; the float32 rows of indomain-t4-lr on a slower AVX2 CPU): "
        "read speed from the table above.",
        "",
        *verdict_lines(verdict),
        "",
    ]
    return "\n".join(lines)


def verdict_lines(verdict: dict[str, Any] | None) -> list[str]:
    if verdict is None:
        return ["Quality: not measured on enough seeds yet (it needs a CPU with native bf16)."]
    acc, cnll = verdict["test_acc"], verdict["test_cnll"]
    seeds = ", ".join(map(str, verdict["seeds"]))
    return [
        f"Over seeds {seeds} on test: bf16 {acc['bf16']:.2f} % / cNLL {cnll['bf16']:.4f}, float32 "
        f"{acc['float32']:.2f} % / {cnll['float32']:.4f} (difference {acc['difference']:+.2f} "
        f"points / {cnll['difference']:+.4f}; float32's spread over the same seeds "
        f"{acc['float32_spread']:.2f} points / {cnll['float32_spread']:.4f}): "
        + ("**within noise**." if verdict["within_noise"] else "**worse than noise**."),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    entry = measure(args.repeats)
    machines = {
        **entries_by_machine(JSON_PATH, machine_key, "capability"),
        machine_key(entry): entry,
    }
    rows = quality_rows()
    verdict = quality_verdict(rows)
    data = {"machines": machines, "quality": {"rows": rows, "verdict": verdict}}
    atomic_write_text(JSON_PATH, json.dumps(data, indent=2) + "\n")
    text = render(machines, rows, verdict)
    atomic_write_text(MD_PATH, text)
    print(text)


if __name__ == "__main__":
    main()
