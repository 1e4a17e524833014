"""How fast the in-memory and the streamed data paths feed training, and how much memory each takes.

    python benchmarks/bench_data.py                 # CIFAR-10 JPEGs; writes docs/bench-data.{json,md}
    python benchmarks/bench_data.py --feed-batches 20 --train-steps 4 --no-write   # a quick look
    python benchmarks/bench_data.py --rss-cases torch:5000,torch:50000   # rerun only these rows

On the CIFAR-10 JPEG folder (``$ENSC_SHARED/data/cifar10-jpeg``; skipped, saying so, when absent),
side by side in one run:

1. images/s that ``iterate_batches`` yields for training (batch 128, shuffled, pad-crop + flip):
   the in-memory split (``--data-mode memory``: decoded once, augmented in batches) and the
   streamed split (``--data-mode stream``) with 0, 1 and 2 reader processes;
2. a compress-like training step fed by each: CIFAR ResNet-32 (ensc's ``resnet32``) forward,
   cross-entropy, backward and SGD at batch 128, with torch's default intra-op threads; each
   feeder measured twice (order memory, w0, w1, w2, then reversed) and averaged, with the share
   of the step spent waiting for data;
3. peak resident memory (``ru_maxrss``) of a fresh process per case that loads the data and runs
   one training pass over it: streamed 5,000 vs 50,000 training images (the whole train folder)
   next to the in-memory path on the same images, and a generic torch Dataset making 5,000 vs
   50,000 32×32 images on the fly handed to ``ensc.data.from_torch`` with ``data_mode="stream"``
   (``torch:N``; needs no image folder). ``--rss-cases`` reruns only the cases named and merges
   their rows into docs/bench-data.{json,md}, leaving the timing part as it was measured.

Everything runs under the allocator the ``ensc`` command uses (tcmalloc when installed: the
script re-executes itself with it preloaded, as ``ensc`` does; else glibc tuned by ``mallopt``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import hardware  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("ENSC_SHARED", ROOT.parent / "shared"))
CIFAR_JPEG = SHARED / "data" / "cifar10-jpeg"
BATCH = 128
WORKERS = (0, 1, 2)
RSS_CASES = ("stream:5000", "stream:50000", "memory:5000", "memory:50000", "torch:5000",
             "torch:50000")  # fmt: skip
TARGET = 0.20  # streamed training throughput within 20 % of the in-memory path's


def _config(mode: str, train_subset: int | None = None, workers: int = 0, test_subset: int = 1000):
    from ensc.data.splits import DataConfig

    return DataConfig("imagefolder", root=CIFAR_JPEG, mode=mode, workers=workers,
                      train_subset=train_subset, test_subset=test_subset)  # fmt: skip


def _batches(split, seed: int = 0):
    import torch

    from ensc.data.batches import iterate_batches

    gen = torch.Generator().manual_seed(seed)
    return iterate_batches(split, BATCH, gen=gen, shuffle=True, augment_hflip=True, drop_last=True)


def _feeders() -> tuple[dict[str, Any], dict[str, float]]:
    """The training split of each path, by name, and the seconds each took to load."""
    from ensc.data.datasets import load_dataset

    start = time.perf_counter()
    memory = load_dataset(_config("memory")).train
    loaded = {"memory": time.perf_counter() - start}
    start = time.perf_counter()
    streamed = load_dataset(_config("stream")).train
    loaded["stream"] = time.perf_counter() - start
    feeders = {"memory": memory}
    feeders.update({f"stream w{w}": replace(streamed, workers=w) for w in WORKERS})
    return feeders, loaded


def measure_feed(
    feeders: dict[str, Any], n_batches: int, rounds: int
) -> dict[str, dict[str, float]]:
    """Images/s each feeder yields after its first batch (timed apart: worker start-up), the
    median of ``rounds`` runs."""
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in feeders}
    for _ in range(rounds):
        for name, split in feeders.items():
            start = time.perf_counter()
            batches = _batches(split, seed=len(runs[name]))
            next(batches)
            first = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(n_batches):
                next(batches)
            rate = n_batches * BATCH / (time.perf_counter() - start)
            batches.close()
            runs[name].append((rate, first))
            print(f"feed {name}: {rate:,.0f} images/s", file=sys.stderr)
    out = {}
    for name, pairs in runs.items():
        rate, first = sorted(pairs)[len(pairs) // 2]
        out[name] = {"images_per_s": rate, "first_batch_s": first,
                     "runs_images_per_s": [p[0] for p in pairs]}  # fmt: skip
    return out


def measure_training(
    feeders: dict[str, Any], steps: int, rounds: int
) -> dict[str, dict[str, float]]:
    """Seconds per ResNet-32 training step at batch 128 fed by each feeder: ``rounds`` blocks of
    ``steps`` steps each (after one warm-up step), in alternating order; the median block."""
    import torch

    from ensc.engine.seeding import seeded
    from ensc.models import build_model

    with seeded(0):
        model = build_model("resnet32", num_classes=10, in_channels=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in feeders}
    order = [n for r in range(rounds) for n in (feeders if r % 2 == 0 else reversed(feeders))]
    for name in order:
        batches = _batches(feeders[name], seed=len(runs[name]))
        wait = total = 0.0
        for step in range(steps + 1):  # 1 warm-up step (worker start-up, allocator growth)
            t0 = time.perf_counter()
            x, y = next(batches)
            t1 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
            if step >= 1:
                wait += t1 - t0
                total += time.perf_counter() - t0
        batches.close()
        runs[name].append((total / steps, wait / steps))
        print(f"train {name}: {total / steps:.3f} s/step ({wait / total:.1%} waiting for data)",
              file=sys.stderr)  # fmt: skip
    out = {}
    for name, pairs in runs.items():
        s_step, wait = sorted(pairs)[len(pairs) // 2]  # the median block
        out[name] = {"s_per_step": s_step, "images_per_s": BATCH / s_step,
                     "data_wait_share": wait / s_step, "blocks_s_per_step": [p[0] for p in pairs]}  # fmt: skip
    return out


def _on_the_fly(n: int, offset: int = 0) -> Any:
    """A map-style Dataset of ``n`` random 32×32 RGB uint8 images, each made from its index when
    asked for, with labels ``index % 10`` and no ``.targets`` (ensc reads the labels in a pass)."""
    import torch
    from torch.utils.data import Dataset

    class OnTheFly(Dataset):
        def __len__(self) -> int:
            return n

        def __getitem__(self, i: int) -> tuple[Any, int]:
            gen = torch.Generator().manual_seed(offset + i)
            return torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=gen), i % 10

    return OnTheFly()


def _load_case(mode: str, n: int) -> Any:
    """The data of an RSS case: the CIFAR-10 folder's ``n`` images, or ``n`` made on the fly."""
    if mode == "torch":
        from ensc.data.from_torch import dataset_from_torch
        from ensc.data.splits import DataConfig

        config = DataConfig("python", mode="stream", workers=2)
        return dataset_from_torch(_on_the_fly(n), _on_the_fly(1000, offset=n), config=config)
    from ensc.data.datasets import load_dataset

    return load_dataset(_config(mode, None if n >= 50000 else n, workers=2))


def rss_case(case: str) -> dict[str, Any]:
    """In this (fresh) process: load ``mode:n`` training images and run one training pass over
    them (no model), then the peak RSS of this process and of its largest reader process."""
    mode, n = case.split(":")
    start = time.perf_counter()
    data = _load_case(mode, int(n))
    loaded = time.perf_counter() - start
    images = sum(len(x) for x, _ in _batches(data.train))
    return {
        "case": case,
        "train_images": len(data.train),
        "images_read": images,
        "load_s": loaded,
        "pass_s": time.perf_counter() - start - loaded,
        "main_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_maxrss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def measure_rss(cases: tuple[str, ...] = RSS_CASES) -> list[dict[str, Any]]:
    """:func:`rss_case` of each case, each in a fresh process."""
    rows = []
    for case in cases:
        done = subprocess.run([sys.executable, __file__, "--rss-case", case], capture_output=True,
                              text=True, check=True)  # fmt: skip
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"rss {case}: {rows[-1]['main_maxrss_mb']:.0f} MB", file=sys.stderr)
    return rows


def render(result: dict[str, Any], meta: dict[str, Any]) -> str:
    hw = meta["hardware"]
    feed, train, rss = result["feed"], result["train"], result["rss"]
    mem_step = train["memory"]["s_per_step"]
    lines = [
        "# Data paths: in memory vs streamed from disk",
        "",
        f"Command: `{meta['command']}` ({meta['date']}, {meta['wall_seconds']:.0f} s).",
        f"Hardware: {hw['cpu']}, {hw['cores']} cores, torch {hw['torch']}, {hw['threads']} "
        f"intra-op thread(s), allocator {meta['allocator']}; load average {meta['load_before']} "
        f"before and {meta['load_after']} after (the machine is shared with other jobs).",
        f"Data: CIFAR-10 JPEG folder ({result['train_images']:,} training images after the "
        "validation split, 32×32), batch 128, shuffled, pad-4 crop + flip. Loading took "
        f"{result['load_s']['memory']:.1f} s decoded into memory and {result['load_s']['stream']:.1f} s "
        "streamed (folder scan + channel statistics on 2,000 images).",
        "",
        "## Feeding and training throughput",
        "",
        "feeder | images/s fed (no model, median) | first batch s | ResNet-32 train step s | train images/s "
        "| vs memory | waiting for data",
        "---|---:|---:|---:|---:|---:|---:",
    ]
    for name in feed:
        f, t = feed[name], train[name]
        lines.append(
            f"{name} | {f['images_per_s']:,.0f} | {f['first_batch_s']:.2f} | {t['s_per_step']:.3f} | "
            f"{t['images_per_s']:.0f} | {mem_step / t['s_per_step']:.1%} | {t['data_wait_share']:.1%}"
        )
    worst = max((n for n in train if n != "memory"), key=lambda n: train[n]["s_per_step"])
    gap = train[worst]["s_per_step"] / mem_step - 1
    read_ms = 1000 * BATCH / feed["stream w0"]["images_per_s"]  # main-process CPU per batch
    mem_ms = 1000 * BATCH / feed["memory"]["images_per_s"]
    blocks = "; ".join(
        f"{n} " + ", ".join(f"{b:.2f}" for b in t["blocks_s_per_step"]) for n, t in train.items()
    )
    lines += [
        "",
        f'"w N": N reader processes (`--workers N`). Train step: forward, loss, backward, SGD '
        f"of ensc's `resnet32` at batch 128: {result['rounds']} blocks of {result['train_steps']} "
        "steps (after a warm-up step) per feeder, in the order memory, w0, w1, w2, then reversed, "
        "and so on; the median block is shown; waiting = time spent in `next(batches)`. Every "
        f"block's s/step: {blocks}.",
        "",
        f"Slowest streamed feeder ({worst}): {gap:+.1%} time per step against the in-memory path "
        f"(target within {TARGET:.0%}: {'met' if gap <= TARGET else 'NOT met'}). What reading "
        f"costs: a batch of 128 JPEGs takes {read_ms:.1f} ms to read, decode and augment in one "
        f"process (w0's feed rate; the in-memory path's augmentation alone {mem_ms:.1f} ms), "
        f"{read_ms / (1000 * mem_step):.1%} of an in-memory training step, whichever process does "
        "it; differences between the rows larger than that are the shared machine's noise (see "
        "the blocks).",
        "",
        "## Peak memory",
        "",
        "case | training images | load s | pass s | peak RSS, main process MB | peak RSS, largest reader MB",
        "---|---:|---:|---:|---:|---:",
    ]
    for r in rss:
        worker = f"{r['worker_maxrss_mb']:.0f}" if not r["case"].startswith("memory") else "-"
        lines.append(
            f"{r['case'].replace(':', ' ')} | {r['train_images']:,} | {r['load_s']:.1f} | "
            f"{r['pass_s']:.1f} | {r['main_maxrss_mb']:.0f} | {worker}"
        )
    lines += [
        "",
        "Each case is a fresh process: load the data (`--test-subset 1000`, streams with 2 reader "
        "processes), then one training pass over the training split (no model). A reader's RSS "
        "counts the pages it shares with the main process it was forked from. The streamed "
        "process's peak does not grow with the data: it holds file names, not pixels, and "
        "measures the channel statistics on 2,000 images. The in-memory peak grows by the decoded "
        "images (3 KB each at 32×32: 138 MB for 45,000) on top of torch's own memory; "
        "`channel_stats` converts 2,048 images at a time to float64 (it converted the whole split "
        "before, which peaked at 2,962 MB for the 45,000 images).",
    ]
    if any(r["case"].startswith("torch") for r in rss):
        lines += [
            "",
            "torch N: a generic map-style torch Dataset making N random 32×32 RGB images from "
            "their index as they are asked for (no `.targets`, so ensc reads every item once for "
            'its label), handed to `ensc.data.from_torch` with `data_mode="stream"` (test data: '
            "1,000 more); the pass reads its items through a DataLoader with 2 workers. Its "
            "peak does not grow with the data either: ensc holds the items' indices and labels.",
        ]
    for rerun in result.get("rss_reruns", []):
        lines += [
            "",
            f"Rows {', '.join(rerun['cases'])}: `{rerun['command']}` ({rerun['date']}; load "
            f"average {rerun['load_before']} before, {rerun['load_after']} after), run alone "
            "after the rest of this page.",
        ]
    return "\n".join(lines) + "\n"


def rerun_rss(cases: tuple[str, ...], write: bool) -> None:
    """Measure only ``cases`` and merge their rows into docs/bench-data.{json,md} (the timing
    part and the other rows stay as they were measured)."""
    load_before = " ".join(f"{v:.2f}" for v in os.getloadavg())
    rows = measure_rss(cases)
    print(json.dumps(rows, indent=2))
    if not write:
        return
    path = ROOT / "docs" / "bench-data.json"
    saved = json.loads(path.read_text())
    meta = saved.pop("meta")
    kept = [r for r in saved["rss"] if r["case"] not in cases]
    saved["rss"] = kept + rows
    rerun = {
        "command": " ".join(["python", "benchmarks/bench_data.py", *sys.argv[1:]]),
        "date": datetime.now().strftime("%Y-%m-%d"),
        "cases": list(cases),
        "load_before": load_before,
        "load_after": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }
    reruns = [r for r in saved.get("rss_reruns", []) if set(r["cases"]) - set(cases)]
    saved["rss_reruns"] = reruns + [rerun]
    path.write_text(json.dumps({"meta": meta, **saved}, indent=2) + "\n")
    (ROOT / "docs" / "bench-data.md").write_text(render(saved, meta))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--feed-batches", type=int, default=100)
    parser.add_argument("--train-steps", type=int, default=5, help="timed steps per block")
    parser.add_argument("--rounds", type=int, default=5, help="runs (blocks) per feeder")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    parser.add_argument("--rss-cases", help="comma-separated peak-memory cases to run alone "
                        f"(of {', '.join(RSS_CASES)}), merged into docs/bench-data.*")  # fmt: skip
    parser.add_argument("--rss-case", help=argparse.SUPPRESS)  # internal: one fresh-process case
    args = parser.parse_args()
    cases = tuple(args.rss_cases.split(",")) if args.rss_cases else RSS_CASES
    if set(cases) - set(RSS_CASES):
        parser.error(f"unknown --rss-cases {', '.join(sorted(set(cases) - set(RSS_CASES)))}")
    needs_folder = any(
        not c.startswith("torch") for c in ([args.rss_case] if args.rss_case else cases)
    )
    if needs_folder and not (CIFAR_JPEG / "train").is_dir():
        print(f"skipped: the CIFAR-10 JPEG folder is not at {CIFAR_JPEG} (set ENSC_SHARED)")
        return
    from ensc.engine.allocator import preload_env, tune_malloc

    env = preload_env()
    if env.get("LD_PRELOAD") != os.environ.get("LD_PRELOAD"):  # as `ensc` runs: under tcmalloc
        os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], env)
    allocator = tune_malloc()
    if args.rss_case:
        print(json.dumps(rss_case(args.rss_case)))
        return
    if args.rss_cases:
        rerun_rss(cases, write=not args.no_write)
        return
    start = time.perf_counter()
    load_before = " ".join(f"{v:.2f}" for v in os.getloadavg())
    rss = measure_rss()  # first: a child's ru_maxrss starts at its parent's RSS, small until now
    feeders, load_s = _feeders()
    result = {
        "train_images": len(feeders["memory"]),
        "load_s": load_s,
        "feed": measure_feed(feeders, args.feed_batches, args.rounds),
        "train_steps": args.train_steps,
        "rounds": args.rounds,
        "train": measure_training(feeders, args.train_steps, args.rounds),
        "rss": rss,
    }
    meta = {
        "command": " ".join(["python", "benchmarks/bench_data.py", *sys.argv[1:]]),
        "date": datetime.now().strftime("%Y-%m-%d"),
        "wall_seconds": time.perf_counter() - start,
        "hardware": hardware(),
        "allocator": allocator,
        "load_before": load_before,
        "load_after": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }
    text = render(result, meta)
    print(text)
    if not args.no_write:
        (ROOT / "docs" / "bench-data.json").write_text(
            json.dumps({"meta": meta, **result}, indent=2) + "\n"
        )
        (ROOT / "docs" / "bench-data.md").write_text(text)


if __name__ == "__main__":
    main()
