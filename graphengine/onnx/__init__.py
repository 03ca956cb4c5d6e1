"""ONNX in and out: :func:`export` writes a model's inference graph to an ONNX file,
:func:`load` imports an ONNX inference graph as a trainable :class:`graphengine.Model`, and
:class:`Backend` runs ONNX models through graphengine for ONNX's backend test runner.

ONNX is an optional dependency (``pip install 'graphengine[onnx]'``): this package imports
``onnx`` only when one of these runs, never when graphengine is imported.
"""

from __future__ import annotations

from typing import Any

from .export import DEFAULT_OPSET, export, to_onnx
from .load import load

__all__ = ["DEFAULT_OPSET", "Backend", "export", "load", "to_onnx"]


def __getattr__(name: str) -> Any:
    if name == "Backend":  # subclasses onnx's backend class, so it imports onnx
        from .backend import Backend
        return Backend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
