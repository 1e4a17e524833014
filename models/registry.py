"""Build a model by name: registered builders, ``resnet{D}`` / ``wrn{D}x{W}``, ``torchvision:NAME`` /
``timm:NAME``, or user callables."""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib
import importlib.machinery
import inspect
import logging
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from ensc.errors import ConfigError, MissingExtraError, one_line

from .normalize import Normalize, NormalizedModel
from .resnet import resnet, resnet8, resnet14, resnet20, resnet32, resnet44, resnet56, resnet110
from .wrn import wide_resnet

__all__ = [
    "check_arch_kwargs",
    "build_model",
    "call_builder",
    "is_library_arch",
    "list_models",
    "register_model",
    "trusted_code",
    "user_callable",
]

logger = logging.getLogger(__name__)

BuilderT = TypeVar("BuilderT", bound=Callable[..., nn.Module])

# name -> builder called as builder(num_classes=, in_channels=, mean=, std=, **kwargs)
_MODELS: dict[str, Callable[..., nn.Module]] = {}

# how a network handed over from Python as an object is recorded: "python:module.Class"
PYTHON_ARCH = "python:"
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


def check_arch_kwargs(kwargs: dict[str, Any], flag: str = "--arch-kwargs") -> None:
    """Refuse, in one line, builder arguments that ensc sets itself from the data."""
    fixed = sorted({"num_classes", "in_channels", "mean", "std"} & set(kwargs))
    if fixed:
        raise ConfigError(
            f"{flag} sets {', '.join(fixed)}, which ensc takes from the data; drop it"
        )


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
            ``wrn{D}x{W}`` with D = 6n+4, ``torchvision:NAME`` / ``timm:NAME`` (a library's
            classifier, untrained: :func:`is_library_arch`), or ``"package.module:callable"`` for your own
            architecture (only inside :func:`trusted_code`). The callable is called with ``**kwargs``, plus ``num_classes``,
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
    if name.startswith(PYTHON_ARCH):
        raise ConfigError(
            f"architecture {name!r} was a network handed over from Python (ensc.compress_ensemble), "
            "which ensc cannot rebuild from a name: load the checkpoint's weights into your own "
            "network (net.load_state_dict(torch.load(path, weights_only=True)['state_dict']))"
        )
    common = dict(num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)
    if is_library_arch(name):
        return _build_library_model(name, **common, **kwargs)
    if ":" in name:
        return call_builder(user_callable(name), name, **common, **kwargs)
    if name in _MODELS:
        return _MODELS[name](**common, **kwargs)
    if match := _RESNET_RE.fullmatch(name):
        return resnet(int(match[1]), **common, **kwargs)
    if match := _WRN_RE.fullmatch(name):
        return wide_resnet(int(match[1]), int(match[2]), **common, **kwargs)
    raise ValueError(
        f"Unknown model {name!r}. Available: {', '.join(list_models())}; also resnet{{D}} "
        "for any depth D = 6n+2, wrn{D}x{W} for any depth D = 6n+4 and width W, "
        "torchvision:NAME or timm:NAME, or 'package.module:callable' for your own architecture"
    )


def call_builder(
    fn: Callable[..., Any],
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    **kwargs: Any,
) -> nn.Module:
    """``fn(**kwargs)`` plus ``num_classes``/``in_channels``/``mean``/``std`` where its signature
    takes them; wrapped in :class:`NormalizedModel` when it does not normalize itself. ``name``
    is what error messages call it."""
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
    if not takes_classes:
        _check_fixed_classes(model, name, num_classes)
    if not takes_norm and (mean is not None or std is not None):
        model = NormalizedModel(Normalize(in_channels, mean, std), model)
    return model


def _check_fixed_classes(model: nn.Module, name: str, num_classes: int) -> None:
    """Refuse a builder without ``num_classes`` none of whose layers has ``num_classes`` outputs
    (any layer may be the classifier: a 1x1 conv head after squeeze-excitation Linears, ...)."""
    linears = [m.out_features for m in model.modules() if isinstance(m, nn.Linear)]
    convs = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    if linears and num_classes not in linears + convs:
        raise ValueError(
            f"{name!r} takes no num_classes argument and builds {linears[-1]} outputs, but the "
            f"data has {num_classes} classes; give it a num_classes argument"
        )


LIBRARIES = ("torchvision", "timm")  # trusted like ensc's own: their names run no user code


def is_library_arch(name: str) -> bool:
    """Whether ``name`` is ``torchvision:NAME`` or ``timm:NAME``: built without --code-path."""
    return name.partition(":")[0] in LIBRARIES and ":" in name


def _build_library_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    **kwargs: Any,
) -> nn.Module:
    """An untrained torchvision/timm classifier, normalizing inside (grayscale repeated to RGB for
    torchvision, whose models take 3 channels; timm's take ``in_chans``)."""
    library, _, arch = name.partition(":")
    taken = sorted({"weights", "pretrained", "in_chans"} & set(kwargs))
    if taken:
        raise ConfigError(
            f"{name}: ensc sets {', '.join(taken)} itself (untrained, the data's channels); "
            "drop it from the architecture's arguments"
        )
    repeat = None
    try:
        if library == "timm":
            model = _timm_model(arch, num_classes, in_channels, kwargs)
        else:
            repeat = _rgb_repeat(name, in_channels)
            model = _torchvision_model(arch, num_classes, kwargs)
    except (TypeError, ValueError) as err:  # bad arguments for that architecture
        raise ConfigError(
            f"cannot build {name} with arguments {kwargs}: {one_line(err, join=True)}"
        ) from err
    if repeat is not None or mean is not None or std is not None:
        return NormalizedModel(Normalize(in_channels, mean, std), model, repeat=repeat)
    return model


def _rgb_repeat(name: str, in_channels: int) -> int | None:
    """3 for grayscale data (the channel is repeated), None for RGB; other counts are refused."""
    if in_channels == 3:
        return None
    if in_channels == 1:
        return 3
    raise ConfigError(
        f"{name} takes 3-channel images and the data has {in_channels}; use timm:NAME "
        "(built with in_chans) or your own architecture"
    )


def _torchvision_model(arch: str, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    from torchvision import models

    _check_library_name("torchvision", arch, models.list_models(module=models))
    return models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)


def _timm_model(arch: str, num_classes: int, in_channels: int, kwargs: dict[str, Any]) -> nn.Module:
    try:
        import timm
    except ImportError as err:
        raise MissingExtraError(
            f"timm:{arch} needs the timm package: pip install 'ensc[timm]'"
        ) from err
    if not timm.is_model(arch):
        _check_library_name("timm", arch, timm.list_models())
    return timm.create_model(
        arch, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs
    )


def _check_library_name(library: str, arch: str, names: Sequence[str]) -> None:
    """A one-line ConfigError for a name the library does not have, with the closest ones."""
    if arch in names:
        return
    close = [f"{library}:{n}" for n in difflib.get_close_matches(arch, names, n=5, cutoff=0.6)]
    listing = _LIBRARY_LISTS[library]
    raise ConfigError(
        f"{library} has no classifier named {arch!r}; "
        f"{'close matches: ' + ', '.join(close) if close else 'no close match'} (all: {listing})"
    )


_LIBRARY_LISTS = {
    "torchvision": "torchvision.models.list_models(module=torchvision.models)",
    "timm": "timm.list_models()",
}


@dataclass(frozen=True)
class _Trust:
    """Where user architectures may come from: modules under ``folder``, or anywhere if ``unsafe``."""

    folder: Path | None = None
    unsafe: bool = False


_TRUST: ContextVar[_Trust | None] = ContextVar("ensc_trusted_code", default=None)


@contextlib.contextmanager
def trusted_code(folder: Path | None = None, *, unsafe: bool = False) -> Iterator[None]:
    """Let ``package.module:callable`` names resolve while the block runs: to callables defined in
    modules whose file is under ``folder`` (the user's ``--code-path``), or to anything importable
    if ``unsafe`` (``--unsafe-load``). Outside such a block only ensc's own architectures build,
    so a name read from a file (an ``ensemble.json``, a checkpoint) cannot run code from elsewhere.
    """
    resolved = Path(folder).expanduser().resolve() if folder is not None else None
    token = _TRUST.set(_Trust(resolved, unsafe))
    try:
        yield
    finally:
        _TRUST.reset(token)


def user_callable(name: str) -> Callable[..., Any]:
    """The callable ``package.module:attr`` names, imported if :func:`trusted_code` allows it;
    ValueError/TypeError say what failed, ConfigError that it is not allowed."""
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ValueError(f"Expected a model of the form 'package.module:callable'; got {name!r}")
    trust = _TRUST.get() or _Trust()  # outside trusted_code: ensc's architectures only
    if not trust.unsafe:
        _check_source(name, module_name, trust.folder)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any error while importing user code, re-raised with context
        reason = one_line(exc, join=True)  # one line, even for multi-line messages
        missing = isinstance(exc, ImportError) and trust.unsafe
        hint = "; is it installed or on PYTHONPATH?" if missing else ""
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
    if not trust.unsafe:  # the module imported from the folder, and what it names defined there
        _check_defined_in(name, module, trust.folder)
        owner = sys.modules.get(getattr(fn, "__module__", None) or "")
        if owner is None or not _is_under(getattr(owner, "__file__", None), trust.folder):
            where = f"{fn.__module__}.{getattr(fn, '__qualname__', attr)}" if owner else attr
            raise ConfigError(
                f"architecture {name!r} is {where}, defined outside the --code-path folder "
                f"{trust.folder}; {_UNSAFE_HINT}"
            )
    return fn


_UNSAFE_HINT = "pass --unsafe-load to build it anyway (runs that code: only if you trust it)"


def _check_source(name: str, module_name: str, folder: Path | None) -> None:
    """Refuse, before importing anything, a module that would not come from ``folder``."""
    if folder is None:
        raise ConfigError(
            f"architecture {name!r} is not one of ensc's: other code builds only from the folder "
            "you pass with --code-path, or from anywhere with --unsafe-load (runs that code: only "
            "if you trust it)"
        )
    module = sys.modules.get(module_name)
    if module is not None:
        _check_defined_in(name, module, folder)
    elif not _is_under(_find_in(module_name, folder), folder):
        raise ConfigError(
            f"architecture {name!r}: module {module_name} is not in the --code-path folder {folder}; "
            f"put it there, or {_UNSAFE_HINT}"
        )


def _check_defined_in(name: str, module: Any, folder: Path | None) -> None:
    file = getattr(module, "__file__", None)
    if not _is_under(file, folder):
        raise ConfigError(
            f"architecture {name!r}: module {module.__name__} is {file or 'built in'}, not in the "
            f"--code-path folder {folder}; {_UNSAFE_HINT}"
        )


def _find_in(module_name: str, folder: Path) -> str | None:
    """The file ``module_name`` would be imported from if searched for in ``folder`` only (None if
    not there); runs none of its code (nor its packages' ``__init__``)."""
    search = [str(folder)]
    spec = None
    for part in module_name.split("."):
        if spec is not None:  # a package on the way: look inside it
            if not spec.submodule_search_locations:
                return None
            search = list(spec.submodule_search_locations)
        spec = importlib.machinery.PathFinder.find_spec(part, search)
        if spec is None:
            return None
    return spec.origin


def _is_under(file: str | None, folder: Path | None) -> bool:
    return bool(file and folder) and Path(file).resolve().is_relative_to(folder)


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
