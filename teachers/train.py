"""Train a DeepEns teacher: M members of one architecture, each from its own seed.

See docs/method.md §2 (the teacher) and §7 (the recipe).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ensc import faults, rundir
from ensc.data.datasets import load_dataset
from ensc.data.splits import DataConfig, ImageDataset
from ensc.engine.curves import rows
from ensc.engine.loop import BackwardFn, OptimConfig, StepResult, optim_identity, train
from ensc.engine.predict import predict_probs
from ensc.engine.runtime import Runtime
from ensc.engine.seeding import seeded
from ensc.engine.tensorboard import TensorBoardLog, require_tensorboard
from ensc.errors import CheckpointError, ConfigError
from ensc.evaluation.metrics import accuracy, nll
from ensc.fileio import jsonable, torch_load
from ensc.models.checkpoint import Checkpoint, ModelSpec, load_checkpoint, save_checkpoint
from ensc.models.registry import check_arch_kwargs
from ensc.teachers.ensemble import user_code

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherTrainConfig:
    """What `ensc train` does."""

    arch: str  # registry name, torchvision:NAME, timm:NAME or "package.module:callable"
    data: DataConfig
    out: Path  # folder for member0.pt ... member{M-1}.pt
    members: int = 4  # ensemble size M
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 0  # member k trains with seed + k
    force: bool = False  # retrain all: the old members wait in REPLACED until the new ones exist
    resume: bool = False  # keep finished members (refused unless of these settings), continue an interrupted one
    code_path: Path | None = None  # folder of the code of an --arch package.module:callable
    unsafe_load: bool = False  # allow an --arch callable from any importable module
    save_every: int | None = None  # mid-epoch saves: every N steps, 0 never, None ~10 min
    arch_kwargs: dict[str, Any] = field(default_factory=dict)  # the architecture's arguments
    tensorboard: Path | None = (
        None  # each member's curves as TensorBoard event files, DIR/member<k>
    )


REPLACED = rundir.REPLACED  # --force: the folder's old members, kept until every new one exists


def member_path(out: Path, k: int) -> Path:
    return Path(out) / f"member{k}.pt"


def _state_path(out: Path, k: int) -> Path:
    return Path(out) / f".member{k}.state.pt"


# member{k}.pt, .member{k}.state.pt, and the temp files of their unfinished writes (fileio.atomic_write)
_OURS = re.compile(
    r"(member(\d+)\.pt|\.member(\d+)\.state\.pt)|\.\.?member\d+(\.state)?\.pt\..+\.tmp"
)
# the flag that sets each recorded setting (those without one are named by their field)
_FLAGS = {
    "data": {"name": "--dataset", "root": "--data-root", "val_size": "--val-size", "val_root": "--val-root",
             "train_subset": "--train-subset", "test_subset": "--test-subset", "seed": "--data-seed",
             "mode": "--data-mode", "image_size": "--image-size"},
    "optim": {"epochs": "--epochs", "batch_size": "--batch-size", "lr": "--lr",
              "weight_decay": "--weight-decay", "warmup_epochs": "--warmup-epochs",
              "max_steps": "--max-steps"},
}  # fmt: skip
_NOT_SETTINGS = {"download", "workers"}  # DataConfig fields that do not change the data


def check_output_folder(config: TeacherTrainConfig) -> None:
    """Refuse to overwrite finished or interrupted members unless told what to do with them."""
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the member checkpoints")
    if config.force and config.resume:
        raise ConfigError("--force and --resume contradict each other; pass one")
    if config.force or config.resume or not out.exists():
        return
    existing = sorted(out.glob("member*.pt")) + sorted(out.glob(".member*.state.pt"))
    if existing:
        raise ConfigError(
            f"{out} already holds {existing[0].name}: pass --resume to finish the remaining members "
            "or --force to retrain all of them"
        )


def train_teacher(
    config: TeacherTrainConfig, runtime: Runtime, data: ImageDataset | None = None
) -> list[Path]:
    """Train (or resume) every member and write ``member{k}.pt`` files; returns their paths.

    ``--resume`` keeps a finished member only if it records the settings of ``config`` (and
    refuses members beyond ``config.members``); ``--force`` removes the folder's members first.
    """
    check_output_folder(config)
    check_arch_kwargs(config.arch_kwargs)
    if config.tensorboard is not None:
        require_tensorboard()
    config = _resumed_mode(config)
    runtime = _resumed_amp(config, runtime)
    data = data or load_dataset(config.data)
    config = _mode_used(config, data)  # what every member records: later loads reuse it
    out = Path(config.out)
    if config.resume and out.is_dir():
        _check_resumable(config, data)  # before anything is trained or removed
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
    with rundir.locked(out, "train") if runtime.is_main else contextlib.nullcontext():
        if runtime.is_main:
            _clean(config)
        runtime.barrier()
        try:
            paths = [_member(config, runtime, data, k) for k in range(config.members)]
        except BaseException as error:
            if runtime.is_main and config.force:
                _give_back(out, error)
            raise
        if runtime.is_main and (out / REPLACED).is_dir():  # every member is new: drop the old
            shutil.rmtree(out / REPLACED)
    return paths


def _member(config: TeacherTrainConfig, runtime: Runtime, data: ImageDataset, k: int) -> Path:
    """Member ``k``'s file: kept by --resume when it exists, else trained."""
    path = member_path(config.out, k)
    if config.resume and path.exists():
        log.info("member %d: %s exists, skipping", k, path)
    else:
        _train_member(config, runtime, data, k)
    return path


def _give_back(out: Path, error: BaseException) -> None:
    """A --force that failed (or was interrupted before anything resumable exists) puts the
    members it replaced back; an interrupted one that can be resumed keeps them in REPLACED."""
    old = out / REPLACED
    if not old.is_dir() or (old / rundir.MOVING).exists():
        return
    mine = [p for p in out.iterdir() if _OURS.fullmatch(p.name)]
    if isinstance(error, KeyboardInterrupt | SystemExit) and mine:
        return
    for p in mine:
        p.unlink(missing_ok=True)
    for p in old.iterdir():
        os.replace(p, out / p.name)
    old.rmdir()
    log.warning("%s: training failed; the members --force was replacing are back", out)


def _clean(config: TeacherTrainConfig) -> None:
    """Temp files of writes a crash cut short; with ``--force`` every member and state file too
    (so an interrupted ``--force`` cannot leave old members a later ``--resume`` would keep):
    moved into REPLACED, where they wait until every new member is trained (a REPLACED already
    there holds the members of before an earlier, killed --force: what is beside it is deleted);
    with ``--resume`` the state file of a member that is finished."""
    out = Path(config.out)
    into = out / REPLACED
    move = config.force and (not into.exists() or (into / rundir.MOVING).exists())
    if move:
        into.mkdir(exist_ok=True)
        (into / rundir.MOVING).touch()  # until every old member is in
    for path in sorted(out.iterdir()):
        found = _OURS.fullmatch(path.name)
        if found is None:
            continue
        if found[1] and move:
            os.replace(path, into / path.name)
        elif not found[1] or config.force:  # a temp file, or --force
            path.unlink(missing_ok=True)
        elif found[3] and member_path(config.out, int(found[3])).exists():
            path.unlink(missing_ok=True)  # interrupted after the member was saved
    if move:
        (into / rundir.MOVING).unlink()


def _resumed_mode(config: TeacherTrainConfig) -> TeacherTrainConfig:
    """``--resume`` with ``--data-mode auto``: the mode the folder's members were trained in (a
    finished member's record, else an interrupted one's state), so that the rest are trained, and
    checked, with the same preprocessing whatever memory is free now; ``config`` when none says."""
    out = Path(config.out)
    if not (config.resume and config.data.mode == "auto" and out.is_dir()):
        return config
    for k in range(config.members):
        path, state = member_path(out, k), _state_path(out, k)
        if path.exists():
            recorded, key = load_checkpoint(path).info.get("data"), "mode"
        elif state.exists():
            recorded, key = torch_load(state).get("identity"), "data_mode"
        else:
            continue
        mode = recorded.get(key) if isinstance(recorded, dict) else None
        if mode in ("memory", "stream"):
            log.info("--resume: --data-mode %s, as the members trained so far", mode)
            return replace(config, data=replace(config.data, mode=mode))
    return config


def _resumed_amp(config: TeacherTrainConfig, runtime: Runtime) -> Runtime:
    """``--resume`` under ``--amp auto``: the precision of the interrupted member's state, else
    of the members trained so far (:meth:`~ensc.engine.runtime.Runtime.resumed_in`), so that a
    member goes on, and the ensemble is made, in the precision it started in."""
    out = Path(config.out)
    if not (config.resume and runtime.amp_reason.startswith("auto") and out.is_dir()):
        return runtime  # --amp on|off is obeyed: no member file need be read
    states = [_state_path(out, k) for k in range(config.members)]
    for state in (p for p in states if p.exists()):
        if (recorded := torch_load(state).get("amp")) is not None:
            return runtime.resumed_in(recorded)
    for path in (member_path(out, k) for k in range(config.members)):
        if path.exists() and (recorded := load_checkpoint(path).info.get("amp")) is not None:
            return runtime.resumed_in(recorded)
    return runtime


def _mode_used(config: TeacherTrainConfig, data: ImageDataset) -> TeacherTrainConfig:
    """``config`` with the data mode ``data`` was loaded in (``--data-mode auto`` resolved)."""
    if config.data.mode != "auto" or data.config is None:
        return config
    return replace(config, data=replace(config.data, mode=data.config.mode))


def _check_resumable(config: TeacherTrainConfig, data: ImageDataset) -> None:
    """``--resume`` keeps members only if they were trained with the settings asked for now."""
    out = Path(config.out)
    for path in sorted(out.iterdir()):
        found = _OURS.fullmatch(path.name)
        k = int(found[2] or found[3]) if found and found[1] else None
        if k is not None and k >= config.members:
            raise ConfigError(
                f"{out} holds {path.name}, beyond --members {config.members}: pass --members "
                f"{k + 1} or more to keep it, or --force to retrain every member"
            )
    for k in range(config.members):
        path, state = member_path(out, k), _state_path(out, k)
        if path.exists():
            difference = _difference(_recorded(load_checkpoint(path), k), _settings(config))
            if difference:
                raise ConfigError(
                    f"{path.name} was trained with {difference[0]}, not {difference[1]}: pass the "
                    "same settings with --resume, or --force to retrain every member"
                )
        elif state.exists() and torch_load(state).get("identity") != {
            "config": optim_identity(config.optim),  # as engine.loop.train records it
            **_identity(config, data, k),
        }:
            raise ConfigError(
                f"{state.name} (member {k}, interrupted) was saved by a run with other settings: "
                "pass the same settings with --resume, or --force to retrain every member"
            )


def _settings(config: TeacherTrainConfig) -> dict[str, Any]:
    """The settings every member is trained with (``--seed``: member k's seed is seed + k)."""
    return {
        "arch": config.arch,
        "arch_kwargs": jsonable(config.arch_kwargs),
        "seed": config.seed,
        "data": jsonable(asdict(config.data)),
        "optim": optim_identity(config.optim),
    }


def _recorded(ckpt: Checkpoint, k: int) -> dict[str, Any]:
    """:func:`_settings` as member ``k`` recorded them (in its spec and ``info``)."""
    info = ckpt.info
    if not (
        {"seed", "data", "optim"} <= set(info)
        and isinstance(info["seed"], int)
        and isinstance(info["data"], dict)
        and isinstance(info["optim"], dict)
    ):
        raise CheckpointError(
            f"{ckpt.path} was not written by `ensc train` (it records no training settings): "
            "move it away, or pass --force to retrain every member"
        )
    return {
        "arch": ckpt.spec.arch,
        "arch_kwargs": jsonable(ckpt.spec.arch_kwargs),
        "seed": info["seed"] - k,
        "data": info["data"],
        "optim": info["optim"],
    }


def _difference(recorded: dict[str, Any], wanted: dict[str, Any]) -> tuple[str, str] | None:
    """The first setting that differs, as ("--flag recorded", "--flag wanted"); None if none does."""
    pairs: list[tuple[str, Any, Any]] = [("--arch", recorded["arch"], wanted["arch"]),
                                        ("--arch-kwargs", recorded["arch_kwargs"], wanted["arch_kwargs"]),
                                        ("--seed", recorded["seed"], wanted["seed"])]  # fmt: skip
    for group, cls in (("data", DataConfig), ("optim", OptimConfig)):
        for f in fields(cls):
            if f.name in _NOT_SETTINGS:
                continue
            default = jsonable(f.default_factory() if callable(f.default_factory) else f.default)
            label = _FLAGS[group].get(f.name, f"{group} {f.name}")
            was = recorded[group].get(f.name, default)
            if label == "--data-mode" and was == "auto":  # recorded before the mode was: unknown
                continue
            pairs.append((label, was, wanted[group].get(f.name, default)))
    for label, was, now in pairs:
        if was != now:
            return _show(label, was), _show(label, now)
    return None


def _show(label: str, value: Any) -> str:
    return f"{label} unset" if value is None else f"{label} {value}"


def _identity(config: TeacherTrainConfig, data: ImageDataset, k: int) -> dict[str, Any]:
    """What member ``k``'s resumable state must match (``engine.loop.train`` adds the optim config)."""
    return {
        "arch": config.arch,
        **({"arch_kwargs": jsonable(config.arch_kwargs)} if config.arch_kwargs else {}),
        "dataset": data.name,
        "n_train": len(data.train),
        "seed": config.seed + k,
        # an image folder's mode (memory or stream): --resume of --data-mode auto keeps it
        **({"data_mode": config.data.mode} if data.name == "imagefolder" else {}),
    }


def _val_metrics(model: torch.nn.Module, data: ImageDataset, runtime: Runtime) -> dict[str, float]:
    """The member's validation accuracy (%) and NLL, for its record at each epoch's end."""
    probs = predict_probs(model, data.val, runtime)
    return {"val_acc": accuracy(probs, data.val.labels), "val_nll": nll(probs, data.val.labels)}


def _train_member(config: TeacherTrainConfig, runtime: Runtime, data: ImageDataset, k: int) -> None:
    seed = config.seed + k
    spec = ModelSpec.for_data(config.arch, data, data_root=str(config.data.root or ""),
                              arch_kwargs=config.arch_kwargs)  # fmt: skip
    # member k's weight init (data order has its own generator), user code only as allowed
    with seeded(seed), user_code(config.code_path, unsafe=config.unsafe_load):
        model = runtime.prepare_model(spec.build())
    net = runtime.wrap(model)  # DistributedDataParallel under torchrun

    def step(images: torch.Tensor, labels: torch.Tensor, backward: BackwardFn) -> StepResult:
        logits = net(images)
        loss = F.cross_entropy(logits, labels)
        backward(loss)
        correct, loss = int((logits.argmax(-1) == labels).sum()), loss.detach()
        return StepResult(loss, correct, len(labels), loss.new_zeros(()), loss)  # all of it CE

    board = (
        TensorBoardLog(config.tensorboard / f"member{k}")
        if config.tensorboard is not None and runtime.is_main
        else None
    )
    state_path = _state_path(config.out, k)
    if config.force and runtime.is_main:
        state_path.unlink(missing_ok=True)
    history = train(
        model,
        step,
        data.train,
        config.optim,
        runtime,
        hflip=data.hflip,
        seed=seed,
        state_path=state_path,
        resume=config.resume,
        desc=f"member {k} ({k + 1} of {config.members})",  # numbered as its file is
        identity=_identity(config, data, k),
        after_epoch=lambda epochs: faults.point("train.epoch_saved"),
        save_every=config.save_every,
        after_save=lambda steps: faults.point("train.step_saved"),
        evaluate=lambda: _val_metrics(model, data, runtime),
        on_record=board.records if board is not None else None,
    )
    if board is not None:
        board.close()
    val_probs = predict_probs(model, data.val, runtime)
    metrics = {
        "val_acc": accuracy(val_probs, data.val.labels),
        "val_nll": nll(val_probs, data.val.labels),
        "train_loss": history["epochs"][-1]["loss"] if history["epochs"] else None,
        "train_steps": history["steps"],
        "train_seconds": round(history["seconds"], 1),
    }
    info = {"seed": seed, "data": jsonable(asdict(config.data)), "optim": optim_identity(config.optim),
            "curves": rows(history), "amp": runtime.precision(runtime.amp)}  # fmt: skip
    if runtime.is_main:
        save_checkpoint(
            member_path(config.out, k), model, spec, metrics=metrics, info=info,
            fault_point="train.member_write",  # the temp file written, not yet renamed
        )  # fmt: skip
        faults.point("train.member_saved")  # the member saved, its state file not yet removed
        state_path.unlink(missing_ok=True)
    runtime.barrier()
    log.info(
        "member %d: val acc %.2f%% nll %.4f -> %s",
        k,
        metrics["val_acc"],
        metrics["val_nll"],
        member_path(config.out, k),
    )
