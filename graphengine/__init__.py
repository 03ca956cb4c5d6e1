"""graphengine: a deep-learning engine on a static computation graph.

Build a :class:`Graph`, ``compile`` it into a :class:`Model`, train and run it. Layers,
activations, losses, optimizers, initializers and backends are pluggy plugins.
"""

from __future__ import annotations

from .backend import Backend
from .base import Activation, Initializer, Layer, Loss, Optimizer
from .errors import (
    BackendError,
    CompileError,
    DataError,
    FeedError,
    GraphBuildError,
    GraphEngineError,
    NumericalError,
    PluginConflictError,
    PluginError,
    SerializationError,
    ShapeError,
    UnknownNameError,
)
from .graph import Graph, Tensor
from .model import Model, get_backend, optimizer
from .operators import Operator, TensorSpec
from .plugins import get_plugin_manager, hookimpl
from .training import Callback, History

__version__ = "0.1.0"


def concat(tensors: list[Tensor], axis: int = -1, name: str | None = None) -> Tensor:
    """Join tensors along ``axis``."""
    return tensors[0].graph.op("concat", *tensors, axis=axis, name=name)


def exp(x: Tensor) -> Tensor:
    return x.exp()


def log(x: Tensor) -> Tensor:
    return x.log()


def maximum(a: Tensor, b: Tensor) -> Tensor:
    return a.graph.op("maximum", a, a.graph.as_tensor(b, like=a))


__all__ = [
    "Activation", "Backend", "BackendError", "Callback", "CompileError", "DataError", "FeedError",
    "Graph", "GraphBuildError", "GraphEngineError", "History", "Initializer", "Layer", "Loss",
    "Model", "NumericalError", "Operator", "Optimizer", "PluginConflictError", "PluginError",
    "SerializationError", "ShapeError", "Tensor", "TensorSpec", "UnknownNameError", "concat",
    "exp", "get_backend", "get_plugin_manager", "hookimpl", "log", "maximum", "optimizer",
]
