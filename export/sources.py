"""What gets exported or benchmarked, and on which images: run folders, checkpoints, teachers.

A run folder of `ensc compress` (default ``runs/latest``; layout in :mod:`ensc.rundir`) holds the
averaged single network, the BatchEns student and the config that names the teacher folder. Any
ensc checkpoint can be exported on its own with ``model=FILE.pt``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ensc import rundir
from ensc.errors import ConfigError, ExportError
from ensc.fileio import file_sha256
from ensc.models.checkpoint import Checkpoint, ModelSpec, load_checkpoint
from ensc.teachers.manifest import member_entries

if TYPE_CHECKING:
    import torch
    from torch import nn

WHATS = ("student", "student-be", "teacher")  # what --what can name in a run


@dataclass
class Exportable:
    """A network ready to export: the wrapper module plus what describes it."""

    module: nn.Module  # returns (logits, probs); see ensc.export.wrappers
    spec: ModelSpec  # input contract and classes (the first member's, for a teacher)
    what: str  # "student", "student-be", "teacher" or "model" (a checkpoint given directly)
    members: int  # networks averaged in the graph (1 for a single network)
    sources: tuple[Path, ...]  # checkpoint files it was built from
    archs: tuple[str, ...]
    recorded_data: dict[str, Any] | None  # DataConfig recorded at training time
    default_out: Path  # where its fp32 ONNX file goes unless told otherwise
    hashes: list[str] | None = None  # sha256 of each source as read (load_exportable fills it)

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    @property
    def source_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.sources)

    @property
    def source_sha256(self) -> list[str]:
        """sha256 of each source file as it was read; an export records them (``source_sha256``)."""
        if self.hashes is None:
            self.hashes = [file_sha256(p) for p in self.sources]
        return self.hashes


def _read_whole(paths: list[Path], load: Callable[[], Exportable]) -> Exportable:
    """``load()``, with the sha256 of ``paths`` taken before and checked after, so the hashes an
    export records (and a benchmark checks) are those of the bytes that were loaded: a run
    replaced meanwhile is refused instead of stamped with the new files' hashes."""
    if not all(Path(p).is_file() for p in paths):  # load() says what is wrong with it
        return load()
    before = [file_sha256(p) for p in paths]
    exportable = load()
    changed = [p for p, sha in zip(paths, before, strict=True) if file_sha256(p) != sha]
    if changed:
        raise ExportError(
            f"{changed[0]} changed while it was being read (was the run redone?): try again"
        )
    if [Path(p) for p in exportable.sources] == [Path(p) for p in paths]:
        exportable.hashes = before
    return exportable


def run_data_record(run_dir: Path) -> dict[str, Any] | None:
    """The DataConfig the run was evaluated on (student.pt, else config.json)."""
    student = run_dir / rundir.STUDENT
    if student.is_file():
        data = load_checkpoint(student).info.get("data")
        if data:
            return data
    return (rundir.read_config(run_dir) or {}).get("data")


def load_exportable(
    what: str | None = None,
    *,
    run: Path | None = None,
    model: Path | None = None,
    teacher: Path | None = None,
    runs_dir: Path = Path("runs"),
) -> Exportable:
    """The network to export.

    ``model`` (any ensc checkpoint) wins over a run; ``what="teacher"`` uses ``teacher`` or the
    run's recorded teacher folder; otherwise ``what`` picks ``student.pt`` / ``student_be.pt`` of
    ``run`` (default ``runs_dir/latest``).
    """
    if what is not None and what not in WHATS:
        raise ConfigError(f"unknown --what {what!r}: choose one of {', '.join(WHATS)}")
    if model is not None:
        if what is not None or teacher is not None:
            raise ConfigError(
                "--model exports that checkpoint itself; drop --what/--teacher, or use --run"
            )
        rundir.check_not_unfinished(Path(model))
        return _read_whole([Path(model)], lambda: _from_checkpoint(
            load_checkpoint(model), "model", None, Path(model).with_suffix(".onnx")
        ))  # fmt: skip
    what = what or "student"
    if what == "teacher":
        run_dir = rundir.resolve_run(run, runs_dir) if teacher is None or run is not None else None
        if run_dir is not None:
            rundir.check_finished(run_dir)
        folder = Path(teacher) if teacher is not None else rundir.teacher_dir(run_dir)
        recorded = run_data_record(run_dir) if run_dir is not None else None
        out = rundir.onnx_file(run_dir, what) if run_dir is not None else folder / "teacher.onnx"
        paths = [e.path for e in member_entries(folder)]
        exportable = _read_whole(paths, lambda: load_teacher_exportable(folder, recorded, out))
        if teacher is None:  # the run's own teacher: the files it was distilled from
            rundir.check_teacher_files(run_dir, folder, exportable.source_sha256)
        return exportable
    if teacher is not None:
        raise ConfigError("--teacher only applies to --what teacher")
    run_dir = rundir.resolve_run(run, runs_dir)
    path = rundir.checkpoint_path(run_dir, what)

    def load() -> Exportable:
        ckpt = load_checkpoint(path)
        recorded = ckpt.info.get("data") or run_data_record(run_dir)  # student.pt: no second load
        return _from_checkpoint(ckpt, what, recorded, rundir.onnx_file(run_dir, what))

    return _read_whole([path], load)


def load_teacher_exportable(folder: Path, recorded: dict[str, Any] | None, out: Path) -> Exportable:
    """A DeepEns teacher folder as one graph (``probs`` = the members' mean)."""
    from ensc.export.wrappers import EnsembleMean
    from ensc.teachers.ensemble import load_teacher

    teacher = load_teacher(folder)
    return Exportable(
        module=EnsembleMean(teacher.members).eval(),
        spec=teacher.spec,
        what="teacher",
        members=len(teacher),
        sources=tuple(teacher.paths),
        archs=tuple(s.arch for s in teacher.specs),
        recorded_data=recorded or teacher.infos[0].get("data"),
        default_out=out,
    )


def _from_checkpoint(
    ckpt: Checkpoint, what: str, recorded: dict[str, Any] | None, out: Path
) -> Exportable:
    from ensc.export.wrappers import BatchEnsembleMean, SingleNetwork

    if ckpt.spec.kind == "batchensemble":
        module, members = BatchEnsembleMean(ckpt.build_batchensemble()), ckpt.spec.members
        what = "student-be" if what == "model" else what
    else:
        module, members = SingleNetwork(ckpt.build_model()), 1
    return Exportable(
        module=module.eval(),
        spec=ckpt.spec,
        what=what,
        members=members,
        sources=(ckpt.path,) if ckpt.path else (),
        archs=(ckpt.spec.arch,),
        recorded_data=recorded or ckpt.info.get("data"),
        default_out=out,
    )


def onnx_path(fp32_path: Path, precision: str) -> Path:
    """``student.onnx`` -> ``student.int8.onnx`` (fp32 keeps the plain name)."""
    fp32_path = Path(fp32_path)
    if precision == "fp32":
        return fp32_path
    return fp32_path.with_name(f"{fp32_path.stem}.{precision}.onnx")


@dataclass(frozen=True)
class CheckImages:
    """Real images for parity checks and calibration: float32 in [0, 1]."""

    dataset: str
    test_images: torch.Tensor  # [N, C, H, W], a class-balanced subset of the test split
    test_labels: torch.Tensor  # [N]
    calib_images: torch.Tensor  # [N_calib, C, H, W] from the training split


def load_check_images(
    spec: ModelSpec,
    recorded: dict[str, Any] | None,
    *,
    test_samples: int,
    calib_samples: int = 0,
    data_root: Path | None = None,
) -> CheckImages:
    """Test images (the model's recorded test split, at most ``test_samples``) and calibration images."""
    import torch

    from ensc.data.datasets import load_dataset
    from ensc.data.source import check_compatible, data_config_for
    from ensc.data.splits import balanced_indices

    if test_samples < 1:
        raise ConfigError(f"the parity check needs at least one test image; got {test_samples}")
    config = data_config_for(spec, recorded, root=data_root)
    n_test = min(test_samples, config.test_subset or test_samples)
    # only calibration needs training images: decode a small subset of train (val carved from it)
    n_train = min(config.train_subset or 10**9, max(2 * calib_samples, 100))
    config = replace(config, test_subset=n_test, train_subset=n_train, val_size=None)
    data = load_dataset(config)
    check_compatible(spec, data)
    gen = torch.Generator().manual_seed(config.seed)
    n_calib = min(calib_samples, len(data.train))
    calib_idx = balanced_indices(data.train.labels, n_calib, gen) if n_calib else torch.arange(0)
    calib = data.train.take(calib_idx).images  # a streamed split decodes only these
    return CheckImages(
        dataset=data.name,
        test_images=data.test.take().images.float().div_(255),
        test_labels=data.test.labels,
        calib_images=calib.float().div_(255),
    )
