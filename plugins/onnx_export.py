"""The ONNX exporters of the built-in plugins' kinds: activations and the layers' operators.

Registered through the ``graphengine_register_onnx_exporters`` hook, as a third-party plugin
registers its own (see docs/onnx.md); each exporter ``fn(ex, node)`` writes the ONNX nodes that
compute ``node`` (see :class:`graphengine.onnx.export.Exporter`). Nothing here imports ``onnx``:
the exporter hands out ONNX's helpers when an export runs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from graphengine.plugins.activations import SELU_ALPHA, SELU_SCALE

import graphengine as ge
from graphengine.onnx.mappings import axes_operand, clip_between, unary


def _leaky_relu(ex, node):
    ex.add("LeakyRelu", [ex.input(node, 0)], node.name, alpha=float(node.op.config()["slope"]))


def _elu(ex, node):
    ex.add("Elu", [ex.input(node, 0)], node.name, alpha=float(node.op.config()["alpha"]))


def _gelu(ex, node):
    x = ex.input(node, 0)
    approximate = node.op.config().get("approximate", "none")
    if ex.opset >= 20:
        ex.add("Gelu", [x], node.name, approximate=approximate)
        return
    if approximate == "tanh":  # 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
        cube = ex.add("Mul", [ex.add("Mul", [x, x]), x])
        inner = ex.add("Add", [x, ex.add("Mul", [cube, ex.constant(np.asarray(0.044715, node.dtype))])])
        inner = ex.add("Mul", [inner, ex.constant(np.asarray(np.sqrt(2 / np.pi), node.dtype))])
        gate = ex.add("Tanh", [inner])
    else:  # 0.5 x (1 + erf(x / sqrt 2))
        gate = ex.add("Erf", [ex.add("Mul", [x, ex.constant(np.asarray(0.5 ** 0.5, node.dtype))])])
    one = ex.add("Add", [gate, ex.constant(np.asarray(1.0, node.dtype))])
    half = ex.add("Mul", [x, ex.constant(np.asarray(0.5, node.dtype))])
    ex.add("Mul", [half, one], node.name)


def _silu(ex, node):
    x = ex.input(node, 0)
    ex.add("Mul", [x, ex.add("Sigmoid", [x])], node.name)


def _mish(ex, node):
    x = ex.input(node, 0)
    if ex.opset >= 18:
        ex.add("Mish", [x], node.name)
    else:
        ex.add("Mul", [x, ex.add("Tanh", [ex.add("Softplus", [x])])], node.name)


def _pads(window) -> list[int]:
    """ONNX's (top, left, bottom, right), without what ceil_mode added (ONNX adds it itself)."""
    (top, bottom), (left, right) = window.pads
    extra_h, extra_w = window.ceil_extra
    return [top, left, bottom - extra_h, right - extra_w]


def _conv2d(ex, node):
    op, w = node.op, ex.input(node, 1)
    kernel = list(ex.graph.nodes[w].shape[2:])
    ex.add("Conv", [ex.input(node, i) for i in range(len(node.inputs))], node.name,
           kernel_shape=kernel, strides=list(op.stride), pads=_pads(op.window),
           dilations=list(op.dilation), group=op.groups)


def _conv_transpose2d(ex, node):
    op, w = node.op, ex.input(node, 1)
    (top, bottom), (left, right) = op.pads
    ex.add("ConvTranspose", [ex.input(node, i) for i in range(len(node.inputs))], node.name,
           kernel_shape=list(ex.graph.nodes[w].shape[2:]), strides=list(op.stride),
           pads=[top, left, bottom, right], output_padding=list(op.output_padding))


def _pool(op_type: str) -> Callable:
    def export(ex, node):
        op = node.op
        extra = {"count_include_pad": int(op.count_include_pad)} if op_type == "AveragePool" else {}
        ex.add(op_type, [ex.input(node, 0)], node.name, kernel_shape=list(op.kernel),
               strides=list(op.stride), pads=_pads(op.window),
               ceil_mode=int(op.ceil_mode), **extra)
    return export


def _global_avg_pool2d(ex, node):
    axes_operand(ex, "ReduceMean", ex.input(node, 0), [2, 3], node.name, 18, keepdims=0)


def _layer_norm(ex, node):
    x, gamma, beta = (ex.input(node, i) for i in range(3))
    count, ndim = int(node.op.count), len(node.shape)
    if ex.opset >= 17:
        ex.add("LayerNormalization", [x, gamma, beta], node.name, axis=-count,
               epsilon=float(node.op.eps))
        return
    axes = list(range(ndim - count, ndim))  # before opset 17: its formula
    centered = ex.add("Sub", [x, axes_operand(ex, "ReduceMean", x, axes, None, 18, keepdims=1)])
    variance = axes_operand(ex, "ReduceMean", ex.add("Mul", [centered, centered]), axes, None, 18,
                             keepdims=1)
    eps = ex.constant(np.asarray(node.op.eps, node.dtype), "eps")
    normalized = ex.add("Div", [centered, ex.add("Sqrt", [ex.add("Add", [variance, eps])])])
    ex.add("Add", [ex.add("Mul", [normalized, gamma]), beta], node.name)


def _attention_weights(ex, node):
    """softmax(q k^T * scale + mask) over the keys; a bool mask (and ``causal``) leaves -inf
    where a query may not attend."""
    op = node.op
    q, k = ex.input(node, 0), ex.input(node, 1)
    q_shape = ex.graph.nodes[q].shape
    ndim = len(q_shape)
    keys = ex.add("Transpose", [k], perm=list(range(ndim - 2)) + [ndim - 1, ndim - 2])
    scale = op.scale if op.scale is not None else q_shape[-1] ** -0.5
    scores = ex.add("Mul", [ex.add("MatMul", [q, keys]), ex.constant(np.asarray(scale, node.dtype))])
    allowed = None
    if len(node.inputs) > 2:
        mask = ex.input(node, 2)
        if ex.graph.nodes[mask].dtype == "bool":
            allowed = mask
        else:
            scores = ex.add("Add", [scores, mask])
    if op.causal:
        tq, tk = node.shape[-2:]
        below = ex.constant(np.tril(np.ones((tq, tk), dtype=bool)), "causal")
        allowed = below if allowed is None else ex.add("And", [allowed, below])
    if allowed is not None:
        scores = ex.add("Where", [allowed, scores, ex.constant(np.asarray(-np.inf, node.dtype))])
    ex.add("Softmax", [scores], node.name, axis=-1)


def _embedding(ex, node):
    ex.add("Gather", [ex.input(node, 1), ex.input(node, 0)], node.name, axis=0)


def _one_hot(ex, node):
    values = ex.constant(np.asarray([0, 1], dtype=node.op.dtype), "values")
    ex.add("OneHot", [ex.input(node, 0), ex.ints([node.op.depth], "depth"), values], node.name,
           axis=-1)


def _batch_norm(ex, node):
    op, x = node.op, ex.input(node, 0)
    ndim = len(node.shape)
    if op.axis % ndim == 1:
        ex.add("BatchNormalization", [x] + [ex.input(node, i) for i in range(1, 5)], node.name,
               epsilon=float(op.eps))
        return
    gamma, beta, mean, var = (ex.weight(node, i, what)
                              for i, what in enumerate(("gamma", "beta", "running mean",
                                                        "running variance"), start=1))
    scale = gamma / np.sqrt(var + op.eps)
    shift = beta - mean * scale
    scaled = ex.add("Mul", [x, ex.constant(scale.reshape(op.broadcast), "scale", node.dtype)])
    ex.add("Add", [scaled, ex.constant(shift.reshape(op.broadcast), "shift", node.dtype)], node.name)


def _prelu(ex, node):
    slope = ex.weight(node, 1, "slope")
    ndim = len(node.shape)
    shape = [1] * ndim
    if node.op.axis is not None:
        shape[node.op.axis % ndim] = slope.shape[0]
    ex.add("PRelu", [ex.input(node, 0), ex.constant(slope.reshape(shape), "slope")], node.name)


def _maxout(ex, node):
    pieces = node.op.pieces
    lead = len(node.shape) - 1
    shape = ex.ints([0] * lead + [node.shape[-1], pieces], "shape")
    grouped = ex.add("Reshape", [ex.input(node, 0), shape])
    axes_operand(ex, "ReduceMax", grouped, [lead + 1], node.name, 18, keepdims=0)


#: ONNX's gate order for each recurrent kind, as indices of graphengine's gate blocks: an ONNX
#: LSTM holds (input, output, forget, cell), graphengine (input, forget, output, cell); an ONNX
#: GRU (update, reset, hidden), graphengine (reset, update, candidate).
RECURRENT = {"rnn": ("RNN", (0,)), "lstm": ("LSTM", (0, 2, 1, 3)), "gru": ("GRU", (1, 0, 2))}


def _recurrent(ex, node):
    op = node.op
    op_type, order = RECURRENT[node.kind]
    w, u, b = (ex.weight(node, i, what) for i, what in ((1, "W"), (2, "U"), (3, "b")))
    units = u.shape[0]

    def blocks(matrix: np.ndarray) -> np.ndarray:  # (n, gates*units) -> ONNX's (gates*units, n)
        return np.concatenate([matrix[..., k * units:(k + 1) * units] for k in order], axis=-1).T

    recurrent_bias = np.zeros_like(b)
    if node.kind == "gru":  # the candidate's recurrent bias bh rides inside r * (...)
        recurrent_bias[2 * units:] = ex.weight(node, 4, "bh")
    bias = np.concatenate([blocks(b[None])[:, 0], blocks(recurrent_bias[None])[:, 0]])
    operands = [ex.add("Transpose", [ex.input(node, 0)], perm=[1, 0, 2]),
                ex.constant(blocks(w)[None], "W"), ex.constant(blocks(u)[None], "R"),
                ex.constant(bias[None], "B"), ""]
    first_state = 4 + len(op.extra_params)
    initial = node.inputs[first_state:len(node.inputs) - op.masked]
    for i, _ in enumerate(initial):
        operands.append(axes_operand(ex, "Unsqueeze", ex.input(node, first_state + i), [0], None, 13))
    if op.masked:
        # ONNX takes each sequence's length: the same as the mask where it is a prefix of each
        # row (padding at the end, as batches of variable-length sequences have it).
        steps = ex.add("Cast", [ex.input(node, len(node.inputs) - 1)],
                       to=ex.onnx.helper.np_dtype_to_tensor_dtype(np.dtype("int32")))
        operands[4] = axes_operand(ex, "ReduceSum", steps, [1], None, 13, keepdims=0)
    attributes = {"hidden_size": units, "direction": "reverse" if op.reverse else "forward"}
    if node.kind == "rnn":
        attributes["activations"] = [op.activation.capitalize()]  # "Tanh" or "Relu"
    if node.kind == "gru":
        attributes["linear_before_reset"] = 1
    outputs = ex.add(op_type, operands, outputs=2, **attributes)
    if op.return_sequences:  # Y: (time, directions, batch, units)
        sequence = axes_operand(ex, "Squeeze", outputs[0], [1], None, 13)
        ex.add("Transpose", [sequence], node.name, perm=[1, 0, 2])
    else:  # Y_h: (directions, batch, units)
        axes_operand(ex, "Squeeze", outputs[1], [0], node.name, 13)


EXPORTERS: dict[str, Callable] = {
    "identity": unary("Identity"), "relu": unary("Relu"), "sigmoid": unary("Sigmoid"),
    "tanh": unary("Tanh"), "leaky_relu": _leaky_relu, "elu": _elu, "softplus": unary("Softplus"),
    "sign": unary("Sign"), "gelu": _gelu, "silu": _silu, "mish": _mish, "softsign": unary("Softsign"),
    "selu": unary("Selu", alpha=SELU_ALPHA, gamma=SELU_SCALE),
    "hard_sigmoid": unary("HardSigmoid", alpha=1 / 6, beta=0.5), "relu6": clip_between(0.0, 6.0),
    "conv2d": _conv2d, "conv_transpose2d": _conv_transpose2d, "max_pool2d": _pool("MaxPool"),
    "avg_pool2d": _pool("AveragePool"), "global_avg_pool2d": _global_avg_pool2d,
    "layer_norm": _layer_norm, "attention_weights": _attention_weights, "embedding": _embedding,
    "one_hot": _one_hot, "dropout": unary("Identity"), "batch_norm": _batch_norm,
    "prelu": _prelu, "maxout": _maxout, "rnn": _recurrent, "lstm": _recurrent, "gru": _recurrent,
}


@ge.hookimpl
def graphengine_register_onnx_exporters(register):
    for kind, exporter in EXPORTERS.items():
        register(kind, exporter)
