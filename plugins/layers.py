"""Built-in layers, composed of primitive operators."""

from __future__ import annotations

import math

import graphengine as ge
from graphengine.errors import ShapeError


class Dense(ge.Layer):
    """Fully connected: ``y = x @ W + b`` over the last axis. Parameters ``W`` (in, units), ``b``."""

    def __init__(self, units: int, init: str | dict = "xavier", bias: bool = True) -> None:
        if not isinstance(units, int) or units < 1:
            raise TypeError(f"units must be a positive int, got {units!r}")
        super().__init__(units=units, init=init, bias=bias)
        self.units, self.init, self.bias = units, init, bias

    def build(self, g, x):
        features = x.shape[-1]
        if features is None:
            raise ShapeError(f"dense needs a known number of input features, got shape {x.shape}")
        y = x @ g.parameter("W", (features, self.units), init=self.init)
        if self.bias:
            y = y + g.parameter("b", (self.units,), init="zeros")
        return y


class Flatten(ge.Layer):
    """(batch, d1, d2, ...) -> (batch, d1*d2*...)."""

    def build(self, g, x):
        if any(d is None for d in x.shape[1:]):
            raise ShapeError(f"flatten needs known non-batch dimensions, got {x.shape}")
        return x.reshape(x.shape[0], math.prod(x.shape[1:]))


@ge.hookimpl
def graphengine_register_layers(register):
    register("dense", Dense, aliases=("linear", "fully_connected"))
    register("flatten", Flatten)
