"""`ensc export --onnx` end to end: locate the network, export, convert, validate, write.

Every export is validated (export and validation are separate steps; validation is always on):
the fp32 graph against PyTorch first, then the fp16/int8 graph derived from it. When a gate fails
the file is still written, with a ``.failed`` suffix (``student.onnx.failed``), so it can be
inspected, and :class:`~ensc.errors.ExportParityError` is raised; the real name is only ever
given to a file that passed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ensc import rundir
from ensc.errors import ConfigError, ExportError, ExportParityError
from ensc.export.onnx import (
    DEFAULT_OPSET,
    check_onnx,
    export_onnx,
    onnx_metadata,
    save_onnx,
    set_metadata,
)
from ensc.export.quantize import check_precision, to_fp16, to_int8
from ensc.export.sources import (
    CheckImages,
    Exportable,
    load_check_images,
    load_exportable,
    onnx_path,
)
from ensc.export.validate import (
    ParityReport,
    make_session,
    run_torch,
    tolerance_for,
    validate_onnx,
)
from ensc.fileio import file_sha256, refuse_overwrite

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

FAILED_SUFFIX = ".failed"


@dataclass(frozen=True)
class ExportConfig:
    """What `ensc export --onnx` exports and how it is checked; CLI options map onto the fields."""

    what: str | None = None  # student | student-be | teacher; None = student (or --model's kind)
    run: Path | None = None  # run folder of `ensc compress`; None = runs/latest
    model: Path | None = None  # any ensc checkpoint, instead of a run
    teacher: Path | None = None  # teacher folder for what="teacher"; None = the run's
    precision: str = "fp32"  # fp32 | fp16 | int8
    opset: int = DEFAULT_OPSET
    out: Path | None = None  # None = next to the source: student.onnx, student.int8.onnx, ...
    check_samples: int = 512  # test images compared between onnxruntime and PyTorch
    calib_samples: int = 512  # training images that calibrate int8 activation ranges
    atol: float = 1e-3  # fp32 gate: max |Δlogit| onnxruntime vs PyTorch
    min_agreement: float = 99.9  # fp32 gate: top-1 agreement with PyTorch, percent
    max_acc_drop: float = 1.0  # fp16/int8 gate: accuracy points allowed below fp32
    data_root: Path | None = None  # where the dataset is, if not where it was recorded
    force: bool = False  # overwrite existing output files
    runs_dir: Path = Path("runs")  # where runs/latest lives
    code_path: Path | None = None  # folder of a user architecture's code (--code-path)
    unsafe_load: bool = False  # build architectures from anywhere (--unsafe-load)


@dataclass(frozen=True)
class ExportResult:
    path: Path  # the file written (ends in .failed when a gate failed)
    what: str
    precision: str
    opset: int
    size_bytes: int
    dataset: str
    parity: tuple[ParityReport, ...]  # fp32 first, then the reduced precision if any
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.parity)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "what": self.what, "precision": self.precision, "opset": self.opset,
            "size_bytes": self.size_bytes, "dataset": self.dataset, "passed": self.passed,
            "parity": [r.to_dict() for r in self.parity], "metadata": self.metadata,
        }  # fmt: skip


def run_export(config: ExportConfig) -> ExportResult:
    """Export, validate and write; raises ExportParityError (with ``.result``) after writing ``*.failed``."""
    from ensc.teachers.ensemble import user_code

    check_precision(config.precision)
    with user_code(config.code_path, unsafe=config.unsafe_load):  # a user architecture's model
        return _run_export(config)


def _run_export(config: ExportConfig) -> ExportResult:
    exportable = load_exportable(
        config.what,
        run=config.run,
        model=config.model,
        teacher=config.teacher,
        runs_dir=config.runs_dir,
    )
    out = (
        Path(config.out)
        if config.out is not None
        else onnx_path(exportable.default_out, config.precision)
    )
    check_out(out, config.force)
    images = load_check_images(
        exportable.spec,
        exportable.recorded_data,
        test_samples=config.check_samples,
        calib_samples=config.calib_samples if config.precision == "int8" else 0,
        data_root=config.data_root,
    )
    return write_export(exportable, images, config, out)


def check_out(out: Path, force: bool) -> None:
    """Refuse, before any work, an output (or its ``.failed`` twin) that exists or cannot be written."""
    check_writable(out)
    refuse_overwrite(out, force)
    refuse_overwrite(out.with_name(out.name + FAILED_SUFFIX), force)


def write_export(
    exportable: Exportable, images: CheckImages, config: ExportConfig, out: Path
) -> ExportResult:
    """Export and validate ``exportable`` and write it to ``out`` (``out.failed`` when a gate
    fails, then raise ExportParityError with ``.result``)."""
    recorded = exportable.source_sha256  # hashed now, as read; checked again before writing
    model, reports = build_onnx(exportable, images, config)
    passed = all(r.passed for r in reports)
    failed = out.with_name(out.name + FAILED_SUFFIX)
    path = out if passed else failed
    with rundir.adding_to(path.parent):  # into a run: hold its lock; it must still be finished
        changed = [
            p for p, sha in zip(exportable.sources, recorded, strict=True) if file_sha256(p) != sha
        ]
        if changed:
            raise ExportError(
                f"{changed[0]} changed while it was being exported (was the run redone?): "
                "export again"
            )
        size = save_onnx(model, path)
    result = ExportResult(
        path=path,
        what=exportable.what,
        precision=config.precision if reports[-1].precision == config.precision else "fp32",
        opset=config.opset,
        size_bytes=size,
        dataset=images.dataset,
        parity=tuple(reports),
        metadata={e.key: e.value for e in model.metadata_props},
    )
    if not passed:
        reasons = "; ".join(f for r in reports for f in r.failures)
        raise ExportParityError(
            f"parity check failed ({reasons}); the graph is kept as {failed} for inspection", result
        )
    return result


def build_onnx(
    exportable: Exportable, images: CheckImages, config: ExportConfig
) -> tuple[onnx.ModelProto, list[ParityReport]]:
    """Export to fp32, validate, then convert to ``config.precision`` and validate that.

    Returns the final graph and the reports; when fp32 fails, the fp32 graph is returned and no
    conversion is attempted.
    """
    tol = {
        "atol": config.atol,
        "min_agreement": config.min_agreement,
        "max_acc_drop": config.max_acc_drop,
    }
    log.info(
        "exporting %s (%s) to ONNX opset %d",
        exportable.what,
        ", ".join(exportable.archs),
        config.opset,
    )
    reference = run_torch(exportable.module, images.test_images)
    model = export_onnx(exportable.module, exportable.spec, opset=config.opset)
    _describe(model, exportable, "fp32", config.opset)
    check_onnx(model)
    reports = [_validate(model, reference, images, "fp32", tolerance_for("fp32", **tol))]
    if config.precision == "fp32" or not reports[0].passed:
        return model, reports
    log.info("converting to %s", config.precision)
    if config.precision == "fp16":
        model = to_fp16(model)
    else:
        model = to_int8(model, images.calib_images)
    _describe(model, exportable, config.precision, config.opset)
    reports.append(
        _validate(
            model, reference, images, config.precision, tolerance_for(config.precision, **tol)
        )
    )
    return model, reports


def _describe(model: onnx.ModelProto, exportable: Exportable, precision: str, opset: int) -> None:
    set_metadata(
        model,
        onnx_metadata(
            exportable.spec,
            what=exportable.what,
            precision=precision,
            members=exportable.members,
            sources=[str(p) for p in exportable.sources],
            archs=list(exportable.archs),
            opset=opset,
            source_sha256=exportable.source_sha256,
        ),
    )


def _validate(model, reference, images: CheckImages, precision: str, tolerance) -> ParityReport:
    log.info(
        "checking %s onnxruntime vs PyTorch on %d test images", precision, len(images.test_images)
    )
    report = validate_onnx(
        make_session(model), reference, images.test_images, images.test_labels,
        precision=precision, tolerance=tolerance,
    )  # fmt: skip
    return report


def check_writable(path: Path) -> None:
    """A one-line error now, not after a minute of work, when ``path`` cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"output {path} is a folder; give a file name")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"cannot write {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write {path}: no write permission in {ancestor}")
