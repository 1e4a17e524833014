"""Parity of an exported graph with PyTorch: names, then shapes, then values, with stated tolerances.

Every failure is collected (not only the first) and the largest differences are reported. The
gates (:class:`Tolerance`):

- fp32: max |Δlogit| between onnxruntime and PyTorch ≤ ``atol`` (default 1e-3; float32
  round-off between two conv implementations is ~1e-5) and top-1 agreement ≥ ``min_agreement``
  (default 99.9 %).
- fp16 / int8: test accuracy at most ``max_acc_drop`` points (default 1.0) below the fp32
  PyTorch model on the same images; |Δlogit| and agreement are reported, not gated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ensc.errors import ExportError, one_line
from ensc.export.wrappers import INPUT_NAME, OUTPUT_NAMES

if TYPE_CHECKING:
    import onnx
    import onnxruntime
    import torch
    from torch import nn

EVAL_BATCH = 256  # images per inference call during validation
SHAPE_PROBES = (1, 3)  # batch sizes run to prove the batch axis is dynamic


@dataclass(frozen=True)
class Tolerance:
    """What an export must meet; ``None`` means reported, not gated."""

    atol: float | None = 1e-3  # max |Δlogit| onnxruntime vs PyTorch
    min_agreement: float | None = 99.9  # top-1 agreement with PyTorch, percent
    max_acc_drop: float | None = None  # accuracy points allowed below the fp32 PyTorch model


def tolerance_for(
    precision: str, *, atol: float = 1e-3, min_agreement: float = 99.9, max_acc_drop: float = 1.0
) -> Tolerance:
    """fp32 is held to round-off; reduced precisions to an accuracy budget."""
    if precision == "fp32":
        return Tolerance(atol=atol, min_agreement=min_agreement, max_acc_drop=None)
    return Tolerance(atol=None, min_agreement=None, max_acc_drop=max_acc_drop)


@dataclass(frozen=True)
class ParityReport:
    """onnxruntime vs PyTorch on ``n_images`` test images (accuracy and agreement in percent)."""

    precision: str
    n_images: int
    max_abs_logit_diff: float | None
    max_abs_prob_diff: float | None
    agreement: float | None
    acc_pytorch: float | None
    acc_onnx: float | None
    tolerance: Tolerance
    failures: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def acc_drop(self) -> float | None:
        if self.acc_pytorch is None or self.acc_onnx is None:
            return None
        return self.acc_pytorch - self.acc_onnx

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "failures": list(self.failures),
            "acc_drop": self.acc_drop,
            "passed": self.passed,
        }


def make_session(
    model: onnx.ModelProto | bytes | str,
    *,
    threads: int | None = None,
    providers: list[str] | None = None,
    spinning: bool = True,
) -> onnxruntime.InferenceSession:
    """An onnxruntime session with all graph optimizations; ``threads`` intra-op threads.

    ``spinning=False`` stops the intra-op threads from busy-waiting between calls (onnxruntime's
    default is to spin), which matters when several sessions and PyTorch share the cores.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if threads is not None:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: fp16 graphs on CPU warn about inserted casts
    source = model.SerializeToString() if hasattr(model, "SerializeToString") else model
    try:
        return ort.InferenceSession(
            source, sess_options=options, providers=providers or ["CPUExecutionProvider"]
        )
    except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise ExportError(f"onnxruntime cannot load the graph: {one_line(err)}") from err


def run_onnx(
    session: onnxruntime.InferenceSession, images: torch.Tensor, batch_size: int = EVAL_BATCH
) -> tuple[np.ndarray, np.ndarray]:
    """``(logits, probs)`` float32 [N, K] of the graph on ``images`` float [N, C, H, W]."""
    outs = [
        session.run(list(OUTPUT_NAMES), {INPUT_NAME: images[i : i + batch_size].numpy()})
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


def run_torch(
    module: nn.Module, images: torch.Tensor, batch_size: int = EVAL_BATCH
) -> tuple[np.ndarray, np.ndarray]:
    """``(logits, probs)`` float32 [N, K] of a wrapper module (eval mode) on ``images``."""
    import torch

    module.eval()
    logits, probs = [], []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            lg, pr = module(images[i : i + batch_size])  # [b, K] each
            logits.append(lg.float().numpy())
            probs.append(pr.float().numpy())
    return np.concatenate(logits), np.concatenate(probs)


def validate_onnx(
    session: onnxruntime.InferenceSession,
    reference: tuple[np.ndarray, np.ndarray],
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    precision: str,
    tolerance: Tolerance,
    batch_size: int = EVAL_BATCH,
) -> ParityReport:
    """Check ``session`` against PyTorch's ``reference`` ``(logits, probs)`` on ``images``.

    Names, then shapes, then values; values are compared only when names and shapes are right.
    """
    n, k = int(len(images)), int(reference[0].shape[1])
    failures = _check_names(session) or _check_shapes(session, images, k)
    if failures:
        return ParityReport(precision, n, None, None, None, None, None, tolerance, tuple(failures))
    logits, probs = run_onnx(session, images, batch_size)
    ref_logits, ref_probs = reference
    y = labels.numpy()
    max_logit = float(np.abs(logits - ref_logits).max())
    max_prob = float(np.abs(probs - ref_probs).max())
    agreement = 100.0 * float((logits.argmax(1) == ref_logits.argmax(1)).mean())
    acc_ref = 100.0 * float((ref_logits.argmax(1) == y).mean())
    acc = 100.0 * float((logits.argmax(1) == y).mean())
    if not (np.isfinite(logits).all() and np.isfinite(probs).all()):
        failures.append("the graph returns non-finite values (NaN or inf)")
    if tolerance.atol is not None and not max_logit <= tolerance.atol:
        failures.append(f"max |Δlogit| {max_logit:.3g} > tolerance {tolerance.atol:g}")
    if tolerance.min_agreement is not None and agreement < tolerance.min_agreement:
        failures.append(
            f"top-1 agreement {agreement:.2f} % < {tolerance.min_agreement:g} % on {n} images"
        )
    if tolerance.max_acc_drop is not None and acc_ref - acc > tolerance.max_acc_drop:
        failures.append(
            f"{precision} accuracy {acc:.2f} % is {acc_ref - acc:.2f} points below fp32 "
            f"PyTorch ({acc_ref:.2f} %); allowed drop {tolerance.max_acc_drop:g}"
        )
    return ParityReport(
        precision, n, max_logit, max_prob, agreement, acc_ref, acc, tolerance, tuple(failures)
    )


def _check_names(session: onnxruntime.InferenceSession) -> list[str]:
    failures = []
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if inputs != [INPUT_NAME]:
        failures.append(f"graph inputs are {inputs}, expected [{INPUT_NAME!r}]")
    if outputs != list(OUTPUT_NAMES):
        failures.append(f"graph outputs are {outputs}, expected {list(OUTPUT_NAMES)}")
    for value in [*session.get_inputs(), *session.get_outputs()]:
        if value.type != "tensor(float)":
            failures.append(f"{value.name} is {value.type}, expected tensor(float) (float32)")
    return failures


def _check_shapes(session: onnxruntime.InferenceSession, images: torch.Tensor, k: int) -> list[str]:
    failures = []
    declared = session.get_inputs()[0].shape  # e.g. ['batch', 1, 28, 28]
    expected = list(images.shape[1:])
    if isinstance(declared[0], int) or list(declared[1:]) != expected:
        failures.append(
            f"input shape {declared}, expected [batch, {', '.join(map(str, expected))}]"
        )
    for b in SHAPE_PROBES:
        probe = images[:1].expand(b, *images.shape[1:]).contiguous()  # [b, C, H, W]
        try:
            outs = session.run(list(OUTPUT_NAMES), {INPUT_NAME: probe.numpy()})
        except Exception as err:  # onnxruntime's RuntimeException types are not importable stably
            failures.append(f"batch of {b} fails: {one_line(err)}")
            continue
        for name, out in zip(OUTPUT_NAMES, outs, strict=True):
            if tuple(out.shape) != (b, k):
                failures.append(
                    f"{name} has shape {tuple(out.shape)} for a batch of {b}, expected {(b, k)}"
                )
    return failures
