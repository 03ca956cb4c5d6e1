"""graphengine: a deep-learning engine on a static computation graph.

Build a :class:`Graph`, ``compile`` it into a :class:`Model`, train and run it. Layers,
activations, losses, optimizers, initializers and backends are pluggy plugins.
"""

from __future__ import annotations

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
from .train.loop import Callback, Checkpoint, EarlyStopping, History
from .train.regularization import (
    L1,
    L1L2,
    L2,
    ClipNorm,
    ClipValue,
    ExponentialDecay,
    InverseTimeDecay,
    MaxNorm,
    Schedule,
    StepDecay,
)
from .train.update import optimizer

__version__ = "0.1.0"


def concat(tensors: list[Tensor], axis: int = -1, name: str | None = None) -> Tensor:
    """Join tensors along ``axis``."""
    graph = next((t.graph for t in tensors if isinstance(t, Tensor)), None)
    if graph is None:
        raise GraphBuildError(f"concat joins tensors of a graph, got "
                              f"{[type(t).__name__ for t in tensors]}; put a graph's tensors in "
                              f"the list (g.constant(array) makes one of an array)")
    return graph.op("concat", *tensors, axis=axis, name=name)


def exp(x: Tensor) -> Tensor:
    return x.exp()


def log(x: Tensor) -> Tensor:
    return x.log()


def maximum(a: Tensor, b: Tensor) -> Tensor:
    with a.graph.atomic():
        return a.graph.op("maximum", a, a.graph.as_tensor(b, like=a))


__all__ = [
    "L1", "L1L2", "L2", "ClipNorm", "ClipValue", "ExponentialDecay", "InverseTimeDecay", "MaxNorm",
    "Schedule", "StepDecay",
    "Activation", "Backend", "BackendError", "Callback", "Checkpoint", "CompileError", "DataError",
    "EarlyStopping", "FeedError", "Graph", "GraphBuildError", "GraphBuildWarning",
    "GraphEngineError", "History",
    "Initializer", "Layer", "LoadReport", "Loss",
    "Model", "NumericalError", "Observer", "Operator", "OperatorError", "Optimizer", "Profile",
    "PluginConflictError", "PluginError",
    "SerializationError", "ShapeError", "Tensor", "TensorSpec", "UnknownNameError", "concat",
    "debug", "exp", "get_backend", "get_plugin_manager", "hookimpl", "load", "log", "maximum", "optimizer",
    "profile",
]
