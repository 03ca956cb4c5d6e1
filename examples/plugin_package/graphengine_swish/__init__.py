"""An example graphengine plugin package: what a third-party author writes.

Registers the ``swish_beta`` activation (x * sigmoid(beta x), swish with a slope ``beta``;
graphengine's built-in ``silu``, alias ``swish``, is the case beta = 1) and a ``residual_dense``
layer (x + dense(x)), built from graphengine's own primitives.
"""

from __future__ import annotations

import graphengine as ge


class Swish(ge.Activation):
    keeps = ("x", "y")

    def __init__(self, beta: float = 1.0) -> None:
        self.beta = beta

    def config(self):
        return {"beta": self.beta}

    def forward(self, xp, x):
        return x * (0.5 * (xp.tanh(0.5 * self.beta * x) + 1))

    def backward(self, xp, x, y, dy):
        s = 0.5 * (xp.tanh(0.5 * self.beta * x) + 1)
        return dy * (s + self.beta * y * (1 - s))


class ResidualDense(ge.Layer):
    """y = x + dense(x): a layer made of other layers, with a skip connection."""

    def __init__(self, init: str = "he") -> None:
        super().__init__(init=init)
        self.init = init

    def build(self, g, x):
        return x + g.layer("dense", x, units=x.shape[-1], init=self.init, name="inner")


@ge.hookimpl
def graphengine_register_activations(register):
    register("swish_beta", Swish)


@ge.hookimpl
def graphengine_register_layers(register):
    register("residual_dense", ResidualDense)
