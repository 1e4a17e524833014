"""One command that checks and measures ensc's whole GPU path (issue 23).

    pip install --no-deps --no-build-isolation -e .     # on the GPU machine (no network)
    python benchmarks/gpu_check.py                      # one CUDA GPU: about 5-8 minutes
    python benchmarks/gpu_check.py --device cpu --tiny  # any machine: about a minute (tested)

Checks, each a row of ``OUT/gpu-check.json`` and ``OUT/gpu-check.md`` (pass/fail, what was seen,
seconds), going on after a failure so that one run shows everything:

- device facts: torch and CUDA versions, the GPU's name, memory and bf16 support;
- ``ensc train``: a DE-4 on Fashion-MNIST with AMP and channels_last;
- ``ensc compress --perturb ods``: the fold exact and the parity gate passed;
- ``ensc compress`` with every other perturbation for a few steps;
- a run killed mid-training (SIGKILL at a step) and resumed: weights bit-identical to the
  uninterrupted run's;
- the distillation step's throughput and peak memory: a ResNet-32 BE-4 at batch 128, and the
  README's WRN-28-5 student of a WRN-28-10 DE-4 (random weights);
- ``ensc export --onnx`` (parity checked) and ``ensc bench`` (onnxruntime's CUDA provider when
  it has one, else CPU onnxruntime against the CUDA PyTorch models);
- ``torchrun --nproc_per_node 1``: a compression through the process group (NCCL on CUDA).

It uses the interpreter it runs under (no .venv assumed) and writes into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENSC = [sys.executable, "-m", "ensc.cli"]


class Checks:
    """Rows of (name, passed, detail, seconds); a failing check is recorded and the next runs."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def run(self, name: str, fn: Callable[[], str]) -> bool:
        started = time.perf_counter()
        try:
            detail, passed = fn(), True
        except Exception as err:  # noqa: BLE001 - every failure becomes a row
            detail, passed = f"{type(err).__name__}: {err}"[:600], False
            traceback.print_exc()
        self.rows.append({"check": name, "passed": passed, "detail": detail,
                          "seconds": round(time.perf_counter() - started, 1)})  # fmt: skip
        print(f"[{'ok' if passed else 'FAIL'}] {name}: {detail}", flush=True)
        return passed


def ensc(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([*ENSC, *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=900)  # fmt: skip
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(
            f"ensc {' '.join(args[:2])} exited {proc.returncode}: {' | '.join(tail)}"
        )
    return proc


def device_facts(device: str) -> str:
    import torch

    facts = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device: pass --device cpu --tiny on a machine without one")
        props = torch.cuda.get_device_properties(0)
        facts.update(gpu=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                     bf16=torch.cuda.is_bf16_supported())  # fmt: skip
    else:
        facts.update(cpu=torch.backends.cpu.get_cpu_capability())
    FACTS.update(facts)
    return ", ".join(f"{k} {v}" for k, v in facts.items())


FACTS: dict[str, Any] = {}


def measure_step(device: str, teacher_archs: tuple[str, ...], student_arch: str, batch: int,
                 steps: int, amp: bool | None = None, member_batch: str = "split",
                 image: int = 32) -> dict[str, float]:  # fmt: skip
    """Seconds per distillation step (ensc's loop and step, ODS) and peak GPU memory."""
    import torch

    from ensc.compress.distill import DistillConfig, fast_teachers, make_distill_step, param_groups
    from ensc.compress.perturb import PerturbConfig
    from ensc.data.splits import Split
    from ensc.engine.loop import OptimConfig, train
    from ensc.engine.runtime import resolve_runtime
    from ensc.models import build_model
    from ensc.models.batchensemble import to_batchensemble

    runtime = resolve_runtime(device, amp=amp, channels_last=None)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch * 4, 3, image, image), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (batch * 4,), generator=gen)
    probe = runtime.to_device(images[:8])
    teachers = [
        runtime.prepare_model(build_model(teacher_archs[k % len(teacher_archs)], num_classes=10))
        .eval()
        .requires_grad_(False)
        for k in range(4)
    ]
    teachers = fast_teachers(teachers, runtime, probe)
    student = runtime.prepare_model(
        to_batchensemble(build_model(student_arch, num_classes=10), members=4)
    )
    config = DistillConfig(alpha=1.0, temperature=4.0, perturb=PerturbConfig(kind="ods"),
                           member_batch=member_batch)  # fmt: skip
    step = make_distill_step(student, teachers, config, torch.Generator().manual_seed(1),
                             net=runtime.wrap(student))  # fmt: skip
    marks: list[float] = []

    def timed(x, y, backward):
        if runtime.device.type == "cuda":
            torch.cuda.synchronize()
        marks.append(time.perf_counter())
        return step(x, y, backward)

    if runtime.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train(student, timed, Split(images, labels),
          OptimConfig(epochs=100, batch_size=batch, lr=0.01, max_steps=steps + 1), runtime,
          param_groups=param_groups(student, "wa", 5e-4))  # fmt: skip
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()
    marks.append(time.perf_counter())
    per_step = (marks[-1] - marks[1]) / (len(marks) - 2)  # the first step aside (warm-up)
    return _rate(per_step, batch, cuda=runtime.device.type == "cuda")


def _rate(per_step: float, batch: int, cuda: bool) -> dict[str, float]:
    """Seconds per step, images per second and (on CUDA) the peak GPU memory since its reset."""
    import torch

    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return {"s_per_step": round(per_step, 4), "images_per_s": round(batch / per_step, 1),
            "peak_gib": None if peak is None else round(peak, 2)}  # fmt: skip


def measure_plain(device: str, teacher_archs: tuple[str, ...], student_arch: str, batch: int,
                  steps: int, image: int = 32) -> dict[str, float]:  # fmt: skip
    """The same ODS step written the plain PyTorch way (benchmarks/bench_distill.py), float32."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_distill import run_plain

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    cfg = {"members": 4, "batch": batch, "image": image, "perturb": "ods", "warmup": 1,
           "steps": steps, "device": device, "workers": 8 if cuda else 0,
           "teachers": teacher_archs, "student": student_arch}  # fmt: skip
    return _rate(run_plain(cfg)["s_per_step"], batch, cuda)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="minimal sizes (a CPU in ~1 minute)")
    parser.add_argument("--out", type=Path, default=Path("gpu-check"))
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cuda = args.device.startswith("cuda")
    tiny = args.tiny
    size = {"subset": "600" if tiny else "12000", "epochs": "1" if tiny else "3",
            "steps": "4" if tiny else "200", "few": "2" if tiny else "20"}  # fmt: skip
    dev = ["--device", args.device]
    amp = ["--amp", "--channels-last"] if cuda else []
    common = ["--arch", "resnet8", "--batch-size", "64", "--test-subset", "200" if tiny else "2000",
              "--train-subset", size["subset"], *dev]  # fmt: skip
    checks = Checks()
    checks.run("device", lambda: device_facts(args.device))

    def train_teacher() -> str:
        ensc("train", "--dataset", "fashion-mnist", "--members", "4", "--epochs", size["epochs"],
             *common, *amp, "--out", "teacher", "--force", cwd=out)  # fmt: skip
        return f"4 members in {out / 'teacher'}"

    def compress(name: str, *extra: str) -> dict[str, Any]:
        ensc("compress", "--teacher", "teacher", *common, *amp, "--max-acc-drop", "100",
             "--out", name, "--force", *extra, cwd=out)  # fmt: skip
        return json.loads((out / name / "report.json").read_text())

    def ods() -> str:
        report = compress("ods", "--perturb", "ods", "--steps", size["steps"], "--save-every", "1")
        gate = report["parity"]
        if not gate["fold_passed"]:
            raise RuntimeError(f"fold not exact: max |Δlogit| {gate['fold_max_abs_diff']:.2e}")
        avg = report["student_avg"]
        return (f"fold {gate['fold_max_abs_diff']:.1e}, parity ok, ACC {avg['acc']:.2f} "
                f"cNLL {avg['cnll']:.4f}, {report['train']['s_per_step']:.3f} s/step")  # fmt: skip

    def perturbations() -> str:
        seen = []
        for kind in (
            ("gaussian", "tdiv-sdiv") if tiny else ("none", "gaussian", "confods", "tdiv-sdiv")
        ):
            report = compress(f"p-{kind}", "--perturb", kind, "--steps", size["few"])
            seen.append(f"{kind} {report['train']['s_per_step']:.3f} s/step")
        return ", ".join(seen)

    def resume() -> str:
        from ensc.models.checkpoint import load_checkpoint

        env = {"ENSC_FAULT": f"compress.step:{int(size['steps']) // 2 + 1}"}
        proc = subprocess.run([*ENSC, "compress", "--teacher", "teacher", *common, *amp,
                               "--perturb", "ods", "--steps", size["steps"], "--save-every", "1",
                               "--max-acc-drop", "100", "--out", "killed", "--force"], cwd=out,
                              env={**os.environ, **env}, capture_output=True, text=True)  # fmt: skip
        if proc.returncode != -signal.SIGKILL:
            raise RuntimeError(f"not killed at {env['ENSC_FAULT']}: exit {proc.returncode}")
        ensc("compress", "--teacher", "teacher", *common, *amp, "--perturb", "ods", "--steps",
             size["steps"], "--save-every", "1", "--max-acc-drop", "100", "--out", "killed",
             "--resume", cwd=out)  # fmt: skip
        a = load_checkpoint(out / "ods" / "student_be.pt").state_dict
        b = load_checkpoint(out / "killed" / "student_be.pt").state_dict
        differ = [k for k in a if not (a[k] == b[k]).all()]
        if differ:
            raise RuntimeError(f"resumed weights differ in {len(differ)} tensors, e.g. {differ[0]}")
        return f"killed at step {env['ENSC_FAULT'].split(':')[1]}, resumed: bit-identical"

    def throughput() -> str:
        """ensc's step (its defaults; then the plain loop's work: repeat, float32) and the plain
        loop of bench_distill.py, side by side on the same networks and batch."""
        configs = [(("resnet8",), "resnet8", 32)] if tiny else [
            (("resnet20", "resnet32", "resnet44", "resnet56"), "resnet32", 128),
            (("wrn28x10",), "wrn28x5", 128)]  # fmt: skip
        steps = 2 if tiny else 10
        seen = []
        for teachers, student, batch in configs:
            rows = {
                "ensc (defaults)": measure_step(args.device, teachers, student, batch, steps),
                "ensc (repeat, float32)": measure_step(args.device, teachers, student, batch,
                                                       steps, amp=False, member_batch="repeat"),
                "plain PyTorch (repeat, float32)": measure_plain(args.device, teachers, student,
                                                                 batch, steps),
            }  # fmt: skip
            name = f"{student} BE-4 of {'/'.join(teachers)} DE-4, batch {batch}"
            THROUGHPUT[name] = rows
            seen.append(name + ": " + ", ".join(
                f"{impl} {r['s_per_step']} s/step, {r['images_per_s']} img/s, peak {r['peak_gib']} GiB"
                for impl, r in rows.items()))  # fmt: skip
        return "; ".join(seen)

    def export_bench() -> str:
        ensc("export", "--onnx", "--run", "ods", "--force", cwd=out)
        ensc("bench", "--run", "ods", "--batch-sizes", "8" if tiny else "1,64", "--warmup", "2",
             "--repeats", "3" if tiny else "30", "--test-samples", "100" if tiny else "1000",
             "--json", "bench.json", "--force", cwd=out)  # fmt: skip
        env = json.loads((out / "bench.json").read_text())["environment"]
        return (f"exported with parity; onnxruntime providers {env['onnxruntime_providers']}, "
                f"PyTorch on {env['torch_device']}")  # fmt: skip

    def torchrun() -> str:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "-m",
               "ensc.cli", "compress", "--teacher", "teacher", *common, "--steps", size["few"],
               "--max-acc-drop", "100", "--out", "ddp", "--force"]  # fmt: skip
        proc = subprocess.run(cmd, cwd=out, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:  # the worker's own error line, not the launcher's summary
            said = [ln for ln in proc.stderr.splitlines() if "Error" in ln and "elastic" not in ln]
            raise RuntimeError(f"torchrun exited {proc.returncode}: "
                               f"{' | '.join(said[-2:]) or proc.stderr.strip()[-300:]}")  # fmt: skip
        return f"1 process through {'NCCL' if cuda else 'gloo'}: {out / 'ddp'}"

    plan = [("ensc train (AMP, channels_last)" if cuda else "ensc train", train_teacher),
            ("compress --perturb ods: fold, parity", ods),
            ("compress, other perturbations", perturbations),
            ("kill and --resume: bit-identical", resume),
            ("distillation throughput and memory", throughput),
            ("export --onnx and bench", export_bench)]  # fmt: skip
    if not tiny:  # --tiny (the test suite's run) leaves it to tests/test_distributed.py
        plan.append(("torchrun --nproc_per_node 1", torchrun))
    for name, fn in plan:  # the summary is rewritten after each check: a timeout keeps the rest
        checks.run(name, fn)
        lines = write_summary(out, args.device, tiny, checks.rows)
    print("\n".join(lines))
    sys.exit(0 if all(r["passed"] for r in checks.rows) else 1)


def write_summary(out: Path, device: str, tiny: bool, rows: list[dict[str, Any]]) -> list[str]:
    """gpu-check.json and gpu-check.md (atomically) for the checks run so far."""
    summary = {"device": device, "tiny": tiny, "facts": FACTS, "checks": rows,
               "throughput": THROUGHPUT, "passed": all(r["passed"] for r in rows),
               "checks_run": len(rows)}  # fmt: skip
    lines = [f"# ensc GPU check ({device}{', tiny' if tiny else ''})", "",
             "| check | result | detail | s |", "|---|---|---|---:|",
             *(f"| {r['check']} | {'ok' if r['passed'] else 'FAIL'} | {r['detail']} | {r['seconds']} |"
               for r in rows), ""]  # fmt: skip
    from ensc.fileio import atomic_write_text

    atomic_write_text(out / "gpu-check.json", json.dumps(summary, indent=1) + "\n")
    atomic_write_text(out / "gpu-check.md", "\n".join(lines))
    return lines


THROUGHPUT: dict[str, Any] = {}

if __name__ == "__main__":
    main()
