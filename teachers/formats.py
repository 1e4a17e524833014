"""Read one teacher member file, whatever code saved it: detect the format, return weights or a module.

Formats are told apart by content, not by extension:

==================  =========================================================  ==================
format              what the file is                                           needs
==================  =========================================================  ==================
``ensc``            ensc's own checkpoint (``ensc train``, ``ensc compress``)  nothing
``state_dict``      ``torch.save`` of a state_dict, or of a dict holding one   an architecture
                    under state_dict / model_state_dict / model / net / weights
``safetensors``     a ``.safetensors`` state_dict (Hugging Face, timm)         an architecture
``torchscript``     ``torch.jit.save`` archive                                 nothing
``torch.export``    ``torch.export.save`` program (``.pt2``)                   nothing
``pickled module``  ``torch.save(model)``: a whole pickled ``nn.Module``       ``--unsafe-load``
==================  =========================================================  ==================

Everything loads with ``torch.load(weights_only=True)`` except a pickled module (or a dict with
other pickled objects in it), which runs code from the file and so needs ``unsafe_load=True``.
Key prefixes of DataParallel/DDP (``module.``) and torch.compile (``_orig_mod.``) are stripped.
"""

from __future__ import annotations

import io
import json
import logging
import re
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ensc.errors import CheckpointError, one_line
from ensc.fileio import not_a_file, torch_load
from ensc.models.checkpoint import Checkpoint, checkpoint_from_payload, is_ensc_payload

log = logging.getLogger(__name__)

# dict keys under which training scripts commonly store the weights, in the order tried
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")

_ZIP_MAGIC = b"PK\x03\x04"
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


@dataclass
class MemberFile:
    """What one file holds, before an architecture or a normalization is applied to it."""

    path: Path
    format: str  # ensc | state_dict | safetensors | torchscript | torch.export | pickled module
    state_dict: dict[str, torch.Tensor] | None = None  # weight formats; wrapper prefixes stripped
    module: nn.Module | None = None  # formats that carry their own code
    checkpoint: Checkpoint | None = None  # format "ensc"
    input_shape: tuple[int | None, ...] | None = None  # torch.export: [B, C, H, W], None = dynamic
    notes: list[str] = field(default_factory=list)  # how the weights were found, for `inspect`


def read_member_file(
    path: Path, *, prefix: str | None = None, unsafe_load: bool = False
) -> MemberFile:
    """Detect the format of ``path`` and read it.

    Args:
        path: the member file.
        prefix: keep only state_dict keys under this prefix, with the prefix removed
            (e.g. ``"model."`` for a Lightning checkpoint, ``"teacher."`` to pick a submodule).
        unsafe_load: allow full unpickling for files that hold Python objects besides tensors.
            This runs code from the file: only for files you trust.
    """
    path = Path(path)
    kind = sniff(path)
    if kind == "torchscript":
        return MemberFile(path, "torchscript", module=_load_torchscript(path))
    if kind == "torch.export":
        if not unsafe_load:
            _check_export_pickles(path)
        module, shape = _load_exported(path)
        return MemberFile(path, "torch.export", module=module, input_shape=shape)
    if kind == "safetensors":
        state_dict, notes = strip_prefixes(_load_safetensors(path), path, prefix)
        return MemberFile(path, "safetensors", state_dict=state_dict, notes=notes)
    payload = _torch_load(path, unsafe_load)
    if is_ensc_payload(payload):
        return MemberFile(path, "ensc", checkpoint=checkpoint_from_payload(payload, path))
    found, where = find_weights(payload, path)
    notes = [f"weights under {where!r}"] if where else []
    if isinstance(found, nn.Module):
        return MemberFile(path, "pickled module", module=_unwrap(found), notes=notes)
    state_dict, stripped = strip_prefixes(found, path, prefix)
    return MemberFile(path, "state_dict", state_dict=state_dict, notes=notes + stripped)


def sniff(path: Path) -> str:
    """The container kind from the file's first bytes and zip directory, without unpickling.

    Returns ``torchscript``, ``torch.export``, ``safetensors``, ``torch.save`` (zip) or ``pickle``
    (legacy ``torch.save``); raises :class:`CheckpointError` for anything else.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} {not_a_file(path)}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise CheckpointError(f"cannot load {path} as a checkpoint: the file is empty")
    if head.startswith(_ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            raise CheckpointError(
                f"cannot load {path}: it is truncated or corrupted (a zip archive without its "
                "central directory); copy or save it again"
            )
        with zipfile.ZipFile(path) as archive:
            names = {name.split("/", 1)[-1]: name for name in archive.namelist()}
            if "archive_format" in names and archive.read(names["archive_format"]) == b"pt2":
                return "torch.export"
        if "constants.pkl" in names or any(n.startswith("code/") for n in names):
            return "torchscript"
        if "data.pkl" in names:
            return "torch.save"
        raise CheckpointError(
            f"cannot load {path} as a checkpoint: a zip archive, but no PyTorch file"
        )
    header_len = int.from_bytes(head[:8], "little")
    if len(head) > 8 and head[8:9] == b"{" and header_len < 100_000_000:
        if 8 + header_len > size:
            raise CheckpointError(f"cannot load {path}: the safetensors file is truncated")
        return "safetensors"
    if head[0] == 0x80:  # pickle protocol >= 2: the legacy (pre-1.6) torch.save format
        return "pickle"
    raise CheckpointError(
        f"cannot load {path} as a checkpoint: not a torch.save, TorchScript, torch.export or "
        "safetensors file"
    )


def find_weights(payload: Any, path: Path, depth: int = 0) -> tuple[Any, str]:
    """The state_dict (or, after unsafe loading, the module) in ``payload`` and the key it was under."""
    if _is_state_dict(payload) or isinstance(payload, nn.Module):
        return payload, ""
    if not isinstance(payload, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(payload).__name__}, not a state_dict, a dict holding one, or a model"
        )
    for key in STATE_DICT_KEYS:
        value = payload.get(key)
        if _is_state_dict(value) or isinstance(value, nn.Module):
            return value, key
        if isinstance(value, Mapping) and depth < 2:
            try:
                found, inner = find_weights(value, path, depth + 1)
            except CheckpointError:
                continue
            return found, f"{key}.{inner}" if inner else key
    candidates = [k for k, v in payload.items() if _is_state_dict(v)]
    if len(candidates) == 1:  # one unambiguous state_dict under a name we do not know
        return payload[candidates[0]], str(candidates[0])
    keys = ", ".join(repr(k) for k in list(payload)[:8]) + (", …" if len(payload) > 8 else "")
    which = f"several ({', '.join(map(repr, candidates))})" if candidates else "none"
    raise CheckpointError(
        f"{path} holds a dict with keys {keys} and no state_dict under "
        f"{'/'.join(STATE_DICT_KEYS)} ({which} elsewhere); save the member's model.state_dict() on its own"
    )


def strip_prefixes(
    state_dict: Mapping[str, torch.Tensor], path: Path, prefix: str | None = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Keys under ``prefix`` (stripped), minus the ``module.`` / ``_orig_mod.`` of model wrappers."""
    notes = []
    sd = dict(state_dict)
    if prefix:
        sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
        if not sd:
            first = ", ".join(list(state_dict)[:3])
            raise CheckpointError(
                f"no key of {path} starts with prefix {prefix!r} (its keys begin {first}, …); "
                "fix or drop 'prefix' in ensemble.json"
            )
        notes.append(f"prefix {prefix!r} stripped")
    while True:
        if any(k.startswith("_orig_mod.") or "._orig_mod." in k for k in sd):  # torch.compile
            sd = {re.sub(r"(^|\.)_orig_mod\.", r"\1", k): v for k, v in sd.items()}
            notes.append("torch.compile prefix '_orig_mod.' stripped")
        elif sd and all(k.startswith("module.") for k in sd):  # DataParallel / DDP
            sd = {k[len("module.") :]: v for k, v in sd.items()}
            notes.append("DataParallel prefix 'module.' stripped")
        else:
            return sd, notes


class ExportedModule(nn.Module):
    """A ``torch.export`` program as a module taking any batch size.

    The program's train/eval behaviour was fixed when it was exported, so ``train()`` only sets the
    flag. A program exported with a static batch size B runs in chunks of B (the last one padded).
    """

    def __init__(self, program: nn.Module, batch: int | None) -> None:
        super().__init__()
        self.program = program
        self.batch = batch  # static batch size of the program; None when it is dynamic

    def train(self, mode: bool = True) -> ExportedModule:
        self.training = mode  # exported graph modules refuse train()/eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch is None or x.shape[0] == self.batch:
            return self.program(x)
        out = []
        for part in x.split(self.batch):  # [≤ batch, C, H, W]
            n = part.shape[0]
            if n < self.batch:
                part = torch.cat([part, part.new_zeros(self.batch - n, *part.shape[1:])])
            out.append(self.program(part)[:n])
        return torch.cat(out)  # [B_in, K]


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _torch_load(path: Path, unsafe_load: bool) -> Any:
    """:func:`~ensc.fileio.torch_load`, naming the teacher option that fixes a refused file."""
    try:
        return torch_load(path, unsafe=unsafe_load)
    except CheckpointError as error:
        err = error.__cause__  # torch's own error; None when the file does not exist
        message = str(err)
        garbage = "Unsupported operand" in message  # not pickled objects: not a checkpoint at all
        if not unsafe_load and "Weights only load failed" in message and not garbage:
            found = _UNSUPPORTED_GLOBAL.search(message)
            what = f" ({found[1]})" if found else ""
            raise CheckpointError(
                f"{path} holds pickled Python objects{what}, not just weights, and loading it would "
                "run code from the file: pass --unsafe-load if you trust it, or save model.state_dict() instead"
            ) from err
        if unsafe_load and isinstance(err, AttributeError | ImportError):
            raise CheckpointError(
                f"cannot unpickle {path}: {one_line(err, join=True)}; the classes it pickled must be "
                "importable: pass --code-path DIR with their source"
            ) from err
        raise


def _load_torchscript(path: Path) -> nn.Module:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still common
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as err:  # RuntimeError from the TorchScript deserializer
        raise CheckpointError(
            f"cannot load TorchScript archive {path}: {one_line(err, join=True)}"
        ) from err


def _check_export_pickles(path: Path) -> None:
    """Refuse a torch.export archive whose pickled parts need a full unpickle.

    ``torch.export.load`` reads pickled weights and constants with ``weights_only=False``, and
    retries its sample inputs that way when the safe load fails: a payload there runs code. So
    every pickled part (a nested ``torch.save`` archive, a ``.pt``/``.pkl`` entry, or an entry its
    config marks ``use_pickle``) must load with ``weights_only=True`` first; then torch's own
    unrestricted load of the same bytes meets only the globals the safe load allowed.
    """
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        flagged = set()
        for name in names:
            if name.endswith("_config.json"):
                flagged |= _pickled_in_config(archive.read(name), name.rsplit("/", 1)[0])
        for name in names:
            data = archive.read(name)
            if not (name in flagged or name.endswith((".pt", ".pkl"))
                    or data.startswith(_ZIP_MAGIC)):  # fmt: skip
                continue
            try:
                torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            except Exception as err:  # UnpicklingError for a refused global, or damage
                found = _UNSUPPORTED_GLOBAL.search(str(err))
                what = f" ({found[1]})" if found else ""
                raise CheckpointError(
                    f"{path} is a torch.export archive whose part {name} needs a full unpickle"
                    f"{what}, which would run code from the file: pass --unsafe-load if you "
                    "trust it, or export the model again"
                ) from err


def _pickled_in_config(text: bytes, folder: str) -> set[str]:
    """The archive entries a torch.export payload config (``*_config.json``) marks as pickled."""
    try:
        config = json.loads(text).get("config", {})
        return {f"{folder}/{meta['path_name']}" for meta in config.values()
                if isinstance(meta, dict) and meta.get("use_pickle")}  # fmt: skip
    except (ValueError, AttributeError, TypeError, KeyError):
        return set()


def _load_exported(path: Path) -> tuple[nn.Module, tuple[int | None, ...] | None]:
    # both log tracebacks of their own (the serializer's even fails to format: "Logging error")
    loggers = [logging.getLogger(n) for n in ("torch.export", "torch._export.serde.serialize")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        program = torch.export.load(io.BytesIO(path.read_bytes()))  # any name, not only *.pt2
    except Exception as err:  # deserialization errors of many kinds
        raise CheckpointError(
            f"cannot load torch.export program {path}: {one_line(err, join=True)}"
        ) from err
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
    user_inputs = program.graph_signature.user_inputs
    if len(user_inputs) != 1:
        raise CheckpointError(
            f"the torch.export program {path} takes {len(user_inputs)} inputs; ensc needs one image batch"
        )
    node = next(
        n for n in program.graph.nodes if n.op == "placeholder" and n.name == user_inputs[0]
    )
    val = node.meta.get("val")
    shape = None if val is None else tuple(d if isinstance(d, int) else None for d in val.shape)
    batch = shape[0] if shape else None
    if batch is not None:
        log.info(
            "%s was exported with a static batch of %d; it runs in chunks of %d (export with "
            "dynamic_shapes for speed)",
            path,
            batch,
            batch,
        )
    return ExportedModule(program.module(), batch), shape


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as err:
        raise CheckpointError(
            f"{path} is a safetensors file; install the safetensors package to read it "
            "(pip install safetensors)"
        ) from err
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # SafetensorError and OSError
        raise CheckpointError(
            f"cannot load safetensors file {path}: {one_line(err, join=True)}"
        ) from err


def _unwrap(module: nn.Module) -> nn.Module:
    """The model inside DataParallel / DDP / torch.compile wrappers."""
    while True:
        if isinstance(module, nn.DataParallel | nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):
            module = module._orig_mod
        else:
            return module
