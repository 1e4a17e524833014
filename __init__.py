"""ensc: compress a deep ensemble into a single network that costs what one member costs.

The library API (:mod:`ensc.api`) is imported on first use, so ``import ensc`` and the CLI's
``--help`` stay fast::

    import ensc
    result = ensc.compress_ensemble("teachers/", "resnet32", steps=300)
    ensc.export_onnx(result, "model.onnx")
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = ("compress_ensemble", "export_onnx", "benchmark", "CompressResult")
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    """``ensc.compress_ensemble`` and friends, from :mod:`ensc.api` when first asked for."""
    if name in _API:
        from ensc import api

        return getattr(api, name)
    raise AttributeError(f"module 'ensc' has no attribute {name!r}")
