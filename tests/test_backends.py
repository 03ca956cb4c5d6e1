"""Backends: the strict backend keeps NumPy out of operator code; CuPy reports, never crashes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import graphengine as ge
from graphengine.testing import available_backends, check_backward


@pytest.fixture
def strict():
    return ge.get_backend("strict")


def test_strict_arrays_refuse_implicit_conversion(strict):
    a = strict.asarray(np.ones(3))
    with pytest.raises(ge.BackendError, match="implicit conversion"):
        np.asarray(a)
    with pytest.raises(ge.BackendError, match="plain NumPy array"):
        a + np.ones(3)
    with pytest.raises(ge.BackendError, match="plain NumPy array"):
        np.ones(3) * a
    with pytest.raises(ge.BackendError, match="must call xp.sum"):
        np.sum(a)
    with pytest.raises(ge.BackendError, match="plain NumPy array"):
        strict.xp.maximum(a, np.zeros(3))


def test_strict_arrays_work_through_xp(strict):
    xp = strict.xp
    a = strict.asarray(np.arange(6.0).reshape(2, 3))
    b = xp.tanh(a) * 2 + a.sum(axis=0)
    assert isinstance(b, type(a)) and b.shape == (2, 3)
    assert isinstance(a.sum(), type(a))  # reductions give 0-d arrays, as on CuPy
    np.testing.assert_allclose(strict.to_numpy(b), np.tanh(np.arange(6.0).reshape(2, 3)) * 2 + [3, 5, 7])
    target = xp.zeros(3)
    xp.scatter_add(target, strict.asarray(np.array([0, 0, 2])), strict.asarray(np.ones(3)))
    np.testing.assert_array_equal(strict.to_numpy(target), [2, 0, 1])


def test_an_operator_that_leaks_numpy_fails_on_strict_backend():
    class HostMaskedScale(ge.Operator):
        kind = "host_masked_scale"

        def forward(self, ctx, xp, x):
            ctx.scale = np.full(x.shape, 2.0)  # a host array: works on numpy, fails on a GPU
            return x * ctx.scale

        def backward(self, ctx, xp, inputs, output, grad):
            return (grad * ctx.scale,)

    x = np.random.default_rng(0).standard_normal((2, 3))
    check_backward(HostMaskedScale, [x], backend="numpy")
    with pytest.raises(ge.BackendError, match="plain NumPy array"):
        check_backward(HostMaskedScale, [x], backend="strict")


def test_mixing_backends_in_feeds_is_an_error():
    g = ge.Graph()
    x = g.input("x", shape=(None, 2))
    out = g.activation("tanh", x)
    numpy_model = g.compile(outputs=[out], backend="numpy")
    strict_model = g.compile(outputs=[out], backend="strict")
    strict_array = ge.get_backend("strict").asarray(np.ones((1, 2), np.float32))
    with pytest.raises(ge.BackendError):
        numpy_model.predict({"x": strict_array})
    # host data into a device backend is an explicit, allowed transfer
    assert strict_model.predict({"x": np.ones((1, 2))}).shape == (1, 2)


def test_training_on_strict_backend_matches_numpy():
    def train(backend):
        g = ge.Graph()
        x = g.input("x", shape=(None, 3))
        y = g.input("y", shape=(None,), dtype="int64")
        h = g.activation("relu", g.layer("dense", x, units=8, init="he"))
        loss = g.loss("softmax_cross_entropy", g.layer("dense", h, units=2), y)
        model = g.compile(loss, optimizer=ge.optimizer("sgd", lr=0.5), backend=backend)
        rng = np.random.default_rng(0)
        X = rng.standard_normal((32, 3))
        model.fit({"x": X, "y": (X[:, 0] > 0).astype(int)}, epochs=3, batch_size=8, verbose=0)
        return {k: model.backend.to_numpy(v) for k, v in model.parameters().items()}

    a, b = train("numpy"), train("strict")
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_cupy_reports_unavailable_instead_of_crashing():
    cls = ge.get_plugin_manager().backends.get("cupy")
    reason = cls.unavailable_reason()
    if reason is None:
        pytest.skip("a GPU is present: the CuPy path runs in the backend-parametrized tests")
    assert "cupy" not in available_backends()
    with pytest.raises(ge.BackendError, match="unavailable"):
        ge.get_backend("cupy")


@pytest.mark.parametrize("backend", ["numpy", "strict"])
@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 6), width=st.sampled_from([(), (3,), (2, 2)]),
       picks=st.lists(st.integers(-6, 5), min_size=1, max_size=30), seed=st.integers(0, 99))
def test_scatter_add_adds_repeated_indices_as_np_add_at(backend, rows, width, picks, seed):
    """Rows picked by an index array (the sorted, run-reduced path) and anything else (negative
    indices: np.add.at) add up exactly as np.add.at does."""
    be = ge.get_backend(backend)
    indices = np.array([p % rows if p >= 0 else max(p, -rows) for p in picks])
    values = np.random.default_rng(seed).standard_normal((len(indices), *width))
    expected = np.zeros((rows, *width))
    np.add.at(expected, indices, values)
    target = be.xp.zeros((rows, *width))
    be.xp.scatter_add(target, be.asarray(indices), be.asarray(values))
    np.testing.assert_allclose(be.to_numpy(target), expected, rtol=1e-12, atol=1e-12)
