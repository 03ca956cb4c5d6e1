"""A model's parameters: their arrays, which of them train, and a change counter for each."""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import CompileError, GraphEngineError
from ..hooks import get_plugin_manager
from ..ir.contracts import fans
from ..ir.graph import in_scope, split_init
from ..ir.operators import Parameter

if TYPE_CHECKING:
    from ..ir.graph import Graph
    from .backend import Backend


def initial_value(node_name: str, op: Parameter, seed: int) -> np.ndarray:
    """A parameter's first value, from a generator seeded by the model seed and the parameter's
    name, so adding a layer does not change the initial values of the others."""
    name, config = split_init(op.init, f"parameter {node_name!r}")
    initializer = get_plugin_manager().initializers.get(name)(**config)
    rng = np.random.default_rng([seed, zlib.crc32(node_name.encode())])
    shape = tuple(op.spec.shape)
    value = np.asarray(initializer(rng, shape, *fans(shape)), dtype=op.spec.dtype)
    if value.shape != shape:
        raise GraphEngineError(f"initializer {name!r} returned shape {value.shape} for "
                               f"parameter {node_name!r} of shape {shape}")
    return value


class ParameterStore:
    """Parameter name -> array (``arrays``), the graph's constants on the backend, the frozen
    set, and version counters (PyTorch's idea): every change through the model's API (an
    optimizer step, ``set_parameters``, a load) moves ``generation`` on and stamps the changed
    parameters with it (``changed_at``), so that a backward can tell that weights its forward
    read have changed since, at the cost of one integer comparison per step."""

    def __init__(self, graph: Graph, backend: Backend, seed: int,
                 shared: Mapping[str, Any] | None = None,
                 initial: Mapping[str, Any] | None = None) -> None:
        """``shared``: arrays of this backend used as they are (another model's); ``initial``:
        host arrays copied in instead of running the initializers (a loaded file's)."""
        self.graph = graph
        self.backend = backend
        shared, initial = shared or {}, initial or {}
        self.arrays: dict[str, Any] = {}
        for name, node in graph.nodes.items():
            if not isinstance(node.op, Parameter):
                continue
            if name in shared:
                value = shared[name]
                backend.check_array(value, f"shared parameter {name!r}")
                if tuple(value.shape) != node.shape:
                    raise CompileError(f"shared parameter {name!r} has shape {value.shape}, "
                                       f"the graph needs {node.shape}")
            elif name in initial:
                value = np.array(initial[name])  # a copy: the model owns its arrays
                if value.shape != node.shape:
                    raise CompileError(f"initial value of parameter {name!r} has shape "
                                       f"{value.shape}, the graph needs {node.shape}")
                value = backend.asarray(value, dtype=node.dtype)
            else:
                value = backend.asarray(initial_value(name, node.op, seed))
            self.arrays[name] = value
        self.shared = frozenset(shared)
        self.constants = {name: backend.asarray(node.op.value)
                          for name, node in graph.nodes.items() if node.kind == "constant"}
        self.generation = 0
        self.changed_at: dict[str, int] = dict.fromkeys(self.arrays, 0)
        self.frozen: frozenset[str] = frozenset()
        self._trainable: tuple[frozenset[str] | None, tuple[str, ...]] = (None, ())

    def touch(self, names: Sequence[str]) -> None:
        """Count a change of the parameters ``names``."""
        self.generation += 1
        self.changed_at.update(dict.fromkeys(names, self.generation))

    def changed_since(self, generation: int, names: Sequence[str]) -> list[str]:
        """Those of ``names`` changed after ``generation``."""
        if generation == self.generation:
            return []
        return [n for n in names if self.changed_at[n] > generation]

    def set(self, values: Mapping[str, Any]) -> None:
        """Copy host arrays into parameters by name, in place (cast to each parameter's dtype);
        all are checked before any changes."""
        checked = []
        for name, value in values.items():
            if name not in self.arrays:
                raise GraphEngineError(f"model {self.graph.name!r} has no parameter {name!r}")
            param = self.arrays[name]
            value = np.asarray(value)
            if value.shape != tuple(param.shape):
                raise GraphEngineError(f"parameter {name!r} has shape {tuple(param.shape)}, "
                                       f"the value given has {value.shape}")
            checked.append((param, value))
        for param, value in checked:
            param[...] = self.backend.asarray(value, dtype=param.dtype)
        self.touch(list(values))

    def trainable(self) -> tuple[str, ...]:
        """Names of the parameters the optimizer updates: trainable and not frozen. The same
        tuple while the frozen set stays the same (callers may cache on its identity)."""
        if self._trainable[0] != self.frozen:
            self._trainable = self.frozen, tuple(
                n for n in self.arrays if self.graph.nodes[n].op.trainable and n not in self.frozen)
        return self._trainable[1]

    def matching(self, patterns: Sequence[str]) -> list[str]:
        """Parameters a pattern names: a parameter (``"fc1/W"``) or a layer (``"fc1"`` or
        ``"fc1/"``, not ``"fc10"``)."""
        names = [n for n in self.arrays if any(in_scope(n, p) for p in patterns)]
        if not names:
            raise GraphEngineError(f"no parameter matches {patterns}; name a parameter or a "
                                   f"layer: parameters are {list(self.arrays)}")
        return names
