"""Built-in optimizers. Each ``update`` changes the parameter in place."""

from __future__ import annotations

import graphengine as ge


class SGD(ge.Optimizer):
    """w <- w - lr * g. Full-batch, mini-batch and stochastic descent differ only in batch size."""

    def update(self, xp, param, grad, state, step):
        param -= self.lr * grad


@ge.hookimpl
def graphengine_register_optimizers(register):
    register("sgd", SGD)
