"""ensc.export: deploy a compressed network as a verified ONNX file and benchmark it.

One job per module:

- :mod:`~ensc.export.wrappers` — what a graph computes: one network, a DE-M teacher or a BE-M
  student, each ``images`` in [0, 1] → ``(logits, probs)``.
- :mod:`~ensc.export.sources` — what to export (run folder, checkpoint, teacher folder) and the
  real images used to check and calibrate it.
- :mod:`~ensc.export.onnx` — ``torch.onnx.export`` with a dynamic batch axis, metadata, checker.
- :mod:`~ensc.export.quantize` — fp16 and static int8 (QDQ) variants.
- :mod:`~ensc.export.validate` — onnxruntime vs PyTorch: names, shapes, values, tolerances.
- :mod:`~ensc.export.pipeline` — `ensc export --onnx` end to end (:func:`run_export`).
- :mod:`~ensc.export.bench` — `ensc bench` measurements (:func:`run_bench`), as dataclasses.
- :mod:`~ensc.export.render` — tables, JSON, Markdown and the optional plot.

Importing this package does not import torch or onnxruntime.
"""
