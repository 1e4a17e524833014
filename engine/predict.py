"""Batched inference: a model's logits over a whole split, and fast copies of networks to get them.

Evaluation runs every network once per split under ``torch.inference_mode()``. Measured on this
project's 2-core CPU machine with a CIFAR ResNet-32 (``docs/eval-overhead.md``):

- batches of 64 images beat larger ones (1,120 images/s at 64, 820 at 256);
- :func:`eval_copy` folds each BatchNorm into the convolution before it
  (``torch.fx.experimental.optimization.fuse``) and runs in NHWC layout (channels_last), which
  oneDNN's convolutions prefer: 1,120 → 1,400 images/s. It is kept only when its logits match;
- a BatchEnsemble's BatchNorm follows the members' concatenated outputs and cannot be folded,
  so its members run as the plain networks they are
  (:func:`~ensc.models.fold.member_network`): 1,360 vs 900 member-images/s for one
  BatchEnsemble forward pass over all members;
- :func:`predict_logits_many` runs batches side by side, one intra-op thread each, instead of
  one after the other on a team of threads (about 10 % on an idle machine, and it does not
  collapse when other processes share the cores).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from ensc.data.datasets import Split, iterate_batches
from ensc.engine.runtime import Runtime
from ensc.models.batchensemble import BatchEnsemble
from ensc.models.fold import member_network
from ensc.models.modes import eval_mode

log = logging.getLogger(__name__)

CPU_BATCH = 64  # images per forward pass on a CPU (as fast as 32, faster than 128-512)
GPU_BATCH = 512
EVAL_COPY_TOLERANCE = 1e-4  # max |Δlogit| (relative to the logits' scale) of a fast copy


def probe_batch(splits: Iterable[Split], runtime: Runtime, n: int = 16) -> torch.Tensor | None:
    """Up to ``n`` images of the first non-empty split, on ``runtime.device``: checks fast copies."""
    for split in splits:
        if len(split):
            return next(iterate_batches(split, n))[0].to(runtime.device)
    return None


def eval_batch_size(runtime: Runtime) -> int:
    """Images per forward pass for evaluation: small on CPUs (cache-friendly), large on GPUs."""
    return CPU_BATCH if runtime.device.type == "cpu" else GPU_BATCH


@torch.inference_mode()
def predict_logits(
    model: nn.Module, split: Split, runtime: Runtime, batch_size: int | None = None
) -> torch.Tensor:
    """Logits of ``model`` (eval mode) on every image of ``split``: float32 [N, K] on the CPU."""
    batch_size = batch_size or eval_batch_size(runtime)
    out = []
    with eval_mode(model):
        for images, _ in iterate_batches(split, batch_size):
            with runtime.autocast():
                out.append(model(runtime.to_device(images)).float().cpu())
    return torch.cat(out)


def predict_logits_many(
    models: Sequence[nn.Module],
    splits: Mapping[str, Split],
    runtime: Runtime,
    batch_size: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """:func:`predict_logits` of every model on every split: ``[{split name: [N, K]}]`` per model.

    On a CPU with T > 1 intra-op threads the batches run side by side on T threads with one
    intra-op thread each, instead of one after the other on a team of T: the team waits at every
    layer for its slowest thread, which costs about 10 % on an idle 2-core machine (ResNet-32s:
    1,210 vs 1,350 images/s) and much more when other processes share the cores. Every batch
    is the one :func:`predict_logits` would run, so the logits are the same up to float round-off.
    """
    batch_size = batch_size or eval_batch_size(runtime)
    jobs = [
        (k, name, start)
        for k in range(len(models))
        for name, split in splits.items()
        for start in range(0, len(split), batch_size)
    ]
    workers = min(torch.get_num_threads(), len(jobs)) if runtime.device.type == "cpu" else 1
    if workers <= 1:
        return [
            {
                name: predict_logits(model, split, runtime, batch_size)
                for name, split in splits.items()
            }
            for model in models
        ]

    def run(job: tuple[int, str, int]) -> torch.Tensor:
        k, name, start = job
        images = splits[name].images[start : start + batch_size].float().div_(255)
        with torch.inference_mode(), runtime.autocast():
            return models[k](runtime.to_device(images)).float().cpu()

    threads = torch.get_num_threads()
    try:
        with (
            eval_mode(*models),
            ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool,
        ):
            outs = list(pool.map(run, jobs))
    finally:
        torch.set_num_threads(threads)
    parts: list[dict[str, list[torch.Tensor]]] = [{name: [] for name in splits} for _ in models]
    for (k, name, _), out in zip(jobs, outs, strict=True):
        parts[k][name].append(out)
    return [{name: torch.cat(p[name]) for name in splits} for p in parts]


def predict_probs(
    model: nn.Module, split: Split, runtime: Runtime, batch_size: int | None = None
) -> torch.Tensor:
    """Softmax probabilities of ``model`` on ``split``: float32 [N, K]."""
    return predict_logits(model, split, runtime, batch_size).softmax(-1)


@torch.inference_mode()
def predict_member_logits(
    student: BatchEnsemble, split: Split, runtime: Runtime, batch_size: int | None = None
) -> torch.Tensor:
    """Each BatchEns member's logits on ``split`` from one BE forward per batch: [M, N, K], CPU."""
    batch_size = batch_size or max(1, eval_batch_size(runtime) // student.members)
    out = []
    with eval_mode(student):
        for images, _ in iterate_batches(split, batch_size):
            with runtime.autocast():
                out.append(student.forward_members(runtime.to_device(images)).float().cpu())
    return torch.cat(out, dim=1)  # [M, N, K]


def predict_member_probs(
    student: BatchEnsemble, split: Split, runtime: Runtime, batch_size: int | None = None
) -> torch.Tensor:
    """Each BatchEns member's probabilities on ``split``: float32 [M, N, K] on the CPU."""
    return predict_member_logits(student, split, runtime, batch_size).softmax(-1)


class _ChannelsLast(nn.Module):
    """Feeds its network NHWC images (the network's 4-d weights are NHWC too)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)


def eval_copy(model: nn.Module, runtime: Runtime, probe: torch.Tensor) -> nn.Module:
    """A faster copy of ``model`` for inference only, or ``model`` itself when none is found.

    The copy has its BatchNorm layers folded into the preceding convolutions / linear layers
    (``torch.fx.experimental.optimization.fuse``; needs a network ``torch.fx`` can trace) and runs
    in channels_last on CPUs (and on GPUs when ``runtime.channels_last``). It is used only if its
    logits on ``probe`` (a batch of [0, 1] images on ``runtime.device``) match ``model``'s within
    float32 round-off; ``model`` is not modified either way.
    """
    if isinstance(model, torch.jit.ScriptModule) or not any(
        isinstance(m, nn.modules.batchnorm._BatchNorm | nn.Conv2d) for m in model.modules()
    ):
        return model
    with eval_mode(model):
        fast = _fused(model)
        if runtime.device.type == "cpu" or runtime.channels_last:
            fast = _ChannelsLast(fast.to(memory_format=torch.channels_last))
        diff = _max_rel_diff(model, fast, probe)
    if not diff <= EVAL_COPY_TOLERANCE:  # NaN too
        log.warning(
            "the fused evaluation copy of %s differs by %.1e from the network; evaluating the "
            "network itself", type(model).__name__, diff,
        )  # fmt: skip
        return model
    return fast.eval().requires_grad_(False)


def eval_member_networks(
    student: BatchEnsemble, runtime: Runtime, probe: torch.Tensor
) -> list[nn.Module] | None:
    """Every member of ``student`` as a fast plain network (:func:`eval_copy` of its fold).

    None when the members' logits on ``probe`` do not match ``student.forward_members``: then
    evaluate with :func:`predict_member_logits`.
    """
    nets = [member_network(student, m).to(runtime.device) for m in range(student.members)]
    nets = [eval_copy(net, runtime, probe) for net in nets]
    with eval_mode(student), torch.inference_mode():
        want = student.forward_members(probe).float()  # [M, B, K]
        got = torch.stack([net(probe).float() for net in nets])
    diff = _rel_diff(want, got)
    if not diff <= EVAL_COPY_TOLERANCE:  # NaN too
        log.warning(
            "the BatchEnsemble's members as plain networks differ by %.1e from its own forward "
            "pass; evaluating with the BatchEnsemble", diff,
        )  # fmt: skip
        return None
    return nets


def _fused(model: nn.Module) -> nn.Module:
    """``model`` with BatchNorm folded into convolutions (a deep copy either way)."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(model)
    except Exception as err:  # any tracing failure: keep the unfused network
        log.debug("cannot fold BatchNorm of %s (%s); using a plain copy", type(model).__name__, err)
        return copy.deepcopy(model)


@torch.inference_mode()
def _max_rel_diff(model: nn.Module, fast: nn.Module, probe: torch.Tensor) -> float:
    return _rel_diff(model(probe).float(), fast(probe).float())


def _rel_diff(want: torch.Tensor, got: torch.Tensor) -> float:
    """max |want − got| over the logits' scale (at least 1): float32 round-off is ~1e-6."""
    if want.shape != got.shape:
        return float("inf")
    scale = max(1.0, float(want.abs().max()))
    return float((want - got).abs().max()) / scale
