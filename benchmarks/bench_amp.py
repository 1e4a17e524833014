"""bfloat16 autocast against float32 on this CPU: why `--amp auto` is on or off here (issue 23).

    python benchmarks/bench_amp.py          # ~1 min on 2 cores

Times, alternating and side by side, the training step (forward + backward + SGD) of a ResNet-20
at batch 128 on 32x32 images in float32 and under bf16 autocast, and the small probe that
``--amp auto`` runs at start (ensc/engine/precision.py). Records whether the CPU has native bf16
(AMX or AVX512-BF16) and what auto decides. Writes ``docs/bench-amp.json`` and
``docs/bench-amp.md``. Quality (accuracy, cNLL against float32 on the in-domain study) is a study
row, run where native bf16 exists: the table says whether it was.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from ensc.engine import precision
from ensc.models import build_model

REPO = Path(__file__).resolve().parents[1]


def step_seconds(model: torch.nn.Module, bf16: bool, x: torch.Tensor, y: torch.Tensor) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10)
    x, y = torch.rand(128, 3, 32, 32), torch.randint(0, 10, (128,))
    times: dict[str, list[float]] = {"float32": [], "bf16": []}
    for bf16 in (False, True):  # warm-up: oneDNN builds its primitives once per precision
        step_seconds(model, bf16, x, y)
    for _ in range(args.repeats):
        for name in times:
            times[name].append(step_seconds(model, name == "bf16", x, y))
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    flags = precision.cpu_flags()
    auto = precision.choose_amp("auto", torch.device("cpu"))
    result = {
        "cpu": platform.processor() or platform.machine(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": precision.native_bf16(flags),
        "flags_found": sorted(f for f in precision.NATIVE_BF16_FLAGS if f in flags),
        "threads": torch.get_num_threads(),
        "resnet20_step_s": {k: round(v, 4) for k, v in med.items()},
        "resnet20_speedup": round(med["float32"] / med["bf16"], 3),
        "probe_speedup": round(precision.bf16_speedup(), 3),
        "auto": {"on": auto.on, "reason": auto.reason},
        "quality_measured": precision.CPU_BF16_QUALITY_MEASURED,
    }
    (REPO / "docs" / "bench-amp.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# bf16 autocast against float32 on the CPU (`--amp auto`)",
        "",
        "    python benchmarks/bench_amp.py",
        "",
        f"CPU capability {result['capability']}, native bf16: "
        f"{'yes (' + ', '.join(result['flags_found']) + ')' if result['native_bf16'] else 'no'}; "
        f"{result['threads']} torch threads; median of {args.repeats} alternating steps.",
        "",
        "| | float32 s/step | bf16 s/step | bf16 speed-up |",
        "|---|---:|---:|---:|",
        f"| ResNet-20 training step, batch 128, 32×32 | {med['float32']:.3f} | {med['bf16']:.3f} "
        f"| {result['resnet20_speedup']:.2f}× |",
        f"| `--amp auto`'s start-up probe | | | {result['probe_speedup']:.2f}× |",
        "",
        f"`--amp auto` here: **{'on' if auto.on else 'off'}** ({auto.reason}).",
        "Quality against float32 (accuracy, cNLL on the in-domain study, same seeds): "
        + ("measured." if result["quality_measured"] else
           "not measured yet; it needs a CPU with native bf16, where auto stays off until it is."),
        "",
    ]  # fmt: skip
    (REPO / "docs" / "bench-amp.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
