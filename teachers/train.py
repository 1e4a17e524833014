"""Train a DeepEns teacher: M members of one architecture, each from its own seed.

See docs/method.md §2 (the teacher) and §7 (the recipe).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ensc.data.datasets import DataConfig, ImageDataset, load_dataset
from ensc.engine.loop import BackwardFn, OptimConfig, StepResult, train
from ensc.engine.predict import predict_probs
from ensc.engine.runtime import Runtime
from ensc.engine.seeding import seeded
from ensc.errors import ConfigError
from ensc.evaluation.metrics import accuracy, nll
from ensc.fileio import jsonable
from ensc.models.checkpoint import ModelSpec, save_checkpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherTrainConfig:
    """What `ensc train` does."""

    arch: str  # registry name or "package.module:callable"
    data: DataConfig
    out: Path  # folder for member0.pt ... member{M-1}.pt
    members: int = 4  # ensemble size M
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 0  # member k trains with seed + k
    force: bool = False  # overwrite finished members
    resume: bool = False  # keep finished members, continue an interrupted one


def member_path(out: Path, k: int) -> Path:
    return Path(out) / f"member{k}.pt"


def _state_path(out: Path, k: int) -> Path:
    return Path(out) / f".member{k}.state.pt"


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
    """Train (or resume) every member and write ``member{k}.pt`` files; returns their paths."""
    check_output_folder(config)
    data = data or load_dataset(config.data)
    Path(config.out).mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(config.members):
        path = member_path(config.out, k)
        paths.append(path)
        if config.resume and path.exists():
            log.info("member %d: %s exists, skipping", k, path)
            continue
        _train_member(config, runtime, data, k)
    return paths


def _train_member(config: TeacherTrainConfig, runtime: Runtime, data: ImageDataset, k: int) -> None:
    seed = config.seed + k
    spec = ModelSpec.for_data(config.arch, data, data_root=str(config.data.root or ""))
    with seeded(seed):  # member k's weight init; data order has its own generator (seed)
        model = runtime.prepare_model(spec.build())
    net = runtime.wrap(model)  # DistributedDataParallel under torchrun

    def step(images: torch.Tensor, labels: torch.Tensor, backward: BackwardFn) -> StepResult:
        logits = net(images)
        loss = F.cross_entropy(logits, labels)
        backward(loss)
        return StepResult(loss.detach(), int((logits.argmax(-1) == labels).sum()), len(labels))

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
        desc=f"member {k + 1}/{config.members}",
        identity={
            "arch": config.arch,
            "dataset": data.name,
            "n_train": len(data.train),
            "seed": seed,
        },
    )
    val_probs = predict_probs(model, data.val, runtime)
    metrics = {
        "val_acc": accuracy(val_probs, data.val.labels),
        "val_nll": nll(val_probs, data.val.labels),
        "train_loss": history["epochs"][-1]["loss"] if history["epochs"] else None,
        "train_steps": history["steps"],
        "train_seconds": round(history["seconds"], 1),
    }
    info = {"seed": seed, "data": jsonable(asdict(config.data)), "optim": asdict(config.optim)}
    if runtime.is_main:
        save_checkpoint(member_path(config.out, k), model, spec, metrics=metrics, info=info)
        state_path.unlink(missing_ok=True)
    runtime.barrier()
    log.info(
        "member %d: val acc %.2f%% nll %.4f -> %s",
        k,
        metrics["val_acc"],
        metrics["val_nll"],
        member_path(config.out, k),
    )
