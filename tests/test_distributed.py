"""Data-parallel training on the CPU: two gloo processes, as torchrun would launch on GPUs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from ensc.models.checkpoint import load_checkpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    from ensc.data.datasets import load_dataset
    from ensc.data.splits import DataConfig
    from ensc.engine.loop import OptimConfig, StepResult, train
    from ensc.engine.runtime import resolve_runtime
    from ensc.models import build_model

    torch.set_num_threads(1)
    runtime = resolve_runtime("cpu")
    data = load_dataset(DataConfig("fashion-mnist", train_subset=400, test_subset=10))
    torch.manual_seed(0)
    model = build_model("resnet8", num_classes=10, in_channels=1)
    net = runtime.wrap(model)
    shard_sizes = []

    def step(x, y, backward):
        shard_sizes.append(len(y))
        loss = F.cross_entropy(net(x), y)
        backward(loss)
        return StepResult(loss.detach(), 0, len(y))

    train(
        model,
        step,
        data.train,
        OptimConfig(epochs=1, batch_size=64, max_steps=3),
        runtime,
        hflip=False,
    )
    torch.save({"state": model.state_dict(), "shards": shard_sizes}, Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ddp_keeps_replicas_identical_on_shards(tmp_path: Path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert (
        r0["shards"] == r1["shards"] == [32, 32, 32]
    )  # each process took half of every batch of 64
    torch.manual_seed(0)
    from ensc.models import build_model

    init = build_model("resnet8", num_classes=10, in_channels=1).state_dict()
    for name, w0 in r0["state"].items():
        if "running" in name or "num_batches" in name:
            continue  # BN buffers are per-process until the next forward broadcasts them
        assert torch.allclose(w0, r1["state"][name], atol=1e-6), name  # gradients were averaged
    assert not torch.allclose(r0["state"]["fc.weight"], init["fc.weight"])  # and they trained


def test_torchrun_launch_of_ensc_train(tmp_path: Path):
    out = tmp_path / "T"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         "-m", "ensc.cli", "train", "--dataset", "fashion-mnist", "--arch", "resnet8", "--members", "1",
         "--epochs", "1", "--train-subset", "400", "--batch-size", "64", "--max-steps", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("teacher with 1 member in") == 1  # only rank 0 reports
    assert load_checkpoint(out / "member0.pt").info["optim"]["max_steps"] == 2


def _distill_worker(rank: int, world: int, port: int, out: str) -> None:
    """Two-pass distillation steps (KD on x̃, then CE on x) under DDP, gloo."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    from torch import nn

    from ensc.compress.distill import DistillConfig, make_distill_step
    from ensc.compress.perturb import PerturbConfig
    from ensc.data.splits import Split
    from ensc.engine.loop import OptimConfig, train
    from ensc.engine.runtime import resolve_runtime
    from ensc.models.batchensemble import to_batchensemble

    torch.set_num_threads(1)
    runtime = resolve_runtime("cpu")

    def net(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
        )  # fmt: skip

    teachers = [net(10 + k).eval().requires_grad_(False) for k in range(2)]
    student = to_batchensemble(net(0), members=2)
    config = DistillConfig(perturb=PerturbConfig(kind="gaussian", step=4.0))
    gen = torch.Generator().manual_seed(1)
    step = make_distill_step(student, teachers, config, gen, net=runtime.wrap(student))
    images = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8, generator=gen)
    data = Split(images, torch.randint(0, 3, (64,), generator=gen))
    train(student, step, data, OptimConfig(epochs=1, batch_size=16, lr=0.1), runtime, hflip=False)
    torch.save(student.state_dict(), Path(out) / f"distill{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ddp_two_pass_distillation_keeps_replicas_identical(tmp_path: Path):
    mp.spawn(_distill_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"distill{r}.pt", weights_only=True) for r in (0, 1))
    for name, w0 in r0.items():
        if "running" in name or "num_batches" in name:
            continue
        assert torch.allclose(w0, r1[name], atol=1e-6), name
