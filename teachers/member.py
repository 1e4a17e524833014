"""One teacher member: a file plus its manifest entry → a frozen module taking [0, 1] pixels.

Weight-only files get their architecture built (from ensc's registry or the user's code, sized from
the arguments or else from the weights) and their state_dict loaded with errors that name the keys.
Files that carry their own code are used as they are. The mean/std a member was trained with goes
in front of it (into the first layer of ensc architectures, a :class:`NormalizedModel` wrapper
otherwise), and one small test batch tells its number of classes and checks it returns logits.
"""

from __future__ import annotations

import inspect
import json
import logging
from typing import Any

import torch
from torch import nn

from ensc.errors import CheckpointError, ConfigError, one_line
from ensc.models.checkpoint import ModelSpec, check_finite
from ensc.models.normalize import Normalize, NormalizedModel
from ensc.teachers.formats import MemberFile, read_member_file
from ensc.teachers.manifest import MemberEntry

log = logging.getLogger(__name__)

DEFAULT_IMAGE_SIZE = (32, 32)  # test-batch size for members that record none (and no dataset hint)


def load_member(
    entry: MemberEntry, *, unsafe_load: bool = False, hint: tuple[int, int, int] | None = None
) -> tuple[nn.Module, ModelSpec, dict[str, Any]]:
    """The member in eval mode, its spec, and how it was read (format, notes, normalization).

    ``hint`` is (channels, height, width) of the data, for members that do not record their input.
    """
    file = read_member_file(entry.path, prefix=entry.prefix, unsafe_load=unsafe_load)
    if file.checkpoint is None:  # ensc's own checkpoints are checked as they are read
        check_finite(
            file.state_dict if file.module is None else file.module.state_dict(), entry.path
        )
    info: dict[str, Any] = {"format": file.format, "notes": list(file.notes)}
    where = f"member {entry.path}"
    if file.checkpoint is not None:  # ensc's own: it knows its architecture and normalization
        ckpt = file.checkpoint
        _warn_ignored(entry, ckpt.spec)
        model = ckpt.build_model()
        if entry.mean is not None:
            model = _apply_normalization(model, ckpt.spec.in_channels, entry, where)
        info.update(ckpt.info, normalization="recorded in the checkpoint")
        return model, ckpt.spec, info

    channels = _in_channels(file, entry, hint)
    if file.state_dict is not None:
        if not entry.arch:
            raise CheckpointError(
                f"{entry.path} holds only weights ({file.format}); say which architecture they "
                'belong to with --teacher-arch NAME or package.module:callable (or "arch" in ensemble.json)'
            )
        arch = entry.arch
        model = _build_arch(entry, file.state_dict, channels, where)
        _load_weights(model, file.state_dict, entry, where, info)
    else:
        arch = file.format if file.format != "pickled module" else _class_path(file.module)
        model = file.module
    model.eval()
    if entry.mean is not None:
        model = _apply_normalization(model, channels, entry, where)
        info["normalization"] = "from ensemble.json"
    size = _image_size(file, hint)
    num_classes = _probe(model, channels, size, where)
    expected = entry.kwargs.get("num_classes")
    if expected is not None and expected != num_classes:
        raise CheckpointError(f"{where} predicts {num_classes} classes, not num_classes={expected}")
    mean, std, inside = _normalization_of(model, channels)
    info.setdefault("normalization", "inside the model" if inside else "none")
    spec = ModelSpec(
        arch=arch,
        num_classes=num_classes,
        in_channels=channels,
        image_size=size,
        mean=mean,
        std=std,
        arch_kwargs=dict(entry.kwargs) if file.state_dict is not None else {},
    )
    return model, spec, info


def _in_channels(file: MemberFile, entry: MemberEntry, hint: tuple[int, int, int] | None) -> int:
    """From the arguments, the export signature, the first conv kernel, the mean, or the dataset."""
    if "in_channels" in entry.kwargs:
        return int(entry.kwargs["in_channels"])
    if file.input_shape and len(file.input_shape) == 4 and file.input_shape[1]:
        return int(file.input_shape[1])
    weights = file.state_dict if file.state_dict is not None else file.module.state_dict()
    conv = next((v for v in weights.values() if v.ndim == 4), None)
    if conv is not None:
        return int(conv.shape[1])  # [out, in, kh, kw]
    if entry.mean is not None and len(entry.mean) > 1:
        return len(entry.mean)
    return hint[0] if hint else 3


def _image_size(file: MemberFile, hint: tuple[int, int, int] | None) -> tuple[int, int]:
    if file.input_shape and len(file.input_shape) == 4 and all(file.input_shape[2:]):
        return int(file.input_shape[2]), int(file.input_shape[3])
    return (hint[1], hint[2]) if hint else DEFAULT_IMAGE_SIZE


def _warn_ignored(entry: MemberEntry, spec: ModelSpec) -> None:
    """An ensc checkpoint is built from the architecture it records: say which given settings
    (--teacher-arch/-kwargs, "arch"/"kwargs" in ensemble.json) it does not use."""
    recorded = {
        **spec.arch_kwargs,
        "num_classes": spec.num_classes,
        "in_channels": spec.in_channels,
    }
    other = {k: v for k, v in entry.kwargs.items() if recorded.get(k, object()) != v}
    ignored = ([f"arch {entry.arch}"] if entry.arch and entry.arch != spec.arch else []) + (
        [f"kwargs {json.dumps(other, sort_keys=True, default=str)}"] if other else []
    )
    if ignored:
        log.warning(
            "%s is an ensc %s checkpoint, built as it records; ignoring %s",
            entry.path, spec.arch, " and ".join(ignored),
        )  # fmt: skip


def _build_arch(
    entry: MemberEntry, state_dict: dict[str, torch.Tensor], channels: int, where: str
) -> nn.Module:
    """The architecture of ``entry``, sized from its arguments or else from the weights."""
    from ensc.models import build_model
    from ensc.models.registry import is_library_arch

    kwargs = {k: v for k, v in entry.kwargs.items() if k not in ("num_classes", "in_channels")}
    num_classes = entry.kwargs.get("num_classes")
    if num_classes is None:  # the classifier is the last matrix in the state_dict
        last = [v for k, v in state_dict.items() if v.ndim == 2 and k.endswith("weight")]
        if not last:
            raise ConfigError(
                f"{where}: cannot tell the number of classes from its weights; pass "
                """--teacher-arch-kwargs '{"num_classes": K}' (or "kwargs" in ensemble.json)"""
            )
        num_classes = int(last[-1].shape[0])
    arch = entry.arch
    # torchvision:NAME / timm:NAME are built by the registry, like ensc's own names
    fn = _user_callable(arch, where) if ":" in arch and not is_library_arch(arch) else None
    try:
        if fn is None:
            return build_model(arch, num_classes=num_classes, in_channels=channels, **kwargs)
        # user code gets num_classes / in_channels only if it takes them (it may fix them itself)
        names, var_keyword = _keyword_names(fn)
        if var_keyword or names is None or "num_classes" in names:
            kwargs["num_classes"] = num_classes
        if names is not None and "in_channels" in names:
            kwargs["in_channels"] = channels
        model = fn(**kwargs)
    except Exception as err:  # unknown names, bad arguments, errors inside user code
        raise ConfigError(
            f"{where}: cannot build architecture {arch!r}: {one_line(err, join=True)}"
        ) from err
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{where}: {arch} returned a {type(model).__name__}, not an nn.Module")
    return model


def _user_callable(arch: str, where: str) -> Any:
    """``package.module:callable``, resolved as ``models.registry`` allows (``--code-path``,
    ``--unsafe-load``: see :func:`~ensc.models.registry.trusted_code`)."""
    from ensc.models.registry import user_callable

    try:
        return user_callable(arch)
    except (ConfigError, ValueError, TypeError) as err:  # not allowed, not importable, not callable
        raise ConfigError(f"{where}: {one_line(err, join=True)}") from err


def _keyword_names(fn: Any) -> tuple[set[str] | None, bool]:
    """Names ``fn`` takes by keyword (None if it has no signature) and whether it takes ``**kwargs``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # some builtins and extension types have no signature
        return None, False
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def _load_weights(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    entry: MemberEntry,
    where: str,
    info: dict[str, Any],
) -> None:
    """``load_state_dict`` with errors that name the keys; only normalization buffers and
    ``num_batches_tracked`` may be missing."""
    own = model.state_dict()
    optional = {k for k in own if k.endswith("num_batches_tracked")} | {
        f"{name}.{b}" if name else b
        for name, m in model.named_modules()
        if isinstance(m, Normalize)
        for b in ("mean", "std")
    }

    def mismatch(sd: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        missing = [k for k in own if k not in sd and k not in optional]
        return missing, [k for k in sd if k not in own]

    missing, unexpected = mismatch(state_dict)
    if missing or unexpected:
        first = {k.split(".", 1)[0] + "." for k in state_dict}
        if len(first) == 1 and all("." in k for k in state_dict):  # e.g. Lightning's "model."
            stripped = {k.split(".", 1)[1]: v for k, v in state_dict.items()}
            if mismatch(stripped) == ([], []):
                state_dict, (missing, unexpected) = stripped, ([], [])
                info["notes"].append(f"common prefix {first.pop()!r} stripped")
    if missing or unexpected:
        hint = 'check the architecture (--teacher-arch / "arch" in ensemble.json)'
        prefixes = {k.split(".", 1)[0] + "." for k in unexpected}
        if len(prefixes) == 1 and len(unexpected) == len(state_dict):
            hint = f'all its keys start with {prefixes.pop()!r}: set "prefix" in ensemble.json, or {hint}'
        else:
            hint = f'{hint}, or set "prefix" in ensemble.json to strip a key prefix'
        raise CheckpointError(
            f"{where}: its weights do not fit {entry.arch}: {_keys('missing', missing)}, "
            f"{_keys('unexpected', unexpected)}; {hint}"
        )
    for key, value in state_dict.items():
        if value.shape != own[key].shape:
            raise CheckpointError(
                f"{where}: {key} has shape {list(value.shape)} in the checkpoint but "
                f"{list(own[key].shape)} in {entry.arch}; pass the matching arguments with "
                '--teacher-arch-kwargs (or "kwargs" in ensemble.json)'
            )
    model.load_state_dict(state_dict, strict=False)  # only `optional` keys can be absent


def _keys(what: str, keys: list[str]) -> str:
    if not keys:
        return f"no {what} keys"
    shown = ", ".join(keys[:3]) + (", …" if len(keys) > 3 else "")
    return f"{len(keys)} {what} key{'s' if len(keys) > 1 else ''} ({shown})"


def _apply_normalization(
    model: nn.Module, channels: int, entry: MemberEntry, where: str
) -> nn.Module:
    """Make ``model`` take [0, 1] pixels given the mean/std it was trained with."""
    wanted = Normalize(channels, entry.mean, entry.std)
    own = getattr(model, "normalize", None)
    if isinstance(own, Normalize):  # ensc architectures normalize in their first layer
        identity = bool((own.mean == 0).all() and (own.std == 1).all())
        same = (
            own.mean.shape == wanted.mean.shape
            and torch.allclose(own.mean, wanted.mean)
            and torch.allclose(own.std, wanted.std)
        )
        if not (identity or same):
            raise ConfigError(
                f"{where} already normalizes its input (mean {_rounded(own.mean)}, std "
                f"{_rounded(own.std)}); drop mean/std from its entry in ensemble.json"
            )
        own.load_state_dict(wanted.state_dict())
        return model
    return NormalizedModel(wanted, model)


def _normalization_of(
    model: nn.Module, channels: int
) -> tuple[tuple[float, ...], tuple[float, ...], bool]:
    norm = getattr(model, "normalize", None)
    if isinstance(norm, Normalize):
        return tuple(norm.mean.flatten().tolist()), tuple(norm.std.flatten().tolist()), True
    return (0.0,) * channels, (1.0,) * channels, False


def _probe(model: nn.Module, channels: int, size: tuple[int, int], where: str) -> int:
    """Run a [2, C, H, W] batch: the member must return logits [2, K]; returns K."""
    x = torch.rand(2, channels, *size, generator=torch.Generator().manual_seed(0))
    shape = f"[2, {channels}, {size[0]}, {size[1]}]"
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as err:  # whatever the member's own code raises
        raise CheckpointError(
            f"{where} fails on a test batch {shape}: {one_line(err, join=True)}; pass the --dataset it was "
            "trained on (for its image size) or check its architecture"
        ) from err
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 2:
        got = f"shape {list(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise CheckpointError(
            f"{where} returns {got} for a batch {shape}; ensc needs logits [B, num_classes]"
        )
    return int(out.shape[1])


def _class_path(module: nn.Module | None) -> str:
    cls = type(module)
    return f"{cls.__module__}:{cls.__qualname__}"


def _rounded(t: torch.Tensor) -> list[float]:
    return [round(v, 4) for v in t.flatten().tolist()]
