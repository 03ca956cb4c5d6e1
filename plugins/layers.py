"""Built-in layers, composed of primitive operators."""

from __future__ import annotations

import math
from typing import Any

import graphengine as ge
from graphengine.errors import GraphBuildError, ShapeError, require_int
from graphengine.ir.operators import require_float, same_dtype


class Dense(ge.Layer):
    """Fully connected: ``y = x @ W + b`` over the last axis. Parameters ``W`` (in, units), ``b``."""

    def __init__(self, units: int, init: str | dict = "xavier", bias: bool = True) -> None:
        units = require_int(units, "units")
        super().__init__(units=units, init=init, bias=bias)
        self.units, self.init, self.bias = units, init, bias

    def build(self, g, x):
        features = x.shape[-1]
        if features is None:
            raise ShapeError(f"dense needs a known number of input features, got shape {x.shape}")
        y = x @ g.parameter("W", (features, self.units), init=self.init, dtype=x.dtype)
        if self.bias:
            y = y + g.parameter("b", (self.units,), init="zeros", dtype=x.dtype)
        return y


class Flatten(ge.Layer):
    """(batch, d1, d2, ...) -> (batch, d1*d2*...)."""

    def build(self, g, x):
        if any(d is None for d in x.shape[1:]):
            raise ShapeError(f"flatten needs known non-batch dimensions, got {x.shape}")
        return x.reshape(x.shape[0], math.prod(x.shape[1:]))


class Add(ge.Layer):
    """Elementwise sum of two or more tensors of the same shape: ``g.layer("add", x, f(x))``
    for a residual connection. Shapes must match exactly (no broadcasting), so a shortcut of the
    wrong width fails at build time instead of silently broadcasting."""

    def build(self, g, *xs):
        if len(xs) < 2:
            raise ShapeError(f"add needs at least two inputs, got {len(xs)}")
        for x in xs[1:]:
            if x.shape != xs[0].shape:
                raise ShapeError(f"add needs inputs of one shape, got {xs[0].name} {xs[0].shape} and "
                                 f"{x.name} {x.shape}; project the shortcut with a dense layer")
        total = xs[0]
        for x in xs[1:]:
            total = total + x
        return total


class LayerNormOp(ge.Operator):
    """Layer normalization (Ba et al. 2016) over the last ``count`` axes of each example:
    ``(x - mean) / sqrt(var + eps) * gamma + beta``, the (biased) variance as PyTorch's
    ``F.layer_norm``. Inputs ``x``, ``gamma``, ``beta`` (each of the shape of those axes). The
    same in training and evaluation: no statistics are kept across batches. Keeps the normalized
    ``x`` and ``1 / std`` on its context for backward."""

    kind = "layer_norm"
    retain_inputs = (1,)

    def __init__(self, count: int = 1, eps: float = 1e-5) -> None:
        self.count, self.eps = count, eps

    def config(self) -> dict[str, Any]:
        return {"count": self.count, "eps": self.eps}

    def infer(self, x, gamma, beta):
        require_float(x)
        same_dtype(x, gamma, beta)
        normalized = x.shape[x.ndim - self.count:]
        if not 1 <= self.count <= x.ndim or None in normalized:
            raise ShapeError(f"layer_norm over the last {self.count} axes needs them known, got {x.shape}")
        for name, spec in (("gamma", gamma), ("beta", beta)):
            if spec.shape != normalized:
                raise ShapeError(f"layer_norm {name} must have the normalized shape {normalized}, "
                                 f"got {spec.shape}")
        return x

    def forward(self, ctx, xp, x, gamma, beta):
        axes = tuple(range(x.ndim - self.count, x.ndim))
        centered = x - x.mean(axis=axes, keepdims=True)
        ctx.inv_std = 1.0 / xp.sqrt((centered * centered).mean(axis=axes, keepdims=True) + self.eps)
        ctx.normalized = centered * ctx.inv_std
        return ctx.normalized * gamma + beta

    def backward(self, ctx, xp, inputs, output, grad):
        gamma, normalized = inputs[1], ctx.normalized
        axes = tuple(range(grad.ndim - self.count, grad.ndim))
        leading = tuple(range(grad.ndim - self.count))
        grad_gamma = (grad * normalized).sum(axis=leading)
        grad_beta = grad.sum(axis=leading)
        grad_normalized = grad * gamma
        # d/dx through each example's mean and variance as well as directly.
        grad_x = grad_normalized - grad_normalized.mean(axis=axes, keepdims=True)
        grad_x -= normalized * (grad_normalized * normalized).mean(axis=axes, keepdims=True)
        grad_x *= ctx.inv_std
        return grad_x, grad_gamma, grad_beta


class LayerNorm(ge.Layer):
    """``g.layer("layer_norm", h, axis=-1, eps=1e-5)``: normalize each example over its last
    axis (or the trailing axes ``axis``, e.g. ``(-2, -1)``), then scale by ``gamma`` (ones) and
    shift by ``beta`` (zeros), learned, of the normalized shape; as PyTorch's
    ``nn.LayerNorm(normalized_shape)``. Unlike batch_norm it needs no batch statistics, so it
    behaves the same in training and evaluation and at any batch size (transformers, RNNs)."""

    def __init__(self, axis: int | tuple[int, ...] = -1, eps: float = 1e-5) -> None:
        if not isinstance(eps, (int, float)) or eps <= 0:
            raise GraphBuildError(f"layer_norm eps must be a positive number, got {eps!r}")
        axes = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
        if not axes or not all(isinstance(a, int) for a in axes):
            raise GraphBuildError(f"layer_norm axis must be an int or a tuple of ints, got {axis!r}")
        super().__init__(axis=axis, eps=eps)
        self.axes, self.eps = axes, eps

    def build(self, g, x):
        if any(not -x.ndim <= a < x.ndim for a in self.axes):
            raise ShapeError(f"layer_norm axis {self.axes} is out of range for {x.name} {x.shape}")
        axes = sorted(a % x.ndim for a in self.axes)
        if axes != list(range(x.ndim - len(axes), x.ndim)):
            raise ShapeError(f"layer_norm normalizes trailing axes, got axis {self.axes} for {x.name} "
                             f"{x.shape}: move the axis last (transpose) or use batch_norm")
        normalized = x.shape[axes[0]:]
        if None in normalized:
            raise ShapeError(f"layer_norm needs the normalized axes known, got {x.name} {x.shape}")
        params = [g.parameter(name, normalized, init=init, decay=False, dtype=x.dtype)
                  for name, init in (("gamma", "ones"), ("beta", "zeros"))]
        return g.apply(LayerNormOp(len(axes), self.eps), x, *params)


@ge.hookimpl
def graphengine_register_layers(register):
    register("dense", Dense, aliases=("linear", "fully_connected"))
    register("flatten", Flatten)
    register("add", Add, aliases=("residual",))
    register("layer_norm", LayerNorm, aliases=("layernorm",))
