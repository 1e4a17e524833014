"""Build a model by name: registered builders, ``resnet{D}`` / ``wrn{D}x{W}``, or user callables."""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from torch import nn

from ensc.errors import one_line

from .normalize import Normalize, NormalizedModel
from .resnet import resnet, resnet8, resnet14, resnet20, resnet32, resnet44, resnet56, resnet110
from .wrn import wide_resnet

__all__ = ["build_model", "list_models", "register_model"]

logger = logging.getLogger(__name__)

BuilderT = TypeVar("BuilderT", bound=Callable[..., nn.Module])

# name -> builder called as builder(num_classes=, in_channels=, mean=, std=, **kwargs)
_MODELS: dict[str, Callable[..., nn.Module]] = {}

_RESNET_RE = re.compile(r"resnet(\d+)")
_WRN_RE = re.compile(r"wrn(\d+)x(\d+)")


def register_model(name: str | None = None) -> Callable[[BuilderT], BuilderT]:
    """Decorator registering a builder under ``name`` (default: the function's ``__name__``).

    The builder must accept the keyword arguments ``num_classes``, ``in_channels``, ``mean``
    and ``std``. Raises ``ValueError`` if the name is already taken.
    """

    def wrapper(fn: BuilderT) -> BuilderT:
        key = name if name is not None else getattr(fn, "__name__", None)
        if not key:
            raise ValueError(f"register_model needs an explicit name for {fn!r}")
        if key in _MODELS:
            raise ValueError(f"A model named {key!r} is already registered; choose another name")
        if ":" in key:
            raise ValueError(
                f"Model names cannot contain ':' (reserved for 'module:callable'); got {key!r}"
            )
        _MODELS[key] = fn
        return fn

    return wrapper


def list_models() -> list[str]:
    """Sorted names of the registered models (any ``resnet{D}``/``wrn{D}x{W}`` also builds)."""
    return sorted(_MODELS, key=_natural_key)


def build_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a model that takes pixels in [0, 1] and returns ``[B, num_classes]`` logits.

    Args:
        name: a registered name (see :func:`list_models`), ``resnet{D}`` with D = 6n+2,
            ``wrn{D}x{W}`` with D = 6n+4, or ``"package.module:callable"`` for your own
            architecture. The callable is called with ``**kwargs``, plus ``num_classes``,
            ``in_channels``/``mean``/``std`` if its signature names them (one without
            ``num_classes`` must build ``num_classes`` outputs itself); if it does not name
            both ``mean`` and ``std`` but they are given, the model is wrapped in
            :class:`NormalizedModel`.
        num_classes: number of output logits.
        in_channels: channels of the input images.
        mean: per-channel mean of the input normalization.
        std: per-channel std of the input normalization.
        **kwargs: passed on to the builder (e.g. ``dropout`` for Wide ResNets).
    """
    common = dict(num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)
    if ":" in name:
        return _build_user_model(name, **common, **kwargs)
    if name in _MODELS:
        return _MODELS[name](**common, **kwargs)
    if match := _RESNET_RE.fullmatch(name):
        return resnet(int(match[1]), **common, **kwargs)
    if match := _WRN_RE.fullmatch(name):
        return wide_resnet(int(match[1]), int(match[2]), **common, **kwargs)
    raise ValueError(
        f"Unknown model {name!r}. Available: {', '.join(list_models())}; also resnet{{D}} "
        "for any depth D = 6n+2, wrn{D}x{W} for any depth D = 6n+4 and width W, or "
        "'package.module:callable' for your own architecture"
    )


def _build_user_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    **kwargs: Any,
) -> nn.Module:
    fn = _user_callable(name)
    params, var_keyword = _keyword_params(fn)
    # a builder that fixes its own number of classes (no num_classes argument) is checked below
    takes_classes = params is None or "num_classes" in params or var_keyword
    call_kwargs: dict[str, Any] = {**kwargs}
    if takes_classes:
        call_kwargs["num_classes"] = num_classes
    if params is not None and "in_channels" in params:
        call_kwargs["in_channels"] = in_channels
    elif in_channels != 3:
        logger.warning(
            "%s does not take in_channels; make sure it expects %d input channels",
            name,
            in_channels,
        )
    # mean/std are only passed to callables that name both; otherwise we normalize outside.
    takes_norm = params is not None and {"mean", "std"} <= params
    if takes_norm:
        call_kwargs.update(mean=mean, std=std)

    model = fn(**call_kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name!r} returned {type(model).__name__}, expected a torch.nn.Module")
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not takes_classes and classifier and classifier[-1].out_features != num_classes:
        raise ValueError(
            f"{name!r} takes no num_classes argument and builds {classifier[-1].out_features} "
            f"outputs, but the data has {num_classes} classes"
        )
    if not takes_norm and (mean is not None or std is not None):
        model = NormalizedModel(Normalize(in_channels, mean, std), model)
    return model


def _user_callable(name: str) -> Callable[..., Any]:
    """The callable ``package.module:attr`` names, imported; ValueError/TypeError say what failed."""
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ValueError(f"Expected a model of the form 'package.module:callable'; got {name!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any error while importing user code, re-raised with context
        reason = one_line(exc, join=True)  # one line, even for multi-line messages
        hint = "; is it installed or on PYTHONPATH?" if isinstance(exc, ImportError) else ""
        raise ValueError(
            f"Cannot import module {module_name!r} for model {name!r}: "
            f"{type(exc).__name__}: {reason}{hint}"
        ) from exc
    try:
        fn = functools.reduce(getattr, attr.split("."), module)
    except AttributeError as exc:
        raise ValueError(
            f"Module {module_name!r} has no attribute {attr!r} (model {name!r})"
        ) from exc
    if not callable(fn):
        raise TypeError(f"{name!r} is not callable; point to a model class or builder function")
    return fn


def _keyword_params(fn: Callable[..., Any]) -> tuple[set[str] | None, bool]:
    """Names ``fn`` accepts by keyword (``None`` if unknown) and whether it has ``**kwargs``."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins and extension types have no signature
        return None, False
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = {p.name for p in sig.parameters.values() if p.kind in kinds}
    var_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    return names, var_keyword


def _natural_key(name: str) -> tuple[object, ...]:
    """Sort 'resnet8' before 'resnet20' and 'wrn16x4' before 'wrn28x10'."""
    return tuple(int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", name))


def _register_builtin_models() -> None:
    for builder in (resnet8, resnet14, resnet20, resnet32, resnet44, resnet56, resnet110):
        register_model()(builder)
    # Wide ResNets used by [DM]/[WA] and common small variants; any wrn{D}x{W} also builds.
    for depth, width in ((16, 4), (16, 8), (28, 4), (28, 5), (28, 10), (40, 2)):
        register_model(f"wrn{depth}x{width}")(functools.partial(wide_resnet, depth, width))


_register_builtin_models()
