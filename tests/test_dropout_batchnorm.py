"""dropout, batch_norm and add: gradients on every backend, train/eval behaviour, saved state."""

from __future__ import annotations

import numpy as np
import pytest
from graphengine.plugins.regularization import BatchNormOp, DropoutOp

import graphengine as ge
from graphengine.ir.operators import TensorSpec
from graphengine.testing import check_backward, make_context

rng = np.random.default_rng(7)


def prepared(factory, inputs):
    """Run infer first, as the graph does when the node is added."""
    def make():
        op = factory()
        op.infer(*[TensorSpec(tuple(a.shape), "float64") for a in inputs])
        return op
    return make


@pytest.mark.parametrize("rate", [0.2, 0.5, 0.9])
def test_dropout_gradient_with_a_fixed_rng(backend, rate):
    check_backward(lambda: DropoutOp(rate), [rng.standard_normal((6, 5))], backend=backend)


def test_dropout_gradient_in_evaluation_is_the_identity(backend):
    check_backward(lambda: DropoutOp(0.5), [rng.standard_normal((4, 3))], backend=backend,
                   training=False)


def test_dropout_zeroes_at_the_rate_and_keeps_the_mean(backend):
    be = ge.get_backend(backend)
    op = DropoutOp(0.3)
    x = be.asarray(np.ones((200, 500)))
    ctx = make_context(training=True, rng=be.make_rng(0))
    y = be.to_numpy(op.forward(ctx, be.xp, x))
    assert abs((y == 0).mean() - 0.3) < 0.01
    assert np.allclose(y[y != 0], 1 / 0.7)  # survivors are scaled: inverted dropout
    assert abs(y.mean() - 1.0) < 0.02
    # the mask is the call's state: it lives on the context, and backward reads it from there
    np.testing.assert_array_equal(be.to_numpy(ctx.mask), y)
    (grad,) = op.backward(ctx, be.xp, (None,), None, be.asarray(np.full((200, 500), 3.0)))
    np.testing.assert_array_equal(be.to_numpy(grad), 3.0 * y)
    evaluation = make_context(training=False)
    assert np.array_equal(be.to_numpy(op.forward(evaluation, be.xp, x)), np.ones((200, 500)))
    (grad,) = op.backward(evaluation, be.xp, (None,), None, be.asarray(np.full((200, 500), 3.0)))
    np.testing.assert_array_equal(be.to_numpy(grad), np.full((200, 500), 3.0))


def test_dropout_keeps_nothing_on_the_operator_and_each_call_its_own_mask():
    op = DropoutOp(0.5)
    assert not hasattr(op, "training") and not hasattr(op, "rng")
    x = np.ones((50, 40))
    first, second = make_context(rng=np.random.default_rng(1)), make_context(rng=np.random.default_rng(2))
    y1 = op.forward(first, np, x)
    y2 = op.forward(second, np, x)  # a second call (another run, another thread) in between
    assert not np.array_equal(y1, y2)
    assert vars(op) == {"rate": 0.5}  # a description only: no mask, mode or generator on it
    # each backward gets the mask of its own forward, whatever ran in between
    (g1,) = op.backward(first, np, (None,), None, np.ones_like(x))
    (g2,) = op.backward(second, np, (None,), None, np.ones_like(x))
    np.testing.assert_array_equal(g1, y1)
    np.testing.assert_array_equal(g2, y2)


def dropout_model(rate=0.5):
    g = ge.Graph("drop")
    x = g.input("x", (None, 8))
    y = g.input("y", (None, 8))
    h = g.layer("dropout", x, rate=rate)
    return g.compile(g.loss("mse", g.layer("dense", h, units=8), y), optimizer="sgd")


def test_dropout_mode_is_explicit_train_and_eval():
    model = dropout_model()
    x = np.ones((4, 8), np.float32)
    model.train()
    first = model.run({"x": x}, fetches=["dropout_0/dropout"], training=True)["dropout_0/dropout"]
    second = model.run({"x": x}, fetches=["dropout_0/dropout"], training=True)["dropout_0/dropout"]
    assert not np.array_equal(first, second)  # fresh masks in training
    assert set(np.unique(first)) <= {0.0, 2.0}
    model.eval()
    assert not model.training
    evaluated = model.run({"x": x}, fetches=["dropout_0/dropout"])["dropout_0/dropout"]
    assert np.array_equal(evaluated, x)
    # a run chooses its own mode and leaves the model's alone
    masked = model.run({"x": x}, fetches=["dropout_0/dropout"], training=True)["dropout_0/dropout"]
    assert set(np.unique(masked)) == {0.0, 2.0}
    assert not model.training
    # predict evaluates even from training mode, and leaves the mode as it was
    model.train()
    w, b = (model.parameters()[n] for n in ("dense_0/W", "dense_0/b"))
    assert np.allclose(model.predict({"x": x}), x @ w + b, atol=1e-6)
    assert model.training


def test_dropout_rate_is_checked():
    g = ge.Graph()
    x = g.input("x", (None, 3))
    for bad in (1.0, -0.1, "half"):
        with pytest.raises(ge.GraphBuildError, match="dropout rate"):
            g.layer("dropout", x, rate=bad)


BN_CASES = {
    "dense": ((16, 5), -1),
    "channels_first": ((4, 3, 2, 2), 1),
    "channels_last": ((2, 3, 3, 4), -1),
}


def bn_inputs(shape, axis):
    features = shape[axis]
    return [rng.standard_normal(shape) * 2 + 1, rng.uniform(0.5, 2, features),
            rng.standard_normal(features), rng.standard_normal(features),
            rng.uniform(0.5, 2, features)]


@pytest.mark.parametrize("case", sorted(BN_CASES))
@pytest.mark.parametrize("training", [True, False], ids=["training", "evaluation"])
def test_batch_norm_gradient(backend, case, training):
    shape, axis = BN_CASES[case]
    inputs = bn_inputs(shape, axis)
    check_backward(prepared(lambda: BatchNormOp(axis, 0.9, 1e-5), inputs), inputs,
                   backend=backend, training=training)


def test_batch_norm_normalizes_and_updates_running_statistics_in_place(backend):
    be = ge.get_backend(backend)
    x = rng.standard_normal((64, 3)) * np.array([1.0, 5.0, 0.1]) + np.array([2.0, -1.0, 0.0])
    inputs = [x, np.ones(3), np.zeros(3), np.zeros(3), np.ones(3)]
    op = prepared(lambda: BatchNormOp(-1, 0.9, 1e-5), inputs)()
    device = [be.asarray(a) for a in inputs]
    y = be.to_numpy(op.forward(make_context(training=True), be.xp, *device))
    assert np.allclose(y.mean(axis=0), 0, atol=1e-7)
    assert np.allclose(y, (x - x.mean(axis=0)) / np.sqrt(x.var(axis=0) + 1e-5))
    assert np.allclose(be.to_numpy(device[3]), 0.1 * x.mean(axis=0))
    assert np.allclose(be.to_numpy(device[4]), 0.9 + 0.1 * x.var(axis=0, ddof=1))
    assert not hasattr(op, "training")  # the mode is the run's, read from the context
    running_mean, running_var = be.to_numpy(device[3]), be.to_numpy(device[4])
    y_eval = be.to_numpy(op.forward(make_context(training=False), be.xp, *device))
    assert np.allclose(y_eval, (x - running_mean) / np.sqrt(running_var + 1e-5))
    assert np.array_equal(be.to_numpy(device[3]), running_mean)  # evaluation leaves them alone


def bn_model(seed=0):
    g = ge.Graph("bn")
    x = g.input("x", (None, 4))
    y = g.input("y", (None,), dtype="int64")
    h = g.layer("batch_norm", g.layer("dense", x, units=6, name="fc1"), name="bn")
    out = g.layer("dense", g.activation("relu", h), units=3, name="out")
    return g.compile(g.loss("softmax_cross_entropy", out, y),
                     optimizer=ge.optimizer("sgd", lr=0.1), seed=seed)


def test_batch_norm_running_statistics_are_model_state_saved_with_it(tmp_path):
    model = bn_model()
    assert "bn/running_mean" not in model.trainable_parameters()
    assert {"bn/gamma", "bn/beta"} <= set(model.trainable_parameters())
    data = {"x": rng.standard_normal((40, 4)).astype(np.float32) * 3 + 2,
            "y": rng.integers(0, 3, 40)}
    model.fit(data, epochs=3, batch_size=10)
    running_mean = model.parameters()["bn/running_mean"]
    assert np.abs(running_mean).max() > 0.1  # the operator moved them during fit
    before = running_mean.copy()
    model.evaluate(data)
    model.predict(data)
    assert np.array_equal(model.parameters()["bn/running_mean"], before)
    path = tmp_path / "bn.safetensors"
    model.save(path)
    loaded = ge.load(path)
    assert np.array_equal(loaded.parameters()["bn/running_var"], model.parameters()["bn/running_var"])
    assert np.array_equal(loaded.predict(data), model.predict(data))


def test_batch_norm_needs_two_values_per_feature_in_training():
    model = bn_model()
    with pytest.raises(ge.DataError, match="at least 2 values"):
        model.forward({"x": np.ones((1, 4), np.float32), "y": np.zeros(1, np.int64)})
    assert model.predict({"x": np.ones((1, 4), np.float32)}).shape == (1, 3)


def test_add_layer_sums_and_refuses_mismatched_shapes():
    g = ge.Graph()
    x = g.input("x", (None, 4))
    h = g.layer("dense", x, units=4, name="fc")
    out = g.layer("add", x, h, name="residual")
    model = g.compile(outputs=[out])
    data = rng.standard_normal((3, 4)).astype(np.float32)
    w, b = (model.parameters()[n] for n in ("fc/W", "fc/b"))
    assert np.allclose(model.predict({"x": data}), data + data @ w + b, atol=1e-6)
    with pytest.raises(ge.ShapeError, match=r"one shape.*project the shortcut"):
        g.layer("add", x, g.layer("dense", x, units=3))
    with pytest.raises(ge.ShapeError, match="at least two"):
        g.layer("add", x)


def test_residual_gradient_accumulates_through_the_shortcut():
    g = ge.Graph("res")
    x = g.input("x", (None, 3), dtype="float64")
    h = g.layer("dense", g.activation("tanh", x), units=3, name="fc")
    out = g.layer("add", x, h)
    model = g.compile((out * out).sum(), outputs=[out])
    data = rng.standard_normal((2, 3))
    model.forward({"x": data})
    model.backward(wrt=["x"])
    analytic = model.input_gradient("x")
    numeric = np.zeros_like(data)
    for i in np.ndindex(data.shape):
        shifted = [data.copy(), data.copy()]
        shifted[0][i] += 1e-6
        shifted[1][i] -= 1e-6
        numeric[i] = (model.forward({"x": shifted[0]}) - model.forward({"x": shifted[1]})) / 2e-6
    assert np.allclose(analytic, numeric, atol=1e-6)
