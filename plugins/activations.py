"""Built-in activations. Each keeps only what its backward reads."""

from __future__ import annotations

import graphengine as ge


class Identity(ge.Activation):
    keeps = ()

    def forward(self, xp, x):
        return x

    def backward(self, xp, x, y, dy):
        return dy


class Sigmoid(ge.Activation):
    keeps = ("y",)

    def forward(self, xp, x):
        # tanh form: no overflow in exp for large |x|
        return 0.5 * (xp.tanh(0.5 * x) + 1)

    def backward(self, xp, x, y, dy):
        return dy * y * (1 - y)


class Tanh(ge.Activation):
    keeps = ("y",)

    def forward(self, xp, x):
        return xp.tanh(x)

    def backward(self, xp, x, y, dy):
        return dy * (1 - y * y)


class ReLU(ge.Activation):
    keeps = ("y",)

    def forward(self, xp, x):
        return xp.maximum(x, 0)

    def backward(self, xp, x, y, dy):
        return dy * (y > 0)


class Softmax(ge.Activation):
    """Softmax over the last axis."""

    keeps = ("y",)

    def forward(self, xp, x):
        shifted = xp.exp(x - x.max(axis=-1, keepdims=True))
        return shifted / shifted.sum(axis=-1, keepdims=True)

    def backward(self, xp, x, y, dy):
        return y * (dy - (dy * y).sum(axis=-1, keepdims=True))


@ge.hookimpl
def graphengine_register_activations(register):
    register("identity", Identity, aliases=("linear",))
    register("sigmoid", Sigmoid, aliases=("logistic",))
    register("tanh", Tanh)
    register("relu", ReLU)
    register("softmax", Softmax)
