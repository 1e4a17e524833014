"""Export a wrapped network to ONNX: dynamic batch axis, named input/outputs, self-describing.

The graph takes ``images`` float32 ``[batch, C, H, W]`` with pixels in [0, 1] (normalization is
inside, docs/method.md §1) and returns ``logits`` and ``probs`` ``[batch, K]``
(see :mod:`ensc.export.wrappers`). Class names, the input contract, mean/std, the source
checkpoints (and their sha256) and the ensc version are stored in the model's ``metadata_props``.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ensc import __version__
from ensc.errors import ExportError, one_line
from ensc.export.wrappers import INPUT_NAME, OUTPUT_NAMES
from ensc.fileio import atomic_write

if TYPE_CHECKING:
    import onnx
    from torch import nn

    from ensc.models.checkpoint import ModelSpec

log = logging.getLogger(__name__)

# ONNX opset written by default: current in torch's exporter and run by onnxruntime >= 1.17.
DEFAULT_OPSET = 20
MIN_OPSET = 18  # the torch.export-based exporter's own opset; older ones need down-conversion
BATCH_AXIS = "batch"
TRACE_BATCH = 2  # example batch for tracing; not 0/1, which torch.export would specialize
# libraries that log every optimization pass at INFO while exporting
EXPORTER_LOGGERS = ("torch.onnx", "torch.export", "torch.fx", "onnxscript", "onnx_ir")


def export_onnx(
    module: nn.Module, spec: ModelSpec, *, opset: int = DEFAULT_OPSET
) -> onnx.ModelProto:
    """Trace ``module`` (eval mode, returns ``(logits, probs)``) into an ONNX model in memory.

    Uses the ``torch.export``-based exporter with a dynamic batch axis named ``batch``.
    """
    import torch

    if opset < MIN_OPSET:
        raise ExportError(
            f"--opset {opset} is too old for torch's exporter: use {MIN_OPSET} or newer"
        )
    module.eval()
    example = torch.rand(TRACE_BATCH, spec.in_channels, *spec.image_size)  # [B, C, H, W] in [0, 1]
    batch = torch.export.Dim(BATCH_AXIS, min=1)
    try:
        with quiet_loggers(EXPORTER_LOGGERS):
            program = torch.onnx.export(
                module,
                (example,),
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                opset_version=opset,
                dynamo=True,
                dynamic_shapes=({0: batch},),
                verbose=False,
            )
    except Exception as err:  # torch.export / onnxscript raise many types; keep the first line
        raise ExportError(f"torch.onnx.export failed: {one_line(err)}") from err
    model = program.model_proto
    _name_batch_axis(model)
    return model


@contextlib.contextmanager
def quiet_loggers(names: Sequence[str], level: int = logging.WARNING) -> Iterator[None]:
    """Raise the level of the named loggers (``""`` = root) while the block runs, unless ensc is in debug mode."""
    if logging.getLogger("ensc").isEnabledFor(logging.DEBUG):
        yield
        return
    loggers = [logging.getLogger(name or None) for name in names]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(level, lg.getEffectiveLevel()))
    try:
        yield
    finally:
        for lg, old in zip(loggers, saved, strict=True):
            lg.setLevel(old)


def _name_batch_axis(model: onnx.ModelProto) -> None:
    """Give the batch dimension of the input and outputs one readable name, ``batch``."""
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = BATCH_AXIS


def onnx_metadata(
    spec: ModelSpec,
    *,
    what: str,
    precision: str,
    members: int,
    sources: list[str],
    archs: list[str],
    opset: int,
    source_sha256: list[str] | None = None,
) -> dict[str, str]:
    """The ``metadata_props`` ensc writes: enough to use the file without ensc.

    ``source_sha256`` (of each source checkpoint) lets `ensc export` / `ensc bench` tell whether
    a file in a run folder was exported from the run's current checkpoints.
    """
    ensemble = members > 1
    return {
        "ensc_version": __version__,
        "what": what,
        "precision": precision,
        "arch": ",".join(archs),
        "members": str(members),
        "num_classes": str(spec.num_classes),
        "class_names": json.dumps(list(spec.class_names)),
        "dataset": spec.dataset,
        "input_name": INPUT_NAME,
        "input_shape": json.dumps([BATCH_AXIS, spec.in_channels, *spec.image_size]),
        "input_format": "float32 NCHW, pixels in [0, 1] (uint8 / 255); mean/std normalization is inside the graph",
        "mean": json.dumps(list(spec.mean)),
        "std": json.dumps(list(spec.std)),
        "outputs": (
            "logits: log of the members' mean probabilities; probs: the members' mean softmax"
            if ensemble
            else "logits: the network's logits; probs: softmax(logits)"
        ),
        "source": json.dumps(sources),
        **({"source_sha256": json.dumps(source_sha256)} if source_sha256 is not None else {}),
        "opset": str(opset),
    }


def set_metadata(model: onnx.ModelProto, metadata: Mapping[str, str]) -> onnx.ModelProto:
    """Replace ``model``'s ``metadata_props`` with ``metadata``; also sets doc_string/producer."""
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, str(value)
    model.producer_name = "ensc"
    model.producer_version = __version__
    model.doc_string = (
        f"ensc export of {metadata.get('what', '?')} ({metadata.get('arch', '?')}, "
        f"{metadata.get('precision', '?')}): {metadata.get('outputs', '')}"
    )
    return model


def read_metadata(model: onnx.ModelProto) -> dict[str, Any]:
    """``metadata_props`` as a dict, JSON values decoded."""
    out: dict[str, Any] = {}
    for entry in model.metadata_props:
        try:
            out[entry.key] = json.loads(entry.value)
        except ValueError:
            out[entry.key] = entry.value
    return out


def check_onnx(model: onnx.ModelProto) -> None:
    """``onnx.checker`` with full shape inference; raises ExportError on an invalid graph."""
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise ExportError(
            f"the exported ONNX graph is invalid (onnx.checker): {one_line(err)}"
        ) from err


def save_onnx(model: onnx.ModelProto, path: Path) -> int:
    """Write ``model`` atomically to ``path``; returns the file size in bytes."""
    data = model.SerializeToString()
    atomic_write(Path(path), lambda f: f.write(data))
    return len(data)
