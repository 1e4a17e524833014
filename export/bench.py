"""`ensc bench`: latency and throughput of the teacher, the BatchEns student and the single network.

Candidates (each on PyTorch eager and on onnxruntime): the DE-M teacher (one graph, members'
mean), the BE-M student (batch tiled inside), the averaged single network, plus its fp16/int8 ONNX
files when `ensc export` wrote them. Every candidate returns the same thing, ``probs [B, K]``.

Timing is round-robin: each of ``repeats`` rounds calls every candidate once (in a rotating
order) per batch size, so load from other processes on a shared machine hits all candidates
alike and the ratios stay meaningful. onnxruntime sessions are created without spin-waiting
threads for the same reason (a spinning idle pool steals the next candidate's cores); that costs
onnxruntime a little at tiny batch sizes. Both engines use ``threads`` intra-op threads; auto (the
default) takes the cores other work leaves free at start, since PyTorch's OpenMP thread pool
degrades badly when oversubscribed. Results are dataclasses; rendering is
:mod:`ensc.export.render`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ensc import __version__, rundir
from ensc.engine.threads import apply_threads, parse_threads
from ensc.errors import ConfigError, ExportError, ExportParityError, one_line
from ensc.export.onnx import read_metadata
from ensc.export.sources import (
    CheckImages,
    Exportable,
    load_check_images,
    load_exportable,
    onnx_path,
)
from ensc.export.validate import make_session

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

PROVIDERS = ("auto", "cpu", "cuda")
FAMILIES = ("teacher", "student-be", "student")  # row order of the tables
REDUCED = ("fp16", "int8")  # extra single-network files used when present


@dataclass(frozen=True)
class BenchConfig:
    """How `ensc bench` measures; CLI options map onto the fields."""

    batch_sizes: tuple[int, ...] = (1, 8, 64)
    warmup: int = 5  # untimed calls per candidate and batch size
    repeats: int = 50  # timed calls per candidate and batch size
    # intra-op threads of both engines: N, or auto (None too): the cores other processes leave
    # free at start, as every ensc command chooses them (ensc.engine.threads)
    threads: int | str | None = "auto"
    provider: str = "auto"  # auto (CUDA when onnxruntime-gpu and a GPU are there) | cpu | cuda
    test_samples: int = 1000  # test images for the accuracy column
    data_root: Path | None = None  # dataset location, if not the recorded one

    def __post_init__(self) -> None:
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ConfigError(f"batch sizes must be positive integers; got {self.batch_sizes}")
        if self.repeats < 1 or self.warmup < 0:
            raise ConfigError(
                f"need repeats >= 1 and warmup >= 0; got {self.repeats}, {self.warmup}"
            )
        parse_threads(self.threads)  # auto, None or a whole number >= 1 (one line otherwise)
        if self.provider not in PROVIDERS:
            raise ConfigError(
                f"unknown provider {self.provider!r}: choose one of {', '.join(PROVIDERS)}"
            )


@dataclass(frozen=True)
class Candidate:
    """One model on one engine; ``predict`` maps images float32 [B, C, H, W] to probs [B, K]."""

    name: str  # e.g. "DE-4 teacher"
    family: str  # teacher | student-be | student
    engine: str  # pytorch | onnxruntime
    precision: str  # fp32 | fp16 | int8
    predict: Callable[[np.ndarray], np.ndarray]
    params: int
    macs: int  # multiply-accumulates of conv/linear layers per image
    file_bytes: int  # what is deployed: the checkpoint(s) for PyTorch, the .onnx for onnxruntime
    source: str  # file(s) it came from


@dataclass(frozen=True)
class Latency:
    """Per-call wall time of one candidate at one batch size."""

    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    images_per_s: float  # batch size / median call time
    calls: int


@dataclass(frozen=True)
class BenchRow:
    name: str
    family: str
    engine: str
    precision: str
    batch_size: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    images_per_s: float
    calls: int
    params: int
    macs: int
    file_bytes: int
    accuracy: float  # test accuracy, percent
    speedup_vs_teacher: float | None  # teacher's p50 / this p50, same engine and batch size
    source: str


@dataclass(frozen=True)
class BenchResult:
    rows: tuple[BenchRow, ...]
    environment: dict[str, Any]
    config: dict[str, Any]
    notes: tuple[str, ...] = ()
    command: str = ""
    n_test: int = 0
    dataset: str = ""
    schema: str = "ensc-bench/1"

    def row(self, family: str, engine: str, batch_size: int, precision: str = "fp32") -> BenchRow:
        for r in self.rows:
            if (r.family, r.engine, r.batch_size, r.precision) == (
                family,
                engine,
                batch_size,
                precision,
            ):
                return r
        raise KeyError(f"no row for {family} on {engine} ({precision}) at batch {batch_size}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchResult:
        """Rebuild a result from :meth:`to_dict` output (e.g. a ``--json`` file)."""
        return cls(
            rows=tuple(BenchRow(**r) for r in data["rows"]),
            environment=data["environment"],
            config=data["config"],
            notes=tuple(data.get("notes", ())),
            command=data.get("command", ""),
            n_test=data.get("n_test", 0),
            dataset=data.get("dataset", ""),
            schema=data.get("schema", "ensc-bench/1"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "command": self.command,
            "dataset": self.dataset,
            "n_test": self.n_test,
            "environment": self.environment,
            "config": self.config,
            "units": "latency in ms per call (one batch); images_per_s = batch / p50; accuracy in percent; "
            "macs per image; speedup_vs_teacher = teacher p50 / p50 on the same engine and batch size",
            "rows": [asdict(r) for r in self.rows],
            "notes": list(self.notes),
        }


# --- measuring ---------------------------------------------------------------------------------


def _check_batch_memory(images: np.ndarray, batch_sizes: Sequence[int]) -> None:
    """Refuse, with one line, a batch whose input alone would take half the available memory
    (--batch-sizes 100000000 used to end in a raw MemoryError after the exports loaded)."""
    from ensc.data.mode import available_memory

    free = available_memory()
    biggest = max(batch_sizes)
    need = biggest * images[0].nbytes
    if free is not None and need > free // 2:
        raise ConfigError(
            f"--batch-sizes {biggest}: its input alone takes {need / 2**30:.1f} GiB and this "
            f"machine has {free / 2**30:.1f} GiB available; use smaller --batch-sizes"
        )


def measure(
    candidates: Sequence[Candidate],
    images: np.ndarray,
    batch_sizes: Sequence[int],
    *,
    warmup: int,
    repeats: int,
) -> dict[tuple[int, int], Latency]:
    """Latency of every candidate at every batch size, keyed by (candidate index, batch size).

    Batches are cut from ``images`` (tiled when there are fewer images than the batch size).
    Rounds are interleaved across candidates with a rotating start, so that machine load is shared
    fairly; each candidate gets ``warmup`` untimed calls per batch size first.
    """
    out: dict[tuple[int, int], Latency] = {}
    n = len(candidates)
    _check_batch_memory(images, batch_sizes)
    for b in batch_sizes:
        reps = -(-b // len(images))
        batch = np.ascontiguousarray(np.concatenate([images] * reps)[:b])  # [b, C, H, W]
        for cand in candidates:
            for _ in range(warmup):
                cand.predict(batch)
        times: list[list[float]] = [[] for _ in candidates]
        for r in range(repeats):
            for j in range(n):
                i = (r + j) % n
                start = time.perf_counter()
                candidates[i].predict(batch)
                times[i].append(time.perf_counter() - start)
        for i, t in enumerate(times):
            ms = np.asarray(t) * 1e3
            p50 = float(np.percentile(ms, 50))
            out[(i, b)] = Latency(
                p50_ms=p50,
                p90_ms=float(np.percentile(ms, 90)),
                p99_ms=float(np.percentile(ms, 99)),
                mean_ms=float(ms.mean()),
                images_per_s=b / (p50 / 1e3),
                calls=len(ms),
            )
    return out


def count_macs(module: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of conv/linear/matmul ops for ``example``, via FlopCounterMode (2 FLOPs per MAC)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        module(example)
    return int(counter.get_total_flops() // 2)


def accuracy(
    predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray, labels: np.ndarray
) -> float:
    """Top-1 accuracy (percent) of ``predict`` on ``images``, in batches of 256."""
    preds = np.concatenate(
        [predict(images[i : i + 256]).argmax(1) for i in range(0, len(images), 256)]
    )
    return 100.0 * float((preds == labels).mean())


# --- candidates ------------------------------------------------------------------------------------


def torch_predictor(module: nn.Module, device: torch.device) -> Callable[[np.ndarray], np.ndarray]:
    import torch

    if device.type != "cpu":  # a copy: the module itself stays on the CPU for the ONNX export
        module = copy.deepcopy(module).to(device)
    module = module.eval()

    def predict(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            _, probs = module(torch.from_numpy(images).to(device))  # [B, K]
            return probs.cpu().numpy()  # synchronizes on CUDA

    return predict


def onnx_predictor(session: Any) -> Callable[[np.ndarray], np.ndarray]:
    def predict(images: np.ndarray) -> np.ndarray:
        return session.run(["probs"], {"images": images})[0]

    return predict


def resolve_provider(provider: str) -> tuple[list[str], str]:
    """onnxruntime providers and the torch device for ``provider`` (auto | cpu | cuda).

    auto: both on the GPU with onnxruntime-gpu; with CPU onnxruntime and a GPU, the PyTorch rows
    still run on the GPU (what a user of that machine would deploy them on).
    """
    import onnxruntime as ort
    import torch

    has_cuda = (
        "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()
    )
    if provider == "cuda" and not has_cuda:
        raise ConfigError(
            "--provider cuda needs onnxruntime-gpu (pip install 'ensc[gpu]') and a visible GPU; use --provider cpu"
        )
    if provider == "cuda" or (provider == "auto" and has_cuda):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"], "cuda"
    if provider == "auto" and torch.cuda.is_available():  # CPU onnxruntime; PyTorch on the GPU
        return ["CPUExecutionProvider"], "cuda"
    return ["CPUExecutionProvider"], "cpu"


# --- the benchmark -----------------------------------------------------------------------------------


def run_bench(
    config: BenchConfig,
    *,
    run: Path | None = None,
    teacher: Path | None = None,
    runs_dir: Path = Path("runs"),
    command: str = "",
    images: CheckImages | None = None,
    exportables: dict[str, Exportable] | None = None,
    code_path: Path | None = None,
    unsafe_load: bool = False,
) -> BenchResult:
    """Benchmark the run's teacher, BE student and averaged network side by side (accuracy on
    ``images``, else on the test split the run records; the networks ``exportables``, else read
    from the run, user architectures from ``code_path``)."""
    from ensc.teachers.ensemble import user_code

    run_dir = rundir.resolve_run(run, runs_dir)
    if exportables is None:
        with user_code(code_path, unsafe=unsafe_load):  # models of a user architecture
            exportables = {
                "student": load_exportable("student", run=run_dir),
                "student-be": load_exportable("student-be", run=run_dir),
                "teacher": load_exportable("teacher", run=run_dir, teacher=teacher),
            }
    return _bench(config, run_dir, exportables, images, command)


def _bench(
    config: BenchConfig, run_dir: Path, exportables: dict[str, Exportable],
    images: CheckImages | None, command: str,
) -> BenchResult:  # fmt: skip
    import torch

    providers, device_type = resolve_provider(config.provider)
    onnx_files = _check_onnx_files(exportables, run_dir)
    student = exportables["student"]
    images = images or load_check_images(
        student.spec,
        student.recorded_data,
        test_samples=config.test_samples,
        data_root=config.data_root,
    )
    threads = parse_threads(config.threads) or apply_threads("auto").threads
    notes: list[str] = []
    with _torch_threads(threads):
        candidates = _candidates(
            exportables, run_dir, onnx_files, images, providers, torch.device(device_type),
            threads, notes,
        )  # fmt: skip
        x, y = images.test_images.numpy(), images.test_labels.numpy()
        acc = [accuracy(c.predict, x, y) for c in candidates]
        latency, load_before, load_after = _timed(candidates, x, config)
    if (
        threads > 1
        and load_before is not None
        and (load_before - 1) + threads > (os.cpu_count() or 1)
    ):
        notes.append(
            f"the {os.cpu_count() or 1} CPUs were already busy (1-min load average {load_before}) "
            f"and {threads} threads oversubscribed them: PyTorch's OpenMP pool stalls then, so its "
            "times are inflated far more than onnxruntime's; rerun with --threads 1 or on free cores"
        )
    rows = _rows(candidates, latency, acc, config.batch_sizes)
    environment = _environment(threads, providers, device_type)
    environment["loadavg_1min"] = {"before": load_before, "after": load_after}
    return BenchResult(
        rows=tuple(rows),
        environment=environment,
        config={**asdict(config), "data_root": str(config.data_root) if config.data_root else None,
                "run": str(run_dir), "threads": threads},
        notes=tuple(notes),
        command=command,
        n_test=len(y),
        dataset=images.dataset,
    )  # fmt: skip


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """PyTorch's intra-op threads set to ``threads`` for the block, then restored."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _timed(
    candidates: list[Candidate], x: np.ndarray, config: BenchConfig
) -> tuple[dict[tuple[int, int], Latency], float | None, float | None]:
    """Latencies of every candidate at every batch size, with the load average before and after."""
    log.info(
        "timing %d candidates at batch sizes %s (%d warm-up + %d timed calls each)",
        len(candidates), ",".join(map(str, config.batch_sizes)), config.warmup, config.repeats,
    )  # fmt: skip
    load_before = _loadavg()
    latency = measure(
        candidates, x, config.batch_sizes, warmup=config.warmup, repeats=config.repeats
    )
    return latency, load_before, _loadavg()


def _candidates(
    exportables: dict[str, Exportable],
    run_dir: Path,
    onnx_files: dict[Path, bytes],
    images: CheckImages,
    providers: list[str],
    device: torch.device,
    threads: int,
    notes: list[str],
) -> list[Candidate]:
    import onnx

    example = images.test_images[:1]  # [1, C, H, W]
    out: list[Candidate] = []
    for family in FAMILIES:
        exp = exportables[family]
        name = _display_name(exp)
        macs = count_macs(exp.module, example)
        sources = ", ".join(str(p) for p in exp.sources)
        out.append(Candidate(
            name, family, "pytorch", "fp32", torch_predictor(exp.module, device),
            exp.params, macs, exp.source_bytes, sources,
        ))  # fmt: skip
        fp32_path = rundir.onnx_file(run_dir, family)
        files = [("fp32", fp32_path)]
        if family == "student":
            files += [(p, onnx_path(fp32_path, p)) for p in REDUCED if onnx_path(fp32_path, p) in onnx_files]  # fmt: skip
        for precision, path in files:
            in_run = path in onnx_files  # read (and checked) by _check_onnx_files
            if in_run:
                model_bytes = onnx_files[path]
            else:
                model_bytes = _export_for_bench(exp, images)
                notes.append(
                    f"{path.name} was not in the run; exported and checked it for this benchmark only "
                    f"(keep it with `ensc export --onnx --what {family}`)"
                )
            # no spin-waiting: the idle thread pools of 5 sessions would steal the cores of
            # whichever candidate runs next in the round-robin
            try:
                session = make_session(
                    model_bytes, threads=threads, providers=providers, spinning=False
                )
            except ExportError as err:
                if not in_run:
                    raise
                redo = f"ensc export --onnx --run {run_dir} --what {family}"
                redo += f" --precision {precision}" if precision != "fp32" else ""
                raise ExportError(
                    f"{path} is not an ONNX graph onnxruntime can load "
                    f"({one_line(err.__cause__ or err)}); re-export it with `{redo} --force`"
                ) from err
            metadata = {e.key: e.value for e in onnx.load_from_string(model_bytes).metadata_props}
            if metadata.get("precision", precision) != precision:
                notes.append(
                    f"{path.name} says its precision is {metadata['precision']}, not {precision}"
                )
            out.append(Candidate(
                name, family, "onnxruntime", precision, onnx_predictor(session),
                exp.params, macs, len(model_bytes), str(path) if in_run else "(exported for this run)",
            ))  # fmt: skip
    return out


def _check_onnx_files(exportables: dict[str, Exportable], run_dir: Path) -> dict[Path, bytes]:
    """Each ONNX file of the run, read once: refused, before any work, when it was not exported
    from the checkpoints loaded for this benchmark (a file onnxruntime cannot read is reported
    when it is loaded). The benchmark runs these bytes, so what was checked is what is timed."""
    import onnx

    read: dict[Path, bytes] = {}
    for family, exp in exportables.items():
        fp32_path = rundir.onnx_file(run_dir, family)
        files = [("fp32", fp32_path)]
        if family == "student":
            files += [(p, onnx_path(fp32_path, p)) for p in REDUCED]
        for precision, path in files:
            try:
                read[path] = path.read_bytes()
                model = onnx.load_from_string(read[path])
            except Exception:  # missing, or not ONNX: reported when _candidates loads it
                continue
            if not model.graph.node:  # not an ONNX graph either
                continue
            recorded = read_metadata(model).get("source_sha256")
            redo = f"ensc export --onnx --run {run_dir} --what {family}"
            redo += f" --precision {precision}" if precision != "fp32" else ""
            rundir.check_derived(path, recorded, exp.sources, exp.source_sha256, f"{redo} --force")
    return read


def _export_for_bench(exp: Exportable, images: CheckImages) -> bytes:
    from ensc.export.pipeline import ExportConfig, build_onnx

    model, reports = build_onnx(exp, images, ExportConfig())
    if not reports[0].passed:
        raise ExportParityError(
            f"the {exp.what} graph exported for the benchmark fails its parity check: "
            + "; ".join(reports[0].failures)
        )
    return model.SerializeToString()


def _display_name(exp: Exportable) -> str:
    arch = "+".join(sorted(set(exp.archs)))
    if exp.what == "teacher":
        return f"DE-{exp.members} teacher ({arch})"
    if exp.what == "student-be":
        return f"BE-{exp.members} student ({arch})"
    return f"averaged student ({arch})"


def _rows(
    candidates: Sequence[Candidate],
    latency: dict[tuple[int, int], Latency],
    acc: Sequence[float],
    batch_sizes: Sequence[int],
) -> list[BenchRow]:
    teacher = {
        (c.engine, b): latency[(i, b)].p50_ms
        for i, c in enumerate(candidates)
        if c.family == "teacher" and c.precision == "fp32"
        for b in batch_sizes
    }
    rows = []
    for b in batch_sizes:
        for i, c in enumerate(candidates):
            lat = latency[(i, b)]
            ref = teacher.get((c.engine, b))
            rows.append(BenchRow(
                name=c.name, family=c.family, engine=c.engine, precision=c.precision, batch_size=b,
                **asdict(lat), params=c.params, macs=c.macs, file_bytes=c.file_bytes, accuracy=acc[i],
                speedup_vs_teacher=None if ref is None else ref / lat.p50_ms, source=c.source,
            ))  # fmt: skip
    return rows


def _environment(threads: int, providers: list[str], device: str) -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "onnxruntime_providers": providers,
        "onnxruntime_spinning": False,
        "torch_device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "ensc": __version__,
    }


def cpu_model() -> str:
    """The CPU's model name as lscpu shows it (``/proc/cpuinfo`` on Linux, else platform)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None
