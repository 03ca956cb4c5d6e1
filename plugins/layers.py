"""Built-in layers, composed of primitive operators."""

from __future__ import annotations

import math

import graphengine as ge
from graphengine.errors import ShapeError, require_int


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


@ge.hookimpl
def graphengine_register_layers(register):
    register("dense", Dense, aliases=("linear", "fully_connected"))
    register("flatten", Flatten)
    register("add", Add, aliases=("residual",))
