"""``graphengine.onnx.Backend``: ONNX's backend interface, so that ONNX's own test runner
(``onnx.backend.test.BackendTest``) runs its operator tests through graphengine's importer.

``Backend.prepare(model)`` returns a :class:`BackendRep` whose ``run(inputs)`` imports the model
and computes its outputs. Graph inputs that fix a shape (a Reshape's target shape fed as an
input, as ONNX's tests do) or hold an RNN's weights are folded in with the values of the run,
and the imported model is kept for each distinct set of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx.backend.base import Backend as _OnnxBackend
from onnx.backend.base import BackendRep as _OnnxBackendRep

from ..model import Model
from .load import STATIC_INPUTS, WEIGHT_INPUTS, Importer, read


class BackendRep(_OnnxBackendRep):
    """An ONNX model prepared to run on graphengine."""

    def __init__(self, proto: Any, backend: str = "numpy") -> None:
        self.proto = proto
        self.backend = backend
        graph = proto.graph
        initialized = {init.name for init in graph.initializer}
        self.inputs = [v.name for v in graph.input if v.name not in initialized]
        self.shape_inputs = sorted({name for node in graph.node
                                    for position, name in enumerate(node.input)
                                    if (position in STATIC_INPUTS.get(node.op_type, ())
                                        or position in WEIGHT_INPUTS.get(node.op_type, ()))
                                    and name in self.inputs})
        self._models: dict[tuple, Model] = {}

    def model(self, static: Mapping[str, np.ndarray]) -> Model:
        key = tuple((name, static[name].tobytes()) for name in self.shape_inputs)
        model = self._models.get(key)
        if model is None:
            graph, outputs, initial = Importer(self.proto, static).run()
            model = graph.compile(outputs=outputs, backend=self.backend, initial_values=initial)
            self._models[key] = model
        return model

    def run(self, inputs: Any, **kwargs: Any) -> tuple[np.ndarray, ...]:
        feeds = dict(inputs) if isinstance(inputs, Mapping) else dict(zip(self.inputs, _listed(inputs)))
        feeds = {name: _array(value) for name, value in feeds.items()}
        static = {name: np.asarray(feeds.pop(name)) for name in self.shape_inputs}
        model = self.model(static)
        used = set(model.graph.inputs())
        values = model.run({name: value for name, value in feeds.items() if name in used})
        return tuple(values[name] for name in model.output_names)


def _array(value: Any) -> np.ndarray:
    """ONNX's tests give tensors of types NumPy lacks a dtype for as TensorProtos."""
    if isinstance(value, onnx.TensorProto):
        return onnx.numpy_helper.to_array(value)
    return np.asarray(value)


def _listed(inputs: Any) -> Sequence[Any]:
    return [inputs] if isinstance(inputs, np.ndarray) else list(inputs)


class Backend(_OnnxBackend):
    """graphengine as an ONNX backend (CPU, NumPy)."""

    @classmethod
    def prepare(cls, model: Any, device: str = "CPU", **kwargs: Any) -> BackendRep:
        return BackendRep(read(model))

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return device == "CPU"
