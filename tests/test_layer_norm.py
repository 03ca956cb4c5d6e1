"""layer_norm: gradients on every backend, PyTorch's nn.LayerNorm (forward, input and parameter
gradients), invariance to each example's shift and scale, build-time errors."""

from __future__ import annotations

import numpy as np
import pytest
from graphengine.plugins.layers import LayerNormOp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch_reference import graph_result, torch_result

import graphengine as ge
from graphengine.testing import check_backward, make_context

rng = np.random.default_rng(7)


@pytest.mark.parametrize("shape,count", [((3, 5), 1), ((2, 3, 4), 1), ((2, 3, 4), 2), ((4,), 1)])
def test_gradient(shape, count, backend):
    normalized = shape[len(shape) - count:]
    inputs = [rng.standard_normal(shape), rng.standard_normal(normalized), rng.standard_normal(normalized)]
    check_backward(lambda: LayerNormOp(count), inputs, backend=backend)


@pytest.mark.parametrize("shape,axis", [((4, 6), -1), ((3, 5, 4), -1), ((3, 5, 4), (-2, -1)),
                                        ((3, 5, 4), (1, 2))])
def test_matches_pytorch(shape, axis):
    torch = pytest.importorskip("torch")
    g = ge.Graph()
    out = g.layer("layer_norm", g.input("x", (None, *shape[1:]), dtype="float64"), axis=axis, name="ln")
    normalized = g.nodes["ln/gamma"].shape
    params = {"ln/gamma": rng.standard_normal(normalized), "ln/beta": rng.standard_normal(normalized)}
    feeds = {"x": rng.standard_normal(shape) * 3 + 1}
    weight = rng.standard_normal(shape)
    value, input_grads, grads, _ = graph_result(g, out, feeds, weight, parameters=params)

    module = torch.nn.LayerNorm(normalized, eps=1e-5, dtype=torch.float64)
    with torch.no_grad():
        module.weight.copy_(torch.tensor(params["ln/gamma"]))
        module.bias.copy_(torch.tensor(params["ln/beta"]))
    expected, expected_grads = torch_result(lambda x: module(x), feeds, weight)
    np.testing.assert_allclose(value, expected, atol=1e-12)
    np.testing.assert_allclose(input_grads["x"], expected_grads["x"], atol=1e-12)
    np.testing.assert_allclose(grads["ln/gamma"], module.weight.grad.numpy(), atol=1e-12)
    np.testing.assert_allclose(grads["ln/beta"], module.bias.grad.numpy(), atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(2, 8), st.floats(0.1, 100), st.floats(-50, 50), st.integers(0, 1000))
def test_each_example_is_normalized_whatever_its_shift_and_scale(batch, features, scale, shift, seed):
    gen = np.random.default_rng(seed)
    x = gen.standard_normal((batch, features))
    x[:, 0] += 1  # not constant along the features
    op = LayerNormOp(1, eps=1e-12)
    ones, zeros = np.ones(features), np.zeros(features)
    y = op.forward(make_context(), np, x, ones, zeros)
    np.testing.assert_allclose(y.mean(axis=-1), 0, atol=1e-9)
    np.testing.assert_allclose(y.var(axis=-1), 1, atol=1e-6)
    moved = op.forward(make_context(), np, x * scale + shift, ones, zeros)
    np.testing.assert_allclose(moved, y, atol=1e-6)


def test_same_in_training_and_evaluation_and_at_any_batch_size():
    g = ge.Graph()
    out = g.layer("layer_norm", g.layer("dense", g.input("x", (None, 5)), units=4))
    model = g.compile(outputs=[out])
    x = rng.standard_normal((6, 5)).astype(np.float32)
    whole = model.run({"x": x})[out.name]
    np.testing.assert_array_equal(model.run({"x": x}, training=True)[out.name], whole)
    np.testing.assert_allclose(model.run({"x": x[2:3]})[out.name], whole[2:3], atol=1e-6)


@pytest.mark.parametrize("shape,config,message", [
    ((None, 3, 4), {"axis": 1}, r"normalizes trailing axes, got axis \(1,\)"),
    ((None, 3, 4), {"axis": 3}, r"axis \(3,\) is out of range"),
    ((None, None, 4), {"axis": (-2, -1)}, "needs the normalized axes known"),
    ((None, 4), {"eps": 0}, "eps must be a positive number"),
    ((None, 4), {"axis": "last"}, "axis must be an int or a tuple of ints"),
])
def test_build_time_errors(shape, config, message):
    g = ge.Graph()
    with pytest.raises(ge.GraphBuildError, match=message):
        g.layer("layer_norm", g.input("x", shape), **config)
