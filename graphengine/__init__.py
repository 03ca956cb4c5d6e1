"""graphengine: a deep-learning engine on a static computation graph.

Build a :class:`Graph`, ``compile`` it into a :class:`Model`, train and run it. Layers,
activations, losses, optimizers, initializers and backends are pluggy plugins.
"""

from __future__ import annotations

from typing import Any

from . import distributed
from .errors import (
    BackendError,
    CompileError,
    DataError,
    FeedError,
    GraphBuildError,
    GraphEngineError,
    NumericalError,
    OperatorError,
    PluginConflictError,
    PluginError,
    SerializationError,
    ShapeError,
    UnknownNameError,
)
from .hooks import get_plugin_manager, hookimpl
from .io.serialize import LoadReport, load
from .ir.contracts import Activation, Initializer, Layer, Loss, Optimizer
from .ir.graph import Graph, GraphBuildWarning, Tensor
from .ir.operators import Operator, TensorSpec
from .model import Model
from .runtime.backend import Backend, get_backend
from .runtime.executor import Observer
from .tools.debug import debug
from .tools.profile import Profile, profile
from .train.loop import Callback, Checkpoint, EarlyStopping, History, ReduceLROnPlateau
from .train.regularization import (
    L1,
    L1L2,
    L2,
    ClipNorm,
    ClipValue,
    CosineDecay,
    ExponentialDecay,
    InverseTimeDecay,
    MaxNorm,
    Schedule,
    StepDecay,
)
from .train.update import optimizer

__version__ = "0.1.0"


def _graph_of(values: list[Any], what: str) -> Graph:
    """The graph of the first tensor among ``values``; an error naming ``what`` if none is."""
    graph = next((t.graph for t in values if isinstance(t, Tensor)), None)
    if graph is None:
        raise GraphBuildError(f"{what} takes tensors of a graph, got "
                              f"{[type(t).__name__ for t in values]}; pass a graph's tensors "
                              f"(g.constant(array) makes one of an array)")
    return graph


def concat(tensors: list[Tensor], axis: int = -1, name: str | None = None) -> Tensor:
    """Join tensors along ``axis``."""
    return _graph_of(list(tensors), "concat").op("concat", *tensors, axis=axis, name=name)


def stack(tensors: list[Tensor], axis: int = 0, name: str | None = None) -> Tensor:
    """Join tensors of one shape along a new axis ``axis`` (numpy.stack, torch.stack)."""
    return _graph_of(list(tensors), "stack").op("stack", *tensors, axis=axis, name=name)


def where(cond: Tensor | Any, a: Tensor | Any, b: Tensor | Any, name: str | None = None) -> Tensor:
    """``a`` where the bool ``cond`` holds, else ``b``, broadcast together (torch.where). Any of
    the three may be an array or a number, made a constant (``a``, ``b`` of the other's dtype)."""
    graph = _graph_of([cond, a, b], "where")
    with graph.atomic():
        if not isinstance(cond, Tensor):
            cond = graph.constant(cond)
        if isinstance(a, Tensor) or isinstance(b, Tensor):
            like = a if isinstance(a, Tensor) else b
            a, b = graph.as_tensor(a, like=like), graph.as_tensor(b, like=like)
        else:
            a, b = graph.constant(a), graph.constant(b)
        return graph.op("where", cond, a, b, name=name)


def gather(x: Tensor, indices: Tensor, axis: int, name: str | None = None) -> Tensor:
    """``x``'s elements at ``indices`` along ``axis`` (numpy.take_along_axis, torch.gather)."""
    return _graph_of([x, indices], "gather").op("gather", x, indices, axis=axis, name=name)


def exp(x: Tensor) -> Tensor:
    return x.exp()


def log(x: Tensor) -> Tensor:
    return x.log()


def maximum(a: Tensor, b: Tensor) -> Tensor:
    with a.graph.atomic():
        return a.graph.op("maximum", a, a.graph.as_tensor(b, like=a))


__all__ = [
    "L1", "L1L2", "L2", "ClipNorm", "ClipValue", "ExponentialDecay", "InverseTimeDecay", "MaxNorm",
    "Schedule", "StepDecay", "CosineDecay",
    "Activation", "Backend", "BackendError", "Callback", "Checkpoint", "CompileError", "DataError",
    "EarlyStopping", "FeedError", "Graph", "GraphBuildError", "GraphBuildWarning",
    "GraphEngineError", "History",
    "Initializer", "Layer", "LoadReport", "Loss",
    "Model", "NumericalError", "Observer", "Operator", "OperatorError", "Optimizer", "Profile",
    "PluginConflictError", "PluginError",
    "SerializationError", "ShapeError", "Tensor", "TensorSpec", "UnknownNameError", "concat",
    "debug", "distributed", "exp", "get_backend",
    "get_plugin_manager", "hookimpl", "load", "log", "maximum", "optimizer",
    "profile", "ReduceLROnPlateau", "gather", "stack", "where",
]
