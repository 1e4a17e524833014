"""BatchEnsemble: M members sharing one network's weights (Wen et al. 2020, https://arxiv.org/abs/2002.06715).

Every ``nn.Conv2d`` / ``nn.Linear`` of a base network keeps its shared weight ``W`` (and bias) and
gets per-member fast weights ``r`` [M, in], ``s`` [M, out] and, where the layer has a bias, a
per-member bias ``member_bias`` [M, out]. Member m computes ([WA] §2, Wen et al. eq. 1)::

    y_m = (layer(x_m ⊙ r_m) ⊙ s_m) + member_bias_m      # layer = the shared conv / matmul + bias

which is the plain layer with weight ``W ⊙ (s_m r_mᵀ)`` and bias ``bias ⊙ s_m + member_bias_m``
(for a grouped conv, output channel o's weights see the r of its group's input channels:
:func:`rank1_scale`).
That is how the layers compute it: M small per-member weights, one conv / matmul per member
chunk. Same arithmetic as scaling the activations, but autograd keeps only the layer input for
the backward pass instead of three activation-sized tensors per layer, which halves a BE
student's training memory (``docs/bench-distill.md``).
BatchNorm layers stay shared: one BN over the whole M·B batch, which keeps averaging exact
(docs/method.md §8); so does every layer other than an exact Conv2d/Linear (the rule:
:func:`to_batchensemble`).

Ensemble-axis convention, used by every module here: the input is ``(M*B, C, H, W)``, made of M
contiguous chunks of B examples, chunk m being member m's input; logits ``(M*B, K)`` are viewed
as ``(M, B, K)``. To predict with all members on one batch, tile it M times
(:meth:`BatchEnsemble.forward_members`).
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from ensc.errors import ConfigError, one_line

__all__ = [
    "BE_LAYERS",
    "FAST_WEIGHT_INITS",
    "rank1_scale",
    "BEConv2d",
    "BELinear",
    "BatchEnsemble",
    "to_batchensemble",
]

logger = logging.getLogger(__name__)

# "ones": [WA], members start identical (needed for averaging); "normal": [DM], N(1, 0.5²);
# "spread": members start apart (1 + ε_m − mean ε, ε ~ N(0, SPREAD_STD²)) but their average is
# exactly 1, so the averaged network starts as the base model (a warm start stays intact).
FAST_WEIGHT_INITS = ("ones", "normal", "spread")
SPREAD_STD = 0.1


def _check_members(members: Any) -> int:
    if isinstance(members, bool) or not isinstance(members, int):
        raise TypeError(f"members must be an int >= 1; got {members!r}")
    if members < 1:
        raise ValueError(f"members must be >= 1; got {members}")
    return members


def _check_init(init: str) -> str:
    if init not in FAST_WEIGHT_INITS:
        raise ValueError(
            f"unknown fast-weight init {init!r}: choose one of {', '.join(FAST_WEIGHT_INITS)}"
        )
    return init


def _check_batch(x: Tensor, members: int) -> None:
    if x.dim() == 0:
        raise ValueError("BatchEnsemble inputs need a batch axis (M*B, ...); got a scalar")
    n = x.shape[0]
    if n % members != 0:
        raise ValueError(
            f"batch of {n} is not divisible by M={members}: tile inputs with "
            f"x.repeat({members}, 1, 1, 1) (chunk m = member m), or call "
            "BatchEnsemble.forward_members(x) on a plain batch"
        )


def rank1_scale(s: Tensor, r: Tensor, weight_dim: int, groups: int = 1) -> Tensor:
    """``s rᵀ`` shaped like a weight ``[..., out, in/groups, 1, ...]`` (leading axes of s, r kept),
    so that ``W ⊙ scale`` is the layer that scales its input by r and its output by s.

    A grouped conv's output channel o only sees its group's in/groups input channels, so its row
    takes the r of those channels (groups=1: the plain outer product).
    """
    if groups == 1:
        scale = s.unsqueeze(-1) * r.unsqueeze(-2)  # [..., out, in]
    else:
        per_group = r.unflatten(-1, (groups, -1))  # [..., groups, in/groups]
        per_out = per_group.repeat_interleave(s.shape[-1] // groups, dim=-2)  # [..., out, in/g]
        scale = s.unsqueeze(-1) * per_out
    return scale.view(*scale.shape, *([1] * (weight_dim - 2)))


class _BEMixin:
    """Fast weights r, s and member biases shared by :class:`BEConv2d` and :class:`BELinear`."""

    members: int
    init: str
    r: nn.Parameter
    s: nn.Parameter
    member_bias: nn.Parameter | None
    weight: Tensor
    bias: Tensor | None

    def _add_fast_weights(
        self, in_features: int, out_features: int, members: int, init: str, member_bias: bool
    ) -> None:
        self.members = _check_members(members)
        self.init = _check_init(init)
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.r = nn.Parameter(torch.empty(members, in_features, **factory))  # [M, in]
        self.s = nn.Parameter(torch.empty(members, out_features, **factory))  # [M, out]
        if member_bias:
            self.member_bias = nn.Parameter(torch.zeros(members, out_features, **factory))
        else:
            self.register_parameter("member_bias", None)  # type: ignore[attr-defined]
        self.reset_fast_weights()

    @torch.no_grad()
    def reset_fast_weights(self) -> None:
        """Re-draw r, s from ``self.init`` (global torch RNG for "normal", "spread"); zero member biases."""
        for p in (self.r, self.s):
            if self.init == "ones":
                p.fill_(1.0)
            elif self.init == "normal":
                p.normal_(1.0, 0.5)
            else:  # spread: centred across members, so the members' mean is exactly 1
                eps = torch.randn_like(p) * SPREAD_STD
                p.copy_(1.0 + eps - eps.mean(0, keepdim=True))
        if self.member_bias is not None:
            self.member_bias.zero_()

    def member_weights(self) -> Tensor:
        """``W ⊙ (s_m r_mᵀ)`` for every member: [M, out, in/groups, *kernel]."""
        scale = rank1_scale(self.s, self.r, self.weight.dim(), getattr(self, "groups", 1))
        return self.weight.unsqueeze(0) * scale

    def member_biases(self) -> Tensor | None:
        """``bias ⊙ s_m + member_bias_m`` for every member: [M, out], or None without biases."""
        bias = self.bias * self.s if self.bias is not None else None
        if self.member_bias is not None:
            bias = self.member_bias if bias is None else bias + self.member_bias
        return bias

    def _be_extra_repr(self) -> str:
        return f"members={self.members}, init={self.init!r}, member_bias={self.member_bias is not None}"


class BEConv2d(_BEMixin, nn.Conv2d):
    """``nn.Conv2d`` with BatchEnsemble fast weights; ``weight``/``bias`` keep their plain names.

    Input ``(M*B, C_in, H, W)`` in member chunks (see the module docstring). Grouped and
    depthwise convs work too: ``r`` has ``in_channels`` entries and scales whole input channels,
    so the fold (docs/method.md §8) stays a rescaling of ``W`` (:func:`rank1_scale`).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, device, dtype: as for ``nn.Conv2d``.
        members: ensemble size M.
        init: fast-weight init, ``"ones"`` ([WA]) or ``"normal"`` ([DM], N(1, 0.5²)).
        member_bias: give each member its own bias (init 0); default: iff ``bias``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        members: int,
        init: str = "ones",
        member_bias: bool | None = None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, device, dtype,
        )  # fmt: skip
        has_member_bias = bias if member_bias is None else member_bias
        self._add_fast_weights(in_channels, out_channels, members, init, has_member_bias)

    @classmethod
    def from_layer(
        cls, layer: nn.Conv2d, members: int, init: str = "ones", *, member_bias: bool | None = None
    ) -> BEConv2d:
        """A BE version of ``layer`` whose shared ``weight``/``bias`` are copies of the layer's."""
        if not isinstance(layer, nn.Conv2d):
            raise TypeError(f"BEConv2d.from_layer needs an nn.Conv2d; got {type(layer).__name__}")
        be = cls(
            layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
            layer.padding, layer.dilation, layer.groups, layer.bias is not None,
            layer.padding_mode, layer.weight.device, layer.weight.dtype,
            members=members, init=init, member_bias=member_bias,
        )  # fmt: skip
        _copy_shared(layer, be)
        return be

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(
                f"BEConv2d expects a batched input (M*B, C, H, W); got shape {tuple(x.shape)}"
            )
        _check_batch(x, self.members)
        # unbind, not indexing: its backward is one stack, where indexing would
        # zero-fill and add a full-size gradient per member (a tenth of a ResNet-32 step)
        chunks = x.unflatten(0, (self.members, -1)).unbind(0)  # M views [B, C_in, H, W]
        weights = self.member_weights().unbind(0)
        biases = self.member_biases()
        biases = [None] * self.members if biases is None else biases.unbind(0)
        outs = [
            self._conv_forward(c, w, b) for c, w, b in zip(chunks, weights, biases, strict=True)
        ]
        return torch.cat(outs)  # [M*B, C_out, H', W']

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._be_extra_repr()}"


class BELinear(_BEMixin, nn.Linear):
    """``nn.Linear`` with BatchEnsemble fast weights; ``weight``/``bias`` keep their plain names.

    Input ``(M*B, ..., in_features)`` in member chunks (see the module docstring).

    Args:
        in_features, out_features, bias, device, dtype: as for ``nn.Linear``.
        members: ensemble size M.
        init: fast-weight init, ``"ones"`` ([WA]) or ``"normal"`` ([DM], N(1, 0.5²)).
        member_bias: give each member its own bias (init 0); default: iff ``bias``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        members: int,
        init: str = "ones",
        member_bias: bool | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        has_member_bias = bias if member_bias is None else member_bias
        self._add_fast_weights(in_features, out_features, members, init, has_member_bias)

    @classmethod
    def from_layer(
        cls, layer: nn.Linear, members: int, init: str = "ones", *, member_bias: bool | None = None
    ) -> BELinear:
        """A BE version of ``layer`` whose shared ``weight``/``bias`` are copies of the layer's."""
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"BELinear.from_layer needs an nn.Linear; got {type(layer).__name__}")
        be = cls(
            layer.in_features, layer.out_features, layer.bias is not None,
            layer.weight.device, layer.weight.dtype,
            members=members, init=init, member_bias=member_bias,
        )  # fmt: skip
        _copy_shared(layer, be)
        return be

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2:
            raise ValueError(
                f"BELinear expects a batched input (M*B, ..., in); got shape {tuple(x.shape)}"
            )
        _check_batch(x, self.members)
        chunks = x.unflatten(0, (self.members, -1))  # [M, B, ..., in]
        rows = chunks.flatten(1, -2)  # [M, N, in]
        weights, biases = self.member_weights(), self.member_biases()  # [M, out, in], [M, out]
        if biases is None:
            y = torch.bmm(rows, weights.transpose(1, 2))
        else:
            y = torch.baddbmm(biases.unsqueeze(1), rows, weights.transpose(1, 2))  # [M, N, out]
        return y.view(*chunks.shape[:-1], -1).flatten(0, 1)  # [M*B, ..., out]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._be_extra_repr()}"


# The BatchEnsemble layer types, e.g. for isinstance checks when folding (docs/method.md §8).
BE_LAYERS = (BEConv2d, BELinear)


@torch.no_grad()
def _copy_shared(src: nn.Conv2d | nn.Linear, dst: nn.Conv2d | nn.Linear) -> None:
    dst.weight.copy_(src.weight)
    dst.weight.requires_grad_(src.weight.requires_grad)
    if src.bias is not None and dst.bias is not None:
        dst.bias.copy_(src.bias)
        dst.bias.requires_grad_(src.bias.requires_grad)


class BatchEnsemble(nn.Module):
    """M members in one network whose Conv2d/Linear layers are :class:`BEConv2d`/:class:`BELinear`.

    Built by :func:`to_batchensemble`. ``forward`` follows the module's ensemble-axis convention
    (``(M*B, ...)`` in, ``(M*B, K)`` out); :meth:`forward_members` takes a plain batch.

    Parameters fall into three disjoint groups, for optimizers that treat them differently
    (docs/method.md §6, fast-weight regularization):
    :meth:`fast_weight_parameters` (r, s: [WA] decays them towards 1 and scales their gradients
    by M), :meth:`member_bias_parameters` (per-member biases: gradient scaled by M like r, s, but
    ordinary decay, not towards 1) and :meth:`shared_parameters` (everything else).

    Args:
        net: a network already containing BE layers, all with ``members`` members.
        members: ensemble size M.
    """

    def __init__(self, net: nn.Module, members: int) -> None:
        super().__init__()
        members = _check_members(members)
        layers = [m for m in net.modules() if isinstance(m, BE_LAYERS)]
        if not layers:
            raise ValueError(
                f"{type(net).__name__} has no BEConv2d/BELinear layer; build a BatchEnsemble "
                "from a plain network with to_batchensemble(model, members=M)"
            )
        wrong = sorted({layer.members for layer in layers} - {members})
        if wrong:
            raise ValueError(
                f"BatchEnsemble of M={members} holds BE layers with members={wrong}; "
                "convert the whole network with one members value"
            )
        self.net = net
        self.members = members

    def forward(self, x: Tensor) -> Tensor:
        _check_batch(x, self.members)
        return self.net(x)  # [M*B, ...] -> [M*B, K]

    def forward_members(self, x: Tensor) -> Tensor:
        """Every member's logits ``(M, B, K)`` on the same plain batch ``x`` of shape ``(B, ...)``."""
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(
                f"forward_members needs a non-empty batch (B, ...); got {tuple(x.shape)}"
            )
        b = x.shape[0]
        tiled = x.repeat(self.members, *([1] * (x.dim() - 1)))  # [B, ...] -> [M*B, ...]
        return self(tiled).unflatten(0, (self.members, b))  # [M*B, K] -> [M, B, K]

    def be_layers(self) -> Iterator[BEConv2d | BELinear]:
        """The BE layers of :attr:`net`, in module order."""
        for module in self.net.modules():
            if isinstance(module, BE_LAYERS):
                yield module

    def fast_weight_parameters(self) -> Iterator[nn.Parameter]:
        """The fast weights r, s of every BE layer (not the member biases)."""
        for layer in self.be_layers():
            yield layer.r
            yield layer.s

    def member_bias_parameters(self) -> Iterator[nn.Parameter]:
        """The per-member biases of the BE layers that have one."""
        for layer in self.be_layers():
            if layer.member_bias is not None:
                yield layer.member_bias

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """All parameters that are neither fast weights nor member biases (W, biases, BN)."""
        own = {id(p) for p in self.fast_weight_parameters()}
        own |= {id(p) for p in self.member_bias_parameters()}
        for p in self.parameters():
            if id(p) not in own:
                yield p

    def extra_repr(self) -> str:
        return f"members={self.members}"


def to_batchensemble(
    model: nn.Module, *, members: int, init: str = "ones", example: Tensor | None = None
) -> BatchEnsemble:
    """A BatchEnsemble of ``members`` members built on a deep copy of ``model``.

    Which layers get fast weights (docs/method.md §8): every ``nn.Conv2d`` (grouped and depthwise
    too) and ``nn.Linear`` of exactly that type becomes a :class:`BEConv2d` / :class:`BELinear`
    with the same shared weights, so the state-dict keys of the plain network are kept (plus
    ``r``, ``s``, ``member_bias``). Every other layer stays shared by all members, which keeps the
    fold exact: normalization layers (BatchNorm, LayerNorm, GroupNorm, ...) silently; other layers
    with parameters, logged once in one line: subclasses that may compute something else
    (timm's ``StdConv2d``, ``Conv2dSame``), other layer types (``Conv1d``, ``ConvTranspose2d``,
    ``Embedding``, ...), and Conv2d/Linear layers that the network may not call on its batch
    axis: inside ``nn.MultiheadAttention`` (it uses ``out_proj.weight`` directly) or any module
    with ``batch_first=False``, with forward hooks (old-style weight/spectral norm), whose
    weight is also registered in another module (tied), or, given an ``example`` input, that a
    forward pass on it never calls (the network uses their weight itself, as torchvision Swin's
    ``ShiftedWindowAttention`` passes ``qkv.weight`` to ``F.linear``: fast weights there would
    get no gradient and break the fold). A network with uninitialized lazy layers or
    TorchScript submodules is refused (:class:`~ensc.errors.ConfigError`).
    ``model`` is not modified. Extra parameters: Σ_layers M·(in + out [+ out if biased])
    (docs/method.md §3).

    Args:
        model: any network; the result's members take batches ``(M*B, ...)`` in member chunks.
        members: ensemble size M >= 1.
        init: fast-weight init, ``"ones"`` ([WA]; members start as the base model) or
            ``"normal"`` ([DM]; N(1, 0.5²) from the global torch RNG).
        example: a batch the network takes (e.g. 2 images); one eval-mode forward pass on it,
            without gradients, finds the layers never called. Without it, such layers get fast
            weights that do nothing: pass one for networks not written for BatchEnsemble.
    """
    members = _check_members(members)
    init = _check_init(init)
    if any(isinstance(m, BE_LAYERS) for m in model.modules()):
        raise ValueError(
            f"{type(model).__name__} already contains BatchEnsemble layers; pass the plain "
            "base network to to_batchensemble"
        )
    _refuse_unsupported(model)
    net = copy.deepcopy(model)
    keep = _kept_shared(net)
    if example is not None:
        keep |= _never_called(net, example, keep)
    converted: dict[int, nn.Module] = {}  # id(plain layer) -> its BE layer (for shared modules)
    # remove_duplicate=False: a layer registered under two names is replaced under both.
    for name, module in list(net.named_modules(remove_duplicate=False)):
        be_cls = _BE_TYPES.get(type(module))
        if be_cls is None or id(module) in keep:
            continue
        if id(module) not in converted:
            converted[id(module)] = be_cls.from_layer(module, members, init)
        be_layer = converted[id(module)]
        if name == "":  # the model itself is a single Conv2d/Linear
            net = be_layer
        else:
            parent_name, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent_name), child, be_layer)
    if not converted:
        raise ValueError(
            f"{type(model).__name__} has no nn.Conv2d or nn.Linear layer to give fast weights; "
            "BatchEnsemble needs at least one"
        )
    _log_shared(net)
    return BatchEnsemble(net, members)


# exact types that get fast weights; subclasses may compute something else and stay shared
_BE_TYPES: dict[type[nn.Module], type[BEConv2d] | type[BELinear]] = {
    nn.Conv2d: BEConv2d,
    nn.Linear: BELinear,
}
# shared by design (BatchNorm over the whole M·B batch; the others per example): never logged
_NORM_LAYERS = tuple(
    t
    for t in (_NormBase, nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None))
    if t is not None
)


def _refuse_unsupported(model: nn.Module) -> None:
    """A ConfigError naming the first layer that cannot be copied or converted at all."""
    for name, module in model.named_modules():
        where = f"{name or '<root>'} ({type(module).__name__})"
        if isinstance(module, torch.jit.ScriptModule):
            raise ConfigError(
                f"layer {where} is TorchScript, whose layers cannot be swapped for BatchEnsemble "
                "ones; build the student from the plain nn.Module (before torch.jit.script/trace)"
            )
        if any(
            isinstance(p, nn.parameter.UninitializedParameter)
            for p in module.parameters(recurse=False)
        ):
            raise ConfigError(
                f"layer {where} has uninitialized (lazy) parameters, whose shapes BatchEnsemble "
                "needs; run one forward pass on a batch before converting, or use sized layers"
            )


def _kept_shared(net: nn.Module) -> set[int]:
    """ids of the Conv2d/Linear layers of ``net`` that must stay shared (see to_batchensemble)."""
    owners: dict[int, int] = {}  # id(parameter) -> number of modules registering it
    for module in {id(m): m for m in net.modules()}.values():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    keep: set[int] = set()
    for scope in net.modules():
        if isinstance(scope, nn.MultiheadAttention) or _sequence_first(scope):
            keep |= {id(m) for m in scope.modules() if m is not scope}
    for module in net.modules():
        if type(module) not in _BE_TYPES:
            continue
        hooked = bool(module._forward_hooks or module._forward_pre_hooks)
        tied = any(owners[id(p)] > 1 for p in module.parameters(recurse=False))
        if hooked or tied or not isinstance(module._parameters.get("weight"), nn.Parameter):
            keep.add(id(module))
    return keep


def _never_called(net: nn.Module, example: Tensor, keep: set[int]) -> set[int]:
    """ids of the Conv2d/Linear layers of ``net`` (besides ``keep``) that one eval-mode forward
    pass on ``example`` does not call; every module's train/eval mode is restored."""
    candidates = {id(m): m for m in net.modules() if type(m) in _BE_TYPES and id(m) not in keep}
    called: set[int] = set()
    hooks = [
        m.register_forward_hook(lambda module, args, out: called.add(id(module)))
        for m in candidates.values()
    ]
    modes = [(m, m.training) for m in net.modules()]
    first = next(itertools.chain(net.parameters(), net.buffers()), example)
    try:
        net.eval()
        with torch.no_grad():
            net(example.to(first.device))
    except Exception as err:  # the caller's network on the caller's data: say which failed
        raise ConfigError(
            f"{type(net).__name__} fails on an example batch of shape {tuple(example.shape)} "
            f"({type(err).__name__}: {one_line(err)})"
        ) from err
    finally:
        for hook in hooks:
            hook.remove()
        for module, mode in modes:
            module.training = mode
    return set(candidates) - called


def _sequence_first(module: nn.Module) -> bool:
    """Whether ``module`` works on (sequence, batch, ...) tensors: ``batch_first=False`` on it or
    on an attention layer directly inside it (``nn.TransformerEncoderLayer`` and its kind)."""
    if getattr(module, "batch_first", None) is False:
        return True
    return any(
        isinstance(child, nn.MultiheadAttention) and not child.batch_first
        for child in module.children()
    )


def _log_shared(net: nn.Module) -> None:
    """One log line: the layers with parameters (besides normalization) left shared by all members."""
    shared: dict[str, list[str]] = {}  # type name -> module paths
    seen: set[int] = set()
    for name, module in net.named_modules():
        if isinstance(module, BE_LAYERS + _NORM_LAYERS) or id(module) in seen:
            continue
        seen.add(id(module))
        if any(True for _ in module.parameters(recurse=False)):
            shared.setdefault(type(module).__name__, []).append(name or "<root>")
    if shared:
        listing = ", ".join(
            f"{len(paths)} {kind} ({paths[0]}{', …' if len(paths) > 1 else ''})"
            for kind, paths in shared.items()
        )
        logger.warning(
            "layers with parameters that stay shared by all members (only nn.Conv2d/nn.Linear "
            "called on the batch get fast weights): %s",
            listing,
        )
