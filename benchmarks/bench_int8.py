"""int8 quantization variants of a run's averaged network, side by side (issue 23, item 3).

    python benchmarks/bench_int8.py --run RUN              # a finished `ensc compress` run
    python benchmarks/bench_int8.py --run RUN --test-samples 2000 --repeats 30
    python benchmarks/bench_int8.py --run RUN --code-path DIR   # an architecture from your code

Exports the run's fp32 averaged network once (``ensc.export.onnx``), then quantizes it with
onnxruntime's ``quantize_static`` in each variant below, times every graph with onnxruntime on
1 thread at batch 64 (round-robin, the median of the rounds) and measures its test accuracy on
the same images. Variants: ensc's choice (QDQ, per-channel, U8S8, reduce_range where the CPU lacks
VNNI, MinMax on 512 images), then one change at a time: full 8-bit weights, per-tensor weights,
QOperator format, Entropy and Percentile calibration, 128 and 2,048 calibration images, int8
activations (S8S8), convolutions only (residual adds left in float). Conv + BN + ReLU are fused
by ``quant_pre_process`` (onnxruntime's graph optimizer) before each. Writes
``docs/bench-int8.json`` and ``docs/bench-int8.md``, one table per kind of CPU (VNNI or not).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ensc.fileio import atomic_write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import entries_by_machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
JSON_PATH = REPO / "docs" / "bench-int8.json"


@dataclass(frozen=True)
class Variant:
    name: str
    fmt: str = "QDQ"
    per_channel: bool = True
    reduce_range: bool | None = None  # None: ensc's choice for this CPU
    method: str = "MinMax"
    calib: int = 512
    activations: str = "QUInt8"  # U8S8; "QInt8": S8S8
    ops: tuple[str, ...] | None = None  # the op types quantized; None: every one it can


def variants() -> list[Variant]:
    base = Variant("ensc default")
    return [
        base,
        replace(base, name="8-bit weights (no reduce_range)", reduce_range=False),
        replace(base, name="7-bit weights (reduce_range)", reduce_range=True),
        replace(base, name="per-tensor weights", per_channel=False),
        replace(base, name="QOperator format", fmt="QOperator"),
        replace(base, name="Entropy calibration", method="Entropy"),
        replace(base, name="Percentile calibration", method="Percentile"),
        replace(base, name="128 calibration images", calib=128),
        replace(base, name="2,048 calibration images", calib=2048),
        replace(base, name="int8 activations (S8S8)", activations="QInt8"),
        replace(base, name="convolutions only (adds in float)", ops=("Conv", "Gemm", "MatMul")),
    ]


def quantize(fp32: Path, out: Path, variant: Variant, calib: np.ndarray) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from ensc.export.quantize import reduce_range_here
    from ensc.export.wrappers import INPUT_NAME

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([calib[i : i + 64] for i in range(0, len(calib), 64)])

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    quantize_static(
        str(pre), str(out), Reader(), quant_format=getattr(QuantFormat, variant.fmt),
        per_channel=variant.per_channel,
        reduce_range=reduce_range_here() if variant.reduce_range is None else variant.reduce_range,
        activation_type=getattr(QuantType, variant.activations), weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, variant.method),
        op_types_to_quantize=list(variant.ops) if variant.ops else None,
    )  # fmt: skip


def session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def accuracy(sess, images: np.ndarray, labels: np.ndarray) -> float:
    name = sess.get_inputs()[0].name
    out = sess.get_outputs()[0].name
    preds = [sess.run([out], {name: images[i : i + 256]})[0].argmax(1)
             for i in range(0, len(images), 256)]  # fmt: skip
    return float((np.concatenate(preds) == labels).mean() * 100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--test-samples", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--code-path", type=Path, help="The architecture's code (as ensc export).")
    args = parser.parse_args()
    from ensc.teachers.ensemble import user_code

    with user_code(args.code_path, unsafe=False):
        measure(args)


def measure(args: argparse.Namespace) -> None:
    from ensc.export.pipeline import ExportConfig, run_export
    from ensc.export.sources import load_check_images, load_exportable

    tmp = Path(tempfile.mkdtemp(prefix="ensc-int8-"))
    fp32 = tmp / "fp32.onnx"
    run_export(ExportConfig(run=args.run, out=fp32, force=True, code_path=args.code_path))
    exportable = load_exportable("student", run=args.run)
    # the test images: the run's recorded test split, not its subset (--test-samples caps them)
    recorded = {**(exportable.recorded_data or {}), "test_subset": None}
    images = load_check_images(exportable.spec, recorded,
                               test_samples=args.test_samples, calib_samples=2048)  # fmt: skip
    test_x = images.test_images.numpy().astype("float32")
    test_y = images.test_labels.numpy()
    calib_all = images.calib_images.numpy().astype("float32")
    graphs = {"fp32": fp32}
    for v in variants():
        graphs[v.name] = tmp / f"{len(graphs)}.onnx"
        quantize(fp32, graphs[v.name], v, calib_all[: v.calib])
    sessions = {name: session(path) for name, path in graphs.items()}
    batch = test_x[: args.batch]
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(3):  # warm-up
        for s in sessions.values():
            s.run(None, {s.get_inputs()[0].name: batch})
    for _ in range(args.repeats):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, {s.get_inputs()[0].name: batch})
            times[name].append(time.perf_counter() - start)
    p50 = {name: sorted(t)[len(t) // 2] * 1000 for name, t in times.items()}
    rows = [{"variant": name, "p50_ms": round(p50[name], 2),
             "speedup_vs_fp32": round(p50["fp32"] / p50[name], 2),
             "accuracy": round(accuracy(sessions[name], test_x, test_y), 2),
             "bytes": os.path.getsize(graphs[name])} for name in sessions]  # fmt: skip
    from ensc.engine.precision import cpu_flags
    from ensc.export.quantize import VNNI_FLAGS, reduce_range_here

    flags = cpu_flags()
    result = {"run": args.run.name, "batch": args.batch, "threads": 1, "repeats": args.repeats,
              "test_images": len(test_y), "vnni": sorted(f for f in VNNI_FLAGS if f in flags),
              "reduce_range_here": reduce_range_here(flags), "load_before": os.getloadavg()[0],
              "rows": rows}  # fmt: skip
    result["command"] = (
        f"python benchmarks/bench_int8.py --run RUN --test-samples {args.test_samples} "
        f"--repeats {args.repeats}" + (" --code-path DIR" if args.code_path else "")
    )
    result["arch"], result["date"] = exportable.spec.arch, time.strftime("%Y-%m-%d")
    machines = {**entries_by_machine(JSON_PATH, machine_key, "rows"), machine_key(result): result}
    atomic_write_text(JSON_PATH, json.dumps({"machines": machines}, indent=2) + "\n")
    text = render(machines)
    atomic_write_text(JSON_PATH.with_suffix(".md"), text)
    print(text)


def machine_key(result: dict) -> str:
    return f"VNNI ({', '.join(result['vnni'])})" if result["vnni"] else "no VNNI"


def render(machines: dict[str, dict]) -> str:
    lines = ["# int8 variants of the averaged network (onnxruntime, 1 thread)", "",
             "One table per kind of CPU (its last measurement); `python benchmarks/bench_int8.py` "
             "adds or refreshes the one it runs on.", ""]  # fmt: skip
    for key, result in sorted(machines.items()):
        rows, fp32_acc = result["rows"], result["rows"][0]["accuracy"]
        lines += [
            f"## CPU with {key}", "",
            f"    {result.get('command', 'python benchmarks/bench_int8.py --run RUN')}", "",
            f"Run: `{result['run']}` ({result.get('arch', 'resnet_cifar:resnet32')}); batch "
            f"{result['batch']}, p50 of {result['repeats']} round-robin calls; accuracy on "
            f"{result['test_images']} test images; measured {result.get('date', 'before 2026-12-04')}, "
            f"1-minute load average {result['load_before']:.2f} at the start. ensc's default uses "
            f"{'7-bit' if result['reduce_range_here'] else '8-bit'} weights here.",
            "",
            "| variant | p50 ms | × fp32 | accuracy % | Δ vs fp32 | size |",
            "|---|---:|---:|---:|---:|---:|",
            *(
                f"| {r['variant']} | {r['p50_ms']:.2f} | {r['speedup_vs_fp32']:.2f} | "
                f"{r['accuracy']:.2f} | {r['accuracy'] - fp32_acc:+.2f} | {r['bytes'] / 1e6:.2f} MB |"
                for r in rows
            ),
            "",
        ]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
