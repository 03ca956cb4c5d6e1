"""Built-in optimizers. Each ``update`` changes the parameter in place.

Notation: ``w`` parameter, ``g`` its gradient, ``t`` the step (from 1), ``lr`` the learning rate
(a schedule may change it between steps). Learning-rate schedules, gradient clipping and
weight penalties are not optimizer options: they live in :mod:`graphengine.train.regularization`
and work with every optimizer.
"""

from __future__ import annotations

import math
from typing import Any

import graphengine as ge
from graphengine.errors import HyperparameterError, require_number


def _check(value: float, what: str, low: float, high: float | None = None) -> float:
    """``value`` as a finite float in [low, high) (``high=None``: unbounded)."""
    return require_number(value, what, low, high, exclusive_maximum=True,
                          error=HyperparameterError)


def _step_by_root(xp: Any, param: Any, numerator: Any, square: Any, lr: float, eps: float,
                  scratch: Any) -> None:
    """``param -= lr * numerator / (sqrt(square) + eps)``, computed in ``scratch`` (an array
    the size of ``param``) instead of four temporaries."""
    xp.sqrt(square, out=scratch)
    scratch += eps
    xp.divide(numerator, scratch, out=scratch)
    scratch *= lr
    param -= scratch


class SGD(ge.Optimizer):
    """w <- w - lr * g. Full-batch, mini-batch and stochastic descent differ only in batch size."""

    elementwise = True

    def __init__(self, lr: float = 0.01) -> None:
        super().__init__(_check(lr, "lr", 0.0))

    def update(self, xp, param, grad, state, step):
        param -= self.lr * grad


class Momentum(ge.Optimizer):
    """Gradient descent with momentum, as in the course notes: the movement ``v`` remembers the
    previous movement, ``v <- momentum * v - lr * g``, then ``w <- w + v`` (``v`` starts at 0)."""

    elementwise = True

    def __init__(self, lr: float = 0.01, momentum: float = 0.9) -> None:
        super().__init__(_check(lr, "lr", 0.0))
        self.momentum = _check(momentum, "momentum", 0.0, 1.0)

    def init_state(self, xp, param):
        return {"velocity": xp.zeros_like(param)}

    def advance(self, state, grad):
        """The new movement ``v``, updated in place in ``state``."""
        velocity = state["velocity"]
        velocity *= self.momentum
        velocity -= self.lr * grad
        return velocity

    def update(self, xp, param, grad, state, step):
        param += self.advance(state, grad)


class Nesterov(Momentum):
    """Nesterov accelerated gradient: the gradient is taken at the look-ahead point ``w + mu v``.

    Stored as that look-ahead point (CS231n's form; Sutskever et al. 2013), so it needs the
    gradient at the current parameter only: ``v <- mu v - lr g``, ``w <- w + mu v - lr g``."""

    def update(self, xp, param, grad, state, step):
        param += self.momentum * self.advance(state, grad) - self.lr * grad


class Adagrad(ge.Optimizer):
    """One learning rate per weight, divided by the root of the sum of all its past squared
    gradients: ``G <- G + g^2``, ``w <- w - lr * g / (sqrt(G) + eps)``."""

    elementwise = True

    def __init__(self, lr: float = 0.01, eps: float = 1e-8) -> None:
        super().__init__(_check(lr, "lr", 0.0))
        self.eps = _check(eps, "eps", 0.0)

    def init_state(self, xp, param):
        return {"sum_squares": xp.zeros_like(param)}

    def update(self, xp, param, grad, state, step):
        sum_squares, scratch = state["sum_squares"], xp.multiply(grad, grad)
        sum_squares += scratch
        _step_by_root(xp, param, grad, sum_squares, self.lr, self.eps, scratch)


class RMSProp(ge.Optimizer):
    """Adagrad with a forgetting root mean square, as in the course notes: ``sigma`` starts at
    ``|g_1|`` and then ``sigma^2 <- alpha sigma^2 + (1 - alpha) g^2``; ``w <- w - lr g / (sigma +
    eps)``. A smaller ``alpha`` trusts recent gradients more.

    (PyTorch and Keras start the mean square at 0 instead; their first steps are then
    ``1 / sqrt(1 - alpha)`` times larger.)"""

    elementwise = True

    def __init__(self, lr: float = 0.001, alpha: float = 0.9, eps: float = 1e-8) -> None:
        super().__init__(_check(lr, "lr", 0.0))
        self.alpha = _check(alpha, "alpha", 0.0, 1.0)
        self.eps = _check(eps, "eps", 0.0)

    def update(self, xp, param, grad, state, step):
        scratch = xp.multiply(grad, grad)
        mean_square = state.get("mean_square")
        if mean_square is None:  # this parameter's first gradient (it may have been frozen)
            mean_square = state["mean_square"] = scratch.copy()
        else:
            mean_square *= self.alpha
            scratch *= 1 - self.alpha
            mean_square += scratch
        _step_by_root(xp, param, grad, mean_square, self.lr, self.eps, scratch)


class Adam(ge.Optimizer):
    """RMSProp + momentum with bias correction (Kingma & Ba 2015):
    ``m <- b1 m + (1 - b1) g``, ``v <- b2 v + (1 - b2) g^2``,
    ``w <- w - lr * m_hat / (sqrt(v_hat) + eps)`` with ``m_hat = m / (1 - b1^t)``,
    ``v_hat = v / (1 - b2^t)`` (``m`` and ``v`` start at 0, so they are biased towards 0 early).
    ``t`` counts this parameter's own updates, so a parameter unfrozen late starts at t = 1."""

    elementwise = True

    def __init__(self, lr: float = 0.001, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8) -> None:
        super().__init__(_check(lr, "lr", 0.0))
        self.beta1 = _check(beta1, "beta1", 0.0, 1.0)
        self.beta2 = _check(beta2, "beta2", 0.0, 1.0)
        self.eps = _check(eps, "eps", 0.0)

    def init_state(self, xp, param):
        return {"m": xp.zeros_like(param), "v": xp.zeros_like(param), "t": 0}

    def update(self, xp, param, grad, state, step):
        m, v = state["m"], state["v"]
        state["t"] = t = state["t"] + 1
        scratch = xp.multiply(grad, 1 - self.beta1)
        m *= self.beta1
        m += scratch
        xp.multiply(grad, grad, out=scratch)
        scratch *= 1 - self.beta2
        v *= self.beta2
        v += scratch
        # m_hat / (sqrt(v_hat) + eps) with the corrections moved onto scalars: the same number,
        # without two more arrays the size of the parameter.
        root_correction = math.sqrt(1 - self.beta2 ** t)
        _step_by_root(xp, param, m, v, self.lr * root_correction / (1 - self.beta1 ** t),
                      self.eps * root_correction, scratch)


@ge.hookimpl
def graphengine_register_optimizers(register):
    register("sgd", SGD)
    register("momentum", Momentum)
    register("nesterov", Nesterov)
    register("adagrad", Adagrad)
    register("rmsprop", RMSProp)
    register("adam", Adam)
