"""ensc as a library: ``ensc.compress_ensemble``, ``ensc.export_onnx``, ``ensc.benchmark``.

The CLI is a layer over these functions (``ensc compress`` calls :func:`compress_ensemble`), so a
notebook and a shell run the same code and raise the same :class:`ensc.errors.EnscError` types.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ensc import rundir
from ensc.compress.config import compress_config, with_recorded_data_mode
from ensc.compress.pipeline import CompressResult, Sources, run_compress
from ensc.data.catalog import PYTHON_DATA
from ensc.data.datasets import load_dataset
from ensc.data.splits import DataConfig, ImageDataset, balanced_indices
from ensc.engine.runtime import Runtime, resolve_runtime
from ensc.errors import ConfigError
from ensc.models.checkpoint import ModelSpec
from ensc.models.registry import PYTHON_ARCH, call_builder

if TYPE_CHECKING:
    from ensc.data.from_torch import TorchData
    from ensc.export.bench import BenchResult
    from ensc.export.pipeline import ExportResult
    from ensc.export.sources import CheckImages, Exportable

__all__ = ["CompressResult", "benchmark", "compress_ensemble", "export_onnx"]

StudentLike = str | nn.Module | Callable[..., nn.Module]


def compress_ensemble(
    teachers: str | Path | Sequence[nn.Module] | None = None,
    student: StudentLike | None = None,
    *,
    config: str | Path | None = None,
    train_data: TorchData | None = None,
    test_data: TorchData | None = None,
    val_data: TorchData | None = None,
    out: str | Path | None = None,
    save: bool | None = None,
    device: str = "auto",
    amp: bool | str | None = "auto",
    channels_last: bool | None = None,
    threads: str | int = "auto",
    hflip: bool = True,
    check: bool = True,
    progress: bool = True,
    **options: Any,
) -> CompressResult:
    """Distill ``teachers`` into a BatchEns student of ``student``'s architecture and average it
    into one network (what ``ensc compress`` does; its flags are the keyword ``options``, e.g.
    ``steps=300, perturb="ods", seed=1, method="kd-single"``).

    Args:
        teachers: a folder of member files, a manifest (``ensemble.json``) or a glob, as
            ``ensc compress --teacher`` takes; or the member networks themselves (each takes
            pixels in [0, 1] and returns logits).
        student: an architecture name (``"resnet32"``, ``"torchvision:resnet18"``, ...), a network
            (copied; its weights are the starting point unless a teacher member matches it), or a
            builder called with ``num_classes`` (and ``in_channels``, ``mean``, ``std``) if it
            accepts them.
        train_data, test_data, val_data: torch Datasets (or DataLoaders over them) of
            ``(image, label)``, images as PIL images, uint8 tensors or [0, 1] float tensors of one
            size (a DataLoader's batch size is used unless ``batch_size=`` is given; ensc
            shuffles and augments itself). Read into memory, or streamed when they would not fit
            comfortably (``data_mode="auto"|"memory"|"stream"``, ``workers=``;
            :mod:`ensc.data.from_torch`): a torchvision ImageFolder then streams from its files
            at ``image_size=`` (its own transform is not applied), any other Dataset item by
            item through ``__getitem__``. Without ``val_data`` validation is carved from
            ``train_data``. Without any: the data the teacher was trained on, or
            ``dataset=``/``data_root=``.
        config: a run folder (or its config.json) to rerun with the settings it recorded;
            ``teachers``, ``student`` and the keyword options given override them one by one.
            The teacher files and the images must be the recorded ones unless overridden.
        out: write the run folder there as it goes (resumable with ``resume=True``); without it
            nothing touches the disk (no teacher-logits cache either) until
            :meth:`CompressResult.save`.
        save: write a run folder even without ``out`` (under ``runs_dir``, as the CLI does).
        device, amp, channels_last, threads: as ``ensc compress --device/--amp/--channels-last/
            --threads`` (amp auto|on|off, or True/False; threads auto or a count).
        hflip: whether horizontal flips are a valid augmentation of ``train_data``.
        check: raise CompressParityError when the averaged network lost the BE student's
            accuracy (the report is still written when ``out`` is given).
        progress: print the CLI's progress lines (steps, ETA, stages) to stderr while it runs,
            unless the program has configured logging itself (then they go to the ``ensc``
            logger's handlers as usual).

    Returns the :class:`CompressResult`: ``.network`` (the averaged ``nn.Module``), ``.student``
    (the BatchEns student), ``.report`` (report.json's dict), ``.save(path)``. None on the
    non-main processes of a torchrun launch.
    """
    from ensc.engine.allocator import tune_malloc

    teachers, student, options = _with_recorded(config, teachers, student, options)
    tune_malloc()  # the CLI's malloc settings (tcmalloc needs the `ensc` command: docs/bench-distill.md)
    with _progress_lines(progress):
        return _compress(teachers, student, train_data, test_data, val_data, out, save,
                         resolve_runtime(device, amp, channels_last, threads), hflip, check, options)  # fmt: skip


def _with_recorded(
    config: str | Path | None, teachers: Any, student: Any, options: dict[str, Any]
) -> tuple[Any, Any, dict[str, Any]]:
    """``config=``: the recorded run's teacher, architecture and options under the given ones."""
    if config is None:
        if teachers is None or student is None:
            raise ConfigError(
                "compress_ensemble needs teachers and student (or config=RUN to rerun a run)"
            )
        return teachers, student, options
    from ensc.compress.rerun import rerun_options

    given = {**options, **({"teacher": teachers} if teachers is not None else {}),
             **({"arch": student} if student is not None else {})}  # fmt: skip
    merged, expected = rerun_options(config, given)
    return merged.pop("teacher"), merged.pop("arch"), {**merged, "expected": expected}


@contextlib.contextmanager
def _progress_lines(show: bool) -> Iterator[None]:
    """INFO lines of the ``ensc`` loggers to stderr meanwhile, as the CLI prints them, when no
    handler would receive them (a notebook or script that never configured logging)."""
    logger = logging.getLogger("ensc")
    if not show or logger.hasHandlers():
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    with rundir.info_to(handler):
        yield


def _compress(
    teachers: str | Path | Sequence[nn.Module], student: StudentLike, train_data: TorchData | None,
    test_data: TorchData | None, val_data: TorchData | None, out: str | Path | None,
    save: bool | None, runtime: Runtime, hflip: bool, check: bool, options: dict[str, Any],
) -> CompressResult:  # fmt: skip
    """compress_ensemble's work, once the allocator and the progress lines are set up."""
    loader_batch = getattr(train_data, "batch_size", None)  # a DataLoader's, unless one is given
    if isinstance(train_data, DataLoader) and loader_batch and "batch_size" not in options:
        options["batch_size"] = loader_batch
    modules = _teacher_modules(teachers)
    teacher_path = None if modules is not None else Path(teachers)  # type: ignore[arg-type]
    arch, build, arch_kwargs = _student_builder(student, options.pop("arch_kwargs", None))
    if arch_kwargs:
        options["arch_kwargs"] = arch_kwargs
    config = compress_config(teacher=teacher_path, arch=arch, out=Path(out) if out else None,
                             **options)  # fmt: skip
    sources = Sources(build_student=build)
    if teacher_path is None or any(d is not None for d in (train_data, test_data, val_data)):
        # resumed: the data mode the run started with (auto would choose again from free memory)
        resolved = with_recorded_data_mode(config, config.out)
        data, data_config = _data(resolved, train_data, test_data, val_data, hflip)
        sources = replace(sources, data=data, data_config=data_config)
    if teacher_path is None:
        from ensc.teachers.from_modules import teacher_from_modules

        sources = replace(sources, teacher=teacher_from_modules(modules, sources.data))  # type: ignore[arg-type]
    write = save if save is not None else out is not None
    result = run_compress(config, runtime, sources, write=write)
    if check and result is not None:  # after writing: a failed run's report is there to read
        result.check()
    return result  # type: ignore[return-value]


def export_onnx(
    model: CompressResult | nn.Module | str | Path | None = None,
    path: str | Path | None = None,
    *,
    images: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    precision: str = "fp32",
    force: bool = False,
    **options: Any,
) -> ExportResult:
    """Export one network to ONNX and check it against PyTorch (as ``ensc export --onnx``).

    ``model`` is a :class:`CompressResult` (its averaged network, checked on a class-balanced
    subset of its test images; once saved, into its run folder, the ONNX file recording the
    sha256 of its ``student.pt`` as the CLI's does), a run folder or checkpoint path (None: the
    latest run), or any network taking [0, 1] pixels, checked on ``images`` ([N, C, H, W] in
    [0, 1], with ``labels`` for the fp16/int8 accuracy gate). ``path``: the .onnx file (default
    for a run: next to its network). ``options`` are :class:`ensc.export.pipeline.ExportConfig`
    fields (``what``, ``opset``, ``atol``, ``code_path``, ``unsafe_load``...). Raises
    ExportParityError (after writing ``path.failed``) when a gate fails.
    """
    from ensc.export.pipeline import ExportConfig, check_out, run_export, write_export
    from ensc.export.quantize import check_precision
    from ensc.export.sources import onnx_path

    check_precision(precision)
    config = ExportConfig(precision=precision, force=force, out=_opt_path(path), **options)
    if model is None or isinstance(model, (str, Path)):
        kind = "model" if model is not None and Path(model).is_file() else "run"
        return run_export(replace(config, **{kind: _opt_path(model)}))
    exportable = _exportable(model, images)
    if path is None and not (isinstance(model, CompressResult) and model.run_dir is not None):
        raise ConfigError(
            "export_onnx needs a path for the .onnx file of a network not saved in a run"
        )
    out = Path(path) if path is not None else onnx_path(exportable.default_out, precision)
    check_out(out, force)
    check = _check_images(model, exportable, images, labels, config.check_samples)
    return write_export(exportable, check, config, out)


def benchmark(
    run: CompressResult | str | Path | None = None,
    *,
    teacher: str | Path | None = None,
    code_path: str | Path | None = None,
    unsafe_load: bool = False,
    command: str = "",
    **options: Any,
) -> BenchResult:
    """Time the run's teacher, BE student and averaged network in PyTorch and onnxruntime side by
    side (as ``ensc bench``); ``options`` are :class:`ensc.export.bench.BenchConfig` fields
    (``batch_sizes``, ``repeats``, ``threads``, ``provider``...). A CompressResult must be saved
    (``result.save(path)``: the ONNX files live in its folder); its networks and test images are
    used as they are in memory, teachers handed over from Python included."""
    from ensc.export.bench import BenchConfig, run_bench

    if "batch_sizes" in options:
        options["batch_sizes"] = tuple(options["batch_sizes"])
    config = BenchConfig(**options)
    images = exportables = None
    if isinstance(run, CompressResult):
        if run.run_dir is None:
            raise ConfigError("benchmark needs a saved run: call result.save(path) first")
        images = _result_images(run, config.test_samples)
        exportables = _result_exportables(run)
        run = run.run_dir
    return run_bench(config, run=_opt_path(run), teacher=_opt_path(teacher), command=command,
                     images=images, exportables=exportables, code_path=_opt_path(code_path),
                     unsafe_load=unsafe_load)  # fmt: skip


def _teacher_modules(teachers: Any) -> list[nn.Module] | None:
    """The teacher networks handed over (any iterable of nn.Modules), or None for a path."""
    if isinstance(teachers, (str, Path)):
        return None
    try:
        modules = list(teachers)
    except TypeError:
        modules = None
    if modules and all(isinstance(t, nn.Module) for t in modules):
        return modules
    raise ConfigError(
        "teachers must be a folder, a manifest or a list of nn.Module networks; "
        f"got {type(teachers).__name__}"
    )


def _student_builder(
    student: StudentLike, arch_kwargs: dict[str, Any] | None
) -> tuple[str, Callable[[ModelSpec], tuple[nn.Module, ModelSpec]] | None, dict[str, Any]]:
    """(the arch name recorded, a builder of (network, its spec) for students handed over as
    objects, the builder's kwargs)."""
    kwargs = dict(arch_kwargs or {})
    if isinstance(student, str):
        return student, None, kwargs
    if isinstance(student, nn.Module):
        if kwargs:
            raise ConfigError("arch_kwargs apply to a student builder or name, not to a network")
        template = copy.deepcopy(student).cpu()
        # it takes [0, 1] pixels as it is (like teachers handed over): no normalization recorded
        return (
            f"{PYTHON_ARCH}{type(student).__module__}.{type(student).__qualname__}",
            lambda spec: (copy.deepcopy(template), replace(spec, mean=(), std=())),
            kwargs,
        )
    if callable(student):
        name = _qualified(student)

        def build(spec: ModelSpec) -> tuple[nn.Module, ModelSpec]:
            net = call_builder(student, name, num_classes=spec.num_classes,
                               in_channels=spec.in_channels, mean=spec.mean, std=spec.std,
                               **spec.arch_kwargs)  # fmt: skip
            return net, spec

        return name, build, kwargs
    raise ConfigError(
        f"student must be an architecture name, an nn.Module or a builder; got {type(student).__name__}"
    )


def _qualified(obj: Any) -> str:
    """``package.module:Name``, how ensc records an architecture."""
    return f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', type(obj).__name__)}"


def _data(
    config: Any, train: TorchData | None, test: TorchData | None, val: TorchData | None, hflip: bool
) -> tuple[ImageDataset, DataConfig]:
    """The data handed over (torch datasets), or the named dataset teachers from Python train on."""
    overrides = {k: v for k, v in config.data_overrides.items() if v is not None}
    if train is None:
        if test is not None or val is not None:
            raise ConfigError("test_data/val_data need train_data too (or none of them)")
        if "name" not in overrides:
            raise ConfigError(
                "teachers handed over as networks need data: pass train_data= and test_data=, or dataset="
            )
        data_config = DataConfig(**overrides)
        return load_dataset(data_config), data_config
    if test is None:
        raise ConfigError("train_data needs test_data too (the report is measured on it)")
    from ensc.data.from_torch import dataset_from_torch

    overrides.pop("root", None)
    data_config = DataConfig(**{**overrides, "name": PYTHON_DATA})
    return dataset_from_torch(train, test, val, config=data_config, hflip=hflip), data_config


def _exportable(model: Any, images: torch.Tensor | None) -> Exportable:
    """The export wrapper of a CompressResult's averaged network (its student.pt the source once
    saved), or of a bare network."""
    from ensc import rundir
    from ensc.export.wrappers import SingleNetwork

    if isinstance(model, CompressResult):
        run_dir = model.run_dir
        saved = run_dir is not None
        return _in_memory(
            SingleNetwork(model.network), model._files.spec, "student",
            sources=(run_dir / rundir.STUDENT,) if saved else (),
            default_out=rundir.onnx_file(run_dir, "student") if saved else Path("student.onnx"),
        )  # fmt: skip
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"export_onnx takes a CompressResult, a network or a path; got {type(model).__name__}"
        )
    if images is None:
        raise ConfigError(
            "export_onnx of a network needs images= ([N, C, H, W] in [0, 1]) to check it on"
        )
    net = model.eval()
    with torch.no_grad():
        k = net(_as_float(images[:1])).shape[-1]
    spec = ModelSpec(arch=_qualified(type(model)), num_classes=int(k), in_channels=images.shape[1],
                     image_size=tuple(images.shape[2:]), mean=(), std=())  # fmt: skip
    return _in_memory(SingleNetwork(net), spec, "model", default_out=Path("model.onnx"))


def _result_exportables(result: CompressResult) -> dict[str, Exportable]:
    """A saved result's three networks as they are in memory, each with the files it was saved
    to (or, for teachers handed over from Python, none) as its sources."""
    from ensc import rundir
    from ensc.export.wrappers import BatchEnsembleMean, EnsembleMean

    run_dir, files = result.run_dir, result._files
    assert run_dir is not None
    teacher = files.teacher
    teacher_files = tuple(p for p in teacher.paths if p.is_file())
    return {
        "student": _exportable(result, None),
        "student-be": _in_memory(
            BatchEnsembleMean(result.student), files.be_spec, "student-be",
            members=files.be_spec.members, sources=(run_dir / rundir.STUDENT_BE,),
            default_out=rundir.onnx_file(run_dir, "student-be"),
        ),
        "teacher": _in_memory(
            EnsembleMean(teacher.members), teacher.spec, "teacher", members=len(teacher),
            sources=teacher_files, default_out=rundir.onnx_file(run_dir, "teacher"),
        ),
    }  # fmt: skip


def _in_memory(
    module: nn.Module, spec: ModelSpec, what: str, *, members: int = 1,
    sources: tuple[Path, ...] = (), default_out: Path,
) -> Exportable:  # fmt: skip
    """An export wrapper around a CPU copy of ``module`` as it is in memory (not rebuilt from files;
    ``sources``: the files it was saved to, whose sha256 an ONNX file records)."""
    from ensc.export.sources import Exportable

    return Exportable(module=copy.deepcopy(module).cpu().eval(), spec=spec, what=what,
                      members=members, sources=sources, archs=(spec.arch,), recorded_data=None,
                      default_out=default_out)  # fmt: skip


def _check_images(
    model: Any, exportable: Exportable, images: torch.Tensor | None, labels: torch.Tensor | None,
    n: int,
) -> CheckImages:  # fmt: skip
    """The parity images: the result's test images, or those given (labels: the network's own
    predictions when not given)."""
    if isinstance(model, CompressResult):
        return _result_images(model, n)
    from ensc.export.sources import CheckImages

    images = _as_float(images)
    if labels is None:
        with torch.no_grad():
            labels = exportable.module(images)[0].argmax(-1)
    return CheckImages(dataset=PYTHON_DATA, test_images=images, test_labels=labels,
                       calib_images=images)  # fmt: skip


def _result_images(result: CompressResult, n: int) -> CheckImages:
    """A class-balanced, seeded subset of ``n`` of the result's test images (calibration too)."""
    from ensc.export.sources import CheckImages

    test = result._files.test_split
    pick = balanced_indices(test.labels, min(n, len(test)), torch.Generator().manual_seed(0))
    images = test.take(pick).images.float().div(255)
    name = result.report.get("dataset", PYTHON_DATA)
    return CheckImages(dataset=name, test_images=images, test_labels=test.labels[pick],
                       calib_images=images)  # fmt: skip


def _as_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div(255) if images.dtype == torch.uint8 else images.float()


def _opt_path(value: str | Path | None) -> Path | None:
    return Path(value) if value is not None else None
