"""How fast ensc distills, side by side with the same step written the plain PyTorch way.

    python benchmarks/bench_distill.py                      # everything (~10 min on 2 cores)
    python benchmarks/bench_distill.py --only main --steps 2

Every measurement runs in its own process (so peak RSS is that configuration's own), one after
another in the same run, on the same synthetic data and randomly initialised networks (timing does
not depend on the weights). Writes ``docs/bench-distill.json`` and ``docs/bench-distill.md``.

* **ensc** — ``ensc.engine.loop.train`` with ``make_distill_step``, exactly what `ensc compress`
  runs, after ``tune_malloc()`` as the CLI does; phases from its :class:`PhaseTimer`.
* **plain** — the obvious loop: torchvision ``DataLoader`` with per-sample PIL transforms, the
  BatchEnsemble written as activation scaling (``conv(x ⊙ r) ⊙ s``, as in Wen et al.'s code), the
  perturbation through one teacher, the teachers one after another, the student run on x̃ and on
  x and one backward of the summed loss; glibc's default allocator.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import hardware  # noqa: E402

TEACHERS = ("resnet20", "resnet32", "resnet44", "resnet56")
STUDENT = "resnet32"
N_IMAGES = 2048  # synthetic training images (uint8), reshuffled every epoch
ROOT = Path(__file__).resolve().parent.parent
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the shared teacher's


def configurations(only: str, shared: Path | None, cifar_jpeg: Path | None) -> list[dict[str, Any]]:
    """The named configurations: main comparison first, then how ensc's cost grows, then the
    real teacher through `ensc compress` against the plain loop on the same teacher and data."""
    base = {"members": 4, "batch": 128, "image": 32, "perturb": "ods", "member_batch": "repeat"}
    main = []
    for perturb in ("none", "ods", "tdiv-sdiv"):
        for impl in ("plain", "ensc"):
            main.append({**base, "impl": impl, "perturb": perturb, "group": "main"})
    main.append({**base, "impl": "ensc", "member_batch": "split", "group": "main"})
    main.append({**base, "impl": "ensc", "malloc": "glibc", "group": "main"})  # without tcmalloc
    main.append({**base, "impl": "ensc", "amp": True, "group": "main"})  # bf16 autocast on a CPU
    scaling = [
        {**base, "impl": "ensc", "group": "scaling", **change}
        for change in (
            {"members": 2},
            {"members": 8},
            {"batch": 32},
            {"batch": 64},
            {"batch": 256},
            {"image": 64},
        )
    ]
    cli = []
    if shared is not None and cifar_jpeg is not None:
        real = {**base, "group": "cli", "shared": str(shared), "cifar_jpeg": str(cifar_jpeg)}
        cli = [{**real, "impl": "plain"}, {**real, "impl": "ensc-cli"}]
    return {"main": main, "scaling": scaling, "cli": cli, "all": main + scaling + cli}[only]


# --- worker side: one configuration in this process ----------------------------------------


def _teachers(members: int, num_classes: int, channels: int, archs=TEACHERS) -> list:
    from ensc.models import build_model

    archs = [archs[k % len(archs)] for k in range(members)]
    return [
        build_model(a, num_classes=num_classes, in_channels=channels).eval().requires_grad_(False)
        for a in archs
    ]


def _data(cfg: dict[str, Any]):
    import torch

    gen = torch.Generator().manual_seed(0)
    size = cfg["image"]
    images = torch.randint(0, 256, (N_IMAGES, 3, size, size), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (N_IMAGES,), generator=gen)
    return images, labels


def run_ensc(cfg: dict[str, Any]) -> dict[str, Any]:
    """ensc's own loop and step; returns seconds per step and per phase."""
    from ensc.engine.allocator import tune_malloc

    allocator = tune_malloc()
    import torch

    from ensc.compress.distill import (
        DistillConfig,
        fast_teachers,
        fast_weight_hook,
        make_distill_step,
        param_groups,
    )
    from ensc.compress.perturb import PerturbConfig
    from ensc.data.splits import Split
    from ensc.engine.loop import OptimConfig, train
    from ensc.engine.runtime import resolve_runtime
    from ensc.engine.timing import PhaseTimer
    from ensc.models import build_model
    from ensc.models.batchensemble import to_batchensemble

    torch.manual_seed(0)
    images, labels = _data(cfg)
    runtime = resolve_runtime("cpu", amp=cfg.get("amp", False))
    teachers = fast_teachers(_teachers(cfg["members"], 10, 3), runtime, images[:16].float() / 255)
    student = to_batchensemble(
        build_model(STUDENT, num_classes=10, in_channels=3), members=cfg["members"]
    )
    config = DistillConfig(
        perturb=PerturbConfig(kind=cfg["perturb"]), member_batch=cfg["member_batch"]
    )
    timer = PhaseTimer()
    step = make_distill_step(
        student, teachers, config, torch.Generator().manual_seed(1), timer=timer
    )
    warmup, steps = cfg["warmup"], cfg["steps"]
    marks: dict[str, float] = {}

    def measured(x, y, backward):
        if len(marks) == 0 and measured.calls == warmup:
            timer.reset()
            marks["start"] = time.perf_counter()
        measured.calls += 1
        return step(x, y, backward)

    measured.calls = 0
    train(
        student,
        measured,
        Split(images, labels),
        OptimConfig(epochs=100, batch_size=cfg["batch"], lr=0.01, max_steps=warmup + steps),
        runtime,
        param_groups=param_groups(student, "wa", 5e-4),
        after_backward=fast_weight_hook(student, "wa", 5e-4),
        timer=timer,
    )
    seconds = (time.perf_counter() - marks["start"]) / steps
    phases = {k: v / steps for k, v in timer.seconds.items()}
    return {"s_per_step": seconds, "phases": phases, "allocator": allocator}


def _naive_batchensemble(model, members: int):
    """BatchEnsemble the obvious way: every Conv2d/Linear wrapped as ``layer(x ⊙ r) ⊙ s``."""
    import torch
    from torch import nn

    class Scaled(nn.Module):
        def __init__(self, layer: nn.Module) -> None:
            super().__init__()
            fan_in = layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features
            fan_out = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
            self.layer = layer
            self.r = nn.Parameter(torch.ones(members, fan_in))
            self.s = nn.Parameter(torch.ones(members, fan_out))

        def forward(self, x):
            shape = (members, -1, x.shape[1]) + (1,) * (x.dim() - 2)
            x = (x.view(members, -1, *x.shape[1:]) * self.r.view(shape)).flatten(0, 1)
            y = self.layer(x)
            shape = (members, -1, y.shape[1]) + (1,) * (y.dim() - 2)
            return (y.view(members, -1, *y.shape[1:]) * self.s.view(shape)).flatten(0, 1)

    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) in (nn.Conv2d, nn.Linear):
                setattr(module, child_name, Scaled(child))
    return model


def run_plain(cfg: dict[str, Any]) -> dict[str, Any]:
    """The reference loop, written as a user would without ensc."""
    import torch
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms
    from torchvision.transforms.functional import to_pil_image

    from ensc.models import build_model

    torch.manual_seed(0)
    if cfg.get("shared"):
        return _timed_plain_loop(cfg, *_real_setup(cfg))
    images, labels = _data(cfg)
    m = cfg["members"]

    class Images(Dataset):
        transform = transforms.Compose(
            [
                transforms.RandomCrop(cfg["image"], padding=4),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
            ]
        )

        def __len__(self) -> int:
            return len(labels)

        def __getitem__(self, i: int):
            return self.transform(to_pil_image(images[i])), labels[i]

    workers = cfg.get("workers", 0)  # a GPU user gives the loader worker processes
    loader = DataLoader(Images(), batch_size=cfg["batch"], shuffle=True, drop_last=True,
                        num_workers=workers, pin_memory=cfg.get("device", "cpu") != "cpu",
                        persistent_workers=workers > 0)  # fmt: skip
    teachers = _teachers(m, 10, 3, cfg.get("teachers", TEACHERS))
    student = build_model(cfg.get("student", STUDENT), num_classes=10, in_channels=3)
    return _timed_plain_loop(cfg, loader, teachers, _naive_batchensemble(student, m))


def _real_setup(cfg: dict[str, Any]):
    """The shared teacher (third-party ResNet-20/32/44/56) and CIFAR-10 JPEGs, read plainly."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    sys.path.insert(0, str(Path(cfg["shared"]) / "code"))
    import resnet_cifar

    mean, std = (
        torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
        torch.tensor(IMAGENET_STD).view(1, 3, 1, 1),
    )

    class Normalized(nn.Module):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net((x - mean) / std)

    def member(name: str) -> nn.Module:
        net = getattr(resnet_cifar, name)()
        path = next((Path(cfg["shared"]) / "checkpoints").glob(f"{name}-*.th"))
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        net.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
        return Normalized(net)

    teachers = [member(n).eval().requires_grad_(False) for n in TEACHERS]
    student = _naive_batchensemble(member(STUDENT), cfg["members"])
    transform = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
        ]
    )
    data = datasets.ImageFolder(str(Path(cfg["cifar_jpeg"]) / "train"), transform=transform)
    loader = DataLoader(data, batch_size=cfg["batch"], shuffle=True, drop_last=True)
    return loader, teachers, student


def _timed_plain_loop(cfg: dict[str, Any], loader, teachers, student) -> dict[str, Any]:
    """Warm-up steps, then seconds per step of the plain loop (float32, on ``cfg["device"]``)."""
    import torch
    import torch.nn.functional as F

    device = torch.device(cfg.get("device", "cpu"))
    teachers = [t.to(device) for t in teachers]
    student = student.to(device)
    m, alpha, step_size = cfg["members"], 0.9, 1 / 255
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, nesterov=True)

    def student_logits(x):
        return student(x.repeat(m, 1, 1, 1)).view(m, x.shape[0], -1)

    def perturb(x):
        kind = cfg["perturb"]
        if kind == "none":
            return x
        x = x.clone().requires_grad_()
        if kind == "ods":
            j = int(torch.randint(m, (1,)))
            probs = teachers[j](x).softmax(-1)
            w = torch.rand_like(probs) * 2 - 1
            (w * probs).sum().backward()
        else:  # tdiv-sdiv, student in eval mode
            i, j = torch.randperm(m)[:2].tolist()
            t_i, t_j = teachers[i](x), teachers[j](x)
            student.eval()
            s = student_logits(x)
            student.train()

            def ce(a, b):
                return -(b.detach().softmax(-1) * a.log_softmax(-1)).sum()

            (ce(t_i, t_j) - ce(s[i], s[j])).backward()
        g = x.grad.flatten(1)
        eps = step_size * g.shape[1] ** 0.5 * g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
        student.zero_grad()
        return (x.detach() + eps.view_as(x)).clamp(0, 1)

    def one_step(x, y):
        x_tilde = perturb(x)
        with torch.no_grad():
            targets = torch.stack([t(x_tilde) for t in teachers])  # [M, B, K]
        kd = -(targets.softmax(-1) * student_logits(x_tilde).log_softmax(-1)).sum(-1).mean()
        ce = F.cross_entropy(student_logits(x).flatten(0, 1), y.repeat(m))
        loss = alpha * kd + (1 - alpha) * ce
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def batches():
        while True:
            for x, y in loader:
                yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    feed = batches()
    for _ in range(cfg["warmup"]):
        one_step(*next(feed))
    sync()
    start = time.perf_counter()
    for _ in range(cfg["steps"]):
        one_step(*next(feed))
    sync()
    return {"s_per_step": (time.perf_counter() - start) / cfg["steps"], "phases": {}}


STUDENT_WRAPPER = """import resnet_cifar


def resnet32(num_classes=10):  # ensc calls student builders with num_classes
    assert num_classes == 10
    return resnet_cifar.resnet32()
"""


def run_ensc_cli(cfg: dict[str, Any]) -> dict[str, Any]:
    """`ensc compress` itself on the shared teacher, with the flags a new user tried."""
    import tempfile

    shared = Path(cfg["shared"])
    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "code"
        code.mkdir()
        (code / "resnet_cifar.py").write_text((shared / "code" / "resnet_cifar.py").read_text())
        (code / "student_nets.py").write_text(STUDENT_WRAPPER)
        members = [
            {"path": str(next((shared / "checkpoints").glob(f"{n}-*.th"))), "arch": f"resnet_cifar:{n}",
             "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
            for n in TEACHERS
        ]  # fmt: skip
        manifest = Path(tmp) / "ensemble.json"
        manifest.write_text(json.dumps({"members": members}))
        run = Path(tmp) / "run"
        cmd = [
            str(Path(sys.executable).with_name("ensc")), "compress", "--teacher", str(manifest),
            "--code-path", str(code), "--dataset", "imagefolder", "--data-root", cfg["cifar_jpeg"],
            "--arch", "student_nets:resnet32", "--student-init", "member:1", "--perturb", cfg["perturb"],
            "--alpha", "0.9", "--temperature", "1", "--lr", "0.01", "--batch-size", str(cfg["batch"]),
            "--max-steps", str(cfg["warmup"] + cfg["steps"]), "--member-batch", cfg["member_batch"],
            "--train-subset", "5000", "--test-subset", "500", "--max-acc-drop", "100",
            "--out", str(run), "--force", "--device", "cpu",
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr.strip().splitlines()[-1])
        report = json.loads((run / "report.json").read_text())
    train = report["train"]
    return {
        "s_per_step": train.get("s_per_step") or train["seconds"] / train["steps"],
        "phases": {},
        "command": _portable(cmd, work=run.parent),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6,
    }


def worker(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(cfg["threads"])
    run = {"plain": run_plain, "ensc": run_ensc, "ensc-cli": run_ensc_cli}[cfg["impl"]]
    result = run(cfg)
    result["images_per_s"] = cfg["batch"] / result["s_per_step"]
    result.setdefault("peak_rss_gb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6)
    return result


# --- orchestration ---------------------------------------------------------------------------


def run_one(cfg: dict[str, Any]) -> dict[str, Any]:
    from ensc.engine.allocator import preload_env

    cmd = [sys.executable, __file__, "--worker", json.dumps(cfg)]
    env = dict(os.environ)
    if cfg["impl"] == "ensc" and cfg.get("malloc") != "glibc":
        env = preload_env(env)  # what the `ensc` command does for itself
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def label(cfg: dict[str, Any]) -> str:
    return (
        f"{cfg['impl']} {cfg['perturb']} M={cfg['members']} B={cfg['batch']} "
        f"{cfg['image']}px {_mode(cfg)}"
    )


def render(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    hw = meta["hardware"]
    lines = [
        "# Distillation step: ensc vs the plain PyTorch loop",
        "",
        f"Command: `{meta['command']}` ({meta['date']}, {meta['wall_seconds']:.0f} s).",
        f"Hardware: {hw['cpu']}, {hw['cores']} cores, torch {hw['torch']} "
        f"(CPU capability {hw['cpu_capability']}, oneDNN bf16 {hw['mkldnn_bf16']}), "
        f"{meta['threads']} threads, float32, {meta['steps']} measured steps after "
        f"{meta['warmup']} warm-up, median of {meta.get('repeats', 1)} interleaved run(s). Teachers: DE-M of {'/'.join(TEACHERS)} (cycled for M > 4), "
        f"student BE-M {STUDENT}, α 0.9, T 1, step 1/255, randomly initialised.",
        "",
        "## Side by side (DE-4 → BE-4 ResNet-32, batch 128, 32×32)",
        "",
        "perturb | ensc mode | plain s/step | ensc s/step | speed-up | plain peak RSS GB | "
        "ensc peak RSS GB | memory ratio | ensc allocator | ensc phases (s/step)",
        "---|---|---:|---:|---:|---:|---:|---:|---|---",
    ]
    main = [r for r in results if r["cfg"]["group"] == "main"]
    plain = {r["cfg"]["perturb"]: r for r in main if r["cfg"]["impl"] == "plain"}
    for r in main:
        if r["cfg"]["impl"] != "ensc" or "error" in r:
            continue
        p = plain.get(r["cfg"]["perturb"], {})
        phases = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["phases"].items()))
        if "s_per_step" in p:
            ratio = f"{p['s_per_step'] / r['s_per_step']:.2f}×"
            mem = f"{r['peak_rss_gb'] / p['peak_rss_gb']:.0%}"
            p_s, p_m = f"{p['s_per_step']:.2f}", f"{p['peak_rss_gb']:.2f}"
        else:
            ratio = mem = p_s = p_m = "–"
        lines.append(
            f"{r['cfg']['perturb']} | {_mode(r['cfg'])} | {p_s} | "
            f"{r['s_per_step']:.2f} | {ratio} | {p_m} | {r['peak_rss_gb']:.2f} | {mem} | "
            f"{r.get('allocator', '')} | {phases}"
        )
    scaling = [r for r in results if r["cfg"]["group"] in ("scaling", "main")]
    lines += [
        "",
        "## How ensc's step grows (ODS, repeat mode unless said)",
        "",
        "M | batch | image | s/step | images/s | peak RSS GB",
        "---|---:|---:|---:|---:|---:",
    ]
    seen = set()
    for r in scaling:
        c = r["cfg"]
        key = (c["members"], c["batch"], c["image"])
        if c["impl"] != "ensc" or c["perturb"] != "ods" or _mode(c) != "repeat":
            continue
        if key in seen or "error" in r:
            continue
        seen.add(key)
        lines.append(
            f"{c['members']} | {c['batch']} | {c['image']}² | {r['s_per_step']:.2f} | "
            f"{r['images_per_s']:.1f} | {r['peak_rss_gb']:.2f}"
        )
    lines += ["", *_scaling_sentences(results)]
    cli = {r["cfg"]["impl"]: r for r in results if r["cfg"]["group"] == "cli" and "error" not in r}
    if "plain" in cli and "ensc-cli" in cli:
        p, e = cli["plain"], cli["ensc-cli"]
        lines += [
            "",
            "## `ensc compress` on the shared teacher vs the plain loop on the same teacher",
            "",
            "Real DE-4 (third-party ResNet-20/32/44/56) → BE-4 ResNet-32 warm-started from member 1, "
            "ODS, batch 128, CIFAR-10 JPEGs. ensc's seconds per step are `report.json`'s "
            "`train.s_per_step` (training seconds after its first step, like the plain loop's "
            "after its warm-up step); its peak RSS covers the whole command (data, training, "
            "evaluation).",
            "",
            "loop | s/step | images/s | peak RSS GB",
            "---|---:|---:|---:",
            f"plain | {p['s_per_step']:.2f} | {p['images_per_s']:.1f} | {p['peak_rss_gb']:.2f}",
            f"`ensc compress` | {e['s_per_step']:.2f} | {e['images_per_s']:.1f} | {e['peak_rss_gb']:.2f}",
            "",
            f"All runs, interleaved (s/step): plain {p.get('all_s_per_step', [])}, "
            f"`ensc compress` {e.get('all_s_per_step', [])}; the table shows the median run (of two, the faster, for both loops).",
            "",
            f"Speed-up {p['s_per_step'] / e['s_per_step']:.2f}×, memory "
            f"{e['peak_rss_gb'] / p['peak_rss_gb']:.0%} of the plain loop's. Command: `{e['command']}`",
        ]
    failed = [f"- {label(r['cfg'])}: {r['error']}" for r in results if "error" in r]
    if failed:
        lines += ["", "Failed:", *failed]
    return "\n".join(lines) + "\n"


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median s/step (all s/step values kept under ``all_s_per_step``)."""
    ok = sorted((r for r in runs if "error" not in r), key=lambda r: r["s_per_step"])
    if not ok:
        return runs[0]
    median = dict(ok[(len(ok) - 1) // 2])
    median["all_s_per_step"] = [round(r["s_per_step"], 3) for r in ok]
    return median


def _scaling_sentences(results: list[dict[str, Any]]) -> list[str]:
    """How s/step grows with M, batch and image size, read off the measured rows."""
    ods = {
        (r["cfg"]["members"], r["cfg"]["batch"], r["cfg"]["image"]): r["s_per_step"]
        for r in results
        if r["cfg"]["impl"] == "ensc" and r["cfg"]["perturb"] == "ods"
        and _mode(r["cfg"]) == "repeat" and "error" not in r
    }  # fmt: skip
    base = ods.get((4, 128, 32))
    if base is None:
        return []
    parts = []
    for what, keys in (
        ("M", [(m, 128, 32) for m in (2, 4, 8)]),
        ("batch", [(4, b, 32) for b in (32, 64, 128, 256)]),
        ("image side", [(4, 128, i) for i in (32, 64)]),
    ):
        found = [(k, ods[k]) for k in keys if k in ods]
        if len(found) > 1:
            steps = ", ".join(f"{v:.2f}" for _, v in found)
            parts.append(
                f"s/step for {what} {'/'.join(str(_axis(k, what)) for k, _ in found)}: {steps}"
            )
    if not parts:
        return []
    return [
        "Scaling: " + "; ".join(parts) + ". The step is a fixed number of network passes over "
        "M × batch student images plus batch teacher images, so its cost grows about linearly "
        "in M (student side), in the batch, and in the number of pixels. On a GPU the same "
        "step runs with float16 autocast and channels_last (the defaults for `--device cuda`), "
        "not measured here (no GPU); small batches underuse a GPU, so there cost should grow "
        "less than linearly until the device is full.",
    ]


def _mode(cfg: dict[str, Any]) -> str:
    extras = [", glibc mallopt" if cfg.get("malloc") == "glibc" else ""]
    extras.append(", bf16 autocast" if cfg.get("amp") else "")
    return cfg["member_batch"] + "".join(extras)


def _axis(key: tuple[int, int, int], what: str) -> int:
    return {"M": key[0], "batch": key[1], "image side": key[2]}[what]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("main", "scaling", "cli", "all"), default="all")
    parser.add_argument(
        "--shared-teacher", type=Path, default=ROOT.parent / "shared/data/teachers-cifar10-resnet",
        help="the third-party DE-4 for the `ensc compress` comparison (skipped when absent)",
    )  # fmt: skip
    parser.add_argument("--cifar-jpeg", type=Path, default=ROOT.parent / "shared/data/cifar10-jpeg")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per configuration")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs of every configuration; the median counts"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "bench-distill.json")
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs" / "bench-distill.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--render-only", action="store_true", help="Markdown from the JSON")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.render_only:  # re-render the Markdown from the JSON
        saved = json.loads(args.json.read_text())
        args.markdown.write_text(render(saved["results"], saved["meta"]))
        return

    started = time.perf_counter()
    results = []
    found = args.shared_teacher.is_dir() and args.cifar_jpeg.is_dir()
    if not found and args.only in ("cli", "all"):
        print(
            f"no shared teacher at {args.shared_teacher}: skipping the `ensc compress` comparison"
        )
    shared, jpeg = (args.shared_teacher, args.cifar_jpeg) if found else (None, None)
    runs: dict[str, list[dict[str, Any]]] = {}
    for _ in range(args.repeats):  # interleaved, so slow spells of the machine hit both loops
        for cfg in configurations(args.only, shared, jpeg):
            cfg = {**cfg, "steps": args.steps, "warmup": args.warmup, "threads": args.threads}
            result = {"cfg": cfg, **run_one(cfg)}
            runs.setdefault(label(cfg), []).append(result)
            shown = result.get("error") or (
                f"{result['s_per_step']:.2f} s/step, {result['peak_rss_gb']:.2f} GB"
            )
            print(f"{label(cfg)}: {shown}", flush=True)
    results = [_median_run(rs) for rs in runs.values()]
    command = "python benchmarks/bench_distill.py " + " ".join(sys.argv[1:])
    commands = [command]
    if args.only != "all" and args.json.exists():  # keep the other groups' earlier rows
        earlier = json.loads(args.json.read_text())
        ran = {r["cfg"]["group"] for r in results}
        results = [r for r in earlier["results"] if r["cfg"]["group"] not in ran] + results
        commands = earlier["meta"].get("commands", [earlier["meta"]["command"]]) + commands
    meta = {
        "command": " ; ".join(commands),
        "commands": commands,
        "date": time.strftime("%Y-%m-%d"),
        "wall_seconds": time.perf_counter() - started,
        "hardware": hardware(),
        "threads": args.threads,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
    }
    for path, text in (
        (args.json, json.dumps({"meta": meta, "results": results}, indent=2) + "\n"),
        (args.markdown, render(results, meta)),
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    print(f"wrote {args.json} and {args.markdown}")


if __name__ == "__main__":
    main()


def _portable(cmd: list[str], work: Path) -> str:
    """The command as a reader can retype it: ``ensc`` for the executable, ``WORK/`` for this
    run's temp folder, the data folder relative to the repository."""
    text = " ".join(["ensc", *cmd[1:]]).replace(str(work), "WORK")
    return text.replace(str(ROOT.parent), "..")
