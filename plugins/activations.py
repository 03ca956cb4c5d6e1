"""Built-in activations, and the two activation layers that learn parameters (PReLU, Maxout).

Each activation keeps only what its backward reads. An activation with a learned parameter is a
*layer* (``g.layer("prelu", h)``, ``g.layer("maxout", h, units=32, pieces=2)``): activations
are parameter-free elementwise functions, so ``g.activation("prelu", h)`` is an error that points
to the layer.
"""

from __future__ import annotations

import math
from typing import Any

from scipy.special import erf  # a ufunc (NumPy has no erf): CuPy arrays dispatch it to cupyx.scipy

import graphengine as ge
from graphengine.errors import HyperparameterError, ShapeError, require_int
from graphengine.ir.operators import (
    TensorSpec,
    log_softmax,
    log_softmax_grad,
    require_float,
    same_dtype,
    softmax,
    softmax_grad,
)
from graphengine.tools.monitor import SATURATED_SLOPE


def sigmoid(xp: Any, x: Any) -> Any:
    """``1 / (1 + exp(-x))`` in one buffer, 1.5-2x faster than the tanh form ``(tanh(x / 2) +
    1) / 2`` on CPUs where NumPy's tanh is not vectorized. An exp that overflows (x < -88 in
    float32) gives inf and so exactly 0, the right value; models run operators with overflow
    warnings off (see graphengine.model)."""
    y = xp.negative(x, out=xp.empty_like(x))  # an array even for a 0-d x, for the out= below
    xp.exp(y, out=y)
    y += 1
    return xp.reciprocal(y, out=y)


def softplus(xp: Any, x: Any) -> Any:
    """``log(1 + exp(x))`` without overflow: ``max(x, 0) + log1p(exp(-|x|))``."""
    return xp.maximum(x, 0) + xp.log1p(xp.exp(-xp.abs(x)))


# Health measures (see ge.Activation.health): fractions of an output, batch first, on the device.

def dead_fraction(xp: Any, y: Any) -> Any:
    """The share of units that no example of the batch activates (``y <= 0`` all along the
    batch axis): dead on this batch, they pass no gradient."""
    return xp.mean(xp.all(y <= 0, axis=0))


def sigmoid_saturation(xp: Any, y: Any) -> Any:
    """The share of sigmoid outputs whose slope ``y (1 - y)`` is below ``SATURATED_SLOPE`` of
    its peak, 1/4."""
    return xp.mean(y * (1 - y) < 0.25 * SATURATED_SLOPE)


def tanh_saturation(xp: Any, y: Any) -> Any:
    """The share of tanh outputs whose slope ``1 - y^2`` is below ``SATURATED_SLOPE`` of its
    peak, 1."""
    return xp.mean(1 - y * y < SATURATED_SLOPE)


def _positive(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise TypeError(f"{what} must be a positive number, got {value!r}")
    return float(value)


class Identity(ge.Activation):
    keeps = ()

    def forward(self, xp, x):
        return x

    def backward(self, xp, x, y, dy):
        return dy


class Sigmoid(ge.Activation):
    keeps = ("y",)
    health = "saturation"

    def forward(self, xp, x):
        return sigmoid(xp, x)

    def backward(self, xp, x, y, dy):
        return dy * y * (1 - y)

    def measure_health(self, xp, y):
        return sigmoid_saturation(xp, y)


class Tanh(ge.Activation):
    keeps = ("y",)
    health = "saturation"

    def forward(self, xp, x):
        return xp.tanh(x)

    def backward(self, xp, x, y, dy):
        return dy * (1 - y * y)

    def measure_health(self, xp, y):
        return tanh_saturation(xp, y)


class ReLU(ge.Activation):
    keeps = ("y",)
    health = "dead_fraction"

    def forward(self, xp, x):
        return xp.maximum(x, 0)

    def backward(self, xp, x, y, dy):
        return dy * (y > 0)

    def measure_health(self, xp, y):
        return dead_fraction(xp, y)


class LeakyReLU(ge.Activation):
    """``x`` for ``x > 0``, ``slope * x`` otherwise: negative inputs keep a small gradient, so
    units cannot die as ReLU units can."""

    keeps = ("x",)

    def __init__(self, slope: float = 0.01) -> None:
        if isinstance(slope, bool) or not isinstance(slope, (int, float)):
            raise TypeError(f"slope must be a number, got {slope!r}")
        self.slope = float(slope)

    def config(self) -> dict[str, Any]:
        return {"slope": self.slope}

    def forward(self, xp, x):
        return xp.where(x > 0, x, self.slope * x)

    def backward(self, xp, x, y, dy):
        return xp.where(x > 0, dy, self.slope * dy)


class ELU(ge.Activation):
    """``x`` for ``x > 0``, ``alpha * (exp(x) - 1)`` otherwise: smooth, saturating at ``-alpha``."""

    keeps = ("x", "y")

    def __init__(self, alpha: float = 1.0) -> None:
        self.alpha = _positive(alpha, "alpha")

    def config(self) -> dict[str, Any]:
        return {"alpha": self.alpha}

    def forward(self, xp, x):
        # exp only of the non-positive part, so large x cannot overflow
        return xp.where(x > 0, x, self.alpha * xp.expm1(xp.minimum(x, 0)))

    def backward(self, xp, x, y, dy):
        # for x <= 0 the derivative alpha * exp(x) equals y + alpha
        return xp.where(x > 0, dy, dy * (y + self.alpha))


class Softplus(ge.Activation):
    """``log(1 + exp(x))``, a smooth ReLU; its derivative is the sigmoid."""

    keeps = ("x",)

    def forward(self, xp, x):
        return softplus(xp, x)

    def backward(self, xp, x, y, dy):
        return dy * sigmoid(xp, x)


class ReLU6(ge.Activation):
    """``min(max(x, 0), 6)``: a ReLU capped at 6 (MobileNet), whose output fits low-precision
    arithmetic. Units die as ReLU units do, so it measures the same dead fraction."""

    keeps = ("y",)
    health = "dead_fraction"

    def forward(self, xp, x):
        return xp.clip(x, 0, 6)

    def backward(self, xp, x, y, dy):
        return dy * ((y > 0) & (y < 6))

    def measure_health(self, xp, y):
        return dead_fraction(xp, y)


class HardSigmoid(ge.Activation):
    """PyTorch's ``relu6(x + 3) / 6``: a piecewise-linear sigmoid, 0 below -3, 1 above 3, with
    slope 1/6 between. Outside (-3, 3) it passes no gradient at all, so it measures saturation."""

    keeps = ("y",)
    health = "saturation"

    def forward(self, xp, x):
        return xp.clip(x * (1 / 6) + 0.5, 0, 1)

    def backward(self, xp, x, y, dy):
        return dy * (1 / 6) * ((y > 0) & (y < 1))

    def measure_health(self, xp, y):
        return xp.mean((y <= 0) | (y >= 1))


class Softsign(ge.Activation):
    """``x / (1 + |x|)``: tanh's shape, approached polynomially rather than exponentially, so it
    saturates more slowly. Its slope ``1 / (1 + |x|)^2`` equals ``(1 - |y|)^2``."""

    keeps = ("y",)
    health = "saturation"

    def forward(self, xp, x):
        return x / (1 + xp.abs(x))

    def backward(self, xp, x, y, dy):
        slope = 1 - xp.abs(y)
        return dy * slope * slope

    def measure_health(self, xp, y):
        slope = 1 - xp.abs(y)
        return xp.mean(slope * slope < SATURATED_SLOPE)


#: SELU's constants (Klambauer et al. 2017), PyTorch's to the last digit: the ones that make
#: mean 0 and variance 1 a stable fixed point of a layer's activations.
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946


class SELU(ge.Activation):
    """Scaled ELU, ``scale * elu(x, alpha)`` with SELU's fixed constants: self-normalizing."""

    keeps = ("x", "y")

    def forward(self, xp, x):
        # exp only of the non-positive part, so large x cannot overflow
        return SELU_SCALE * xp.where(x > 0, x, SELU_ALPHA * xp.expm1(xp.minimum(x, 0)))

    def backward(self, xp, x, y, dy):
        # for x <= 0 the derivative scale * alpha * exp(x) equals y + scale * alpha
        return xp.where(x > 0, SELU_SCALE * dy, dy * (y + SELU_SCALE * SELU_ALPHA))


class SiLU(ge.Activation):
    """``x * sigmoid(x)`` (SiLU, also called swish): smooth, non-monotonic below 0."""

    keeps = ("x",)

    def forward(self, xp, x):
        return x * sigmoid(xp, x)

    def backward(self, xp, x, y, dy):
        s = sigmoid(xp, x)
        return dy * s * (1 + x * (1 - s))


class Mish(ge.Activation):
    """``x * tanh(softplus(x))`` (Misra 2019)."""

    keeps = ("x",)

    def forward(self, xp, x):
        return x * xp.tanh(softplus(xp, x))

    def backward(self, xp, x, y, dy):
        t = xp.tanh(softplus(xp, x))
        return dy * (t + x * (1 - t * t) * sigmoid(xp, x))


GELU_FORMS = ("none", "tanh")


class GELU(ge.Activation):
    """``x * Phi(x)``, Phi the standard normal distribution function (Hendrycks & Gimpel 2016),
    computed exactly through erf. ``approximate="tanh"`` uses their tanh approximation instead,
    ``0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))``, as PyTorch's ``approximate`` does
    (some pretrained models were trained with it)."""

    keeps = ("x",)
    _SQRT_2_OVER_PI = math.sqrt(2 / math.pi)
    _CUBIC = 0.044715

    def __init__(self, approximate: str = "none") -> None:
        if approximate not in GELU_FORMS:
            raise HyperparameterError(f"gelu: approximate must be one of {GELU_FORMS}, got "
                                      f"{approximate!r}")
        self.approximate = approximate

    def config(self) -> dict[str, Any]:
        return {"approximate": self.approximate}

    def _tanh_inner(self, xp, x):
        return xp.tanh(self._SQRT_2_OVER_PI * (x + self._CUBIC * x * x * x))

    def forward(self, xp, x):
        if self.approximate == "tanh":
            return 0.5 * x * (1 + self._tanh_inner(xp, x))
        return 0.5 * x * (1 + erf(x * math.sqrt(0.5)))

    def backward(self, xp, x, y, dy):
        if self.approximate == "tanh":
            t = self._tanh_inner(xp, x)
            inner_slope = self._SQRT_2_OVER_PI * (1 + 3 * self._CUBIC * x * x)
            return dy * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * inner_slope)
        cdf = 0.5 * (1 + erf(x * math.sqrt(0.5)))
        pdf = xp.exp(-0.5 * x * x) * (1 / math.sqrt(2 * math.pi))
        return dy * (cdf + x * pdf)


class Sign(ge.Activation):
    """-1, 0 or +1. Forward only: its derivative is zero wherever it exists, so the gradient it
    passes back is exactly zero and nothing below it learns through it. Use it for a binary code
    at inference time, not inside a network trained through it."""

    keeps = ()

    def forward(self, xp, x):
        return xp.sign(x)

    def backward(self, xp, x, y, dy):
        return xp.zeros_like(dy)


class Softmax(ge.Activation):
    """Softmax over the last axis."""

    keeps = ("y",)

    def forward(self, xp, x):
        return softmax(xp, x)

    def backward(self, xp, x, y, dy):
        return softmax_grad(xp, y, dy)


class LogSoftmax(ge.Activation):
    """log(softmax(x)) over the last axis: the log-probabilities the ``nll`` loss takes."""

    keeps = ("y",)

    def forward(self, xp, x):
        return log_softmax(xp, x)

    def backward(self, xp, x, y, dy):
        return log_softmax_grad(xp, y, dy)


# --------------------------------------------------------------------------- layers with parameters

class PReLUOp(ge.Operator):
    """Leaky ReLU whose negative slope is an input: one slope per index along ``axis``
    (``axis=None``: one slope shared by all units)."""

    kind = "prelu"
    retain_inputs = (0, 1)

    def __init__(self, axis: int | None = -1) -> None:
        self.axis = axis

    def config(self) -> dict[str, Any]:
        return {"axis": self.axis}

    def infer(self, x: TensorSpec, slope: TensorSpec) -> TensorSpec:
        require_float(x)
        same_dtype(x, slope)
        want = (1,) if self.axis is None else (x.shape[self.axis],)
        if slope.shape != want:
            raise ShapeError(f"slope has shape {slope.shape}, input {x.shape} needs {want}")
        return x

    def _broadcast(self, slope: Any, ndim: int) -> Any:
        if self.axis is None:
            return slope.reshape((1,) * ndim)
        shape = [1] * ndim
        shape[self.axis] = slope.shape[0]
        return slope.reshape(tuple(shape))

    def forward(self, ctx, xp, x, slope):
        return xp.where(x > 0, x, self._broadcast(slope, x.ndim) * x)

    def backward(self, ctx, xp, inputs, output, grad):
        x, slope = inputs
        positive = x > 0
        grad_x = xp.where(positive, grad, self._broadcast(slope, x.ndim) * grad)
        per_unit = xp.where(positive, 0, grad * x)
        keep = () if self.axis is None else (self.axis % x.ndim,)
        grad_slope = per_unit.sum(axis=tuple(a for a in range(x.ndim) if a not in keep))
        return grad_x, grad_slope.reshape(slope.shape)


class PReLU(ge.Layer):
    """Parametric ReLU: a leaky ReLU whose slope ``alpha`` is learned, one per unit along
    ``axis`` (-1: per neuron of a dense layer; 1: per channel of an NCHW feature map; None: one
    for the whole layer). Parameter ``alpha``, initialized to ``init`` (0.25 as in He et al.
    2015); it is a vector, so weight penalties skip it by default."""

    def __init__(self, axis: int | None = -1, init: float = 0.25) -> None:
        if axis is not None and not isinstance(axis, int):
            raise TypeError(f"axis must be an int or None, got {axis!r}")
        super().__init__(axis=axis, init=init)
        self.axis, self.init = axis, float(init)

    def build(self, g, x):
        if self.axis is not None:
            if not -x.ndim <= self.axis < x.ndim or x.shape[self.axis] is None:
                raise ShapeError(f"prelu axis {self.axis} must be a known dimension of {x.shape}")
        units = 1 if self.axis is None else x.shape[self.axis]
        alpha = g.parameter("alpha", (units,), init={"name": "constant", "value": self.init},
                            dtype=x.dtype)
        return g.apply(PReLUOp(self.axis), x, alpha, name="prelu")


class MaxoutOp(ge.Operator):
    """Max over consecutive groups of ``pieces`` features: (..., units * pieces) -> (..., units).
    The gradient goes to the winner of each group (the first one on a tie)."""

    kind = "maxout"

    def __init__(self, pieces: int) -> None:
        self.pieces = pieces

    def config(self) -> dict[str, Any]:
        return {"pieces": self.pieces}

    def infer(self, z: TensorSpec) -> TensorSpec:
        require_float(z)
        features = z.shape[-1]
        if features is None or features % self.pieces:
            raise ShapeError(f"maxout needs a last dimension divisible by pieces={self.pieces}, "
                             f"got {z.shape}")
        return TensorSpec(z.shape[:-1] + (features // self.pieces,), z.dtype)

    def forward(self, ctx, xp, z):
        groups = z.reshape(z.shape[:-1] + (z.shape[-1] // self.pieces, self.pieces))
        ctx.winner = groups.argmax(axis=-1)
        return groups.max(axis=-1)

    def backward(self, ctx, xp, inputs, output, grad):
        chosen = xp.arange(self.pieces) == ctx.winner[..., None]
        grad_groups = grad[..., None] * chosen
        return (grad_groups.reshape(grad.shape[:-1] + (grad.shape[-1] * self.pieces,)),)


class Maxout(ge.Layer):
    """Maxout (Goodfellow et al. 2013): ``units`` outputs, each the max of ``pieces`` linear
    functions of the input. Parameters ``W`` (features, units * pieces) and ``b``; the pieces of
    unit ``j`` are columns ``j * pieces ... j * pieces + pieces - 1``. With two pieces, one of
    them zero, a unit is exactly a ReLU; in general it learns a convex piecewise-linear
    activation."""

    def __init__(self, units: int, pieces: int = 2, init: str | dict = "xavier",
                 bias: bool = True) -> None:
        units, pieces = require_int(units, "units"), require_int(pieces, "pieces")
        super().__init__(units=units, pieces=pieces, init=init, bias=bias)
        self.units, self.pieces, self.init, self.bias = units, pieces, init, bias

    def build(self, g, x):
        features = x.shape[-1]
        if features is None:
            raise ShapeError(f"maxout needs a known number of input features, got shape {x.shape}")
        width = self.units * self.pieces
        z = x @ g.parameter("W", (features, width), init=self.init, dtype=x.dtype)
        if self.bias:
            z = z + g.parameter("b", (width,), init="zeros", dtype=x.dtype)
        return g.apply(MaxoutOp(self.pieces), z, name="max")


@ge.hookimpl
def graphengine_register_activations(register):
    register("identity", Identity, aliases=("linear",))
    register("sigmoid", Sigmoid, aliases=("logistic",))
    register("tanh", Tanh)
    register("relu", ReLU)
    register("leaky_relu", LeakyReLU)
    register("elu", ELU)
    register("softplus", Softplus)
    register("relu6", ReLU6)
    register("hard_sigmoid", HardSigmoid)
    register("softsign", Softsign)
    register("selu", SELU)
    register("silu", SiLU, aliases=("swish",))
    register("mish", Mish)
    register("gelu", GELU)
    register("sign", Sign)
    register("softmax", Softmax)
    register("log_softmax", LogSoftmax)


@ge.hookimpl
def graphengine_register_layers(register):
    register("prelu", PReLU)
    register("maxout", Maxout)
