"""Fold a BatchEnsemble into a plain network of its base architecture: one member's, or the mean's.

BatchNorm (and every layer without fast weights) is shared by the members, so with fixed fast
weights (r, s, b) a BE layer is a plain layer with ``W' = W ⊙ (s rᵀ)`` (per group for grouped
convs) and ``bias' = bias ⊙ s + b``. Weight averaging
(:mod:`ensc.compress.average`) folds the mean fast weights; fast evaluation folds each member.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ensc.models.batchensemble import BE_LAYERS, BatchEnsemble, BEConv2d, BELinear, rank1_scale


def member_network(be: BatchEnsemble, member: int) -> nn.Module:
    """Member ``member`` of ``be`` as a plain network of the base architecture, in eval mode.

    The same fold as weight averaging (:func:`ensc.compress.average.average`) with that member's fast weights instead of their mean:
    ``W' = W ⊙ (s_m r_mᵀ)``, ``bias' = bias ⊙ s_m + b_m``, BatchNorm shared. Its logits equal
    ``be.forward_members(x)[member]`` up to float32 round-off; evaluation uses it because a plain
    network can have its BatchNorm folded into its convolutions. ``be`` is not modified.
    """
    check_be(be, "member_network")
    if not 0 <= member < be.members:
        raise ValueError(f"member must be in [0, {be.members}); got {member}")
    return fold(be, member=member)


def fold(be: BatchEnsemble, member: int | None) -> nn.Module:
    """``be`` as a plain network of its base architecture, in eval mode: every BE layer folded
    with the mean fast weights (``member=None``, weight averaging) or with those of one member."""
    net = copy.deepcopy(be.net)
    folded: dict[int, nn.Module] = {}  # id(BE layer) -> plain layer, for layers under two names
    for name, module in list(net.named_modules(remove_duplicate=False)):
        if not isinstance(module, BE_LAYERS):
            continue
        if id(module) not in folded:
            folded[id(module)] = _fold_layer(module, member)
        if name == "":  # the network is a single BE layer
            net = folded[id(module)]
        else:
            parent_name, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent_name), child, folded[id(module)])
    return net.eval()


@torch.no_grad()
def _fold_layer(layer: BEConv2d | BELinear, member: int | None = None) -> nn.Conv2d | nn.Linear:
    """The plain layer with the mean fast weights (``member=None``) or those of one member."""

    # Fold in float64 on the CPU (MPS has no float64), then cast back to the layer's dtype.
    def f64(t: Tensor) -> Tensor:
        return t.detach().to("cpu", torch.float64)

    def pick(t: Tensor) -> Tensor:  # [M, features] -> [features]
        return f64(t).mean(0) if member is None else f64(t[member])

    r_bar = pick(layer.r)  # [M, in] -> [in]
    s_bar = pick(layer.s)  # [M, out] -> [out]
    weight = f64(layer.weight)  # [out, in/groups, kh, kw] for convs, [out, in] for linears
    weight = weight * rank1_scale(s_bar, r_bar, weight.dim(), getattr(layer, "groups", 1))
    bias = f64(layer.bias) * s_bar if layer.bias is not None else None  # [out]
    if layer.member_bias is not None:
        b_bar = pick(layer.member_bias)  # [M, out] -> [out]
        bias = b_bar if bias is None else bias + b_bar

    factory = {"device": layer.weight.device, "dtype": layer.weight.dtype}
    plain: nn.Conv2d | nn.Linear
    if isinstance(layer, BEConv2d):
        plain = nn.Conv2d(
            layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
            layer.padding, layer.dilation, layer.groups, bias is not None, layer.padding_mode,
            **factory,
        )  # fmt: skip
    else:
        plain = nn.Linear(layer.in_features, layer.out_features, bias is not None, **factory)
    plain.weight.copy_(weight)
    if bias is not None:
        plain.bias.copy_(bias)
    plain.train(layer.training)
    return plain


def check_be(be: object, fn: str) -> None:
    """A TypeError that says how to get a BatchEnsemble, for anything else."""
    if not isinstance(be, BatchEnsemble):
        raise TypeError(
            f"{fn} needs a BatchEnsemble; got {type(be).__name__}. Build one with "
            "ensc.models.batchensemble.to_batchensemble(model, members=M)"
        )
