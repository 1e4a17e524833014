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
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from ensc.data.batches import iterate_batches
from ensc.data.splits import Split
from ensc.data.stream import StreamSplit
from ensc.engine.runtime import Runtime
from ensc.models.batchensemble import BatchEnsemble
from ensc.models.fold import member_network
from ensc.models.modes import eval_mode, exact_float32

log = logging.getLogger(__name__)

CPU_BATCH = 64  # images per forward pass on a CPU (as fast as 32, faster than 128-512)
GPU_BATCH = 512
EVAL_COPY_TOLERANCE = 1e-4  # max |Δlogit| (relative to the logits' scale) of a fast copy


def probe_batch(
    splits: Iterable[Split | StreamSplit], runtime: Runtime, n: int = 16
) -> torch.Tensor | None:
    """Up to ``n`` images of the first non-empty split, on ``runtime.device``: checks fast copies."""
    for split in splits:
        if len(split):
            first = split.take(torch.arange(min(n, len(split))))  # streamed: reads only these
            return next(iterate_batches(first, n))[0].to(runtime.device)
    return None


def eval_batch_size(runtime: Runtime) -> int:
    """Images per forward pass for evaluation: small on CPUs (cache-friendly), large on GPUs."""
    return CPU_BATCH if runtime.device.type == "cpu" else GPU_BATCH


@torch.inference_mode()
def predict_logits(
    model: nn.Module, split: Split | StreamSplit, runtime: Runtime, batch_size: int | None = None
) -> torch.Tensor:
    """Logits of ``model`` (eval mode) on every image of ``split``: float32 [N, K] on the CPU."""
    batch_size = batch_size or eval_batch_size(runtime)
    out = []
    with eval_mode(model):
        for images, _ in iterate_batches(split, batch_size):
            with runtime.eval_autocast():
                out.append(model(runtime.to_device(images)).float().cpu())
    return torch.cat(out)


def predict_logits_many(
    models: Sequence[nn.Module],
    splits: Mapping[str, Split | StreamSplit],
    runtime: Runtime,
    batch_size: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """:func:`predict_logits` of every model on every split: ``[{split name: [N, K]}]`` per model.

    On a CPU with T > 1 intra-op threads the batches run side by side on T threads with one
    intra-op thread each, instead of one after the other on a team of T: the team waits at every
    layer for its slowest thread, which costs about 10 % on an idle 2-core machine (ResNet-32s:
    1,210 vs 1,350 images/s) and much more when other processes share the cores. Every batch
    is the one :func:`predict_logits` would run, so the logits are the same up to float round-off.
    A streamed split is read once, batch by batch, every model running on each batch (a few
    batches in flight at a time).
    """
    batch_size = batch_size or eval_batch_size(runtime)
    n_jobs = len(models) * sum(-(-len(split) // batch_size) for split in splits.values())
    workers = min(torch.get_num_threads(), n_jobs) if runtime.device.type == "cpu" else 1
    streamed = any(not isinstance(split, Split) for split in splits.values())
    if workers <= 1 and not streamed:
        return [
            {
                name: predict_logits(model, split, runtime, batch_size)
                for name, split in splits.items()
            }
            for model in models
        ]

    def run(job: tuple[int, str, Callable[[], torch.Tensor]]) -> torch.Tensor:
        k, _, images = job
        with torch.inference_mode(), runtime.eval_autocast():
            return models[k](runtime.to_device(images())).float().cpu()

    parts: list[dict[str, list[torch.Tensor]]] = [{name: [] for name in splits} for _ in models]
    jobs = _jobs(len(models), splits, batch_size)
    threads = torch.get_num_threads()
    try:
        with (
            eval_mode(*models),
            ThreadPoolExecutor(
                max(1, workers), initializer=torch.set_num_threads, initargs=(1,)
            ) as pool,
        ):
            for (k, name, _), out in _map_bounded(pool, run, jobs, window=4 * max(1, workers)):
                parts[k][name].append(out)
    finally:
        torch.set_num_threads(threads)
    return [{name: torch.cat(p[name]) for name in splits} for p in parts]


Job = tuple[int, str, Callable[[], torch.Tensor]]  # (model index, split name, its batch's pixels)


def _jobs(
    n_models: int, splits: Mapping[str, Split | StreamSplit], batch_size: int
) -> Iterator[Job]:
    """Every model on every batch of every split, batch by batch: an in-memory batch is sliced
    and converted by the thread that runs it, a streamed one read once for all models."""
    for name, split in splits.items():
        if isinstance(split, Split):
            for start in range(0, len(split), batch_size):
                part = split.images[start : start + batch_size]
                for k in range(n_models):
                    yield k, name, lambda part=part: part.float().div_(255)
        else:
            for images, _ in iterate_batches(split, batch_size):
                for k in range(n_models):
                    yield k, name, lambda images=images: images


def _map_bounded(
    pool: ThreadPoolExecutor, fn: Callable[[Job], torch.Tensor], jobs: Iterator[Job], window: int
) -> Iterator[tuple[Job, torch.Tensor]]:
    """``(job, fn(job))`` in the order of ``jobs``, with at most ``window`` jobs submitted and
    not yet collected (``pool.map`` would read every streamed batch up front)."""
    pending: deque[tuple[Job, Future]] = deque()
    for job in jobs:
        pending.append((job, pool.submit(fn, job)))
        if len(pending) >= window:
            done, future = pending.popleft()
            yield done, future.result()
    while pending:
        done, future = pending.popleft()
        yield done, future.result()


def predict_probs(
    model: nn.Module, split: Split | StreamSplit, runtime: Runtime, batch_size: int | None = None
) -> torch.Tensor:
    """Softmax probabilities of ``model`` on ``split``: float32 [N, K]."""
    return predict_logits(model, split, runtime, batch_size).softmax(-1)


@torch.inference_mode()
def predict_member_logits(
    student: BatchEnsemble,
    split: Split | StreamSplit,
    runtime: Runtime,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Each BatchEns member's logits on ``split`` from one BE forward per batch: [M, N, K], CPU."""
    batch_size = batch_size or max(1, eval_batch_size(runtime) // student.members)
    out = []
    with eval_mode(student):
        for images, _ in iterate_batches(split, batch_size):
            with runtime.eval_autocast():
                out.append(student.forward_members(runtime.to_device(images)).float().cpu())
    return torch.cat(out, dim=1)  # [M, N, K]


def predict_member_probs(
    student: BatchEnsemble,
    split: Split | StreamSplit,
    runtime: Runtime,
    batch_size: int | None = None,
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
    with exact_float32():  # TF32 on a GPU would differ by ~1e-3 with or without the fusion
        return _rel_diff(model(probe).float(), fast(probe).float())


def _rel_diff(want: torch.Tensor, got: torch.Tensor) -> float:
    """max |want − got| over the logits' scale (at least 1): float32 round-off is ~1e-6."""
    if want.shape != got.shape:
        return float("inf")
    scale = max(1.0, float(want.abs().max()))
    return float((want - got).abs().max()) / scale
