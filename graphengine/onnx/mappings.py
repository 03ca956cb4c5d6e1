"""ONNX mappings of the core's primitives, and the helpers that exporters share.

Each exporter ``fn(ex, node)`` writes the ONNX nodes computing ``node``, whose output must be the
ONNX value named ``node.name`` (see :class:`graphengine.onnx.export.Exporter`). The core maps only
what it defines itself: the primitives and imported ONNX nodes. Plugins register exporters for
their own kinds through the ``graphengine_register_onnx_exporters`` hook, the built-in plugins
too (``graphengine.plugins.onnx_export``), exactly as a third party's would.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import GraphEngineError
from .ops import FORWARD

INT64_MAX = np.iinfo(np.int64).max


def unary(op_type: str, **attributes: Any) -> Callable:
    def export(ex, node):
        ex.add(op_type, [ex.input(node, 0)], node.name, **attributes)
    return export


def binary(op_type: str) -> Callable:
    def export(ex, node):
        ex.add(op_type, [ex.input(node, 0), ex.input(node, 1)], node.name)
    return export


def axes_operand(ex, op_type: str, data: str, axes: Any, output: str | None, since: int,
                  **attributes: Any) -> str:
    """``op_type`` over ``axes``, given as an input from opset ``since`` on and as an attribute
    before (ReduceMean and ReduceMax moved them in opset 18, Squeeze and ReduceSum in 13)."""
    axes = [int(a) for a in axes]
    if ex.opset >= since:
        return ex.add(op_type, [data, ex.ints(axes, "axes")], output, **attributes)
    return ex.add(op_type, [data], output, axes=axes, **attributes)


# --------------------------------------------------------------------------- primitives

def _pow(ex, node):
    exponent = ex.constant(np.asarray(node.op.exponent, dtype=node.dtype), "exponent")
    ex.add("Pow", [ex.input(node, 0), exponent], node.name)


def _reduce(op_type: str, since: int) -> Callable:
    def export(ex, node):
        axes_operand(ex, op_type, ex.input(node, 0), node.op.axes, node.name, since,
                      keepdims=int(node.op.keepdims))
    return export


def _reshape(ex, node):
    target = list(node.op.shape)
    x = ex.input(node, 0)
    if None not in target[1:]:  # ONNX's 0 copies the input's dimension at the same index
        shape = ex.ints([0 if d is None else d for d in target], "shape")
    else:  # the batch moves to another position: read it at run time
        batch = ex.add("Slice", [ex.add("Shape", [x]), ex.ints([0]), ex.ints([1])])
        parts = [batch if d is None else ex.ints([d]) for d in target]
        shape = ex.add("Concat", parts, axis=0)
    ex.add("Reshape", [x, shape], node.name)


def _transpose(ex, node):
    ex.add("Transpose", [ex.input(node, 0)], node.name, perm=list(node.op.perm))


def _concat(ex, node):
    ex.add("Concat", [ex.input(node, i) for i in range(len(node.inputs))], node.name,
           axis=int(node.op.resolved_axis))


def _index(ex, node):
    starts, ends, axes, steps, dropped = [], [], [], [], []
    for axis, key in enumerate(node.op.key):
        if isinstance(key, slice):
            if key == slice(None):
                continue
            step = 1 if key.step is None else key.step
            start = key.start if key.start is not None else (0 if step > 0 else -1)
            end = key.stop if key.stop is not None else (INT64_MAX if step > 0 else -INT64_MAX)
        else:
            start, end, step = key, (INT64_MAX if key == -1 else key + 1), 1
            dropped.append(axis)
        starts.append(start), ends.append(end), axes.append(axis), steps.append(step)
    out = ex.input(node, 0)
    if axes:
        out = ex.add("Slice", [out, ex.ints(starts), ex.ints(ends), ex.ints(axes), ex.ints(steps)],
                     None if dropped else node.name)
    if dropped:
        axes_operand(ex, "Squeeze", out, dropped, node.name, 13)
    elif not axes:
        ex.add("Identity", [out], node.name)


def clip_between(low: float | None, high: float | None) -> Callable:
    def export(ex, node):
        bounds = [ex.constant(np.asarray(v, node.dtype), "bound") if v is not None else ""
                  for v in (low, high)]
        ex.add("Clip", [ex.input(node, 0), *bounds], node.name)
    return export


def _clip(ex, node):
    clip_between(node.op.lo, node.op.hi)(ex, node)


def _softmax(op_type: str) -> Callable:
    def export(ex, node):
        ex.add(op_type, [ex.input(node, 0)], node.name, axis=int(node.op.config().get("axis", -1)))
    return export


def _astype(ex, node):
    ex.add("Cast", [ex.input(node, 0)], node.name,
           to=ex.onnx.helper.np_dtype_to_tensor_dtype(np.dtype(node.op.dtype)))


def _spread(ex, node):
    """var / std: the mean of squared deviations, times N / (N - ddof)."""
    op, x = node.op, ex.input(node, 0)
    mean = axes_operand(ex, "ReduceMean", x, op.axes, None, 18, keepdims=1)
    deviation = ex.add("Sub", [x, mean])
    squares = ex.add("Mul", [deviation, deviation])
    output = node.name if node.kind == "var" and not op.ddof else None
    out = axes_operand(ex, "ReduceMean", squares, op.axes, output, 18, keepdims=int(op.keepdims))
    if op.ddof:
        shape = ex.graph.nodes[node.inputs[0]].shape
        count = 1
        for a in op.axes:
            if shape[a] is None:
                raise GraphEngineError(f"ONNX export of {node.name!r}: {node.kind} with ddof over the "
                                       f"batch axis needs the batch size, which ONNX leaves open")
            count *= shape[a]
        factor = ex.constant(np.asarray(count / (count - op.ddof), node.dtype), "correction")
        out = ex.add("Mul", [out, factor], node.name if node.kind == "var" else None)
    if node.kind == "std":
        ex.add("Sqrt", [out], node.name)


def _squeeze(ex, node):
    axes_operand(ex, "Squeeze", ex.input(node, 0), node.op.axes, node.name, 13)


def _expand_dims(ex, node):
    axes_operand(ex, "Unsqueeze", ex.input(node, 0), [node.op.resolved_axis], node.name, 13)


def _stack(ex, node):
    axis = node.op.resolved_axis
    parts = [axes_operand(ex, "Unsqueeze", ex.input(node, i), [axis], None, 13)
             for i in range(len(node.inputs))]
    ex.add("Concat", parts, node.name, axis=axis)


def _gather(ex, node):
    x, indices = (ex.graph.nodes[n].shape for n in node.inputs)
    axis = node.op.resolved_axis
    if any(a != b for i, (a, b) in enumerate(zip(x, indices)) if i != axis):
        raise GraphEngineError(f"ONNX export of {node.name!r}: gather whose other axes broadcast "
                               f"({x} and {indices}) has no ONNX counterpart; expand them first")
    ex.add("GatherElements", [ex.input(node, 0), ex.input(node, 1)], node.name, axis=axis)


def _onnx_node(ex, node):
    """An imported ONNX node (``onnx_node`` layer) written back as it came."""
    op = node.op
    names = iter(range(len(node.inputs)))
    inputs = []
    for value in op.onnx_inputs(tuple(node.inputs)):
        if value is None:
            inputs.append("")
        elif isinstance(value, str):
            inputs.append(ex.input(node, next(names)))
        else:  # a static input; saved configurations hold floats as float64
            dtype = node.dtype if value.dtype.kind == "f" else value.dtype
            inputs.append(ex.constant(value, "static", dtype))
    if not op.output:
        ex.add(op.op_type, inputs, node.name, **op.attributes)
        return
    outputs = ex.add(op.op_type, inputs, outputs=op.output + 1, **op.attributes)
    ex.add("Identity", [outputs[op.output]], node.name)


EXPORTERS: dict[str, Callable] = {
    **{f"onnx:{op_type}": _onnx_node for op_type in FORWARD},
    "add": binary("Add"), "sub": binary("Sub"), "mul": binary("Mul"), "div": binary("Div"),
    "matmul": binary("MatMul"), "maximum": binary("Max"), "neg": unary("Neg"), "pow": _pow,
    "exp": unary("Exp"), "log": unary("Log"), "sqrt": unary("Sqrt"), "abs": unary("Abs"),
    "sum": _reduce("ReduceSum", 13), "mean": _reduce("ReduceMean", 18), "reshape": _reshape,
    "transpose": _transpose, "concat": _concat, "index": _index,
    "softmax": _softmax("Softmax"), "log_softmax": _softmax("LogSoftmax"),
    "power": binary("Pow"), "clip": _clip, "where": lambda ex, node: ex.add(
        "Where", [ex.input(node, i) for i in range(3)], node.name),
    "astype": _astype, "max": _reduce("ReduceMax", 18), "min": _reduce("ReduceMin", 18),
    "var": _spread, "std": _spread, "squeeze": _squeeze, "expand_dims": _expand_dims,
    "stack": _stack, "gather": _gather,
}
