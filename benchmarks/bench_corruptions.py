"""How long making the corrupted test images takes next to evaluating a network on them.

    OMP_NUM_THREADS=1 python benchmarks/bench_corruptions.py            # 2,000 CIFAR-10 test images
    OMP_NUM_THREADS=1 python benchmarks/bench_corruptions.py --images 500 --no-write

`ensc eval --corruptions` makes every corruption × severity of the test split on the fly
(``ensc.evaluation.corruptions.corrupted_split``: float ops, then rounding to uint8) and runs each
network once on each. This script times both, side by side in one process so that a busy machine
slows them alike: for each of the 10 corruptions × 5 severities, first the generation of the
corrupted split, then one CIFAR ResNet-32 (ensc's ``resnet32``, randomly initialised: speed does
not depend on the weights) over it, exactly as the evaluation runs it (its fast evaluation copy,
``engine.predict.predict_logits_many``). Target: generation ≤ 20 % of the forward time.

Images: a class-balanced subset of the CIFAR-10 JPEG test folder (``$ENSC_SHARED/data/cifar10-jpeg``)
when present, else random CIFAR-shaped uint8 images (said in the output). Writes
``docs/bench-corruptions.json`` and ``docs/bench-corruptions.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import hardware  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("ENSC_SHARED", ROOT.parent / "shared"))
CIFAR_JPEG = SHARED / "data" / "cifar10-jpeg"
TARGET = 0.20


def _images(n: int):
    import torch

    from ensc.data.datasets import load_dataset
    from ensc.data.splits import DataConfig, Split

    if (CIFAR_JPEG / "test").is_dir():
        config = DataConfig("imagefolder", root=CIFAR_JPEG, train_subset=200, test_subset=n)
        shown = os.path.relpath(CIFAR_JPEG, ROOT)  # no machine path in the docs it writes
        return load_dataset(config).test, f"CIFAR-10 test JPEGs ({shown})"
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
    return Split(images, torch.arange(n) % 10), "random uint8 images (CIFAR-10 folder not found)"


def measure(n_images: int) -> dict[str, Any]:
    import torch

    from ensc.engine.predict import eval_copy, predict_logits_many, probe_batch
    from ensc.engine.runtime import resolve_runtime
    from ensc.engine.seeding import seeded
    from ensc.evaluation.corruptions import CORRUPTIONS, SEVERITIES, corrupted_split
    from ensc.models import build_model

    split, source = _images(n_images)
    runtime = resolve_runtime("cpu")
    with seeded(0):
        net = build_model("resnet32", num_classes=10, in_channels=3)
    net = eval_copy(net.eval(), runtime, probe_batch([split], runtime))
    predict_logits_many(
        [net], {"warm-up": split.subset(torch.arange(min(256, len(split))))}, runtime
    )
    rows = []
    for name in CORRUPTIONS:
        gen_s = fwd_s = 0.0
        for severity in SEVERITIES:
            start = time.perf_counter()
            corrupted = corrupted_split(split, name, severity)
            middle = time.perf_counter()
            predict_logits_many([net], {"test": corrupted}, runtime)
            gen_s += middle - start
            fwd_s += time.perf_counter() - middle
        rows.append({"corruption": name, "generate_s": gen_s, "forward_s": fwd_s})
        print(f"{name}: generate {gen_s:.2f} s, forward {fwd_s:.2f} s", file=sys.stderr)
    total_gen = sum(r["generate_s"] for r in rows)
    total_fwd = sum(r["forward_s"] for r in rows)
    return {
        "images": len(split),
        "source": source,
        "passes": len(CORRUPTIONS) * len(SEVERITIES),
        "rows": rows,
        "generate_s": total_gen,
        "forward_s": total_fwd,
        "ratio": total_gen / total_fwd,
    }


def render(result: dict[str, Any], meta: dict[str, Any]) -> str:
    hw = meta["hardware"]
    n = result["images"]
    lines = [
        "# Corrupted test images: generation vs forward passes",
        "",
        f"Command: `{meta['command']}` ({meta['date']}, {meta['wall_seconds']:.0f} s).",
        f"Hardware: {hw['cpu']}, {hw['cores']} cores, torch {hw['torch']}, {hw['threads']} "
        f"intra-op thread(s); load average {meta['load_before']} before and "
        f"{meta['load_after']} after (the machine was shared with other jobs; generation and "
        "forward passes were measured alternately in one process, so they share the load).",
        f"Images: {n} {result['source']}, class-balanced. Each of the {result['passes']} "
        "corruption × severity pairs: `corrupted_split` (float ops, rounded to uint8), then one "
        "ResNet-32 (ensc's `resnet32`, its fused channels-last evaluation copy) over the "
        f"{n} corrupted images, as `ensc eval --corruptions` runs them.",
        "",
        "corruption | generate s (5 severities) | forward s (5 passes) | generate / forward",
        "---|---:|---:|---:",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['corruption']} | {r['generate_s']:.2f} | {r['forward_s']:.2f} | "
            f"{r['generate_s'] / r['forward_s']:.1%}"
        )
    ratio = result["ratio"]
    lines += [
        f"**all** | **{result['generate_s']:.2f}** | **{result['forward_s']:.2f}** | "
        f"**{ratio:.1%}**",
        "",
        f"Generation takes {ratio:.1%} of the time of one ResNet-32's forward passes over the "
        f"same images (target ≤ {TARGET:.0%}: {'met' if ratio <= TARGET else 'NOT met'}); "
        f"{result['passes'] * n / result['generate_s']:,.0f} corrupted images/s vs "
        f"{result['passes'] * n / result['forward_s']:,.0f} images/s through the network. "
        "`ensc eval` makes each corrupted split once and runs every network on it (five with a "
        "DE-4 teacher and one student), so its share of a whole evaluation is smaller still.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    args = parser.parse_args()
    start = time.perf_counter()
    load_before = " ".join(f"{v:.2f}" for v in os.getloadavg())
    result = measure(args.images)
    meta = {
        "command": " ".join(
            [
                "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "unset"),
                "python",
                "benchmarks/bench_corruptions.py",
                *sys.argv[1:],
            ]
        ),  # fmt: skip
        "date": datetime.now().strftime("%Y-%m-%d"),
        "wall_seconds": time.perf_counter() - start,
        "hardware": hardware(),
        "load_before": load_before,
        "load_after": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }
    text = render(result, meta)
    print(text)
    if not args.no_write:
        (ROOT / "docs" / "bench-corruptions.json").write_text(
            json.dumps({"meta": meta, **result}, indent=2) + "\n"
        )
        (ROOT / "docs" / "bench-corruptions.md").write_text(text)


if __name__ == "__main__":
    main()
