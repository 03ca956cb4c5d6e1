"""Optimizers: the first steps match the textbook formulas; all reach the minimum of an
ill-conditioned quadratic.

The reference updates below are written from the gradient history in closed form (momentum as
a discounted sum of past gradients, Adagrad's sum of squares, Adam's moment estimates), not as
the recursions the optimizers use, so they check the implementation rather than restate it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from examples_loader import load_example

import graphengine as ge

# a small quadratic f(w) = 1/2 w^T A w - b^T w with a non-diagonal A
A = np.array([[3.0, 0.5, 0.0], [0.5, 1.0, -0.3], [0.0, -0.3, 0.2]])
B = np.array([1.0, -2.0, 0.5])
W0 = np.array([0.5, 1.5, -2.0])
STEPS = 6


def gradient(w: np.ndarray) -> np.ndarray:
    return A @ w - B


def sgd_reference(lr):
    def step(w, history):
        return w - lr * history[-1]
    return step


def momentum_reference(lr, momentum):
    # v_t = -lr * sum_i momentum^(t-i) g_i ;  w_t = w_(t-1) + v_t
    def step(w, history):
        t = len(history)
        return w - lr * sum(momentum ** (t - 1 - i) * g for i, g in enumerate(history))
    return step


def adagrad_reference(lr, eps):
    def step(w, history):
        root = np.sqrt(sum(g * g for g in history))
        return w - lr * history[-1] / (root + eps)
    return step


def rmsprop_reference(lr, alpha, eps):
    # the course notes: sigma_0^2 = g_0^2, sigma_t^2 = alpha sigma_(t-1)^2 + (1 - alpha) g_t^2
    def step(w, history):
        t = len(history) - 1
        square = alpha ** t * history[0] ** 2 + (1 - alpha) * sum(
            alpha ** (t - i) * history[i] ** 2 for i in range(1, t + 1))
        return w - lr * history[-1] / (np.sqrt(square) + eps)
    return step


def adam_reference(lr, beta1, beta2, eps):
    def step(w, history):
        t = len(history)
        m = (1 - beta1) * sum(beta1 ** (t - i) * g for i, g in enumerate(history, 1))
        v = (1 - beta2) * sum(beta2 ** (t - i) * g * g for i, g in enumerate(history, 1))
        m_hat, v_hat = m / (1 - beta1 ** t), v / (1 - beta2 ** t)
        return w - lr * m_hat / (np.sqrt(v_hat) + eps)
    return step


REFERENCES = {
    "sgd": ({"lr": 0.1}, sgd_reference(0.1)),
    "momentum": ({"lr": 0.1, "momentum": 0.8}, momentum_reference(0.1, 0.8)),
    "adagrad": ({"lr": 0.5, "eps": 1e-8}, adagrad_reference(0.5, 1e-8)),
    "rmsprop": ({"lr": 0.05, "alpha": 0.7, "eps": 1e-8}, rmsprop_reference(0.05, 0.7, 1e-8)),
    "adam": ({"lr": 0.05, "beta1": 0.8, "beta2": 0.95, "eps": 1e-8},
             adam_reference(0.05, 0.8, 0.95, 1e-8)),
}


def run_optimizer(name: str, hyper: dict, backend: str, steps: int = STEPS) -> list[np.ndarray]:
    """The trajectory of ``w`` under the registered optimizer, on ``backend``."""
    be = ge.get_backend(backend)
    opt = ge.optimizer(name, **hyper)
    w = be.asarray(W0.copy())
    state = opt.init_state(be.xp, w)
    path = [W0.copy()]
    for t in range(1, steps + 1):
        grad = be.asarray(gradient(be.to_numpy(w)))
        opt.update(be.xp, w, grad, state, t)
        path.append(be.to_numpy(w).copy())
    return path


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_first_steps_match_the_textbook_formula(name, backend):
    hyper, reference = REFERENCES[name]
    path = run_optimizer(name, hyper, backend)
    w, history = W0.copy(), []
    for t in range(1, STEPS + 1):
        history.append(gradient(w))
        w = reference(w, history)
        np.testing.assert_allclose(path[t], w, atol=1e-6, rtol=0, err_msg=f"{name} step {t}")
    assert not np.allclose(path[-1], W0)


def test_nesterov_matches_the_look_ahead_formula(backend):
    # Sutskever et al.: v' = mu v - lr grad(theta + mu v), theta' = theta + v'. The optimizer
    # stores the look-ahead point theta + mu v.
    lr, mu = 0.1, 0.8
    path = run_optimizer("nesterov", {"lr": lr, "momentum": mu}, backend)
    theta, v = W0.copy(), np.zeros(3)
    for t in range(1, STEPS + 1):
        v = mu * v - lr * gradient(theta + mu * v)
        theta = theta + v
        np.testing.assert_allclose(path[t], theta + mu * v, atol=1e-6, rtol=0)


def test_rmsprop_first_step_has_size_lr():
    # sigma_0 = |g_0|, so the first step moves each weight by exactly lr
    path = run_optimizer("rmsprop", {"lr": 0.01, "eps": 0.0}, "numpy", steps=1)
    np.testing.assert_allclose(np.abs(path[1] - W0), 0.01)


def test_adam_counts_steps_per_parameter():
    # a parameter that first gets a gradient at model step 50 still starts with t = 1
    opt = ge.optimizer("adam", lr=0.1)
    w = np.array([1.0])
    state = opt.init_state(np, w)
    opt.update(np, w, np.array([2.0]), state, 50)
    np.testing.assert_allclose(w, [0.9], atol=1e-7)


@pytest.mark.parametrize("name, hyper", [("sgd", {"lr": -0.1}), ("momentum", {"momentum": 1.0}),
                                         ("adam", {"beta2": -0.1}), ("rmsprop", {"alpha": "x"})])
def test_bad_hyperparameters_are_named(name, hyper):
    with pytest.raises(ge.GraphEngineError, match=f"optimizer '{name}'.*rejected"):
        ge.optimizer(name, **hyper)
    if name == "sgd":
        ge.optimizer("sgd", lr=0.0)  # lr 0 is allowed (frozen training, schedules ending at 0)


# --------------------------------------------------------------------------- ill-conditioned quadratic

# f(w) = 1/2 (w1 - 1)^2 + 25 (w2 + 2)^2 from (-4, 1): the example's quadratic and settings
QUADRATIC = load_example("optimizer_trajectories")
TUNED = QUADRATIC.OPTIMIZERS


@pytest.mark.parametrize("name", sorted(TUNED))
def test_every_optimizer_reaches_the_minimum_of_an_ill_conditioned_quadratic(name, backend):
    model = QUADRATIC.quadratic_model(ge.optimizer(name, **TUNED[name]), backend)
    start_loss = model.forward({})
    for _ in range(400):
        loss = model.train_step({})
    w = model.backend.to_numpy(model.parameters()["w"])
    assert np.linalg.norm(w - QUADRATIC.MINIMUM) < 1e-3, (name, w)
    assert loss < 1e-6 * start_loss


def test_all_optimizers_are_registered():
    assert set(TUNED) <= set(ge.get_plugin_manager().optimizers.names())
    assert math.isclose(ge.optimizer("rmsprop").alpha, 0.9)
