"""The operator contract and the primitive operators.

Every node of a graph is an operator. ``forward`` and ``backward`` sit side by side; an operator
declares which of its inputs (``retain_inputs``) and whether its output (``retain_output``)
``backward`` reads, so the compiler knows when an intermediate array can be freed. Arrays that
``backward`` never reads reach it as ``None``.

``infer`` runs when the node is added to a graph: shapes use ``None`` for the batch dimension,
and a mismatch raises :class:`ShapeError` before anything runs.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import ShapeError

Shape = tuple[int | None, ...]
#: The element types a graph's tensors may have.
DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """What is known of a tensor at build time."""

    shape: Shape
    dtype: str

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __str__(self) -> str:
        dims = ", ".join("None" if d is None else str(d) for d in self.shape)
        return f"({dims}{',' if len(self.shape) == 1 else ''}) {self.dtype}"


class Operator:
    """Base class of every operator: a *description* of a computation, never its run state.

    Subclasses set ``kind`` (the name shown in errors and diagrams) and implement ``infer``,
    ``forward`` and ``backward``. One operator object serves every model compiled from its graph
    and every thread that runs them, so it never stores anything on ``self`` while it runs.
    What a forward keeps for its backward (a mask, an argmax, input shapes) goes on ``ctx``,
    the context of this one call, which the run's tape hands back to ``backward``; what the run
    decided is read from ``ctx`` too: ``ctx.training``, ``ctx.rng`` (for random numbers) and, in
    backward, ``ctx.grad_wanted(i)`` (see :class:`graphengine.runtime.tape.Context`).
    """

    kind: ClassVar[str] = "operator"
    retain_inputs: ClassVar[tuple[int, ...]] = ()
    retain_output: ClassVar[bool] = False
    #: Inputs that never receive a gradient (labels, integer ids); None means all can.
    nondifferentiable_inputs: ClassVar[tuple[int, ...]] = ()

    def config(self) -> dict[str, Any]:
        """The keyword arguments that rebuild this operator (shown in diagrams, saved in files)."""
        return {}

    def infer(self, *inputs: TensorSpec) -> TensorSpec:
        raise NotImplementedError

    def forward(self, ctx: Any, xp: Any, *inputs: Any) -> Any:
        """The output, from the input arrays; ``xp`` is the backend's array module."""
        raise NotImplementedError

    def backward(self, ctx: Any, xp: Any, inputs: tuple, output: Any, grad: Any) -> tuple:
        """Gradients for each input (``None`` where none flows), given the output's gradient.
        ``inputs`` holds the inputs named in ``retain_inputs`` (others are None), ``output`` the
        output if ``retain_output`` (else None); ``ctx`` is the forward call's context."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


class Source(Operator):
    """Inputs, parameters and constants: nodes whose value is given, not computed."""

    def infer(self, *inputs: TensorSpec) -> TensorSpec:
        return self.spec

    def __init__(self, spec: TensorSpec) -> None:
        self.spec = spec


class Input(Source):
    kind = "input"


class Parameter(Source):
    kind = "parameter"

    def __init__(self, spec: TensorSpec, init: Any, trainable: bool = True,
                 decay: bool | None = None) -> None:
        super().__init__(spec)
        self.init = init
        self.trainable = trainable
        # Weight decay and similar penalties apply to weights, not to biases or scales.
        self.decay = len(spec.shape) > 1 if decay is None else decay

    def config(self) -> dict[str, Any]:
        return {"init": self.init, "trainable": self.trainable, "decay": self.decay}


class Constant(Source):
    kind = "constant"

    def __init__(self, spec: TensorSpec, value: Any) -> None:
        super().__init__(spec)
        self.value = value


# --------------------------------------------------------------------------- shape helpers

def broadcast_shapes(a: Shape, b: Shape) -> Shape:
    """NumPy broadcasting where ``None`` (the batch) matches anything."""
    out: list[int | None] = []
    for i in range(1, max(len(a), len(b)) + 1):
        da = a[-i] if i <= len(a) else 1
        db = b[-i] if i <= len(b) else 1
        if da == 1:
            out.append(db)
        elif db == 1 or da == db:
            out.append(da)
        elif da is None or db is None:
            out.append(None)
        else:
            raise ShapeError(f"shapes {a} and {b} do not broadcast (dimension {-i}: {da} vs {db}); "
                             f"make that dimension equal, or 1 on one side")
    return tuple(reversed(out))


def same_dtype(*specs: TensorSpec) -> str:
    dtypes = {s.dtype for s in specs}
    if len(dtypes) > 1:
        raise ShapeError(f"dtypes differ: {' vs '.join(s.dtype for s in specs)}; "
                         f"cast one side explicitly, e.g. x.astype({specs[0].dtype!r}) "
                         f"(graphengine never upcasts silently)")
    return specs[0].dtype


def require_float(spec: TensorSpec, what: str = "input") -> None:
    if not spec.dtype.startswith("float"):
        raise ShapeError(f"{what} must be floating point, got {spec.dtype}")


def unbroadcast(xp: Any, grad: Any, shape: tuple[int, ...]) -> Any:
    """Sum ``grad`` over the axes along which an input of ``shape`` was broadcast."""
    if grad.shape == shape:
        return grad
    lead = grad.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, d in enumerate(shape) if d == 1 and grad.shape[lead + i] != 1)
    return grad.sum(axis=axes, keepdims=True).reshape(shape) if axes else grad.reshape(shape)


def normalize_axis(axis: int | tuple[int, ...] | None, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    for a in axes:
        if not -ndim <= a < ndim:
            raise ShapeError(f"axis {a} is out of range for a tensor of {ndim} dimensions")
    return tuple(sorted(a % ndim for a in axes))


# --------------------------------------------------------------------------- arithmetic

class Binary(Operator):
    """Elementwise binary operator with NumPy broadcasting."""

    def infer(self, a: TensorSpec, b: TensorSpec) -> TensorSpec:
        dtype = same_dtype(a, b)
        return TensorSpec(broadcast_shapes(a.shape, b.shape), dtype)


class Add(Binary):
    kind = "add"

    def forward(self, ctx, xp, a, b):
        ctx.shapes = (a.shape, b.shape)
        return a + b

    def backward(self, ctx, xp, inputs, output, grad):
        return unbroadcast(xp, grad, ctx.shapes[0]), unbroadcast(xp, grad, ctx.shapes[1])


class Sub(Binary):
    kind = "sub"

    def forward(self, ctx, xp, a, b):
        ctx.shapes = (a.shape, b.shape)
        return a - b

    def backward(self, ctx, xp, inputs, output, grad):
        return unbroadcast(xp, grad, ctx.shapes[0]), unbroadcast(xp, -grad, ctx.shapes[1])


class Mul(Binary):
    kind = "mul"
    retain_inputs = (0, 1)

    def forward(self, ctx, xp, a, b):
        return a * b

    def backward(self, ctx, xp, inputs, output, grad):
        a, b = inputs
        return unbroadcast(xp, grad * b, a.shape), unbroadcast(xp, grad * a, b.shape)


class Div(Binary):
    kind = "div"
    retain_inputs = (0, 1)

    def forward(self, ctx, xp, a, b):
        return a / b

    def backward(self, ctx, xp, inputs, output, grad):
        a, b = inputs
        grad_a = grad / b
        return unbroadcast(xp, grad_a, a.shape), unbroadcast(xp, -grad_a * a / b, b.shape)


class Neg(Operator):
    kind = "neg"

    def infer(self, x):
        return x

    def forward(self, ctx, xp, x):
        return -x

    def backward(self, ctx, xp, inputs, output, grad):
        return (-grad,)


class Pow(Operator):
    kind = "pow"
    retain_inputs = (0,)

    def __init__(self, exponent: float) -> None:
        self.exponent = float(exponent)

    def config(self):
        return {"exponent": self.exponent}

    def infer(self, x):
        require_float(x)
        return x

    def forward(self, ctx, xp, x):
        return x ** self.exponent

    def backward(self, ctx, xp, inputs, output, grad):
        if self.exponent == 0:  # x ** 0 is constant: 0 * x ** -1 would be NaN at x = 0
            return (xp.zeros_like(grad),)
        (x,) = inputs
        return (grad * self.exponent * x ** (self.exponent - 1),)


class MatMul(Operator):
    """``a @ b`` for ``a`` of shape (..., k) and ``b`` of shape (k, n), or batched (B, m, k) @ (B, k, n)."""

    kind = "matmul"
    retain_inputs = (0, 1)

    def infer(self, a, b):
        dtype = same_dtype(a, b)
        if a.ndim < 1 or b.ndim < 2:
            raise ShapeError(f"matmul needs a matrix on the right, got {a.shape} @ {b.shape}")
        if a.shape[-1] != b.shape[-2] and None not in (a.shape[-1], b.shape[-2]):
            raise ShapeError(f"inner dimensions differ: {a.shape} @ {b.shape} "
                             f"({a.shape[-1]} != {b.shape[-2]})")
        if b.ndim == 2:
            return TensorSpec(a.shape[:-1] + (b.shape[1],), dtype)
        if a.ndim != b.ndim:
            raise ShapeError(f"batched matmul needs equal ranks, got {a.shape} @ {b.shape}")
        lead = broadcast_shapes(a.shape[:-2], b.shape[:-2])
        return TensorSpec(lead + (a.shape[-2], b.shape[-1]), dtype)

    def forward(self, ctx, xp, a, b):
        return a @ b

    def backward(self, ctx, xp, inputs, output, grad):
        a, b = inputs
        if b.ndim == 2:
            grad_a = grad @ b.T if ctx.grad_wanted(0) else None
            k, n = b.shape
            grad_b = a.reshape(-1, k).T @ grad.reshape(-1, n) if ctx.grad_wanted(1) else None
            return grad_a, grad_b
        grad_a = grad @ xp.swapaxes(b, -1, -2)
        grad_b = xp.swapaxes(a, -1, -2) @ grad
        return unbroadcast(xp, grad_a, a.shape), unbroadcast(xp, grad_b, b.shape)


# --------------------------------------------------------------------------- elementwise math

class Exp(Operator):
    kind = "exp"
    retain_output = True

    def infer(self, x):
        require_float(x)
        return x

    def forward(self, ctx, xp, x):
        return xp.exp(x)

    def backward(self, ctx, xp, inputs, output, grad):
        return (grad * output,)


class Log(Operator):
    kind = "log"
    retain_inputs = (0,)

    def infer(self, x):
        require_float(x)
        return x

    def forward(self, ctx, xp, x):
        return xp.log(x)

    def backward(self, ctx, xp, inputs, output, grad):
        return (grad / inputs[0],)


class Sqrt(Operator):
    kind = "sqrt"
    retain_output = True

    def infer(self, x):
        require_float(x)
        return x

    def forward(self, ctx, xp, x):
        return xp.sqrt(x)

    def backward(self, ctx, xp, inputs, output, grad):
        return (grad * 0.5 / output,)


class Abs(Operator):
    kind = "abs"
    retain_inputs = (0,)

    def infer(self, x):
        return x

    def forward(self, ctx, xp, x):
        return xp.abs(x)

    def backward(self, ctx, xp, inputs, output, grad):
        return (grad * xp.sign(inputs[0]),)


class Maximum(Binary):
    """Elementwise maximum; where both sides tie, the gradient goes to the first."""

    kind = "maximum"
    retain_inputs = (0, 1)

    def forward(self, ctx, xp, a, b):
        return xp.maximum(a, b)

    def backward(self, ctx, xp, inputs, output, grad):
        a, b = inputs
        first = a >= b
        return (unbroadcast(xp, grad * first, a.shape),
                unbroadcast(xp, grad * ~first, b.shape))


class Power(Binary):
    """``a ** b`` with a tensor exponent (``2 ** x``, ``x ** y``); ``x ** 3.0`` is :class:`Pow`.
    Where ``a == 0`` the exponent's gradient is 0 (not ``0 * log 0``) and where ``b == 0``
    the base's gradient is 0, as in torch.pow."""

    kind = "power"
    retain_inputs = (0, 1)
    retain_output = True

    def infer(self, a, b):
        spec = super().infer(a, b)
        require_float(spec)
        return spec

    def forward(self, ctx, xp, a, b):
        return xp.power(a, b)

    def backward(self, ctx, xp, inputs, output, grad):
        a, b = inputs
        grad_a = grad_b = None
        if ctx.grad_wanted(0):
            slope = xp.where(b == 0, 0, b * xp.power(a, b - 1))
            grad_a = unbroadcast(xp, grad * slope, a.shape)
        if ctx.grad_wanted(1):
            log_a = xp.log(xp.where(a == 0, 1, a))
            grad_b = unbroadcast(xp, grad * output * log_a, b.shape)
        return grad_a, grad_b


class Clip(Operator):
    """``x`` limited to ``[lo, hi]``; ``None`` leaves that side open. The gradient passes where
    ``lo <= x <= hi``, the bounds included (as torch.clamp's)."""

    kind = "clip"
    retain_inputs = (0,)

    def __init__(self, lo: float | None = None, hi: float | None = None) -> None:
        self.lo = None if lo is None else float(lo)
        self.hi = None if hi is None else float(hi)

    def config(self):
        return {"lo": self.lo, "hi": self.hi}

    def infer(self, x):
        require_float(x)
        bounds = [v for v in (self.lo, self.hi) if v is not None]
        if not bounds or any(math.isnan(v) for v in bounds):
            raise ShapeError(f"clip needs a lower bound, an upper bound or both (numbers, not "
                             f"NaN), got lo={self.lo}, hi={self.hi}")
        if len(bounds) == 2 and self.lo > self.hi:
            raise ShapeError(f"clip needs lo <= hi, got lo={self.lo} > hi={self.hi}")
        return x

    def forward(self, ctx, xp, x):
        return xp.clip(x, self.lo, self.hi)

    def backward(self, ctx, xp, inputs, output, grad):
        (x,) = inputs
        if self.lo is not None:
            grad = grad * (x >= self.lo)
        if self.hi is not None:
            grad = grad * (x <= self.hi)
        return (grad,)


class Where(Operator):
    """``a`` where the bool ``cond`` holds, else ``b``, all three broadcast together
    (numpy.where, torch.where). ``cond`` receives no gradient."""

    kind = "where"
    retain_inputs = (0,)
    nondifferentiable_inputs = (0,)

    def infer(self, cond, a, b):
        if cond.dtype != "bool":
            raise ShapeError(f"the condition of where must be bool, got {cond.dtype}: feed a bool "
                             f"input or constant, or cast it with .astype('bool')")
        dtype = same_dtype(a, b)
        return TensorSpec(broadcast_shapes(broadcast_shapes(cond.shape, a.shape), b.shape), dtype)

    def forward(self, ctx, xp, cond, a, b):
        ctx.shapes = (a.shape, b.shape)
        return xp.where(cond, a, b)

    def backward(self, ctx, xp, inputs, output, grad):
        cond = inputs[0]
        grad_a = unbroadcast(xp, xp.where(cond, grad, 0), ctx.shapes[0]) if ctx.grad_wanted(1) else None
        grad_b = unbroadcast(xp, xp.where(cond, 0, grad), ctx.shapes[1]) if ctx.grad_wanted(2) else None
        return None, grad_a, grad_b


def is_float(dtype: str) -> bool:
    return dtype.startswith("float")


class Astype(Operator):
    """The tensor cast to ``dtype``. Gradients flow through a cast between float types (cast
    back to the input's type); a cast to an integer or bool type is piecewise constant, and
    passes none, as in PyTorch."""

    kind = "astype"

    def __init__(self, dtype: str) -> None:
        self.dtype = str(dtype)
        if not is_float(self.dtype):
            self.nondifferentiable_inputs = (0,)

    def config(self):
        return {"dtype": self.dtype}

    def infer(self, x):
        if self.dtype not in DTYPES:
            raise ShapeError(f"cannot cast to dtype {self.dtype!r}; supported dtypes: "
                             f"{', '.join(DTYPES)}")
        return TensorSpec(x.shape, self.dtype)

    def forward(self, ctx, xp, x):
        ctx.dtype = x.dtype
        return x.astype(self.dtype)

    def backward(self, ctx, xp, inputs, output, grad):
        return (grad.astype(ctx.dtype),)


# --------------------------------------------------------------------------- reductions

class Reduction(Operator):
    def __init__(self, axis: int | tuple[int, ...] | None = None, keepdims: bool = False) -> None:
        self.axis = tuple(axis) if isinstance(axis, list) else axis
        self.keepdims = keepdims

    def config(self):
        return {"axis": self.axis, "keepdims": self.keepdims}

    def infer(self, x):
        self.axes = normalize_axis(self.axis, x.ndim)
        if self.keepdims:
            shape = tuple(1 if i in self.axes else d for i, d in enumerate(x.shape))
        else:
            shape = tuple(d for i, d in enumerate(x.shape) if i not in self.axes)
        return TensorSpec(shape, x.dtype)

    def expand(self, xp, grad, shape):
        if not self.keepdims:
            grad = xp.expand_dims(grad, self.axes)
        return xp.broadcast_to(grad, shape)


class Sum(Reduction):
    kind = "sum"

    def forward(self, ctx, xp, x):
        ctx.shape = x.shape
        return x.sum(axis=self.axes, keepdims=self.keepdims)

    def backward(self, ctx, xp, inputs, output, grad):
        return (self.expand(xp, grad, ctx.shape),)


class Mean(Reduction):
    kind = "mean"

    def forward(self, ctx, xp, x):
        ctx.shape = x.shape
        return x.mean(axis=self.axes, keepdims=self.keepdims)

    def backward(self, ctx, xp, inputs, output, grad):
        count = 1
        for a in self.axes:
            count *= ctx.shape[a]
        return (self.expand(xp, grad / count, ctx.shape),)


class Extremum(Reduction):
    """The largest (``max``) or smallest (``min``) element along ``axis``. Where elements tie
    for it, the gradient is split evenly among them, as torch.amax/amin split it."""

    retain_inputs = (0,)
    retain_output = True
    pick: ClassVar[str]

    def forward(self, ctx, xp, x):
        return getattr(xp, self.pick)(x, axis=self.axes, keepdims=self.keepdims)

    def backward(self, ctx, xp, inputs, output, grad):
        (x,) = inputs
        ties = (x == self.expand(xp, output, x.shape)).astype(x.dtype)
        ties /= ties.sum(axis=self.axes, keepdims=True)
        return (ties * self.expand(xp, grad, x.shape),)


class Max(Extremum):
    kind = "max"
    pick = "max"


class Min(Extremum):
    kind = "min"
    pick = "min"


class Var(Reduction):
    """Variance along ``axis``: the squared deviations from the mean, summed and divided by
    ``N - ddof``. ``ddof=0`` (the default) is numpy's ``var`` and torch's ``var(x,
    correction=0)``; ``ddof=1`` is torch's default, the unbiased estimate."""

    kind = "var"
    retain_inputs = (0,)

    def __init__(self, axis: int | tuple[int, ...] | None = None, keepdims: bool = False,
                 ddof: int = 0) -> None:
        super().__init__(axis, keepdims)
        self.ddof = operator.index(ddof)

    def config(self):
        return {**super().config(), "ddof": self.ddof}

    def infer(self, x):
        require_float(x)
        spec = super().infer(x)
        sizes = [x.shape[a] for a in self.axes]
        if None not in sizes and math.prod(sizes) <= self.ddof:
            raise ShapeError(f"{self.kind} over axes {self.axes} of {x.shape} averages "
                             f"{math.prod(sizes)} elements, which ddof={self.ddof} leaves "
                             f"without a degree of freedom; lower ddof")
        return spec

    def forward(self, ctx, xp, x):
        return xp.var(x, axis=self.axes, keepdims=self.keepdims, ddof=self.ddof)

    def backward(self, ctx, xp, inputs, output, grad):
        return (self.deviation_grad(xp, inputs[0], grad),)

    def deviation_grad(self, xp, x, grad):
        """The gradient of the variance: ``2 (x - mean) / (N - ddof)`` times ``grad``."""
        count = math.prod(x.shape[a] for a in self.axes) - self.ddof
        deviation = x - x.mean(axis=self.axes, keepdims=True)
        return deviation * self.expand(xp, grad * (2.0 / count), x.shape)


class Std(Var):
    """Standard deviation along ``axis``, the root of :class:`Var` (same ``ddof``). Where it
    is 0 (constant input) the gradient is 0; torch's is NaN there."""

    kind = "std"
    retain_output = True

    def forward(self, ctx, xp, x):
        return xp.sqrt(xp.var(x, axis=self.axes, keepdims=self.keepdims, ddof=self.ddof))

    def backward(self, ctx, xp, inputs, output, grad):
        # d std = d var / (2 std); an infinite divisor turns the 0/0 of a constant input into 0
        safe = xp.where(output == 0, math.inf, output)
        return (self.deviation_grad(xp, inputs[0], grad / (2 * safe)),)


# --------------------------------------------------------------------------- shape manipulation

class Regroup(Operator):
    """An operator that only regroups the elements (reshape, squeeze, expand_dims): its
    gradient is the output's gradient in the input's shape."""

    def backward(self, ctx, xp, inputs, output, grad):
        return (grad.reshape(ctx.in_shape),)


class Reshape(Regroup):
    """Reshape; ``None`` in the target shape keeps the batch dimension (axis 0) as it is."""

    kind = "reshape"

    def __init__(self, shape: tuple[int | None, ...]) -> None:
        self.shape = tuple(None if d is None else operator.index(d) for d in shape)

    def config(self):
        return {"shape": self.shape}

    def infer(self, x):
        if None in self.shape and x.ndim == 0:
            raise ShapeError(f"reshape target {self.shape} keeps axis 0 (None), but the input is "
                             f"a scalar")
        known = [d for d in x.shape if d is not None]
        total = 1
        for d in known:
            total *= d
        target = [x.shape[0] if d is None else d for d in self.shape]
        fixed = 1
        for d in target:
            if d not in (None, -1):
                fixed *= d
        if target.count(-1) > 1 or self.shape.count(None) > 1 or any(
                d is not None and d != -1 and d < 1 for d in target):
            raise ShapeError(f"reshape target {self.shape} must hold sizes, at most one -1 and at "
                             f"most one None (axis 0 kept as it is)")
        batch_in = None in x.shape
        batch_out = None in target
        if None in x.shape[1:]:  # sizes besides the batch are unknown until run time
            if -1 in target:
                target[target.index(-1)] = None
        elif -1 in target:
            if batch_in and not batch_out:
                target[target.index(-1)] = None
            elif total % fixed:
                raise ShapeError(f"cannot reshape {x.shape} to {self.shape}")
            else:
                target[target.index(-1)] = total // fixed
        elif batch_in == batch_out and fixed != total:
            raise ShapeError(f"cannot reshape {x.shape} ({total} elements per batch item) "
                             f"to {self.shape} ({fixed})")
        elif batch_in and not batch_out and (fixed % total if total else fixed):
            raise ShapeError(f"cannot reshape {x.shape} to {self.shape}: {fixed} elements are not "
                             f"a whole number of batch items of {total}")
        return TensorSpec(tuple(target), x.dtype)

    def forward(self, ctx, xp, x):
        ctx.in_shape = x.shape
        return x.reshape(tuple(x.shape[0] if d is None else d for d in self.shape))


class Squeeze(Regroup):
    """Remove axes of size 1: those of ``axis`` (an int or a tuple; each must have size 1),
    or with None every axis of size 1 (a batch axis, of unknown size, stays)."""

    kind = "squeeze"

    def __init__(self, axis: int | tuple[int, ...] | None = None) -> None:
        self.axis = tuple(axis) if isinstance(axis, list) else axis

    def config(self):
        return {"axis": self.axis}

    def infer(self, x):
        if self.axis is None:
            self.axes = tuple(i for i, d in enumerate(x.shape) if d == 1)
        else:
            self.axes = normalize_axis(self.axis, x.ndim)
            wide = {a: x.shape[a] for a in self.axes if x.shape[a] != 1}
            if wide:
                raise ShapeError(f"squeeze removes axes of size 1; axes {sorted(wide)} of "
                                 f"{x.shape} have sizes {list(wide.values())}")
        return TensorSpec(tuple(d for i, d in enumerate(x.shape) if i not in self.axes), x.dtype)

    def forward(self, ctx, xp, x):
        ctx.in_shape = x.shape
        return xp.squeeze(x, axis=self.axes)


class ExpandDims(Regroup):
    """Insert an axis of size 1 at position ``axis`` of the output (torch.unsqueeze)."""

    kind = "expand_dims"

    def __init__(self, axis: int) -> None:
        self.axis = operator.index(axis)

    def config(self):
        return {"axis": self.axis}

    def infer(self, x):
        (self.resolved_axis,) = normalize_axis(self.axis, x.ndim + 1)
        shape = list(x.shape)
        shape.insert(self.resolved_axis, 1)
        return TensorSpec(tuple(shape), x.dtype)

    def forward(self, ctx, xp, x):
        ctx.in_shape = x.shape
        return xp.expand_dims(x, self.resolved_axis)


class Transpose(Operator):
    kind = "transpose"

    def __init__(self, axes: tuple[int, ...] | None = None) -> None:
        self.axes = None if axes is None else tuple(axes)

    def config(self):
        return {"axes": self.axes}

    def infer(self, x):
        axes = tuple(reversed(range(x.ndim))) if self.axes is None else self.axes
        if sorted(a % x.ndim for a in axes) != list(range(x.ndim)):
            raise ShapeError(f"axes {self.axes} are not a permutation of {x.ndim} dimensions")
        self.perm = tuple(a % x.ndim for a in axes)
        self.inverse = tuple(self.perm.index(i) for i in range(x.ndim))
        return TensorSpec(tuple(x.shape[a] for a in self.perm), x.dtype)

    def forward(self, ctx, xp, x):
        return xp.transpose(x, self.perm)

    def backward(self, ctx, xp, inputs, output, grad):
        return (xp.transpose(grad, self.inverse),)


class Concat(Operator):
    kind = "concat"

    def __init__(self, axis: int = -1) -> None:
        self.axis = axis

    def config(self):
        return {"axis": self.axis}

    def infer(self, *xs):
        dtype = same_dtype(*xs)
        ndim = xs[0].ndim
        if any(x.ndim != ndim for x in xs):
            raise ShapeError(f"concat needs equal ranks, got {[x.shape for x in xs]}")
        (axis,) = normalize_axis(self.axis, ndim)
        for i in range(ndim):
            dims = {x.shape[i] for x in xs}
            if i != axis and len(dims) > 1:
                raise ShapeError(f"concat along axis {axis}: dimension {i} differs {[x.shape for x in xs]}")
        along = [x.shape[axis] for x in xs]
        size = None if None in along else sum(along)
        self.resolved_axis = axis
        return TensorSpec(xs[0].shape[:axis] + (size,) + xs[0].shape[axis + 1:], dtype)

    def forward(self, ctx, xp, *xs):
        ctx.sizes = [x.shape[self.resolved_axis] for x in xs]
        return xp.concatenate(xs, axis=self.resolved_axis)

    def backward(self, ctx, xp, inputs, output, grad):
        bounds = []
        total = 0
        for s in ctx.sizes[:-1]:
            total += s
            bounds.append(total)
        return tuple(xp.split(grad, bounds, axis=self.resolved_axis))


class Stack(Operator):
    """Join tensors of one shape along a new axis ``axis`` of the output (numpy.stack)."""

    kind = "stack"

    def __init__(self, axis: int = 0) -> None:
        self.axis = operator.index(axis)

    def config(self):
        return {"axis": self.axis}

    def infer(self, *xs):
        if not xs:
            raise ShapeError("stack needs at least one tensor")
        dtype = same_dtype(*xs)
        if len({x.shape for x in xs}) > 1:
            raise ShapeError(f"stack needs tensors of one shape, got {[x.shape for x in xs]}")
        (self.resolved_axis,) = normalize_axis(self.axis, xs[0].ndim + 1)
        shape = xs[0].shape
        return TensorSpec(shape[:self.resolved_axis] + (len(xs),) + shape[self.resolved_axis:], dtype)

    def forward(self, ctx, xp, *xs):
        return xp.stack(xs, axis=self.resolved_axis)

    def backward(self, ctx, xp, inputs, output, grad):
        before = (slice(None),) * self.resolved_axis
        return tuple(grad[before + (i,)] for i in range(grad.shape[self.resolved_axis]))


class Gather(Operator):
    """``out[..., i, ...] = x[..., indices[..., i, ...], ...]`` along ``axis``:
    numpy.take_along_axis. The other axes of ``x`` and ``indices`` broadcast together; an
    index may be negative (from the end). torch.gather is the case of equal other axes."""

    kind = "gather"
    retain_inputs = (1,)
    nondifferentiable_inputs = (1,)

    def __init__(self, axis: int) -> None:
        self.axis = operator.index(axis)

    def config(self):
        return {"axis": self.axis}

    def infer(self, x, indices):
        if not indices.dtype.startswith(("int", "uint")):
            raise ShapeError(f"gather's indices must be integers, got {indices.dtype}")
        if x.ndim != indices.ndim:
            raise ShapeError(f"gather needs x and indices of one rank (as take_along_axis), got "
                             f"{x.shape} and {indices.shape}")
        (axis,) = normalize_axis(self.axis, x.ndim)
        self.resolved_axis = axis

        def others(shape: Shape) -> Shape:
            return shape[:axis] + (1,) + shape[axis + 1:]

        shape = broadcast_shapes(others(x.shape), others(indices.shape))
        return TensorSpec(shape[:axis] + (indices.shape[axis],) + shape[axis + 1:], x.dtype)

    def forward(self, ctx, xp, x, indices):
        ctx.shape = x.shape
        return xp.take_along_axis(x, indices, axis=self.resolved_axis)

    def backward(self, ctx, xp, inputs, output, grad):
        indices, axis = inputs[1], self.resolved_axis
        # Scatter-add into x's shape broadcast as the output's; unbroadcast sums the rest.
        full = xp.zeros(grad.shape[:axis] + (ctx.shape[axis],) + grad.shape[axis + 1:], dtype=grad.dtype)
        where = []
        for d, size in enumerate(grad.shape):
            if d == axis:
                where.append(xp.broadcast_to(indices, grad.shape))
            else:
                where.append(xp.arange(size).reshape((1,) * d + (size,) + (1,) * (grad.ndim - d - 1)))
        xp.scatter_add(full, tuple(where), grad)
        return unbroadcast(xp, full, ctx.shape), None


class Index(Operator):
    """Basic indexing with integers and slices, e.g. ``x[:, -1]`` (the last time step)."""

    kind = "index"

    def __init__(self, key: tuple) -> None:
        self.key = tuple(decode_index(k) for k in key)

    def config(self):
        return {"key": [encode_index(k) for k in self.key]}

    def infer(self, x):
        if len(self.key) > x.ndim:
            raise ShapeError(f"too many indices ({len(self.key)}) for shape {x.shape}")
        shape: list[int | None] = []
        for i, d in enumerate(x.shape):
            k = self.key[i] if i < len(self.key) else slice(None)
            if isinstance(k, int):
                if d is not None and not -d <= k < d:
                    raise ShapeError(f"index {k} is out of range for dimension {i} of {x.shape}")
            elif isinstance(k, slice):
                shape.append(None if d is None else len(range(*k.indices(d))))
            else:
                raise ShapeError(f"only integers and slices can index a tensor, got {k!r}")
        return TensorSpec(tuple(shape), x.dtype)

    def forward(self, ctx, xp, x):
        ctx.in_shape, ctx.dtype = x.shape, x.dtype
        return x[self.key]

    def backward(self, ctx, xp, inputs, output, grad):
        full = xp.zeros(ctx.in_shape, dtype=ctx.dtype)
        full[self.key] = grad
        return (full,)


def encode_index(k: Any) -> Any:
    if isinstance(k, slice):
        return {"slice": [k.start, k.stop, k.step]}
    return k


def decode_index(k: Any) -> Any:
    if isinstance(k, dict):
        return slice(*k["slice"])
    return k


# --------------------------------------------------------------------------- softmax on any axis

def softmax(xp: Any, x: Any, axis: int = -1) -> Any:
    """softmax along ``axis``, in one fresh buffer (no overflow: the maximum goes first)."""
    probs = x - x.max(axis=axis, keepdims=True)
    xp.exp(probs, out=probs)
    probs *= 1.0 / probs.sum(axis=axis, keepdims=True)
    return probs


def log_softmax(xp: Any, x: Any, axis: int = -1) -> Any:
    """log(softmax(x)) along ``axis``, computed without overflow."""
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))


def softmax_grad(xp: Any, y: Any, dy: Any, axis: int = -1) -> Any:
    """The gradient through ``y = softmax(x)`` along ``axis``, from its output."""
    return y * (dy - (dy * y).sum(axis=axis, keepdims=True))


def log_softmax_grad(xp: Any, y: Any, dy: Any, axis: int = -1) -> Any:
    """The gradient through ``y = log_softmax(x)`` along ``axis``, from its output."""
    return dy - xp.exp(y) * dy.sum(axis=axis, keepdims=True)


class SoftmaxAlong(Operator):
    """Softmax (or log-softmax) along ``axis``, any axis; the activations of the same names
    take the last."""

    retain_output = True

    def __init__(self, axis: int = -1) -> None:
        self.axis = operator.index(axis)

    def config(self):
        return {"axis": self.axis}

    def infer(self, x):
        require_float(x)
        (self.resolved_axis,) = normalize_axis(self.axis, x.ndim)
        return x


class Softmax(SoftmaxAlong):
    kind = "softmax"

    def forward(self, ctx, xp, x):
        return softmax(xp, x, self.resolved_axis)

    def backward(self, ctx, xp, inputs, output, grad):
        return (softmax_grad(xp, output, grad, self.resolved_axis),)


class LogSoftmax(SoftmaxAlong):
    kind = "log_softmax"

    def forward(self, ctx, xp, x):
        return log_softmax(xp, x, self.resolved_axis)

    def backward(self, ctx, xp, inputs, output, grad):
        return (log_softmax_grad(xp, output, grad, self.resolved_axis),)


#: Primitive operators by name: what ``Graph.op`` builds, and what a saved graph refers to.
PRIMITIVES: dict[str, type[Operator]] = {
    cls.kind: cls
    for cls in (Add, Sub, Mul, Div, Neg, Pow, Power, MatMul, Exp, Log, Sqrt, Abs, Maximum, Clip,
                Where, Astype, Sum, Mean, Max, Min, Var, Std, Reshape, Squeeze, ExpandDims,
                Transpose, Concat, Stack, Gather, Index, Softmax, LogSoftmax)
}
