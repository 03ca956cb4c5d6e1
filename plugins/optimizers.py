"""Built-in optimizers. Each ``update`` changes the parameter in place.

Notation: ``w`` parameter, ``g`` its gradient, ``t`` the step (from 1), ``lr`` the learning rate
(a schedule may change it between steps). Learning-rate schedules, gradient clipping and the
penalties ``ge.L1``/``ge.L2`` live in :mod:`graphengine.train.regularization` and work with
every optimizer.

``weight_decay`` (every optimizer) is torch.optim's: ``g <- g + weight_decay * w`` on the
gradient the optimizer receives, so after clipping, and on every trainable parameter, biases
included (``ge.L2(weight_decay)`` adds the same term before clipping, to weights only by
default). ``adamw`` decays the weights instead, outside Adam's normalization (Loshchilov &
Hutter 2019): ``w <- (1 - lr * weight_decay) w`` before the Adam step.
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


class Decaying(ge.Optimizer):
    """An optimizer with torch.optim's coupled ``weight_decay``: see the module docstring."""

    elementwise = True

    def __init__(self, lr: float, weight_decay: float = 0.0) -> None:
        super().__init__(_check(lr, "lr", 0.0))
        self.weight_decay = _check(weight_decay, "weight_decay", 0.0)

    def decayed(self, param: Any, grad: Any) -> Any:
        """``grad + weight_decay * param``, a new array (the gradient buffer is left alone)."""
        return grad + self.weight_decay * param if self.weight_decay else grad


class SGD(Decaying):
    """w <- w - lr * g. Full-batch, mini-batch and stochastic descent differ only in batch size."""

    def __init__(self, lr: float = 0.01, weight_decay: float = 0.0) -> None:
        super().__init__(lr, weight_decay)

    def update(self, xp, param, grad, state, step):
        param -= self.lr * self.decayed(param, grad)


class Momentum(Decaying):
    """Gradient descent with momentum, as in the course notes: the movement ``v`` remembers the
    previous movement, ``v <- momentum * v - lr * g``, then ``w <- w + v`` (``v`` starts at 0).

    ``v`` holds past steps already scaled by their lr, so a changed lr acts on new gradients
    only; torch.optim.SGD keeps ``g`` sums and scales them all by the new lr. With a constant lr
    the two are the same."""

    def __init__(self, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 0.0) -> None:
        super().__init__(lr, weight_decay)
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
        param += self.advance(state, self.decayed(param, grad))


class Nesterov(Momentum):
    """Nesterov accelerated gradient: the gradient is taken at the look-ahead point ``w + mu v``.

    Stored as that look-ahead point (CS231n's form; Sutskever et al. 2013), so it needs the
    gradient at the current parameter only: ``v <- mu v - lr g``, ``w <- w + mu v - lr g``."""

    def update(self, xp, param, grad, state, step):
        grad = self.decayed(param, grad)
        param += self.momentum * self.advance(state, grad) - self.lr * grad


class Adagrad(Decaying):
    """One learning rate per weight, divided by the root of the sum of all its past squared
    gradients: ``G <- G + g^2``, ``w <- w - lr * g / (sqrt(G) + eps)``. (torch.optim.Adagrad's
    default eps is 1e-10.)"""

    def __init__(self, lr: float = 0.01, eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(lr, weight_decay)
        self.eps = _check(eps, "eps", 0.0)

    def init_state(self, xp, param):
        return {"sum_squares": xp.zeros_like(param)}

    def update(self, xp, param, grad, state, step):
        grad = self.decayed(param, grad)
        sum_squares, scratch = state["sum_squares"], xp.multiply(grad, grad)
        sum_squares += scratch
        _step_by_root(xp, param, grad, sum_squares, self.lr, self.eps, scratch)


class RMSProp(Decaying):
    """Adagrad with a forgetting root mean square, as in the course notes: ``sigma`` starts at
    ``|g_1|`` and then ``sigma^2 <- alpha sigma^2 + (1 - alpha) g^2``; ``w <- w - lr g / (sigma +
    eps)``. A smaller ``alpha`` trusts recent gradients more.

    (PyTorch and Keras start the mean square at 0 instead; their first steps are then
    ``1 / sqrt(1 - alpha)`` times larger.)"""

    def __init__(self, lr: float = 0.001, alpha: float = 0.9, eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        super().__init__(lr, weight_decay)
        self.alpha = _check(alpha, "alpha", 0.0, 1.0)
        self.eps = _check(eps, "eps", 0.0)

    def update(self, xp, param, grad, state, step):
        grad = self.decayed(param, grad)
        scratch = xp.multiply(grad, grad)
        mean_square = state.get("mean_square")
        if mean_square is None:  # this parameter's first gradient (it may have been frozen)
            mean_square = state["mean_square"] = scratch.copy()
        else:
            mean_square *= self.alpha
            scratch *= 1 - self.alpha
            mean_square += scratch
        _step_by_root(xp, param, grad, mean_square, self.lr, self.eps, scratch)


class Adam(Decaying):
    """RMSProp + momentum with bias correction (Kingma & Ba 2015):
    ``m <- b1 m + (1 - b1) g``, ``v <- b2 v + (1 - b2) g^2``,
    ``w <- w - lr * m_hat / (sqrt(v_hat) + eps)`` with ``m_hat = m / (1 - b1^t)``,
    ``v_hat = v / (1 - b2^t)`` (``m`` and ``v`` start at 0, so they are biased towards 0 early).
    ``t`` counts this parameter's own updates, so a parameter unfrozen late starts at t = 1."""

    def __init__(self, lr: float = 0.001, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(lr, weight_decay)
        self.beta1 = _check(beta1, "beta1", 0.0, 1.0)
        self.beta2 = _check(beta2, "beta2", 0.0, 1.0)
        self.eps = _check(eps, "eps", 0.0)

    def init_state(self, xp, param):
        return {"m": xp.zeros_like(param), "v": xp.zeros_like(param), "t": 0}

    def update(self, xp, param, grad, state, step):
        self.adam_step(xp, param, self.decayed(param, grad), state)

    def adam_step(self, xp: Any, param: Any, grad: Any, state: dict[str, Any]) -> None:
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


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019), torch.optim.AdamW's update:
    ``w <- (1 - lr * weight_decay) w``, then the Adam step on the gradient alone, so the decay
    is not divided by the gradient's root mean square as an L2 term in Adam's gradient would be.
    Like torch's, it decays every trainable parameter and defaults to ``weight_decay=0.01``."""

    def __init__(self, lr: float = 0.001, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8, weight_decay: float = 0.01) -> None:
        super().__init__(lr, beta1, beta2, eps, weight_decay)

    def update(self, xp, param, grad, state, step):
        if self.weight_decay:
            param *= 1 - self.lr * self.weight_decay
        self.adam_step(xp, param, grad, state)


@ge.hookimpl
def graphengine_register_optimizers(register):
    register("sgd", SGD)
    register("momentum", Momentum)
    register("nesterov", Nesterov)
    register("adagrad", Adagrad)
    register("rmsprop", RMSProp)
    register("adam", Adam)
    register("adamw", AdamW)
