"""Convolutional layers: conv2d, conv1d, conv_transpose2d, max_pool2d, avg_pool2d,
global_avg_pool2d, embedding, one_hot.

Images are NCHW to the user (batch, channels, height, width), but the operators compute on
(C, H, W, N) arrays, channels outermost and the batch innermost: a conv's output is the
transposed *view* of a contiguous (C, H, W, N) array, elementwise activations keep that memory
order, and the next conv or pool reads it back as (C, H, W, N). So the NCHW interface costs no
copies inside a conv stack, each channel's pixels are one (H * W * N) row of a matrix, and what a
window or pool tap sees comes in contiguous runs of (width x batch) values, long even for small
images (a channels-last layout has runs of width x channels, a channels-first one of width only).

Why channels outermost: every product then has the pixels as its *output's* long axis,
(filters, pixels) = kernel @ columns. Multithreaded OpenBLAS packs the operand that runs along
the other axis of its output whole, into per-thread buffers whose pages stay resident for the
life of the process: with channels-last (pixels, filters) outputs those buffers grew to each
im2col block (on the benchmark CNN 4 MiB of the step's 14 MiB); this way they stay at the
kernel's size.

Convolution is im2col plus one matrix product per group: the im2col matrix is one copy out of a
strided window view (no Python loop over pixels), rows in (channel, kernel row, kernel column)
order, PyTorch's kernel layout, with a row of ones at the end so the bias rides in the same
product, forward and backward. The matrix is built a few output rows at a time and never kept: a
convolution keeps its input for its backward, which builds the columns again for the kernel
gradient (see :class:`Correlation`). conv1d is conv2d on a height-1 image; conv_transpose2d runs
conv2d's backward as its forward and conv2d's forward in its backward.
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

#: At most how many bytes of im2col matrix (or of its gradient, in conv2d's backward) a
#: convolution builds at a time (see :meth:`Correlation.blocks`). The step's memory then holds
#: one such block, not the batch's columns; OpenBLAS's buffers do not grow with it (see the
#: module docstring). A block that stays in a core's cache (1 MiB of L2 on the benchmark
#: machine) is copied and multiplied faster: on the benchmark CNN's second conv with one thread,
#: 1 MiB blocks (7) take 0.7 to 0.9 of the time of 2 MiB ones (4) or 1.5 MiB ones (5). Each block is
#: one BLAS call, which with 2 threads can wait for the worker thread; on a 2-core machine shared
#: with other processes that wait is so erratic (the same products at a median of 3 to 40x their
#: 1-thread time, whether in 1 or 28 calls) that it cannot be traded against the cache.
COLUMN_BLOCK_BYTES = 1 << 20


def _pair(value: int | Sequence[int], what: str, minimum: int = 1) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum
                                 for v in pair):
        bound = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise GraphBuildError(f"{what} must be {bound} or a pair of them, got {value!r}")
    return pair  # type: ignore[return-value]


def _spatial(x: TensorSpec, what: str) -> tuple[int, int, int]:
    """(channels, height, width) of an NCHW input, all known."""
    if x.ndim != 4 or None in x.shape[1:]:
        raise ShapeError(f"{what} takes NCHW input (batch, channels, height, width) with known "
                         f"channels, height and width, got {x.shape}")
    return x.shape[1], x.shape[2], x.shape[3]  # type: ignore[return-value]


def _explicit_pads(padding: Any) -> Pads | None:
    """``padding`` as ((top, bottom), (left, right)): "valid" (0), an int, (pad_h, pad_w) or
    ((top, bottom), (left, right)) of non-negative ints; None if it is none of those."""
    if padding == "valid":
        return (0, 0), (0, 0)
    if isinstance(padding, int) and not isinstance(padding, bool):
        pads: Any = ((padding, padding), (padding, padding))
    elif isinstance(padding, Sequence) and not isinstance(padding, str) and len(padding) == 2:
        pads = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
    else:
        return None
    if not all(len(p) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in p)
               for p in pads):
        return None
    return pads


@dataclass(frozen=True)
class Window:
    """Where a kh x kw window, its taps ``dilation`` pixels apart, visits a padded (height,
    width) image with a stride."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    pads: Pads
    in_size: tuple[int, int]
    dilation: tuple[int, int] = (1, 1)
    #: Rows and columns that ``ceil_mode`` added at the bottom and right, beyond ``padding``.
    ceil_extra: tuple[int, int] = (0, 0)

    @classmethod
    def resolve(cls, kernel: tuple[int, int], stride: tuple[int, int], padding: Any,
                in_size: tuple[int, int], dilation: tuple[int, int] = (1, 1),
                ceil_mode: bool = False) -> Window:
        """``padding``: "valid" (0), "same" (output = ceil(input / stride), the extra pixel of an
        odd total at the bottom/right, as TensorFlow does), an int, a (pad_h, pad_w) pair, or
        ((top, bottom), (left, right)). ``ceil_mode`` rounds the output size up, as PyTorch's
        pools do: a last, partial window is added where it starts inside the input or the
        top/left padding (bottom/right padding grows to hold it)."""
        spans = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation))
        if padding == "same":
            pads: Any = tuple(_same_pads(k, s, n) for k, s, n in zip(spans, stride, in_size))
        else:
            pads = _explicit_pads(padding)
        if pads is None:
            raise GraphBuildError(f"padding must be 'same', 'valid', an int, (pad_h, pad_w) or "
                                  f"((top, bottom), (left, right)) of non-negative ints, got {padding!r}")
        window = cls(kernel, stride, pads, in_size, dilation)
        padded = window.padded_size
        if padded[0] < spans[0] or padded[1] < spans[1]:
            dilated = f" (dilated to {spans[0]}x{spans[1]})" if spans != kernel else ""
            raise ShapeError(f"the {kernel[0]}x{kernel[1]} window{dilated} does not fit the input "
                             f"{in_size[0]}x{in_size[1]} padded to {padded[0]}x{padded[1]}")
        if not ceil_mode:
            return window
        extra = tuple(_ceil_extra(k, s, n, p) for k, s, n, p in zip(spans, stride, in_size, pads))
        pads = tuple((before, after + e) for (before, after), e in zip(pads, extra))
        return cls(kernel, stride, pads, in_size, dilation, extra)  # type: ignore[arg-type]

    @property
    def padded_size(self) -> tuple[int, int]:
        (top, bottom), (left, right) = self.pads
        return self.in_size[0] + top + bottom, self.in_size[1] + left + right

    @property
    def out_size(self) -> tuple[int, int]:
        return tuple((p - d * (k - 1) - 1) // s + 1 for p, k, s, d in  # type: ignore[return-value]
                     zip(self.padded_size, self.kernel, self.stride, self.dilation))

    @property
    def padded(self) -> bool:
        return self.pads != ((0, 0), (0, 0))

    def patches(self, xp: Any, padded: Any, rows: range, columns: range, groups: int = 1) -> Any:
        """A (groups, C / groups, kh, kw, len(rows), len(columns), N) view of a padded
        (C, H, W, N) array: the pixels under each window position of those output rows and
        columns, without copying. Copying it into the im2col matrix is one array copy whose
        inner runs are columns x N values long (at stride 1)."""
        channels, n = padded.shape[0], padded.shape[3]
        sc, sh, sw, sn = padded.strides
        (kh, kw), (th, tw), (dh, dw) = self.kernel, self.stride, self.dilation
        return xp.lib.stride_tricks.as_strided(
            padded[:, rows.start * th:, columns.start * tw:],
            (groups, channels // groups, kh, kw, len(rows), len(columns), n),
            (sc * (channels // groups), sc, sh * dh, sw * dw, sh * th, sw * tw, sn))

    def taps(self, rows: range, columns: range) -> Iterator[tuple[slice, ...]]:
        """For each kernel tap, row-major, the index of the pixels it sees for those output
        rows and columns in a padded (C, H, W, N) array: one (C, len(rows), len(columns), N)
        slab per tap."""
        (sh, sw), (dh, dw) = self.stride, self.dilation
        top, bottom = rows.start * sh, (rows.stop - 1) * sh + 1
        left, right = columns.start * sw, (columns.stop - 1) * sw + 1
        for i in range(self.kernel[0]):
            for j in range(self.kernel[1]):
                yield (slice(None), slice(top + i * dh, bottom + i * dh, sh),
                       slice(left + j * dw, right + j * dw, sw), slice(None))

    def line_taps(self, axis: int) -> Iterator[tuple[slice, ...]]:
        """For each tap along ``axis`` (1: rows, 2: columns) of a (C, H, W, N) array, the slab
        it sees: a pool is a pass over rows, then one over columns."""
        kernel, stride, count = (self.kernel[axis - 1], self.stride[axis - 1],
                                 self.out_size[axis - 1])
        for i in range(kernel):
            index = [slice(None)] * 4
            index[axis] = slice(i, i + stride * (count - 1) + 1, stride)
            yield tuple(index)

    def pad(self, xp: Any, x: Any, fill: float) -> Any:
        """A contiguous copy of the (C, H, W, N) ``x`` inside a border of ``fill`` (``x``
        itself without padding)."""
        if not self.padded:
            return x
        (top, _), (left, _) = self.pads
        c, h, w, n = x.shape
        out = xp.full((c, *self.padded_size, n), fill, dtype=x.dtype)
        out[:, top:top + h, left:left + w] = x
        return out

    def unpad(self, x: Any) -> Any:
        (top, _), (left, _) = self.pads
        h, w = self.in_size
        return x[:, top:top + h, left:left + w]


def _same_pads(span: int, stride: int, size: int) -> tuple[int, int]:
    total = max((math.ceil(size / stride) - 1) * stride + span - size, 0)
    return total // 2, total - total // 2


def _ceil_extra(span: int, stride: int, size: int, pads: tuple[int, int]) -> int:
    """Padding that ceil_mode adds after ``pads`` along one axis (PyTorch's rule)."""
    padded = size + sum(pads)
    count = -(-(padded - span) // stride) + 1
    if (count - 1) * stride >= size + pads[0]:  # that window would start in the bottom padding
        count -= 1
    return max((count - 1) * stride + span - padded, 0)


def _internal(x: Any) -> Any:
    """NCHW as (C, H, W, N), a view."""
    return x.transpose(1, 2, 3, 0)


def _external(x: Any) -> Any:
    """(C, H, W, N) as NCHW, a view."""
    return x.transpose(3, 0, 1, 2)


def _by_group(rows: Any, groups: int) -> Any:
    """A (groups * k, pixels) matrix as a (groups, k, pixels) stack of matrices, a view."""
    return rows.reshape(groups, rows.shape[0] // groups, rows.shape[1])


# --------------------------------------------------------------------------- convolution

@dataclass(frozen=True)
class Correlation:
    """A grouped 2-D cross-correlation of a (channels, H, W, N) image with a kernel (filters,
    channels / groups, kh, kw): its im2col product and that product's adjoints.

    The kernel is used as a (groups, filters / groups, depth [+ 1]) stack of matrices, ``depth``
    = channels / groups * kh * kw columns in (channel, kernel row, kernel column) order (the
    kernel's own layout), plus a column holding the bias where there is one. The im2col matrix
    has one (depth [+ 1], pixels) block of rows per group, the last of them ones where there is
    a bias. Outputs and their gradients are (filters, out_h * out_w * N) matrices, pixels in
    (row, column, image) order: (C, H, W, N) images.

    - :meth:`correlate` (conv2d's forward, conv_transpose2d's input gradient),
    - :meth:`kernel_grad` (the kernel's gradient for either: output gradients against columns),
    - :meth:`spread` (col2im: conv2d's input gradient, conv_transpose2d's forward).
    """

    window: Window
    channels: int
    filters: int
    groups: int = 1

    @property
    def depth(self) -> int:
        return self.window.kernel[0] * self.window.kernel[1] * self.channels // self.groups

    def kernel_matrix(self, xp: Any, w: Any, b: Any = None) -> Any:
        """``w`` (filters, channels / groups, kh, kw) and ``b`` (filters,) as the product's
        (groups, filters / groups, depth [+ 1]) kernel."""
        g, depth = self.groups, self.depth
        kernel = xp.empty((g, self.filters // g, depth + (b is not None)), dtype=w.dtype)
        kernel[..., :depth] = w.reshape(g, -1, depth)
        if b is not None:
            kernel[..., depth] = b.reshape(g, -1)
        return kernel

    def parameter_grads(self, xp: Any, grad_kernel: Any) -> tuple[Any, Any]:
        """The gradients of ``w`` and ``b`` (None without a bias column) from the kernel's."""
        depth = self.depth
        grad_w = xp.ascontiguousarray(grad_kernel[..., :depth]).reshape(
            self.filters, self.channels // self.groups, *self.window.kernel)
        grad_b = grad_kernel[..., depth].reshape(-1) if grad_kernel.shape[2] > depth else None
        return grad_w, grad_b

    def blocks(self, n: int, rows: int, itemsize: int) -> list[tuple[range, range]]:
        """(output rows, output columns) of the fewest blocks whose (``rows``, pixels) matrices
        for a batch of ``n`` take at most :data:`COLUMN_BLOCK_BYTES` each (one output pixel of
        the batch at least): whole output rows where one row fits, else parts of single rows.
        Either way a block's pixels are one range of the output matrix's columns. Sizes as
        equal as can be: no small last block costing a product of its own for little work."""
        out_h, out_w = self.window.out_size
        pixels = max(1, COLUMN_BLOCK_BYTES // (rows * max(n, 1) * itemsize))
        if pixels >= out_w:
            return [(block, range(out_w)) for block in _even(out_h, -(-out_h // (pixels // out_w)))]
        return [(range(row, row + 1), part) for row in range(out_h)
                for part in _even(out_w, -(-out_w // pixels))]

    def where(self, block: tuple[range, range], n: int) -> slice:
        """The ``block``'s columns of a (.., out_h * out_w * N) matrix."""
        (out_rows, out_columns), out_w = block, self.window.out_size[1]
        return slice((out_rows.start * out_w + out_columns.start) * n,
                     ((out_rows.stop - 1) * out_w + out_columns.stop) * n)

    def columns(self, xp: Any, x: Any, ones: bool) -> Iterator[tuple[tuple[range, range], Any]]:
        """The im2col matrix of the (channels, H, W, N) ``x`` a block at a time (see
        :meth:`blocks`): (the block, its (groups, depth [+ 1], pixels) matrix). One buffer
        serves every block."""
        (kh, kw), g, n = self.window.kernel, self.groups, x.shape[3]
        per_group = self.channels // g
        rows = self.depth + ones
        blocks = self.blocks(n, g * rows, x.dtype.itemsize)
        buffer = xp.empty((g, rows, max(len(r) * len(c) for r, c in blocks) * n), dtype=x.dtype)
        if ones:
            buffer[:, self.depth] = 1
        padded = self.window.pad(xp, x, 0)
        for block in blocks:
            out_rows, out_columns = block
            cols = buffer[..., :len(out_rows) * len(out_columns) * n]
            # The destination view is made explicitly so that it can never be a silent copy.
            sg, sr, sp = cols.strides
            xp.lib.stride_tricks.as_strided(
                cols, (g, per_group, kh, kw, len(out_rows), len(out_columns), n),
                (sg, kh * kw * sr, kw * sr, sr, len(out_columns) * n * sp, n * sp, sp),
            )[...] = self.window.patches(xp, padded, out_rows, out_columns, g)
            yield block, cols

    def correlate(self, xp: Any, x: Any, kernel: Any) -> Any:
        """The (filters, out_h, out_w, N) correlation of the (channels, H, W, N) ``x`` with
        ``kernel`` (from :meth:`kernel_matrix`; with a bias column, the bias is added)."""
        n = x.shape[3]
        out = xp.empty((self.filters, *self.window.out_size, n), dtype=x.dtype)
        matrix = _by_group(out.reshape(self.filters, -1), self.groups)
        for block, cols in self.columns(xp, x, ones=kernel.shape[2] > self.depth):
            xp.matmul(kernel, cols, out=matrix[..., self.where(block, n)])
        return out

    def kernel_grad(self, xp: Any, x: Any, grad_rows: Any, ones: bool) -> Any:
        """The gradient of the (groups, filters / groups, depth [+ 1]) kernel, for the
        (channels, H, W, N) input ``x`` and the output's gradient as a (filters, pixels) matrix."""
        grads = _by_group(grad_rows, self.groups)
        total = None
        for block, cols in self.columns(xp, x, ones):
            # (depth [+ 1], filters / groups) products: with the columns as their left
            # operand, OpenBLAS reads them in their own row order (about 2x faster).
            part = xp.matmul(cols, grads[..., self.where(block, x.shape[3])].transpose(0, 2, 1))
            total = part if total is None else xp.add(total, part, out=total)
        return total.transpose(0, 2, 1)

    def spread(self, xp: Any, grad_rows: Any, kernel: Any) -> Any:
        """col2im, the adjoint of :meth:`correlate`: the (channels, H, W, N) image whose
        correlation's gradient is ``grad_rows`` ((filters, pixels)).

        A block at a time, the columns' gradient (one product for all taps, in the same blocks
        as :meth:`columns`) is added into the image's pixels tap by tap."""
        g, (kh, kw), (oh, ow) = self.groups, self.window.kernel, self.window.out_size
        n = grad_rows.shape[1] // (oh * ow)
        kernel_t = kernel[..., :self.depth].transpose(0, 2, 1)
        grads = _by_group(grad_rows, g)
        blocks = self.blocks(n, g * self.depth, grad_rows.dtype.itemsize)
        buffer = xp.empty((g, self.depth, max(len(r) * len(c) for r, c in blocks) * n),
                          dtype=grad_rows.dtype)
        padded = xp.zeros((self.channels, *self.window.padded_size, n), dtype=grad_rows.dtype)
        for block in blocks:
            out_rows, out_columns = block
            cols = buffer[..., :len(out_rows) * len(out_columns) * n]
            xp.matmul(kernel_t, grads[..., self.where(block, n)], out=cols)
            # (groups, channels / groups) rows merge into channels: a view.
            taps = cols.reshape(self.channels, kh * kw, len(out_rows), len(out_columns), n)
            for tap, where in enumerate(self.window.taps(out_rows, out_columns)):
                padded[where] += taps[:, tap]
        return self.window.unpad(padded)


def _even(total: int, count: int) -> list[range]:
    """range(total) in ``count`` consecutive parts whose sizes differ by one at most."""
    bounds = [total * i // count for i in range(count + 1)]
    return [range(start, stop) for start, stop in zip(bounds, bounds[1:])]


class Conv2D(ge.Operator):
    """2-D cross-correlation of NCHW ``x`` with a kernel ``w`` (filters, channels / groups, kh,
    kw), plus an optional bias ``b`` (filters,); ``dilation`` spaces the kernel's taps, ``groups``
    splits channels and filters into groups convolved separately (PyTorch's layout and meaning).

    Keeps its input and its kernel matrix on its context for backward, not the im2col matrix:
    the backward builds it again, a block of output rows at a time (see :class:`Correlation`).
    """

    kind = "conv2d"
    retain_inputs = (0,)

    def __init__(self, stride: int | Sequence[int] = 1, padding: Any = 0,
                 dilation: int | Sequence[int] = 1, groups: int = 1) -> None:
        self.stride = _pair(stride, "stride")
        self.padding = padding
        self.dilation = _pair(dilation, "dilation")
        self.groups = require_int(groups, "groups")

    def config(self) -> dict[str, Any]:
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation,
                "groups": self.groups}

    def infer(self, x: TensorSpec, w: TensorSpec, b: TensorSpec | None = None) -> TensorSpec:
        require_float(x)
        dtype = same_dtype(x, w, *(() if b is None else (b,)))
        channels, height, width = _spatial(x, "conv2d")
        if w.ndim != 4:
            raise ShapeError(f"the kernel must be (filters, channels / groups, kh, kw), got {w.shape}")
        filters, kernel_channels, kh, kw = w.shape
        _check_groups(channels, filters, self.groups)
        if kernel_channels * self.groups != channels:
            per_group = f" per group ({self.groups} groups)" if self.groups > 1 else ""
            raise ShapeError(f"the input has {channels} channels, the kernel expects "
                             f"{kernel_channels}{per_group}")
        if b is not None and b.shape != (filters,):
            raise ShapeError(f"the bias must be ({filters},) for {filters} filters, got {b.shape}")
        self.window = Window.resolve((kh, kw), self.stride, self.padding, (height, width), self.dilation)
        self.correlation = Correlation(self.window, channels, filters, self.groups)
        return TensorSpec((x.shape[0], filters, *self.window.out_size), dtype)

    def forward(self, ctx, xp, x, w, b=None):
        ctx.kernel = self.correlation.kernel_matrix(xp, w, b)
        return _external(self.correlation.correlate(xp, _internal(x), ctx.kernel))

    def backward(self, ctx, xp, inputs, output, grad):
        has_bias = ctx.kernel.shape[2] > self.correlation.depth
        # A view where the gradient is (C, H, W, N) in memory, as the conv stack makes it.
        grad_rows = _internal(grad).reshape(self.correlation.filters, -1)
        grad_kernel = self.correlation.kernel_grad(xp, _internal(inputs[0]), grad_rows, has_bias)
        grad_w, grad_b = self.correlation.parameter_grads(xp, grad_kernel)
        # The first layer's image gradient is rarely asked for.
        grad_x = (_external(self.correlation.spread(xp, grad_rows, ctx.kernel))
                  if ctx.grad_wanted(0) else None)
        return (grad_x, grad_w, grad_b)[:2 + has_bias]


def _check_groups(channels: int, filters: int, groups: int, x: Any = None) -> None:
    """``x``: the layer's input tensor, named in the message (the operator's node names its own)."""
    if channels % groups or filters % groups:
        of = f" of {x.name} {x.shape}" if x is not None else ""
        raise ShapeError(f"groups={groups} must divide both the input's {channels} channels{of} "
                         f"and the {filters} filters")


class ConvTranspose2D(ge.Operator):
    """The transpose (adjoint) of conv2d, often called deconvolution: NCHW ``x`` (N, C, H, W)
    with a kernel ``w`` (C, filters, kh, kw), PyTorch's layout, plus an optional bias ``b``
    (filters,), gives (N, filters, (H - 1) * stride - pad_total + kh + output_padding, ...).

    Its forward is conv2d's input gradient (col2im) for the conv2d with the same kernel, stride
    and padding that maps the output back to ``x``; its input gradient is that conv2d's forward.
    ``output_padding`` (smaller than the stride) adds rows/columns at the bottom/right that no
    window reaches, as in PyTorch. Keeps its input and kernel matrix for backward.
    """

    kind = "conv_transpose2d"
    retain_inputs = (0,)

    def __init__(self, stride: int | Sequence[int] = 1, padding: Any = 0,
                 output_padding: int | Sequence[int] = 0) -> None:
        self.stride = _pair(stride, "stride")
        self.output_padding = _pair(output_padding, "output_padding", minimum=0)
        if any(p >= s for p, s in zip(self.output_padding, self.stride)):
            raise GraphBuildError(f"output_padding {self.output_padding} must be smaller than the "
                                  f"stride {self.stride} in each dimension")
        self.pads = _explicit_pads(padding)
        if self.pads is None:
            raise GraphBuildError(f"conv_transpose2d padding must be 'valid', an int, (pad_h, pad_w) "
                                  f"or ((top, bottom), (left, right)) of non-negative ints, got {padding!r}")
        self.padding = padding

    def config(self) -> dict[str, Any]:
        return {"stride": self.stride, "padding": self.padding, "output_padding": self.output_padding}

    def infer(self, x: TensorSpec, w: TensorSpec, b: TensorSpec | None = None) -> TensorSpec:
        require_float(x)
        dtype = same_dtype(x, w, *(() if b is None else (b,)))
        channels, height, width = _spatial(x, "conv_transpose2d")
        if w.ndim != 4 or w.shape[0] != channels:
            raise ShapeError(f"the kernel must be (in_channels={channels}, filters, kh, kw), got {w.shape}")
        filters, kernel = w.shape[1], w.shape[2:]
        if b is not None and b.shape != (filters,):
            raise ShapeError(f"the bias must be ({filters},) for {filters} filters, got {b.shape}")
        size = tuple((n - 1) * s - sum(p) + k + extra for n, s, p, k, extra in
                     zip((height, width), self.stride, self.pads, kernel, self.output_padding))
        if min(size) < 1:
            raise ShapeError(f"padding {self.pads} trims the {height}x{width} input, spread by "
                             f"the {kernel[0]}x{kernel[1]} kernel with stride {self.stride}, to "
                             f"nothing ({size[0]}x{size[1]})")
        self.window = Window.resolve(kernel, self.stride, self.pads, size)  # the adjoint conv2d's
        self.correlation = Correlation(self.window, channels=filters, filters=channels)
        return TensorSpec((x.shape[0], filters, *size), dtype)

    def forward(self, ctx, xp, x, w, b=None):
        ctx.kernel = self.correlation.kernel_matrix(xp, w)
        ctx.has_bias = b is not None
        out = self.correlation.spread(xp, _internal(x).reshape(x.shape[1], -1), ctx.kernel)
        # A new contiguous array, rather than a view that would keep the padded buffer alive.
        return _external(xp.add(out, b[:, None, None, None]) if b is not None
                         else xp.ascontiguousarray(out))

    def backward(self, ctx, xp, inputs, output, grad):
        x = inputs[0]
        grad_kernel = self.correlation.kernel_grad(
            xp, _internal(grad), _internal(x).reshape(x.shape[1], -1), ones=False)
        grad_w = self.correlation.parameter_grads(xp, grad_kernel)[0]
        grad_x = (_external(self.correlation.correlate(xp, _internal(grad), ctx.kernel))
                  if ctx.grad_wanted(0) else None)
        if not ctx.has_bias:
            return grad_x, grad_w
        return grad_x, grad_w, grad.sum(axis=(0, 2, 3))


# --------------------------------------------------------------------------- pooling

class Pool2D(ge.Operator):
    """Shared geometry of the pooling operators: a window over each channel of NCHW input.
    ``ceil_mode`` rounds the output size up as PyTorch does (see :meth:`Window.resolve`).

    A window's max (or sum) is taken in two passes, over the kernel's rows and then over its
    columns: the row pass reads whole image rows, which is several times faster than visiting
    the kh*kw taps one pixel slab at a time. Outputs and gradients are (C, H, W, N) in memory,
    whatever the input's memory order (see the module docstring)."""

    def __init__(self, kernel_size: int | Sequence[int], stride: int | Sequence[int] | None = None,
                 padding: Any = 0, ceil_mode: bool = False) -> None:
        self.kernel = _pair(kernel_size, "kernel_size")
        self.stride = self.kernel if stride is None else _pair(stride, "stride")
        self.padding = padding
        if not isinstance(ceil_mode, bool):
            raise GraphBuildError(f"ceil_mode must be True or False, got {ceil_mode!r}")
        self.ceil_mode = ceil_mode

    def config(self) -> dict[str, Any]:
        return {"kernel_size": self.kernel, "stride": self.stride, "padding": self.padding,
                "ceil_mode": self.ceil_mode}

    def infer(self, x: TensorSpec) -> TensorSpec:
        require_float(x)
        channels, height, width = _spatial(x, self.kind)
        if max(self.kernel) > 255:
            raise ShapeError(f"a pooling window spans at most 255 pixels per side, got {self.kernel}")
        self.window = Window.resolve(self.kernel, self.stride, self.padding, (height, width),
                                     ceil_mode=self.ceil_mode)
        if any(max(before, after - extra) >= k for (before, after), extra, k in
               zip(self.window.pads, self.window.ceil_extra, self.kernel)):
            raise ShapeError(f"padding {self.padding!r} must be smaller than the "
                             f"{self.kernel[0]}x{self.kernel[1]} window on each side, or some "
                             f"windows would hold padding only")
        return TensorSpec((x.shape[0], channels, *self.window.out_size), x.dtype)

    def _pass_shapes(self, n: int, channels: int) -> dict[int, tuple[int, ...]]:
        """The (C, H, W, N) shapes the row pass (1) and the column pass (2) read."""
        height, width = self.window.padded_size
        return {1: (channels, height, width, n), 2: (channels, self.window.out_size[0], width, n)}

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
        """The input's gradient from the output's, ``grad`` (C, out_h, out_w, N)."""
        shapes = self._pass_shapes(grad.shape[3], grad.shape[0])
        grad_rows = self._spread(xp, grad, 2, shapes, winners[1])
        return _external(self.window.unpad(self._spread(xp, grad_rows, 1, shapes, winners[0])))


class MaxPool2D(Pool2D):
    """Maximum over each window; the gradient goes to one maximum of the window (the first,
    in column-then-row order, where several tie).

    Keeps on its context which tap won each row pass and each column pass (one byte each)."""

    kind = "max_pool2d"

    def forward(self, ctx, xp, x):
        padded = self.window.pad(xp, _internal(x), -math.inf)
        rows, row_winners = self._max_pass(xp, padded, 1)
        out, col_winners = self._max_pass(xp, rows, 2)
        ctx.winners = row_winners, col_winners
        return _external(out)

    def _max_pass(self, xp, x, axis: int) -> tuple[Any, Any]:
        taps = self.window.line_taps(axis)
        best = x[next(taps)].copy()  # a copy even where the slab is contiguous: it is written to
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
        return (self._backward_passes(xp, _internal(grad), ctx.winners),)


class AvgPool2D(Pool2D):
    """Mean over each window. With ``count_include_pad=True`` (PyTorch's default) padding counts
    as zeros in the mean; with False a window's mean is over its input pixels only. Either way
    the part of a window beyond the padding (``ceil_mode``'s last windows) is not counted, as in
    PyTorch."""

    kind = "avg_pool2d"

    def __init__(self, kernel_size: int | Sequence[int], stride: int | Sequence[int] | None = None,
                 padding: Any = 0, ceil_mode: bool = False, count_include_pad: bool = True) -> None:
        super().__init__(kernel_size, stride, padding, ceil_mode)
        if not isinstance(count_include_pad, bool):
            raise GraphBuildError(f"count_include_pad must be True or False, got {count_include_pad!r}")
        self.count_include_pad = count_include_pad

    def config(self) -> dict[str, Any]:
        return {**super().config(), "count_include_pad": self.count_include_pad}

    def infer(self, x: TensorSpec) -> TensorSpec:
        out = super().infer(x)
        self.counts = tuple(self._counts(axis) for axis in (0, 1))
        return out

    def _counts(self, axis: int) -> tuple[int, ...]:
        """How many pixels each window position counts along ``axis`` (0: rows, 1: columns)."""
        window = self.window
        before, after = window.pads[axis]
        size = window.in_size[axis]
        lo, hi = ((0, before + size + after - window.ceil_extra[axis]) if self.count_include_pad
                  else (before, before + size))
        kernel, stride = self.kernel[axis], self.stride[axis]
        return tuple(min(i * stride + kernel, hi) - max(i * stride, lo)
                     for i in range(window.out_size[axis]))

    def _scale(self, xp, dtype) -> Any:
        """1 / the pixel count of each window: one number, or an (out_h, out_w, 1) array."""
        rows, cols = self.counts
        if len(set(rows)) == 1 and len(set(cols)) == 1:
            return 1.0 / (rows[0] * cols[0])
        return 1.0 / (xp.asarray(rows, dtype=dtype)[:, None, None] * xp.asarray(cols, dtype=dtype)[:, None])

    def forward(self, ctx, xp, x):
        padded = self.window.pad(xp, _internal(x), 0)
        rows = self._sum_pass(xp, padded, 1)
        out = self._sum_pass(xp, rows, 2)
        out *= self._scale(xp, x.dtype)
        return _external(out)

    def _sum_pass(self, xp, x, axis: int) -> Any:
        taps = self.window.line_taps(axis)
        total = x[next(taps)].copy()  # a copy even where the slab is contiguous: it is written to
        for where in taps:
            total += x[where]
        return total

    def backward(self, ctx, xp, inputs, output, grad):
        return (self._backward_passes(xp, _internal(grad) * self._scale(xp, grad.dtype)),)


class GlobalAvgPool2D(ge.Operator):
    """Mean over each channel's whole image: (N, C, H, W) -> (N, C). PyTorch's
    ``F.adaptive_avg_pool2d(x, 1)`` keeps two unit axes, (N, C, 1, 1); this gives what usually
    follows it, the flattened (N, C) (Keras' GlobalAveragePooling2D)."""

    kind = "global_avg_pool2d"

    def infer(self, x: TensorSpec) -> TensorSpec:
        require_float(x)
        channels, height, width = _spatial(x, "global_avg_pool2d")
        self.size = height, width
        return TensorSpec((x.shape[0], channels), x.dtype)

    def forward(self, ctx, xp, x):
        return x.mean(axis=(2, 3))

    def backward(self, ctx, xp, inputs, output, grad):
        # (C, H, W, N) in memory, like every other gradient of the conv stack.
        grad_x = xp.empty((grad.shape[1], *self.size, grad.shape[0]), dtype=grad.dtype)
        grad_x[...] = (grad.T * (1.0 / (self.size[0] * self.size[1])))[:, None, None, :]
        return (_external(grad_x),)

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
    """``conv2d(filters, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True,
    init="he")`` on NCHW input.

    Parameters ``W`` (filters, channels / groups, kh, kw), PyTorch's layout, and ``b``
    (filters,). ``padding`` is an int, a pair, ((top, bottom), (left, right)), "valid" or "same"
    (TensorFlow's: output = ceil(input / stride), the odd pixel at the bottom/right; PyTorch's
    "same" puts it there too, but allows stride 1 only)."""

    def __init__(self, filters: int, kernel_size: int | Sequence[int], stride: int | Sequence[int] = 1,
                 padding: Any = 0, dilation: int | Sequence[int] = 1, groups: int = 1, bias: bool = True,
                 init: str | dict = "he") -> None:
        super().__init__(filters=filters, kernel_size=kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias, init=init)
        self.filters = require_int(filters, "filters")
        self.kernel = _pair(kernel_size, "kernel_size")
        self.op = Conv2D(stride, padding, dilation, groups)
        self.bias, self.init = bias, init

    def build(self, g, x):
        channels = _spatial(x.node.spec, "conv2d")[0]
        _check_groups(channels, self.filters, self.op.groups, x)
        return _convolve(g, self.op, x, self.filters, channels, self.kernel, self.bias, self.init)


def _convolve(g, op: Conv2D, x, filters: int, channels: int, kernel: tuple[int, ...], bias: bool,
              init: str | dict):
    """``op`` applied to NCHW ``x`` with new parameters ``W`` (filters, channels / groups,
    *kernel) and, if ``bias``, ``b``; ``kernel`` (k,) makes conv1d's (filters, channels / groups,
    k) kernel, viewed as (.., 1, k) by the operator."""
    w = g.parameter("W", (filters, channels // op.groups, *kernel), init=init, dtype=x.dtype)
    if len(kernel) == 1:
        w = w.reshape(filters, channels // op.groups, 1, kernel[0])
    if not bias:
        return g.apply(op, x, w)
    return g.apply(op, x, w, g.parameter("b", (filters,), init="zeros", dtype=x.dtype))


class Conv1DLayer(ge.Layer):
    """``conv1d(filters, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True,
    init="he")`` on (N, C, L) input -> (N, filters, L').

    Parameters ``W`` (filters, channels / groups, kernel_size), PyTorch's layout, and ``b``
    (filters,). ``padding``: an int, a (left, right) pair, "valid" or "same" (TensorFlow's, as
    conv2d's). Runs as conv2d on a height-1 image."""

    def __init__(self, filters: int, kernel_size: int, stride: int = 1, padding: Any = 0,
                 dilation: int = 1, groups: int = 1, bias: bool = True, init: str | dict = "he") -> None:
        super().__init__(filters=filters, kernel_size=kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias, init=init)
        self.filters = require_int(filters, "filters")
        self.kernel = require_int(kernel_size, "kernel_size")
        if padding in ("same", "valid"):
            pads: Any = padding
        elif isinstance(padding, int) and not isinstance(padding, bool):
            pads = ((0, 0), (padding, padding))
        elif isinstance(padding, Sequence) and not isinstance(padding, str) and len(padding) == 2:
            pads = ((0, 0), tuple(padding))
        else:
            raise GraphBuildError(f"conv1d padding must be 'same', 'valid', an int or a (left, right) "
                                  f"pair of non-negative ints, got {padding!r}")
        self.op = Conv2D((1, require_int(stride, "stride")), pads, (1, require_int(dilation, "dilation")),
                         groups)
        self.bias, self.init = bias, init

    def build(self, g, x):
        spec = x.node.spec
        if spec.ndim != 3 or None in spec.shape[1:]:
            raise ShapeError(f"conv1d takes (batch, channels, length) input with known channels and "
                             f"length, got {x.name} {spec.shape}")
        channels, length = spec.shape[1:]
        _check_groups(channels, self.filters, self.op.groups, x)
        y = _convolve(g, self.op, x.reshape(spec.shape[0], channels, 1, length), self.filters,
                      channels, (self.kernel,), self.bias, self.init)
        return y.reshape(spec.shape[0], self.filters, y.shape[3])


class ConvTranspose2DLayer(ge.Layer):
    """``conv_transpose2d(filters, kernel_size, stride=1, padding=0, output_padding=0, bias=True,
    init="he")`` on NCHW input: (N, C, H, W) -> (N, filters, (H - 1) * stride - 2 * padding +
    kernel + output_padding, ...), as PyTorch's ConvTranspose2d.

    Parameters ``W`` (C, filters, kh, kw), PyTorch's layout (its in_channels first, unlike
    conv2d's), and ``b`` (filters,). ``padding``: an int, a pair, ((top, bottom), (left, right))
    or "valid"; it trims the output (no "same")."""

    def __init__(self, filters: int, kernel_size: int | Sequence[int], stride: int | Sequence[int] = 1,
                 padding: Any = 0, output_padding: int | Sequence[int] = 0, bias: bool = True,
                 init: str | dict = "he") -> None:
        super().__init__(filters=filters, kernel_size=kernel_size, stride=stride, padding=padding,
                         output_padding=output_padding, bias=bias, init=init)
        self.filters = require_int(filters, "filters")
        self.kernel = _pair(kernel_size, "kernel_size")
        self.op = ConvTranspose2D(stride, padding, output_padding)
        self.bias, self.init = bias, init

    def build(self, g, x):
        channels = _spatial(x.node.spec, "conv_transpose2d")[0]
        w = g.parameter("W", (channels, self.filters, *self.kernel), init=self.init, dtype=x.dtype)
        if not self.bias:
            return g.apply(self.op, x, w)
        return g.apply(self.op, x, w, g.parameter("b", (self.filters,), init="zeros", dtype=x.dtype))


class PoolLayer(ge.Layer):
    """A pooling layer: its operator on the input, no parameters."""

    op: Pool2D

    def build(self, g, x):
        return g.apply(self.op, x)


class MaxPoolLayer(PoolLayer):
    """``max_pool2d(kernel_size, stride=kernel_size, padding=0, ceil_mode=False)`` on NCHW input."""

    def __init__(self, kernel_size: int | Sequence[int], stride: int | Sequence[int] | None = None,
                 padding: Any = 0, ceil_mode: bool = False) -> None:
        super().__init__(kernel_size=kernel_size, stride=stride, padding=padding, ceil_mode=ceil_mode)
        self.op = MaxPool2D(kernel_size, stride, padding, ceil_mode)


class AvgPoolLayer(PoolLayer):
    """``avg_pool2d(kernel_size, stride=kernel_size, padding=0, ceil_mode=False,
    count_include_pad=True)`` on NCHW input."""

    def __init__(self, kernel_size: int | Sequence[int], stride: int | Sequence[int] | None = None,
                 padding: Any = 0, ceil_mode: bool = False, count_include_pad: bool = True) -> None:
        super().__init__(kernel_size=kernel_size, stride=stride, padding=padding, ceil_mode=ceil_mode,
                         count_include_pad=count_include_pad)
        self.op = AvgPool2D(kernel_size, stride, padding, ceil_mode, count_include_pad)


class GlobalAvgPoolLayer(ge.Layer):
    """``global_avg_pool2d()``: (N, C, H, W) -> (N, C), the mean of each channel's image."""

    def build(self, g, x):
        return g.apply(GlobalAvgPool2D(), x)


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
    register("conv1d", Conv1DLayer)
    register("conv_transpose2d", ConvTranspose2DLayer, aliases=("conv2d_transpose",))
    register("max_pool2d", MaxPoolLayer, aliases=("maxpool",))
    register("avg_pool2d", AvgPoolLayer, aliases=("avgpool",))
    register("global_avg_pool2d", GlobalAvgPoolLayer)
    register("embedding", Embedding)
    register("one_hot", OneHotLayer)
