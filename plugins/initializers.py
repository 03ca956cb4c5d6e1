"""Built-in parameter initializers (host-side, from a seeded NumPy generator)."""

from __future__ import annotations

import math

import numpy as np

import graphengine as ge


class Zeros(ge.Initializer):
    def __call__(self, rng, shape, fan_in, fan_out):
        return np.zeros(shape)


class Ones(ge.Initializer):
    def __call__(self, rng, shape, fan_in, fan_out):
        return np.ones(shape)


class Constant(ge.Initializer):
    def __init__(self, value: float = 0.0) -> None:
        self.value = value

    def __call__(self, rng, shape, fan_in, fan_out):
        return np.full(shape, self.value)


class Normal(ge.Initializer):
    def __init__(self, mean: float = 0.0, std: float = 0.01) -> None:
        self.mean, self.std = mean, std

    def __call__(self, rng, shape, fan_in, fan_out):
        return rng.normal(self.mean, self.std, shape)


class Uniform(ge.Initializer):
    def __init__(self, low: float = -0.05, high: float = 0.05) -> None:
        self.low, self.high = low, high

    def __call__(self, rng, shape, fan_in, fan_out):
        return rng.uniform(self.low, self.high, shape)


class Xavier(ge.Initializer):
    """Glorot uniform: U(-a, a) with a = sqrt(6 / (fan_in + fan_out)); keeps the variance of
    activations and gradients alike across layers for tanh/sigmoid."""

    def __init__(self, gain: float = 1.0) -> None:
        self.gain = gain

    def __call__(self, rng, shape, fan_in, fan_out):
        limit = self.gain * math.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-limit, limit, shape)


class He(ge.Initializer):
    """He normal: N(0, 2 / fan_in), for ReLU, which zeroes half its inputs."""

    def __call__(self, rng, shape, fan_in, fan_out):
        return rng.normal(0.0, math.sqrt(2.0 / fan_in), shape)


@ge.hookimpl
def graphengine_register_initializers(register):
    register("zeros", Zeros)
    register("ones", Ones)
    register("constant", Constant)
    register("normal", Normal)
    register("uniform", Uniform)
    register("xavier", Xavier, aliases=("glorot",))
    register("he", He, aliases=("kaiming",))
