"""Weight averaging ([WA]: Nam et al., ICML 2022): fold a BatchEnsemble into one plain network.

Averaging the fast weights over members (r̄, s̄, b̄) makes all members identical; because BatchNorm
is shared, that averaged BatchEnsemble *is* a plain network of the base architecture with

    W' = W ⊙ (s̄ r̄ᵀ)   (broadcast over kernel positions),   bias' = bias ⊙ s̄ + b̄

and the same BN layers, at the inference cost of one member. The fold is exact up to float32
round-off, which :func:`fold_max_abs_diff` checks after training. The fold itself is
:func:`ensc.models.fold.fold`, which also gives one member as a plain network.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn

from ensc.models.batchensemble import BatchEnsemble
from ensc.models.fold import check_be, fold
from ensc.models.modes import eval_mode, exact_float32

__all__ = [
    "average",
    "average_fast_weights",
    "fold_max_abs_diff",
    "recalibrate_bn",
]


def average_fast_weights(be: BatchEnsemble) -> BatchEnsemble:
    """A deep copy of ``be`` whose r, s and member biases are their mean over members.

    All members of the copy compute the same function: the one :func:`average` folds into a
    plain network. ``be`` is not modified; the copy keeps its train/eval mode.
    """
    check_be(be, "average_fast_weights")
    out = copy.deepcopy(be)
    with torch.no_grad():
        for layer in out.be_layers():
            for p in (layer.r, layer.s, layer.member_bias):
                if p is not None:
                    p.copy_(p.mean(0, keepdim=True).expand_as(p))  # [1, C] -> [M, C]
    return out


def average(be: BatchEnsemble) -> nn.Module:
    """The plain base network equal to ``be`` with averaged fast weights ([WA]), in eval mode.

    A deep copy of ``be.net`` in which every :class:`BEConv2d` / :class:`BELinear` becomes an
    ``nn.Conv2d`` / ``nn.Linear`` of the same configuration with ``W' = W ⊙ (s̄ r̄ᵀ)`` and
    ``bias' = bias ⊙ s̄ + b̄``; BatchNorm and all other modules are copied unchanged. Its state-dict
    keys are those of the network ``be`` was converted from, so it loads into
    ``build_model(arch, ...)``, except for a BE layer built with ``member_bias=True`` on a
    layer without bias: its plain version gets a ``bias`` (= b̄) the base model lacks.
    (:func:`~ensc.models.batchensemble.to_batchensemble` never creates such layers.)
    ``be`` is not modified.
    """
    check_be(be, "average")
    return fold(be, member=None)


def fold_max_abs_diff(be: BatchEnsemble, plain: nn.Module, x: Tensor) -> float:
    """Largest ``|logit|`` difference between ``be`` with averaged fast weights and ``plain`` on ``x``.

    Both run in eval mode (running BN statistics) on the plain batch ``x`` ``(B, ...)``; the
    difference is taken over all members (which are identical after averaging) and classes. For
    ``plain = average(be)`` it should be float32 round-off (~1e-5); ``plain``'s mode is restored.
    """
    check_be(be, "fold_max_abs_diff")
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(
            f"fold_max_abs_diff needs a non-empty batch (B, ...); got {tuple(x.shape)}"
        )
    averaged = average_fast_weights(be).eval()
    with eval_mode(plain), torch.no_grad(), exact_float32():  # no TF32 on a GPU
        members = averaged.forward_members(x).float()  # [M, B, K]
        single = plain(x).float()  # [B, K]
    if members.shape[1:] != single.shape:
        raise ValueError(
            f"the BatchEnsemble gives logits {tuple(members.shape[1:])} per member but the plain "
            f"network gives {tuple(single.shape)}; compare a BatchEnsemble with its own average(be)"
        )
    return float((members - single).abs().max())


@torch.no_grad()
def fast_weight_spread(be: BatchEnsemble) -> dict[str, float]:
    """How far the fast weights moved: max |r − 1| over all r, s, and max |r_m − r̄| across members.

    Averaging is exact for the averaged fast weights, but the averaged network only behaves like
    its members while they stay close together; a large spread explains a large parity loss.
    """
    check_be(be, "fast_weight_spread")
    from_one = spread = 0.0
    for p in be.fast_weight_parameters():  # [M, features]
        from_one = max(from_one, float((p - 1).abs().max()))
        spread = max(spread, float((p - p.mean(0, keepdim=True)).abs().max()))
    return {"max_abs_from_one": from_one, "max_member_spread": spread}


def recalibrate_bn(
    model: nn.Module,
    batches: Iterable[Tensor] | Iterable[tuple[Tensor, ...]],
    device: torch.device | str | None = None,
    *,
    max_batches: int | None = None,
    channels_last: bool = False,
) -> nn.Module:
    """Re-estimate the BatchNorm running statistics of ``model`` on ``batches``, in place, as SWA does.

    Uses ``torch.optim.swa_utils.update_bn`` (Izmailov et al., 2018): statistics are reset, then
    set to the equal-weight average over the batches. Pass training images as tensors
    ``(B, C, H, W)`` or ``(images, labels)`` tuples; ``device`` is where they are moved first.
    ``max_batches`` stops after that many batches (a random sample of the training split
    estimates the statistics as well as the whole of it: shuffle before bounding).
    ``channels_last`` feeds the images in NHWC layout, which oneDNN's CPU convolutions run
    about 1.5x faster in train mode (the model's own layout is untouched). The passes run
    without autograd; weights are untouched and the train/eval mode is restored. Returns ``model``.
    """
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be at least 1 (or None for all); got {max_batches}")
    batches = iter(batches)
    if max_batches is not None:
        batches = itertools.islice(batches, max_batches)
    first = next(batches, None)
    if first is None:
        raise ValueError(
            "recalibrate_bn got no batches; pass an iterable of training image batches (B, C, H, W)"
        )
    stream = itertools.chain([first], batches)
    if channels_last:
        stream = (_nhwc(b) for b in stream)
    with torch.no_grad():
        update_bn(stream, model, device=device)
    return model


def _nhwc(batch: Tensor | tuple[Tensor, ...]) -> Tensor:
    images = batch[0] if isinstance(batch, list | tuple) else batch
    return images.contiguous(memory_format=torch.channels_last) if images.dim() == 4 else images
