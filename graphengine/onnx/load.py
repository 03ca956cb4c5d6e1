"""Import an ONNX inference graph as a graphengine graph and model.

Nodes become what graphengine itself would build where it can: Gemm, and MatMul followed by
Add, with weights among the initializers become ``dense`` layers; Conv becomes ``conv2d`` (grouped
and dilated ones too),
BatchNormalization ``batch_norm``, Gather of a table ``embedding``, RNN/LSTM/GRU the recurrent
layers, Relu and friends the registered activations, elementwise arithmetic the primitives.
Pooling stays an ONNX operator, with ONNX's own rules for ceil mode, dilations and padding.
Every other supported operator becomes an ``onnx_node`` layer (:mod:`graphengine.onnx.ops`).
Float initializers become trainable parameters (a batch norm's running statistics fixed ones),
so the imported model trains like any other.

Values known at import time (initializers, Constant nodes, and what is computed from them
alone, such as a Shape of a known shape) are folded; ONNX inputs that fix an output's shape (a
Reshape's shape) must be among them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import GraphEngineError, SerializationError
from ..hooks import get_plugin_manager
from ..ir.graph import Graph, Tensor
from .export import require_onnx
from .ops import BATCH, FORWARD, OnnxOp, static_config
from .plugin import LAYER, ensure_registered

if TYPE_CHECKING:
    from ..model import Model

#: ONNX input positions that must be known at import time, by operator.
STATIC_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,), "Slice": (1, 2, 3, 4), "Squeeze": (1,), "Unsqueeze": (1,), "Expand": (1,),
    "Tile": (1,), "Clip": (1, 2), "Pad": (1, 2, 3), "ConstantOfShape": (0,), "Range": (0, 1, 2),
    "Split": (1,), "Dropout": (1, 2), "CastLike": (1,), "CumSum": (1,), "Trilu": (1,), "OneHot": (1, 2),
    **{op: (1,) for op in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd",
                           "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum",
                           "ReduceLogSumExp")},
}
#: Operators that only move values around: applied to values filled with one number, they give
#: values filled with that number.
LAYOUT_OPS = ("Slice", "Squeeze", "Unsqueeze", "Reshape", "Expand", "Gather", "Identity",
              "Transpose", "Concat", "Flatten", "Tile")
#: Inputs that hold weights, by operator: an ONNX backend (graphengine.onnx.Backend) fed them
#: as graph inputs folds them in as parameters, as if they were initializers.
WEIGHT_INPUTS: dict[str, tuple[int, ...]] = {op: (1, 2, 3, 4) for op in ("RNN", "LSTM", "GRU")}
#: Operators with extra outputs that the importer cannot compute (indices, training statistics).
FIRST_OUTPUT_ONLY = ("MaxPool", "BatchNormalization")
#: ONNX activations that map onto registered activations of the same meaning.
ACTIVATIONS = {"Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Softplus": "softplus",
               "Sign": "sign"}
#: Elementwise ONNX operators that map onto graphengine primitives.
PRIMITIVE_BINARY = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div"}


def supported_ops() -> list[str]:
    """The ONNX operators the importer understands."""
    return sorted({*FORWARD, *CONVERTERS, "Constant", "Split"})


class Importer:
    """Walks an ONNX graph in order, adding a graphengine node (or a folded value) per output."""

    def __init__(self, proto: Any, static_inputs: Mapping[str, np.ndarray] | None = None) -> None:
        self.onnx = require_onnx()
        ensure_registered()
        self.proto = proto
        #: The standard operator set the model was written with: some operators changed meaning.
        self.opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=1)
        graph = proto.graph
        self.g = Graph(_clean(graph.name) or "onnx")
        self.tensors: dict[str, Tensor] = {}
        self.static: dict[str, np.ndarray] = {}
        self.initial: dict[str, np.ndarray] = {}
        self.layer_names: set[str] = set()
        numpy_helper = self.onnx.numpy_helper
        for init in graph.initializer:
            self.static[init.name] = numpy_helper.to_array(init)
        for name, value in (static_inputs or {}).items():
            self.static[name] = np.asarray(value)
        self.consumers: dict[str, int] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers[name] = self.consumers.get(name, 0) + 1
        for out in graph.output:
            self.consumers[out.name] = self.consumers.get(out.name, 0) + 1
        self.skip: set[int] = set()
        #: Values filled with one number, of a shape known only at run time (ConstantOfShape).
        self.fills: dict[str, Any] = {}

    # -- values ---------------------------------------------------------------------------------

    def tensor(self, name: str) -> Tensor:
        """The graph tensor of ONNX value ``name``; a known value becomes a parameter (floats)
        or a constant the first time it is used as a tensor."""
        if name in self.tensors:
            return self.tensors[name]
        if name in self.fills:
            raise GraphEngineError(f"ONNX import: value {name!r} (ConstantOfShape) has a shape "
                                   f"known only at run time, which graphengine cannot build")
        if name not in self.static:
            raise GraphEngineError(f"ONNX import: value {name!r} is used before it is computed")
        value = self.static[name]
        if value.dtype.kind == "f" and value.ndim:
            tensor = self.g.parameter(_clean(name), value.shape, init="zeros", dtype=value.dtype.name)
            self.initial[tensor.name] = np.array(value)
        else:
            tensor = self.g.constant(value, name=_clean(name), dtype=value.dtype.name)
        self.tensors[name] = tensor
        return tensor

    def known(self, name: str) -> np.ndarray | None:
        return self.static.get(name) if name else None

    def layer_name(self, node: Any, fallback: str) -> str:
        """A unique layer name: a weight's module path (``fc1`` of ``fc1.weight``), else the
        node's name."""
        base = _clean(fallback) or _clean(node.name) or node.op_type.lower()
        name, n = base, 1
        while name in self.layer_names or name in self.g.nodes:
            name, n = f"{base}_{n}", n + 1
        self.layer_names.add(name)
        return name

    def add_parameter(self, layer: str, local: str, value: np.ndarray) -> None:
        """The initial value of parameter ``local`` of ``layer`` (what compile copies in)."""
        self.initial[f"{layer}/{local}"] = np.array(value)  # a copy: ONNX's arrays are read-only

    # -- the graph ------------------------------------------------------------------------------

    def run(self) -> tuple[Graph, list[Tensor], dict[str, np.ndarray]]:
        graph = self.proto.graph
        supported = set(supported_ops())
        unknown = sorted({n.op_type for n in graph.node
                          if n.op_type not in supported or n.domain not in ("", "ai.onnx")})
        if unknown:
            raise GraphEngineError(f"ONNX import of graph {graph.name!r}: unsupported operator(s) "
                                   f"{', '.join(unknown)}; graphengine imports {len(supported_ops())} "
                                   f"operators (see docs/onnx.md)")
        helper = self.onnx.helper
        for value in graph.input:
            if value.name in self.static:
                continue
            if not value.type.HasField("tensor_type"):
                raise GraphEngineError(f"ONNX import: input {value.name!r} is not a tensor (an "
                                       f"optional, a sequence or a map), which graphengine has not")
            shape = _input_shape(value)
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)).name
            self.tensors[value.name] = self.g.input(_clean(value.name), shape, dtype=dtype)
        for index, node in enumerate(graph.node):
            if index in self.skip:
                continue
            try:
                self.convert(index, node)
            except GraphEngineError as exc:
                raise type(exc)(f"ONNX import, node {node.name or index!r} ({node.op_type}): {exc}") from None
            except (KeyError, IndexError, ValueError, TypeError) as exc:  # a malformed node
                raise GraphEngineError(f"ONNX import, node {node.name or index!r} ({node.op_type}) is "
                                       f"malformed: {type(exc).__name__}: {exc}") from None
        outputs = [self.tensor(value.name) for value in graph.output]
        return self.g, outputs, self.initial

    def convert(self, index: int, node: Any) -> None:
        attributes = {a.name: _attribute(self.onnx, a) for a in node.attribute}
        if node.op_type in ("Softmax", "LogSoftmax", "Hardmax") and self.opset < 13:
            _flattened_softmax_axis(self, node, attributes)
        if node.op_type == "Constant":
            self.static[node.output[0]] = _constant(self.onnx, node, attributes)
            return
        if node.op_type in FIRST_OUTPUT_ONLY:
            extra = [o for o in node.output[1:] if o and self.consumers.get(o)]
            if extra:
                raise GraphEngineError(f"only the first output of {node.op_type} is imported, "
                                       f"but {extra} are used")
        if node.op_type == "Split":
            self.split(node, attributes)
            return
        converter = CONVERTERS.get(node.op_type)
        if converter is not None and converter(self, index, node, attributes):
            return
        self.generic(node, attributes)

    def generic(self, node: Any, attributes: dict[str, Any]) -> None:
        """The node as an ``onnx_node`` layer, or folded when all its inputs are known. The
        batch size, unknown until run time, may travel through folded shape vectors as
        :data:`~graphengine.onnx.ops.BATCH` (a Shape of a batch of inputs), as far as a Reshape
        or the zeros of an RNN's initial state; computing with it is refused."""
        fixed = STATIC_INPUTS.get(node.op_type, ())
        static, tensors, values = {}, [], []
        for position, name in enumerate(node.input):
            if not name:
                continue
            if position in fixed:
                value = self.known(name)
                if value is None:
                    raise GraphEngineError(f"input {position} ({name!r}) must be known when the "
                                           f"model is imported (an initializer or a constant): "
                                           f"graphengine's shapes are fixed when a graph is built")
                static[position] = value
            else:
                tensors.append(name)
                values.append(self.known(name))
        if any(_holds_batch(v) for v in (*values, *static.values())):
            if node.op_type == "ConstantOfShape":
                # of the batch's size: as PyTorch writes an RNN's initial state of zeros, kept
                # as its value for the recurrent layers (which start from zeros)
                self.fills[node.output[0]] = np.asarray(attributes.get("value", 0.0)).reshape(-1)[0]
                return
            if node.op_type not in (*LAYOUT_OPS, "Expand"):
                raise GraphEngineError("computes with the batch size, which graphengine leaves "
                                       "open until run time: export the model with a fixed batch "
                                       "size, or without this computation")
        filled = {self.fills[n] for n in tensors if n in self.fills}
        if filled and node.op_type in LAYOUT_OPS and len(filled) == 1 and all(
                n in self.fills or (self.known(n) is not None and self.known(n).dtype.kind != "f")
                for n in tensors):
            self.fills[node.output[0]] = filled.pop()  # moving one value around keeps it
            return
        if node.op_type == "Shape" and values[0] is None:
            shape = np.array([BATCH if d is None else d for d in self.tensor(tensors[0]).shape])
            self.static[node.output[0]] = shape[attributes.get("start", 0):attributes.get("end")]
            return
        if node.op_type == "Size" and None not in self.tensor(tensors[0]).shape:
            values = [np.zeros(self.tensor(tensors[0]).shape, np.int8)]  # only its shape matters
        for k, output in enumerate(node.output):
            if not output or (k and not self.consumers.get(output)):
                continue
            if all(v is not None for v in values):
                op = OnnxOp(node.op_type, attributes, static, output=k)
                self.static[output] = np.asarray(op.evaluate(np, values))
                continue
            inputs = [self.tensor(n) for n in tensors]
            self.tensors[output] = self.g.layer(
                LAYER, *inputs, name=self.layer_name(node, node.name), op_type=node.op_type,
                attributes=attributes, static={str(k): static_config(v) for k, v in static.items()},
                output=k)

    def split(self, node: Any, attributes: dict[str, Any]) -> None:
        """Split, as one Slice per output (folded where the input is known)."""
        source = node.input[0]
        value = self.known(source)
        axis = attributes.get("axis", 0)
        size = (value.shape if value is not None else self.tensor(source).shape)[axis]
        if size is None:
            raise GraphEngineError("Split along the batch axis, whose size is known only at run time")
        sizes = attributes.get("split")
        if len(node.input) > 1 and node.input[1]:
            sizes = self.known(node.input[1])
            if sizes is None:
                raise GraphEngineError("the split sizes must be known when the model is imported")
        if sizes is None:
            parts = attributes.get("num_outputs", len(node.output))
            chunk = -(-size // parts)
            sizes = [min(chunk, size - k * chunk) for k in range(parts)]
        start = 0
        for output, length in zip(node.output, [int(v) for v in np.ravel(sizes)]):
            bounds = {1: [start], 2: [start + length], 3: [axis]}
            start += length
            if value is not None:
                op = OnnxOp("Slice", {}, {k: np.asarray(v, np.int64) for k, v in bounds.items()})
                self.static[output] = np.asarray(op.evaluate(np, [value]))
                continue
            self.tensors[output] = self.g.layer(
                LAYER, self.tensor(source), name=self.layer_name(node, f"{node.name}.{output}"),
                op_type="Slice", static={str(k): v for k, v in bounds.items()})


# --------------------------------------------------------------------------- preferred mappings
# Each returns True when it built the node, False to leave it to the generic onnx_node.

def _weight_layer_name(im: Importer, node: Any, weight: str) -> str:
    """``fc1`` for a weight named ``fc1.weight`` (PyTorch's), else the node's own name."""
    stem = re.sub(r"[./](weight|W|kernel)$", "", weight) if re.search(r"[./](weight|W|kernel)$",
                                                                     weight) else ""
    return im.layer_name(node, stem or node.name)


def _dense(im: Importer, node: Any, x: str, w: np.ndarray, b: np.ndarray | None,
           weight_name: str, output: str) -> bool:
    tensor = im.tensors.get(x)
    if tensor is None or w.ndim != 2 or w.dtype.kind != "f" or tensor.dtype != w.dtype.name:
        return False
    units = w.shape[1]
    if b is not None:
        if b.size not in (1, units) or b.ndim > 2:
            return False
        b = np.broadcast_to(b.reshape(-1), (units,))
    name = _weight_layer_name(im, node, weight_name)
    im.tensors[output] = im.g.layer("dense", tensor, units=units, bias=b is not None, name=name)
    im.add_parameter(name, "W", w)
    if b is not None:
        im.add_parameter(name, "b", np.array(b, dtype=w.dtype).reshape(units))
    return True


def _gemm(im: Importer, index: int, node: Any, a: dict[str, Any]) -> bool:
    w = im.known(node.input[1])
    if a.get("transA") or w is None or node.input[0] in im.static:
        return False
    c = im.known(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if len(node.input) > 2 and node.input[2] and c is None:
        return False
    w = (w.T if a.get("transB") else w) * np.asarray(a.get("alpha", 1.0), dtype=w.dtype)
    b = None if c is None else c * np.asarray(a.get("beta", 1.0), dtype=c.dtype)
    return _dense(im, node, node.input[0], w, b, node.input[1], node.output[0])


def _matmul(im: Importer, index: int, node: Any, a: dict[str, Any]) -> bool:
    w = im.known(node.input[1])
    if w is None or node.input[0] in im.static or w.ndim != 2:
        return False
    following = _only_consumer(im, index, node.output[0])
    b = None
    if following is not None and following[1].op_type == "Add":
        add = following[1]
        other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
        bias = im.known(other)
        if bias is not None and bias.size == w.shape[1] and bias.dtype == w.dtype:
            b = bias.reshape(-1)
            im.skip.add(following[0])
            named = node if node.name else add
            if _dense(im, named, node.input[0], w, b, node.input[1], add.output[0]):
                return True
            im.skip.discard(following[0])
            return False
    tensor = im.tensors.get(node.input[0])
    if tensor is None or tensor.ndim < 2:
        return False
    return _dense(im, node, node.input[0], w, None, node.input[1], node.output[0])


def _only_consumer(im: Importer, index: int, output: str) -> tuple[int, Any] | None:
    if im.consumers.get(output) != 1:
        return None
    for k, node in enumerate(im.proto.graph.node[index + 1:], start=index + 1):
        if output in node.input:
            return k, node
    return None


def _flattened_softmax_axis(im: Importer, node: Any, a: dict[str, Any]) -> None:
    """Before opset 13, Softmax, LogSoftmax and Hardmax normalize over every axis from ``axis``
    (default 1) on, as one: the same as today's only where that is the last axis."""
    ndim = im.tensor(node.input[0]).ndim
    if a.get("axis", 1) % max(ndim, 1) != ndim - 1:
        raise GraphEngineError(f"{node.op_type} of opset {im.opset} normalizes over the axes from "
                               f"{a.get('axis', 1)} on of its {ndim}-D input, flattened together; "
                               f"graphengine's normalizes over one axis: export the model with "
                               f"opset 13 or newer")


def _activation(im: Importer, index: int, node: Any, a: dict[str, Any]) -> bool:
    kind = ACTIVATIONS.get(node.op_type)
    if node.op_type == "LeakyRelu":
        kind, config = "leaky_relu", {"slope": float(a.get("alpha", 0.01))}
    elif node.op_type == "Elu":
        kind, config = "elu", {"alpha": float(a.get("alpha", 1.0))}
    elif node.op_type in ("Softmax", "LogSoftmax"):
        tensor = im.tensors.get(node.input[0])
        if tensor is None or a.get("axis", -1) % max(tensor.ndim, 1) != tensor.ndim - 1:
            return False
        kind, config = {"Softmax": "softmax", "LogSoftmax": "log_softmax"}[node.op_type], {}
    else:
        config = {}
    tensor = im.tensors.get(node.input[0])
    if (kind is None or tensor is None or not tensor.dtype.startswith("float")
            or kind not in get_plugin_manager().activations):
        return False
    im.tensors[node.output[0]] = im.g.activation(kind, tensor, name=im.layer_name(node, node.name),
                                                 **config)
    return True


def _binary(im: Importer, index: int, node: Any, a: dict[str, Any]) -> bool:
    left, right = node.input
    if left in im.static and right in im.static:
        return False
    x, y = im.tensor(left), im.tensor(right)
    if x.dtype != y.dtype or not x.dtype.startswith("float"):
        return False
    im.tensors[node.output[0]] = im.g.op(PRIMITIVE_BINARY[node.op_type], x, y,
                                         name=im.layer_name(node, node.name))
    return True


def _conv(im: Importer, index: int, node: Any, a: dict[str, Any]) -> bool:
    w = im.known(node.input[1])
    b = im.known(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    tensor = im.tensors.get(node.input[0])
    if (w is None or w.ndim != 4 or tensor is None or tensor.ndim != 4
            or a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID")
            or (len(node.input) > 2 and node.input[2] and b is None) or "conv2d" not in
            get_plugin_manager().layers):
        return False
    top, left, bottom, right = a.get("pads", [0, 0, 0, 0])
    name = _weight_layer_name(im, node, node.input[1])
    im.tensors[node.output[0]] = im.g.layer(
        "conv2d", tensor, filters=w.shape[0], kernel_size=tuple(w.shape[2:]),
        stride=tuple(a.get("strides", [1, 1])), padding=((top, bottom), (left, right)),
        dilation=tuple(a.get("dilations", [1, 1])), groups=a.get("group", 1),
        bias=b is not None, name=name)
    im.add_parameter(name, "W", w)
    if b is not None:
        im.add_parameter(name, "b", b)
    return True


def _batch_norm(im: Importer, index: int, node: Any, a: dict[str, Any]) -> bool:
    tensor = im.tensors.get(node.input[0])
    values = [im.known(n) for n in node.input[1:5]]
    if (tensor is None or tensor.ndim < 2 or any(v is None for v in values) or a.get("training_mode")
            or "batch_norm" not in get_plugin_manager().layers):
        return False
    name = _weight_layer_name(im, node, node.input[1])
    im.tensors[node.output[0]] = im.g.layer("batch_norm", tensor, axis=1, eps=float(a.get("epsilon", 1e-5)),
                                            momentum=float(a.get("momentum", 0.9)), name=name)
    for local, value in zip(("gamma", "beta", "running_mean", "running_var"), values):
        im.add_parameter(name, local, value)
    return True


def _gather(im: Importer, index: int, node: Any, a: dict[str, Any]) -> bool:
    table, ids = im.known(node.input[0]), im.tensors.get(node.input[1])
    if (table is None or ids is None or table.ndim != 2 or a.get("axis", 0) != 0
            or table.dtype.kind != "f" or "embedding" not in get_plugin_manager().layers):
        return False
    name = _weight_layer_name(im, node, node.input[0])
    im.tensors[node.output[0]] = im.g.layer("embedding", ids, vocab_size=table.shape[0],
                                            dim=table.shape[1], name=name)
    im.add_parameter(name, "W", table)
    return True


def _flatten(im: Importer, index: int, node: Any, a: dict[str, Any]) -> bool:
    tensor = im.tensors.get(node.input[0])
    if tensor is None or a.get("axis", 1) != 1 or tensor.ndim < 2 or None in tensor.shape[1:]:
        return False
    im.tensors[node.output[0]] = im.g.layer("flatten", tensor, name=im.layer_name(node, node.name))
    return True


def _identity(im: Importer, index: int, node: Any, a: dict[str, Any]) -> bool:
    if node.input[0] in im.tensors:
        im.tensors[node.output[0]] = im.tensors[node.input[0]]
        return True
    return False


#: graphengine's gate blocks in ONNX's order (the permutation is its own inverse), as in export.
RECURRENT = {"RNN": ("rnn", (0,)), "LSTM": ("lstm", (0, 2, 1, 3)), "GRU": ("gru", (1, 0, 2))}
DEFAULT_ACTIVATIONS = {"RNN": ["Tanh"], "LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"]}


def _recurrent(im: Importer, index: int, node: Any, a: dict[str, Any]) -> bool:
    """RNN, LSTM and GRU with their weights among the initializers, as the rnn, lstm and gru
    layers (two of them for a bidirectional one): ONNX's time-major sequence is transposed to
    graphengine's batch-major and back."""
    kind, order = RECURRENT[node.op_type]
    inputs = list(node.input) + [""] * (8 - len(node.input))
    w, r, b = im.known(inputs[1]), im.known(inputs[2]), im.known(inputs[3]) if inputs[3] else None
    activations = a.get("activations")
    steps = im.tensor(inputs[0]).shape[1 if a.get("layout", 0) == 1 else 0]  # None: not known
    unsupported = [why for why, bad in (
        ("its weights are computed, not initializers", w is None or r is None or (inputs[3] and b is None)),
        ("sequence_lens that may be shorter than the sequence", bool(inputs[4]) and (
            steps is None or not _is_constant_full(im, inputs[4], steps))),
        ("peepholes (P)", bool(inputs[7])),
        ("clip", "clip" in a), ("input_forget", bool(a.get("input_forget"))),
        ("non-default activations", activations is not None and [x.capitalize() for x in activations]
         != DEFAULT_ACTIVATIONS[node.op_type] * (2 if a.get("direction") == "bidirectional" else 1)),
        ("linear_before_reset=0 (graphengine's GRU applies the reset after the recurrent product, "
         "as PyTorch does)", node.op_type == "GRU" and not a.get("linear_before_reset", 0)),
        ("an output Y_c", len(node.output) > 2 and bool(node.output[2]) and im.consumers.get(node.output[2])),
    ) if bad]
    if unsupported or kind not in get_plugin_manager().layers:
        raise GraphEngineError(f"{node.op_type} is imported as graphengine's {kind} layer, which it "
                               f"cannot be here: {'; '.join(unsupported) or f'no {kind} layer'}")
    units = int(a["hidden_size"])
    direction = a.get("direction", "forward")
    directions = ["forward", "reverse"] if direction == "bidirectional" else [direction]
    batch_first = a.get("layout", 0) == 1
    x = im.tensor(inputs[0])
    if not batch_first:  # ONNX's default is time-major
        x = im.g.op("transpose", x, axes=(1, 0, 2))
    wants_sequence = bool(node.output[0]) and bool(im.consumers.get(node.output[0]))
    base = _weight_layer_name(im, node, node.name or kind)
    sequences, states = [], []
    for d, direction in enumerate(directions):
        initial = [im.tensor(name)[:, d] if batch_first else im.tensor(name)[d]
                   for name in inputs[5:7 if kind == "lstm" else 6]
                   if name and not _is_constant_full(im, name, 0.0)]
        name = im.layer_name(node, f"{base}.{direction}") if len(directions) > 1 else base
        out = im.g.layer(kind, x, *initial, units=units, return_sequences=wants_sequence,
                         reverse=direction == "reverse", name=name)
        _recurrent_parameters(im, name, node.op_type, order, units, w[d], r[d],
                              None if b is None else b[d])
        if wants_sequence:
            sequences.append(out if batch_first else im.g.op("transpose", out, axes=(1, 0, 2)))
            states.append(out[:, 0 if direction == "reverse" else -1])
        else:
            states.append(out)
    # ONNX's Y: (time, directions, batch, units), Y_h: (directions, batch, units); batch first
    # with layout=1: (batch, time, directions, units) and (batch, directions, units)
    if wants_sequence:
        im.tensors[node.output[0]] = im.g.op("stack", *sequences, axis=2 if batch_first else 1)
    if len(node.output) > 1 and node.output[1]:
        im.tensors[node.output[1]] = im.g.op("stack", *states, axis=1 if batch_first else 0)
    return True


def _recurrent_parameters(im: Importer, layer: str, op_type: str, order: tuple[int, ...], units: int,
                          w: np.ndarray, r: np.ndarray, b: np.ndarray | None) -> None:
    def blocks(matrix: np.ndarray) -> np.ndarray:  # ONNX's (gates*units, n) -> (n, gates*units)
        return np.concatenate([matrix[k * units:(k + 1) * units] for k in order]).T

    gates = len(order) * units
    wb, rb = (np.zeros(gates, w.dtype), np.zeros(gates, w.dtype)) if b is None else (b[:gates], b[gates:])
    im.add_parameter(layer, "W", blocks(w))
    im.add_parameter(layer, "U", blocks(r))
    if op_type == "GRU":  # the candidate's recurrent bias stays apart: it is gated by r
        im.add_parameter(layer, "b", blocks(np.concatenate([wb[:2 * units] + rb[:2 * units],
                                                            wb[2 * units:]])[:, None])[0])
        im.add_parameter(layer, "bh", rb[2 * units:])
    else:
        im.add_parameter(layer, "b", blocks((wb + rb)[:, None])[0])


def _holds_batch(value: np.ndarray | None) -> bool:
    return value is not None and value.dtype == np.int64 and bool((value == BATCH).any())


def _is_constant_full(im: Importer, name: str, value: float | None = None) -> bool:
    """Whether ``name`` is known and holds one value everywhere (``value``, if given): a
    sequence_lens of the full length, or zero initial states, which change nothing."""
    if name in im.fills:
        return value is None or im.fills[name] == value
    known = im.known(name)
    if known is None or not known.size:
        return False
    first = known.reshape(-1)[0]
    return bool((known == first).all() and (value is None or first == value))


CONVERTERS: dict[str, Callable[[Importer, int, Any, dict[str, Any]], bool]] = {
    "RNN": _recurrent, "LSTM": _recurrent, "GRU": _recurrent,
    "Gemm": _gemm, "MatMul": _matmul, "Conv": _conv,
    "BatchNormalization": _batch_norm, "Gather": _gather, "Flatten": _flatten,
    "Identity": _identity,
    **{op: _activation for op in (*ACTIVATIONS, "LeakyRelu", "Elu", "Softmax", "LogSoftmax")},
    **{op: _binary for op in PRIMITIVE_BINARY},
}


# --------------------------------------------------------------------------- helpers

def _clean(name: str) -> str:
    """An ONNX name as a graphengine node name: ``/`` separates layer scopes there."""
    return re.sub(r"[/:]+", ".", name).strip(".")


def _input_shape(value: Any) -> tuple[int | None, ...]:
    dims = value.type.tensor_type.shape.dim
    shape: list[int | None] = []
    for i, dim in enumerate(dims):
        if dim.HasField("dim_value") and dim.dim_value > 0:
            shape.append(int(dim.dim_value))
        elif i == 0:
            shape.append(None)
        else:
            raise GraphEngineError(f"ONNX import: input {value.name!r} has a symbolic dimension "
                                   f"{dim.dim_param or '?'} at axis {i}; only the batch (axis 0) "
                                   f"may vary in graphengine: export with fixed sizes elsewhere")
    return tuple(shape)


def _attribute(onnx: Any, attribute: Any) -> Any:
    value = onnx.helper.get_attribute_value(attribute)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, onnx.TensorProto):
        return onnx.numpy_helper.to_array(value)
    if isinstance(value, list):
        return [v.decode() if isinstance(v, bytes) else v for v in value]
    return value


def _constant(onnx: Any, node: Any, attributes: dict[str, Any]) -> np.ndarray:
    for key, dtype in (("value", None), ("value_float", np.float32), ("value_floats", np.float32),
                       ("value_int", np.int64), ("value_ints", np.int64)):
        if key in attributes:
            return np.asarray(attributes[key], dtype=dtype)
    raise GraphEngineError(f"Constant {node.name!r}: unsupported attribute {sorted(attributes)}")


def read(source: str | os.PathLike | Any) -> Any:
    """An ``onnx.ModelProto`` from a path or a proto."""
    onnx = require_onnx()
    if isinstance(source, onnx.ModelProto):
        return source
    try:
        return onnx.load(os.fspath(source))
    except OSError as exc:
        raise SerializationError(f"cannot read ONNX file {os.fspath(source)!r}: "
                                 f"{exc.strerror or exc}") from None
    except Exception as exc:  # a protobuf decode error: not an ONNX file
        raise SerializationError(f"{source}: not an ONNX model ({type(exc).__name__}: {exc})") from None


def load(source: str | os.PathLike | Any, *, loss: str | None = None, optimizer: Any = None,
         backend: str = "numpy", target: str = "target", seed: int = 0) -> Model:
    """Import the ONNX model at ``source`` (a path or an ``onnx.ModelProto``) as a
    :class:`graphengine.Model` that predicts what onnxruntime predicts.

    With ``loss`` (a registered loss, e.g. ``"mse"`` or ``"softmax_cross_entropy"``) applied to
    its first output against a new input named ``target``, it trains (``optimizer``) and its
    gradient flow can be drawn like any model's. Unsupported operators raise a
    :class:`~graphengine.errors.GraphEngineError` listing them.
    """
    proto = read(source)
    graph, outputs, initial = Importer(proto).run()
    if loss is None:
        return graph.compile(outputs=outputs, optimizer=optimizer, backend=backend, seed=seed,
                             initial_values=initial)
    entry = get_plugin_manager().losses.entry(loss)
    head = outputs[0]
    if entry.obj.target_kind in ("int", "any"):  # class labels
        labels = graph.input(target, head.shape[:-1], dtype="int64")
    else:
        labels = graph.input(target, head.shape, dtype=head.dtype)
    applied = getattr(entry.obj(), "applies_activation", None)  # an instance: it may depend on config
    if isinstance(applied, str) and head.node.kind == applied:
        # The loss applies the output's activation itself (softmax cross-entropy on a softmax
        # output): it takes the activation's input, the logits; predict() still gives the output.
        head = graph[head.node.inputs[0]]
    return graph.compile(graph.loss(loss, head, labels), outputs=outputs, optimizer=optimizer,
                         backend=backend, seed=seed, initial_values=initial)
