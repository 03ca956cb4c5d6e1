"""Convolutional layers: conv2d, max_pool2d, avg_pool2d, embedding, one_hot.

Images are NCHW to the user (batch, channels, height, width), but the operators compute
channels-last: a conv's output is the transposed *view* of a contiguous (N, H, W, C) array,
elementwise activations keep that memory order, and the next conv or pool reads it back as a
contiguous channels-last array. So the NCHW interface costs no copies inside a conv stack, and
the pixels a window covers lie in long contiguous runs (kernel width x channels values).

Convolution is im2col plus one matrix product: the im2col matrix is one copy out of a strided
window view (no Python loop over pixels), columns in (kernel row, kernel column, channel) order,
with a column of ones at the end so the bias rides in the same product, forward and backward.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import graphengine as ge
from graphengine.errors import DataError, GraphBuildError, ShapeError, require_int
from graphengine.ir.graph import DTYPES
from graphengine.ir.operators import TensorSpec, require_float, same_dtype

Pads = tuple[tuple[int, int], tuple[int, int]]


def _pair(value: int | Sequence[int], what: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                 for v in pair):
        raise GraphBuildError(f"{what} must be a positive int or a pair of them, got {value!r}")
    return pair  # type: ignore[return-value]


def _spatial(x: TensorSpec, what: str) -> tuple[int, int, int]:
    """(channels, height, width) of an NCHW input, all known."""
    if x.ndim != 4 or None in x.shape[1:]:
        raise ShapeError(f"{what} takes NCHW input (batch, channels, height, width) with known "
                         f"channels, height and width, got {x.shape}")
    return x.shape[1], x.shape[2], x.shape[3]  # type: ignore[return-value]


@dataclass(frozen=True)
class Window:
    """Where a kh x kw window with a stride visits a padded (height, width) image."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    pads: Pads
    in_size: tuple[int, int]

    @classmethod
    def resolve(cls, kernel: tuple[int, int], stride: tuple[int, int], padding: Any,
                in_size: tuple[int, int]) -> Window:
        """``padding``: "valid" (0), "same" (output = ceil(input / stride), the extra pixel of an
        odd total at the bottom/right, as TensorFlow does), an int, a (pad_h, pad_w) pair, or
        ((top, bottom), (left, right))."""
        if padding == "valid":
            pads: Any = ((0, 0), (0, 0))
        elif padding == "same":
            pads = tuple(_same_pads(k, s, n) for k, s, n in zip(kernel, stride, in_size))
        elif isinstance(padding, int) and not isinstance(padding, bool):
            pads = ((padding, padding), (padding, padding))
        elif isinstance(padding, Sequence) and len(padding) == 2:
            pads = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
        else:
            pads = None
        if pads is None or not all(len(p) == 2 and all(isinstance(v, int) and v >= 0 for v in p)
                                   for p in pads):
            raise GraphBuildError(f"padding must be 'same', 'valid', an int, (pad_h, pad_w) or "
                                  f"((top, bottom), (left, right)) of non-negative ints, got {padding!r}")
        window = cls(kernel, stride, pads, in_size)
        padded = window.padded_size
        if padded[0] < kernel[0] or padded[1] < kernel[1]:
            raise ShapeError(f"the {kernel[0]}x{kernel[1]} window does not fit the input "
                             f"{in_size[0]}x{in_size[1]} padded to {padded[0]}x{padded[1]}")
        return window

    @property
    def padded_size(self) -> tuple[int, int]:
        (top, bottom), (left, right) = self.pads
        return self.in_size[0] + top + bottom, self.in_size[1] + left + right

    @property
    def out_size(self) -> tuple[int, int]:
        padded = self.padded_size
        return tuple((p - k) // s + 1 for p, k, s in zip(padded, self.kernel, self.stride))  # type: ignore

    @property
    def padded(self) -> bool:
        return self.pads != ((0, 0), (0, 0))

    def patches(self, xp: Any, padded: Any) -> Any:
        """A (N, out_h, out_w, kh, kw, C) view of a padded channels-last (N, H, W, C) array:
        the pixels under each window position, without copying. Copying it into the im2col
        matrix is one array copy whose inner run is kw*C contiguous values."""
        n, _, _, channels = padded.shape
        sn, sh, sw, sc = padded.strides
        (kh, kw), (th, tw) = self.kernel, self.stride
        return xp.lib.stride_tricks.as_strided(
            padded, (n, *self.out_size, kh, kw, channels), (sn, sh * th, sw * tw, sh, sw, sc))

    def taps(self) -> Iterator[tuple[slice, ...]]:
        """For each kernel tap, row-major, the index of the pixels it sees in a padded
        channels-last (N, H, W, C) array: one (N, out_h, out_w, C) slab per tap."""
        (sh, sw), (oh, ow) = self.stride, self.out_size
        for i in range(self.kernel[0]):
            for j in range(self.kernel[1]):
                yield (slice(None), slice(i, i + sh * (oh - 1) + 1, sh),
                       slice(j, j + sw * (ow - 1) + 1, sw), slice(None))

    def line_taps(self, axis: int) -> Iterator[tuple[slice, ...]]:
        """For each tap along ``axis`` (1: rows, 2: columns) of a channels-last array, the
        slab it sees: a pool is a pass over rows, then one over columns."""
        kernel, stride, count = (self.kernel[axis - 1], self.stride[axis - 1],
                                 self.out_size[axis - 1])
        for i in range(kernel):
            index = [slice(None)] * 4
            index[axis] = slice(i, i + stride * (count - 1) + 1, stride)
            yield tuple(index)

    def pad(self, xp: Any, x: Any, fill: float) -> Any:
        """The channels-last ``x`` inside a border of ``fill`` (``x`` itself without padding)."""
        if not self.padded:
            return x
        (top, _), (left, _) = self.pads
        n, h, w, c = x.shape
        out = xp.full((n, *self.padded_size, c), fill, dtype=x.dtype)
        out[:, top:top + h, left:left + w] = x
        return out

    def unpad(self, x: Any) -> Any:
        (top, _), (left, _) = self.pads
        h, w = self.in_size
        return x[:, top:top + h, left:left + w]


def _same_pads(kernel: int, stride: int, size: int) -> tuple[int, int]:
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _channels_last(x: Any) -> Any:
    return x.transpose(0, 2, 3, 1)


def _channels_first(x: Any) -> Any:
    return x.transpose(0, 3, 1, 2)


# --------------------------------------------------------------------------- convolution

class Conv2D(ge.Operator):
    """2-D cross-correlation of NCHW ``x`` with a kernel ``w`` (filters, channels, kh, kw), plus
    an optional bias ``b`` (filters,).

    Keeps its im2col matrix and kernel matrix on its context for backward, not its inputs.
    """

    kind = "conv2d"

    def __init__(self, stride: int | Sequence[int] = 1, padding: Any = 0) -> None:
        self.stride = _pair(stride, "stride")
        self.padding = padding

    def config(self) -> dict[str, Any]:
        return {"stride": self.stride, "padding": self.padding}

    def infer(self, x: TensorSpec, w: TensorSpec, b: TensorSpec | None = None) -> TensorSpec:
        require_float(x)
        dtype = same_dtype(x, w, *(() if b is None else (b,)))
        channels, height, width = _spatial(x, "conv2d")
        if w.ndim != 4:
            raise ShapeError(f"the kernel must be (filters, channels, kh, kw), got {w.shape}")
        filters, kernel_channels, kh, kw = w.shape
        if kernel_channels != channels:
            raise ShapeError(f"the input has {channels} channels, the kernel expects {kernel_channels}")
        if b is not None and b.shape != (filters,):
            raise ShapeError(f"the bias must be ({filters},) for {filters} filters, got {b.shape}")
        self.window = Window.resolve((kh, kw), self.stride, self.padding, (height, width))
        return TensorSpec((x.shape[0], filters, *self.window.out_size), dtype)

    def forward(self, ctx, xp, x, w, b=None):
        n, channels = x.shape[:2]
        filters = w.shape[0]
        depth = w.shape[2] * w.shape[3] * channels
        padded = self.window.pad(xp, _channels_last(x), 0)
        width = depth + (b is not None)
        if channels == 1:
            # One channel: store each column contiguously, so that filling it copies whole image
            # rows; row by row (below) every run would be just kw values long.
            cols = xp.empty((width, n, *self.window.out_size), dtype=x.dtype).transpose(1, 2, 3, 0)
        else:
            cols = xp.empty((n, *self.window.out_size, width), dtype=x.dtype)
        # Columns in (kernel row, kernel column, channel) order, as the kernel matrix below; the
        # view is made explicitly so that it can never be a silent copy.
        step = cols.strides[3]
        columns = xp.lib.stride_tricks.as_strided(
            cols, (*cols.shape[:3], *w.shape[2:], channels),
            (*cols.strides[:3], w.shape[3] * channels * step, channels * step, step))
        columns[...] = self.window.patches(xp, padded)
        del padded  # not kept: the step's peak memory holds the columns and the output only
        kernel = xp.empty((width, filters), dtype=w.dtype)
        kernel[:depth] = w.transpose(2, 3, 1, 0).reshape(depth, filters)
        if b is not None:
            cols[..., depth] = 1
            kernel[depth] = b
        ctx.cols = cols.reshape(-1, width)
        ctx.kernel, ctx.kernel_shape, ctx.has_bias = kernel, w.shape, b is not None
        ctx.padded_shape = n, *self.window.padded_size, channels
        out = ctx.cols @ kernel
        return _channels_first(out.reshape(n, *self.window.out_size, filters))

    def backward(self, ctx, xp, inputs, output, grad):
        filters, channels, kh, kw = ctx.kernel_shape
        depth = kh * kw * channels
        grad_rows = _channels_last(grad).reshape(-1, filters)
        grad_kernel = ctx.cols.T @ grad_rows
        grad_w = xp.ascontiguousarray(
            grad_kernel[:depth].reshape(kh, kw, channels, filters).transpose(3, 2, 0, 1))
        grad_b = grad_kernel[depth] if ctx.has_bias else None
        if not ctx.grad_wanted(0):  # the first layer's: the image's gradient is rarely asked for
            return (None, grad_w, grad_b)[:2 + ctx.has_bias]
        # Each tap's share of the input gradient comes out of its own small product, so that it
        # is a contiguous (N, out_h, out_w, C) block: adding it into the input's pixels then
        # runs over whole rows instead of C values at a time.
        tap_kernels = ctx.kernel[:depth].reshape(kh * kw, channels, filters)
        grad_padded = xp.zeros(ctx.padded_shape, dtype=grad.dtype)
        for where, tap_kernel in zip(self.window.taps(), tap_kernels):
            grad_padded[where] += (grad_rows @ tap_kernel.T).reshape(
                grad.shape[0], *self.window.out_size, channels)
        grad_x = _channels_first(self.window.unpad(grad_padded))
        return (grad_x, grad_w, grad_b)[:2 + ctx.has_bias]


# --------------------------------------------------------------------------- pooling

class Pool2D(ge.Operator):
    """Shared geometry of the pooling operators: a window over each channel of NCHW input.

    A window's max (or sum) is taken in two passes, over the kernel's rows and then over its
    columns: the row pass reads whole image rows (width x channels contiguous values per run),
    which is several times faster than visiting the kh*kw taps one pixel slab at a time."""

    def __init__(self, kernel_size: int | Sequence[int], stride: int | Sequence[int] | None = None,
                 padding: Any = 0) -> None:
        self.kernel = _pair(kernel_size, "kernel_size")
        self.stride = self.kernel if stride is None else _pair(stride, "stride")
        self.padding = padding

    def config(self) -> dict[str, Any]:
        return {"kernel_size": self.kernel, "stride": self.stride, "padding": self.padding}

    def infer(self, x: TensorSpec) -> TensorSpec:
        require_float(x)
        channels, height, width = _spatial(x, self.kind)
        if max(self.kernel) > 255:
            raise ShapeError(f"a pooling window spans at most 255 pixels per side, got {self.kernel}")
        self.window = Window.resolve(self.kernel, self.stride, self.padding, (height, width))
        (top, bottom), (left, right) = self.window.pads
        if max(top, bottom) >= self.kernel[0] or max(left, right) >= self.kernel[1]:
            raise ShapeError(f"padding {self.window.pads} must be smaller than the "
                             f"{self.kernel[0]}x{self.kernel[1]} window on each side, or some "
                             f"windows would hold padding only")
        return TensorSpec((x.shape[0], channels, *self.window.out_size), x.dtype)

    def _pass_shapes(self, n: int, channels: int) -> dict[int, tuple[int, ...]]:
        """The channels-last shapes the row pass (1) and the column pass (2) read."""
        height, width = self.window.padded_size
        return {1: (n, height, width, channels), 2: (n, self.window.out_size[0], width, channels)}

    def _spread(self, xp, grad, axis: int, shapes: dict, winners: Any = None) -> Any:
        """Backward of one pass: each tap's slab gets ``grad`` where it won (max pooling) or
        everywhere (average pooling)."""
        kernel, stride = self.kernel[axis - 1], self.stride[axis - 1]
        shape = shapes[axis]
        # Taps that tile the pass exactly write every element once: no zeroing, no adding.
        tiled = stride == kernel and self.window.out_size[axis - 1] * stride == shape[axis]
        out = (xp.empty if tiled else xp.zeros)(shape, dtype=grad.dtype)
        for i, where in enumerate(self.window.line_taps(axis)):
            if stride < kernel:
                out[where] += grad if winners is None else grad * (winners == i)
            elif winners is None:
                out[where] = grad
            else:
                xp.multiply(grad, winners == i, out=out[where])
        return out

    def _backward_passes(self, xp, grad, winners=(None, None)) -> Any:
        shapes = self._pass_shapes(grad.shape[0], grad.shape[1])
        grad_rows = self._spread(xp, _channels_last(grad), 2, shapes, winners[1])
        return _channels_first(self.window.unpad(self._spread(xp, grad_rows, 1, shapes, winners[0])))


class MaxPool2D(Pool2D):
    """Maximum over each window; the gradient goes to one maximum of the window (the first,
    in column-then-row order, where several tie).

    Keeps on its context which tap won each row pass and each column pass (one byte each)."""

    kind = "max_pool2d"

    def forward(self, ctx, xp, x):
        padded = self.window.pad(xp, _channels_last(x), -math.inf)
        rows, row_winners = self._max_pass(xp, padded, 1)
        out, col_winners = self._max_pass(xp, rows, 2)
        ctx.winners = row_winners, col_winners
        return _channels_first(out)

    def _max_pass(self, xp, x, axis: int) -> tuple[Any, Any]:
        taps = self.window.line_taps(axis)
        best = xp.ascontiguousarray(x[next(taps)])
        winners = None
        for i, where in enumerate(taps, start=1):
            candidate = x[where]
            better = candidate > best
            if winners is None:
                winners = better.view(xp.uint8)  # 1 where the second tap won, else 0
            else:
                # Taps come in increasing order, so max() records the latest strict winner.
                xp.maximum(winners, better * xp.uint8(i), out=winners)
            xp.maximum(best, candidate, out=best)
        return best, xp.zeros(best.shape, dtype=xp.uint8) if winners is None else winners

    def backward(self, ctx, xp, inputs, output, grad):
        return (self._backward_passes(xp, grad, ctx.winners),)


class AvgPool2D(Pool2D):
    """Mean over each window; padding counts as zeros in the mean (PyTorch's default)."""

    kind = "avg_pool2d"

    def forward(self, ctx, xp, x):
        padded = self.window.pad(xp, _channels_last(x), 0)
        rows = self._sum_pass(xp, padded, 1)
        out = self._sum_pass(xp, rows, 2)
        out *= 1.0 / (self.kernel[0] * self.kernel[1])
        return _channels_first(out)

    def _sum_pass(self, xp, x, axis: int) -> Any:
        taps = self.window.line_taps(axis)
        total = xp.ascontiguousarray(x[next(taps)])
        for where in taps:
            total += x[where]
        return total

    def backward(self, ctx, xp, inputs, output, grad):
        return (self._backward_passes(xp, grad * (1.0 / (self.kernel[0] * self.kernel[1]))),)


# --------------------------------------------------------------------------- integer ids

def _require_ids(ids: TensorSpec, what: str) -> None:
    if not ids.dtype.startswith(("int", "uint")):
        raise ShapeError(f"{what} takes integer ids, got {ids.dtype}")


def _check_range(ids: Any, size: int, what: str) -> None:
    # An id out of range would index garbage on a GPU (CuPy wraps around), not fail.
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= size):
        raise DataError(f"{what}: ids must lie in [0, {size}), got ids from {int(ids.min())} "
                        f"to {int(ids.max())}")


class EmbeddingLookup(ge.Operator):
    """Rows of ``table`` (vocabulary, dim) picked by integer ``ids`` of any shape: (*ids, dim).

    Backward scatter-adds each output row's gradient into the row it came from, so an id that
    appears several times collects all its gradients (``xp.scatter_add``)."""

    kind = "embedding"
    retain_inputs = (0,)
    nondifferentiable_inputs = (0,)

    def infer(self, ids: TensorSpec, table: TensorSpec) -> TensorSpec:
        _require_ids(ids, "embedding")
        require_float(table, "the embedding table")
        if table.ndim != 2:
            raise ShapeError(f"the embedding table must be (vocabulary, dim), got {table.shape}")
        return TensorSpec(ids.shape + (table.shape[1],), table.dtype)

    def forward(self, ctx, xp, ids, table):
        _check_range(ids, table.shape[0], "embedding")
        ctx.table_shape, ctx.dtype = table.shape, table.dtype
        return table[ids]

    def backward(self, ctx, xp, inputs, output, grad):
        ids = inputs[0]
        grad_table = xp.zeros(ctx.table_shape, dtype=ctx.dtype)
        xp.scatter_add(grad_table, ids.reshape(-1), grad.reshape(-1, ctx.table_shape[1]))
        return None, grad_table


class OneHot(ge.Operator):
    """Integer ids of any shape -> (*ids, depth) vectors of zeros with a one at the id.
    Not differentiable: its only input is integer."""

    kind = "one_hot"
    nondifferentiable_inputs = (0,)

    def __init__(self, depth: int, dtype: str = "float32") -> None:
        self.depth, self.dtype = depth, dtype

    def config(self) -> dict[str, Any]:
        return {"depth": self.depth, "dtype": self.dtype}

    def infer(self, ids: TensorSpec) -> TensorSpec:
        _require_ids(ids, "one_hot")
        return TensorSpec(ids.shape + (self.depth,), self.dtype)

    def forward(self, ctx, xp, ids):
        _check_range(ids, self.depth, "one_hot")
        return (ids[..., None] == xp.arange(self.depth)).astype(self.dtype)

    def backward(self, ctx, xp, inputs, output, grad):
        return (None,)


# --------------------------------------------------------------------------- layers

class Conv2DLayer(ge.Layer):
    """``conv2d(filters, kernel_size, stride=1, padding=0, bias=True, init="he")`` on NCHW input.

    Parameters ``W`` (filters, channels, kh, kw) and ``b`` (filters,). ``padding`` is an int,
    a pair, ((top, bottom), (left, right)), "valid" or "same"."""

    def __init__(self, filters: int, kernel_size: int | Sequence[int], stride: int | Sequence[int] = 1,
                 padding: Any = 0, bias: bool = True, init: str | dict = "he") -> None:
        super().__init__(filters=filters, kernel_size=kernel_size, stride=stride, padding=padding,
                         bias=bias, init=init)
        self.filters = require_int(filters, "filters")
        self.kernel = _pair(kernel_size, "kernel_size")
        self.op = Conv2D(stride, padding)
        self.bias, self.init = bias, init

    def build(self, g, x):
        channels = _spatial(x.node.spec, "conv2d")[0]
        w = g.parameter("W", (self.filters, channels, *self.kernel), init=self.init, dtype=x.dtype)
        if not self.bias:
            return g.apply(self.op, x, w)
        return g.apply(self.op, x, w, g.parameter("b", (self.filters,), init="zeros", dtype=x.dtype))


class PoolLayer(ge.Layer):
    """``max_pool2d`` / ``avg_pool2d(kernel_size, stride=kernel_size, padding=0)`` on NCHW input."""

    operator: type[Pool2D] = Pool2D

    def __init__(self, kernel_size: int | Sequence[int], stride: int | Sequence[int] | None = None,
                 padding: Any = 0) -> None:
        super().__init__(kernel_size=kernel_size, stride=stride, padding=padding)
        self.op = self.operator(kernel_size, stride, padding)

    def build(self, g, x):
        return g.apply(self.op, x)


class MaxPoolLayer(PoolLayer):
    operator = MaxPool2D


class AvgPoolLayer(PoolLayer):
    operator = AvgPool2D


class Embedding(ge.Layer):
    """``embedding(vocab_size, dim)``: integer ids (any shape) -> (*ids, dim) learned vectors.
    Parameter ``W`` (vocab_size, dim)."""

    def __init__(self, vocab_size: int, dim: int, init: str | dict = "uniform") -> None:
        super().__init__(vocab_size=vocab_size, dim=dim, init=init)
        self.vocab_size = require_int(vocab_size, "vocab_size")
        self.dim = require_int(dim, "dim")
        self.init = init

    def build(self, g, ids):
        _require_ids(ids.node.spec, "embedding")
        table = g.parameter("W", (self.vocab_size, self.dim), init=self.init)
        return g.apply(EmbeddingLookup(), ids, table)


class OneHotLayer(ge.Layer):
    """``one_hot(depth, dtype="float32")``: integer ids (any shape) -> (*ids, depth)."""

    def __init__(self, depth: int, dtype: str = "float32") -> None:
        super().__init__(depth=depth, dtype=dtype)
        if dtype not in DTYPES:
            raise GraphBuildError(f"one_hot dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.op = OneHot(require_int(depth, "depth"), dtype)

    def build(self, g, ids):
        return g.apply(self.op, ids)


@ge.hookimpl
def graphengine_register_layers(register):
    register("conv2d", Conv2DLayer, aliases=("conv",))
    register("max_pool2d", MaxPoolLayer, aliases=("maxpool",))
    register("avg_pool2d", AvgPoolLayer, aliases=("avgpool",))
    register("embedding", Embedding)
    register("one_hot", OneHotLayer)
