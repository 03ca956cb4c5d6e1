"""Export a model's inference graph to ONNX.

Every node of the graph is translated by the exporter of its operator's kind: the core's
primitives' are in :mod:`graphengine.onnx.mappings`; every plugin, the built-in ones included
(``graphengine.plugins.onnx_export``), supplies those of its kinds through the
``graphengine_register_onnx_exporters`` hook. An exporter is a function
``exporter(ex, node)`` that emits ONNX nodes computing ``node`` through ``ex``, an
:class:`Exporter`. The batch dimension (``None``) stays symbolic, named ``N``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..compiler.plan import ancestors
from ..errors import GraphEngineError
from ..hooks import get_plugin_manager
from ..ir.contracts import ActivationOp, LossOp
from ..ir.operators import Constant, Input, Parameter, Source

if TYPE_CHECKING:
    from ..ir.graph import Node
    from ..model import Model

#: The opset written by default, and the oldest the built-in exporters can write.
DEFAULT_OPSET = 17
MIN_OPSET = 14
#: The name of the symbolic batch dimension of inputs and outputs.
BATCH = "N"

ExporterFn = Callable[["Exporter", "Node"], None]


def require_onnx() -> Any:
    """The ``onnx`` module, or an error saying how to install it."""
    try:
        import onnx
    except ImportError:
        raise GraphEngineError("ONNX support needs the onnx package: pip install onnx "
                               "onnxruntime (or pip install 'graphengine[onnx]')") from None
    return onnx


class Exporter:
    """What an exporter function writes with: the ONNX names of a node's inputs and output,
    the values of its parameter and constant inputs, and ``add`` to emit ONNX nodes."""

    def __init__(self, model: Model, opset: int) -> None:
        self.onnx = require_onnx()
        self.model = model
        self.graph = model.graph
        self.opset = opset
        self.nodes: list[Any] = []
        self.initializers: dict[str, np.ndarray] = {}
        self._names: set[str] = set()
        self._current: Node | None = None

    # -- for exporter functions ------------------------------------------------------------------

    def input(self, node: Node, i: int) -> str:
        """The ONNX value holding input ``i`` of ``node``."""
        return node.inputs[i]

    def value(self, node: Node, i: int) -> np.ndarray | None:
        """The array of input ``i`` when it is a parameter or a constant, else None."""
        name = node.inputs[i]
        op = self.graph.nodes[name].op
        if isinstance(op, Parameter):
            return self.model.backend.to_numpy(self.model.store.arrays[name])
        if isinstance(op, Constant):
            return np.asarray(op.value)
        return None

    def weight(self, node: Node, i: int, what: str) -> np.ndarray:
        """Like :meth:`value`, but input ``i`` must be a parameter or constant (a weight the
        exporter rearranges into ONNX's layout)."""
        array = self.value(node, i)
        if array is None:
            raise GraphEngineError(f"ONNX export of node {node.name!r} ({node.kind}): its {what} "
                                   f"{node.inputs[i]!r} must be a parameter or constant to be "
                                   f"rearranged into ONNX's layout, not a computed tensor")
        return array

    def constant(self, array: Any, hint: str = "const", dtype: Any = None) -> str:
        """An initializer holding ``array``; returns its name."""
        array = np.asarray(array, dtype=dtype)
        name = self.fresh(hint)
        self.initializers[name] = array
        return name

    def ints(self, values: Sequence[int], hint: str = "ints") -> str:
        """An int64 initializer (shapes, axes, slice bounds)."""
        return self.constant(np.asarray(list(values), dtype=np.int64), hint)

    def fresh(self, hint: str) -> str:
        base = f"{self._current.name}/{hint}" if self._current is not None else hint
        name, n = base, 1
        while name in self._names or name in self.graph.nodes:
            name, n = f"{base}_{n}", n + 1
        self._names.add(name)
        return name

    def add(self, op_type: str, inputs: Sequence[str], output: str | None = None, *,
            outputs: int = 1, **attributes: Any) -> Any:
        """Emit an ONNX node; returns its output's name (a list of names if ``outputs`` > 1).
        ``output`` names the (first) output, by default a fresh name; empty input names stand
        for omitted optional inputs."""
        names = [output or self.fresh(op_type.lower())] + [self.fresh(f"{op_type.lower()}_out")
                                                           for _ in range(outputs - 1)]
        self.nodes.append(self.onnx.helper.make_node(
            op_type, list(inputs), names, name=names[0],
            **{k: v for k, v in attributes.items() if v is not None}))
        return names[0] if outputs == 1 else names

    # -- the whole graph --------------------------------------------------------------------------

    def run(self, exporters: dict[str, ExporterFn]) -> Any:
        helper = self.onnx.helper
        wanted = ancestors(self.graph, self.model.output_names)
        needed = [name for name in self.graph.nodes if name in wanted]  # graph order: topological
        inputs, missing = [], {}
        for name in needed:
            node = self.graph.nodes[name]
            if isinstance(node.op, Input):
                inputs.append(value_info(self.onnx, name, node.spec))
            elif isinstance(node.op, Source):
                self.initializers[name] = self._source(node)
            elif isinstance(node.op, LossOp):
                continue
            elif self.kind(node) not in exporters:
                missing.setdefault(node.kind, []).append(name)
        if missing:
            raise GraphEngineError(
                "ONNX export: no ONNX mapping for operator kind(s) "
                + "; ".join(f"{kind!r} (node {names[0]!r}{describe_origin(self.graph, names[0])})"
                            for kind, names in missing.items())
                + ". The plugin of that kind can register one through the "
                  "graphengine_register_onnx_exporters hook (see docs/onnx.md)")
        for name in needed:
            node = self.graph.nodes[name]
            if not isinstance(node.op, Source):
                self._current = node
                exporters[self.kind(node)](self, node)
                self._current = None
        outputs = []
        for name in self.model.output_names:
            out = name
            link = getattr(self.model.link, "applies_activation", None)
            if link is not None:  # predict() returns the loss's link of the output: so does ONNX
                out = self._link(link, name)
            outputs.append(value_info(self.onnx, out, self.graph.nodes[name].spec))
        # Weights that an exporter rearranged (an LSTM's) are read only through their copies.
        used = {name for node in self.nodes for name in node.input}
        initializers = [self.onnx.numpy_helper.from_array(np.ascontiguousarray(a), name)
                        for name, a in self.initializers.items() if name in used]
        graph = helper.make_graph(self.nodes, self.graph.name, inputs, outputs, initializers)
        model = helper.make_model(graph, producer_name="graphengine",
                                  opset_imports=[helper.make_opsetid("", self.opset)])
        self.onnx.checker.check_model(model)
        return model

    def kind(self, node: Node) -> str:
        """The kind exporters are registered under: an activation's registered name, whichever
        alias the graph used (``logistic`` is ``sigmoid``)."""
        if isinstance(node.op, ActivationOp):
            activations = get_plugin_manager().activations
            if node.kind in activations:
                return activations.entry(node.kind).name
        return node.kind

    def _source(self, node: Node) -> np.ndarray:
        if isinstance(node.op, Parameter):
            return self.model.backend.to_numpy(self.model.store.arrays[node.name])
        return np.asarray(node.op.value)

    def _link(self, kind: str, name: str) -> str:
        """The loss's link (``predict``'s softmax of the logits) after output ``name``."""
        op_type = {"softmax": "Softmax", "sigmoid": "Sigmoid", "log_softmax": "LogSoftmax"}.get(kind)
        if op_type is None:
            raise GraphEngineError(f"ONNX export: the model's loss applies {kind!r} to its output in "
                                   f"predict(), which has no ONNX mapping; compile with outputs= "
                                   f"the tensor you want exported")
        attributes = {} if op_type == "Sigmoid" else {"axis": -1}
        return self.add(op_type, [name], f"{name}/{kind}", **attributes)


def describe_origin(graph: Any, name: str) -> str:
    layers = graph.layers()
    layer = graph.enclosing_layer(graph.nodes[name].layer, layers)
    return f", in layer {layer!r} of kind {layers[layer]['kind']!r}" if layer else ""


def value_info(onnx: Any, name: str, spec: Any) -> Any:
    dims = [BATCH if d is None else d for d in spec.shape]
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(spec.dtype))
    return onnx.helper.make_tensor_value_info(name, elem, dims)


def exporters() -> dict[str, ExporterFn]:
    """Kind -> exporter: the primitives', then what plugins registered."""
    from .mappings import EXPORTERS
    table = dict(EXPORTERS)
    for entry in get_plugin_manager().onnx_exporters.entries():
        for key in (entry.name, *entry.aliases):
            table[key] = entry.obj
    return table


def to_onnx(model: Model, opset: int = DEFAULT_OPSET) -> Any:
    """The model's inference graph as an ``onnx.ModelProto``."""
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise GraphEngineError(f"ONNX export writes opset {MIN_OPSET} or newer, got opset={opset!r}")
    return Exporter(model, opset).run(exporters())


def export(model: Model, path: str | os.PathLike, opset: int = DEFAULT_OPSET) -> Any:
    """Write ``model``'s inference graph (evaluation mode: dropout off, batch norm with its
    running statistics) to the ONNX file ``path``; returns the ``onnx.ModelProto``."""
    proto = to_onnx(model, opset)
    require_onnx().save(proto, os.fspath(path))
    return proto
