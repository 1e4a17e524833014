"""Smaller variants of an exported fp32 graph: float16 weights, or static int8 quantization (QDQ).

Both keep the graph's interface: ``images`` in, ``logits``/``probs`` out, all float32.

- fp16: ``onnxruntime.transformers.float16`` (the converter of ``onnxconverter-common``, shipped
  inside onnxruntime) with ``keep_io_types=True``; Cast nodes sit at the graph's edges.
- int8: ``onnxruntime.quantization.quantize_static`` in QDQ format, MinMax calibration on training
  images, per-channel weight scales, uint8 activations with int8 weights (U8S8) and
  ``reduce_range`` (7-bit weights). U8S8 is the fast integer path on x86 CPUs with AVX2/AVX-512
  but without VNNI, where it can saturate; 7-bit weights avoid that, as onnxruntime's
  quantization guide advises. Measured on a 2-core AVX2 EPYC (no VNNI), resnet8 on Fashion-MNIST,
  batch 64: S8S8 was 1.3× slower than fp32, U8S8 1.5× and U8S8 + reduce_range 1.7× faster; on a
  trained teacher member (83.2 % on 2,000 test images) S8S8 lost 0.0 points, U8S8 3.1 points
  (saturation) and U8S8 + reduce_range 0.2 points. On CPUs with VNNI (AVX512-VNNI, AVX-VNNI or
  AMX-INT8) the U8S8 dot product does not saturate, so full 8-bit weights are used there
  (:func:`reduce_range_here`).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ensc.errors import ExportError, one_line
from ensc.export.onnx import check_onnx, quiet_loggers
from ensc.export.wrappers import INPUT_NAME

if TYPE_CHECKING:
    import onnx
    import torch

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
CALIB_BATCH = 64  # images per calibration batch fed to onnxruntime
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # /proc/cpuinfo names


def reduce_range_here(flags: set[str] | None = None) -> bool:
    """7-bit weights (reduce_range) where the CPU lacks VNNI and U8S8 could saturate; full 8-bit
    weights where it has VNNI."""
    from ensc.engine.precision import cpu_flags

    flags = cpu_flags() if flags is None else flags
    return not any(flag in flags for flag in VNNI_FLAGS)


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    return precision


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float16 copy of ``model`` whose inputs and outputs stay float32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    half = convert_float_to_float16(model, keep_io_types=True)
    # the converter appends the float32 -> float16 input casts at the end of the node list;
    # onnx.checker wants nodes in topological order
    wrapped = OnnxModel(half)
    wrapped.topological_sort()
    half = wrapped.model
    check_onnx(half)
    return half


def to_int8(
    model: onnx.ModelProto, calib_images: torch.Tensor, reduce_range: bool | None = None
) -> onnx.ModelProto:
    """Static int8 QDQ quantization of ``model``, calibrated on ``calib_images`` (float [N, C, H, W]
    in [0, 1]); ``reduce_range`` None: :func:`reduce_range_here`."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calib_images) == 0:
        raise ExportError("int8 quantization needs calibration images: pass --calib-samples N > 0")

    class ImageReader(CalibrationDataReader):
        """Batches of calibration images as onnxruntime input feeds."""

        def __init__(self) -> None:
            self._batches = _feeds(calib_images)

        def get_next(self) -> dict | None:
            return next(self._batches, None)

    with tempfile.TemporaryDirectory(prefix="ensc-int8-") as tmp:
        fp32, pre, out = (Path(tmp) / name for name in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        onnx.save(model, fp32)
        try:
            # shape inference + graph optimization (BN folding etc.) before quantization, as
            # onnxruntime's quantization guide recommends. ONNX's own shape inference is enough
            # for these graphs (static C, H, W); the symbolic one fails on the ensemble graphs.
            # onnxruntime.quantization logs its progress on the root logger
            with quiet_loggers(("",)):
                quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
                quantize_static(
                    str(pre),
                    str(out),
                    ImageReader(),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    reduce_range=reduce_range_here() if reduce_range is None else reduce_range,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                )
        except Exception as err:  # onnxruntime raises many types here; keep the first line
            raise ExportError(f"int8 quantization failed: {one_line(err)}") from err
        quantized = onnx.load(out)
    check_onnx(quantized)
    return quantized


def _feeds(images: torch.Tensor) -> Iterator[dict]:
    for start in range(0, len(images), CALIB_BATCH):
        batch = images[start : start + CALIB_BATCH]  # [b, C, H, W]
        yield {INPUT_NAME: batch.numpy().astype("float32", copy=False)}
