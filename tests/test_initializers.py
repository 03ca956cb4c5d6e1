"""Initializers: the distributions they promise (checked on large draws), fans of dense and conv
kernels, determinism by seed, and the recurrent plugin's orthogonal and forget-gate bias."""

from __future__ import annotations

import math

import numpy as np
import pytest

import graphengine as ge
from graphengine.errors import GraphBuildError
from graphengine.ir.contracts import fans

#: The plugins whose initializers this file covers.
BUILT_IN_PLUGINS = ("initializers", "recurrent")
TESTED = {"zeros", "ones", "constant", "normal", "uniform", "xavier", "he", "orthogonal", "forget_bias"}


def within_one_std(values: np.ndarray, mean: float, std: float) -> None:
    """Gaussian, not merely the right two moments: 68.3% of the values within one std of the
    mean (to 5 standard errors of that share)."""
    share = np.mean(np.abs(values - mean) < std)
    assert share == pytest.approx(0.6827, abs=5 * math.sqrt(0.6827 * 0.3173 / values.size))


def draw(name: str, shape: tuple[int, ...], seed: int = 0, **config) -> np.ndarray:
    """A value from initializer ``name``, called the way a model calls it."""
    initializer = ge.get_plugin_manager().initializers.get(name)(**config)
    return np.asarray(initializer(np.random.default_rng(seed), shape, *fans(shape)))


def test_every_built_in_initializer_is_tested_here():
    entries = ge.get_plugin_manager().initializers.entries()
    assert {e.name for e in entries if e.plugin in BUILT_IN_PLUGINS} == TESTED


@pytest.mark.parametrize("shape, expected", [
    ((), (1, 1)),
    ((7,), (7, 7)),
    ((64, 10), (64, 10)),
    ((32, 16, 3, 3), (16 * 9, 32 * 9)),    # conv kernel (out, in, kh, kw)
    ((8, 4, 5, 3), (4 * 15, 8 * 15)),
])
def test_fans_of_matrices_and_kernels(shape, expected):
    assert fans(shape) == expected


@pytest.mark.parametrize("name, config, value", [("zeros", {}, 0.0), ("ones", {}, 1.0),
                                                 ("constant", {"value": 2.5}, 2.5),
                                                 ("constant", {}, 0.0)])
def test_constant_initializers(name, config, value):
    np.testing.assert_array_equal(draw(name, (3, 4, 2), **config), np.full((3, 4, 2), value))


@pytest.mark.parametrize("config, mean, std", [({}, 0.0, 0.01), ({"mean": 1.5, "std": 0.3}, 1.5, 0.3)])
def test_normal_has_its_mean_and_std(config, mean, std):
    values = draw("normal", (500, 400), **config).ravel()
    assert values.mean() == pytest.approx(mean, abs=5 * std / math.sqrt(values.size))
    assert values.std() == pytest.approx(std, rel=0.01)
    within_one_std(values, mean, std)


def assert_uniform(values: np.ndarray, low: float, high: float) -> None:
    """In [low, high), filling it evenly, with the mean and variance of U(low, high); the
    tolerances are 5 standard errors of each estimate."""
    n, width = values.size, high - low
    assert values.min() >= low and values.max() < high
    assert values.min() < low + 1e-3 * width and values.max() > high - 1e-3 * width
    assert values.mean() == pytest.approx((low + high) / 2, abs=5 * width / math.sqrt(12 * n))
    # the variance estimate of a uniform sample has a relative error of sqrt(0.8 / n)
    assert values.var() == pytest.approx(width**2 / 12, rel=5 * math.sqrt(0.8 / n))
    shares = np.histogram(values, bins=10, range=(low, high))[0] / n
    np.testing.assert_allclose(shares, 0.1, atol=5 * math.sqrt(0.1 * 0.9 / n))


@pytest.mark.parametrize("config, low, high", [({}, -0.05, 0.05), ({"low": 0.0, "high": 2.0}, 0.0, 2.0)])
def test_uniform_fills_its_interval(config, low, high):
    assert_uniform(draw("uniform", (400, 300), **config).ravel(), low, high)


@pytest.mark.parametrize("shape", [(300, 200), (64, 32, 3, 3)], ids=["dense", "conv"])
@pytest.mark.parametrize("gain", [1.0, 2.0])
def test_xavier_is_glorot_uniform(shape, gain):
    fan_in, fan_out = fans(shape)
    limit = gain * math.sqrt(6 / (fan_in + fan_out))
    values = draw("xavier", shape, gain=gain).ravel()
    assert_uniform(values, -limit, limit)
    # the variance Glorot and Bengio derive: 2 / (fan_in + fan_out), times gain^2
    assert values.var() == pytest.approx(gain**2 * 2 / (fan_in + fan_out),
                                         rel=5 * math.sqrt(0.8 / values.size))


@pytest.mark.parametrize("shape", [(400, 300), (128, 32, 3, 3)], ids=["dense", "conv"])
def test_he_is_normal_with_std_sqrt_2_over_fan_in(shape):
    fan_in, _ = fans(shape)
    std = math.sqrt(2 / fan_in)
    values = draw("he", shape).ravel()
    assert values.mean() == pytest.approx(0, abs=5 * std / math.sqrt(values.size))
    assert values.std() == pytest.approx(std, rel=0.01)
    within_one_std(values, 0.0, std)


def test_glorot_and_kaiming_are_the_same_initializers():
    manager = ge.get_plugin_manager()
    assert manager.initializers.get("glorot") is manager.initializers.get("xavier")
    assert manager.initializers.get("kaiming") is manager.initializers.get("he")


@pytest.mark.parametrize("shape", [(64, 64), (80, 20), (16, 64), (4, 3, 2, 2)],
                         ids=["square", "tall", "wide (units, 4 units)", "kernel"])
@pytest.mark.parametrize("gain", [1.0, 0.5])
def test_orthogonal_has_orthonormal_rows_or_columns(shape, gain):
    matrix = draw("orthogonal", shape, gain=gain).reshape(shape[0], -1)
    rows, cols = matrix.shape
    # the smaller side is orthonormal: Q^T Q = I for a tall matrix, Q Q^T = I for a wide one
    gram = matrix.T @ matrix if rows >= cols else matrix @ matrix.T
    np.testing.assert_allclose(gram, gain**2 * np.eye(min(rows, cols)), atol=1e-12)


def test_orthogonal_keeps_the_length_of_the_vectors_it_multiplies():
    q = draw("orthogonal", (32, 32))
    vectors = np.random.default_rng(1).standard_normal((32, 100))
    np.testing.assert_allclose(np.linalg.norm(q @ vectors, axis=0), np.linalg.norm(vectors, axis=0))


def test_orthogonal_draws_without_the_sign_bias_of_qr():
    # Over uniformly random orthogonal matrices every entry has mean 0; QR alone gives its Q a
    # diagonal of one sign (LAPACK's Householder convention)
    corners = [draw("orthogonal", (8, 8), seed=seed)[0, 0] for seed in range(400)]
    assert abs(np.mean(corners)) < 0.05
    assert 0.35 < np.mean(np.array(corners) > 0) < 0.65


@pytest.mark.parametrize("name, config, value", [("forget_bias", {}, 1.0),
                                                 ("forget_bias", {"value": 3.0}, 3.0),
                                                 ("unit_forget_bias", {}, 1.0)])
def test_forget_bias_opens_only_the_forget_gate(name, config, value):
    units = 5
    bias = draw(name, (4 * units,), **config)
    expected = np.zeros(4 * units)
    expected[units:2 * units] = value  # gates: input, forget, output, candidate
    np.testing.assert_array_equal(bias, expected)


@pytest.mark.parametrize("shape", [(10,), (4, 8)])
def test_forget_bias_refuses_what_is_not_an_lstm_bias(shape):
    with pytest.raises(GraphBuildError, match="forget_bias is for an LSTM bias"):
        draw("forget_bias", shape)


@pytest.mark.parametrize("name", ["normal", "uniform", "xavier", "he", "orthogonal"])
def test_random_initializers_are_determined_by_the_seed(name):
    np.testing.assert_array_equal(draw(name, (20, 30), seed=4), draw(name, (20, 30), seed=4))
    assert not np.array_equal(draw(name, (20, 30), seed=4), draw(name, (20, 30), seed=5))


def cnn_parameters(seed: int, extra_layer: bool = False, init: str = "he") -> dict[str, np.ndarray]:
    g = ge.Graph("cnn")
    x = g.input("x", (None, 16, 6, 6))
    h = g.layer("conv2d", x, filters=128, kernel_size=3, init=init, name="conv")
    h = g.layer("dense", g.layer("flatten", h), units=40, init="xavier", name="fc")
    if extra_layer:
        h = g.layer("dense", h, units=5, name="extra")
    return {name: np.array(value) for name, value in g.compile(outputs=[h], seed=seed).parameters().items()}


def test_a_model_draws_its_conv_and_dense_weights_with_their_fans():
    params = cnn_parameters(seed=0)
    kernel, weights = params["conv/W"], params["fc/W"]
    assert kernel.shape == (128, 16, 3, 3) and kernel.dtype == np.float32
    assert kernel.std() == pytest.approx(math.sqrt(2 / (16 * 9)), rel=0.02)  # fan_in = in * kh * kw
    assert weights.shape == (128 * 4 * 4, 40)
    limit = math.sqrt(6 / (128 * 16 + 40))
    assert np.abs(weights).max() <= limit and np.abs(weights).max() > 0.99 * limit
    np.testing.assert_array_equal(params["conv/b"], np.zeros(128))


def test_a_model_seed_fixes_every_initial_value():
    first, again, other = cnn_parameters(seed=7), cnn_parameters(seed=7), cnn_parameters(seed=8)
    for name in ("conv/W", "fc/W"):
        np.testing.assert_array_equal(first[name], again[name])
        assert not np.array_equal(first[name], other[name])


def test_adding_a_layer_leaves_the_other_initial_values_alone():
    # each parameter's generator is seeded by the model seed and the parameter's own name
    before, after = cnn_parameters(seed=7), cnn_parameters(seed=7, extra_layer=True)
    assert set(after) - set(before) == {"extra/W", "extra/b"}
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value)
