"""Activations and the activation layers (PReLU, Maxout): values, gradients on every backend."""

from __future__ import annotations

import numpy as np
import pytest
from graphengine.plugins.activations import MaxoutOp, PReLUOp

import graphengine as ge
from graphengine.errors import GraphBuildError, ShapeError
from graphengine.ir.contracts import ActivationOp
from graphengine.ir.operators import TensorSpec
from graphengine.testing import check_backward, make_context

ACTIVATIONS = [
    ("leaky_relu", {"slope": 0.1}),
    ("leaky_relu", {}),
    ("elu", {"alpha": 1.5}),
    ("softplus", {}),
    ("sign", {}),
    ("log_softmax", {}),
    ("relu", {}),
    ("sigmoid", {}),
    ("tanh", {}),
    ("softmax", {}),
    ("identity", {}),
]


def activation_op(kind: str, **config) -> ActivationOp:
    return ActivationOp(kind, ge.get_plugin_manager().activations.get(kind)(**config))


def forward(kind: str, x: np.ndarray, **config) -> np.ndarray:
    return activation_op(kind, **config).forward(make_context(), np, x)


@pytest.mark.parametrize("kind, config", ACTIVATIONS, ids=lambda v: str(v))
def test_activation_backward(kind, config, backend):
    x = np.random.default_rng(1).standard_normal((4, 5)) * 2
    check_backward(activation_op(kind, **config), [x], backend=backend)


def test_every_built_in_activation_is_gradient_checked():
    from test_blocks_activations import BLOCKS  # checked there, with PyTorch's values

    manager = ge.get_plugin_manager()
    built_in = {e.name for e in manager.activations.entries() if e.plugin == "activations"}
    assert built_in == {kind for kind, _ in ACTIVATIONS} | {kind for kind, *_ in BLOCKS}


def test_values_match_their_definitions():
    x = np.array([-3.0, -0.5, 0.0, 0.5, 3.0])
    np.testing.assert_allclose(forward("leaky_relu", x, slope=0.1), [-0.3, -0.05, 0, 0.5, 3])
    np.testing.assert_allclose(forward("leaky_relu", x), [-0.03, -0.005, 0, 0.5, 3])
    np.testing.assert_allclose(forward("elu", x, alpha=2.0),
                               [2 * (np.exp(-3) - 1), 2 * (np.exp(-0.5) - 1), 0, 0.5, 3])
    np.testing.assert_allclose(forward("softplus", x), np.log(1 + np.exp(x)))
    np.testing.assert_array_equal(forward("sign", x), [-1, -1, 0, 1, 1])
    np.testing.assert_array_equal(forward("identity", x), x)
    z = np.array([[1.0, 2.0, 3.0]])
    np.testing.assert_allclose(forward("log_softmax", z), np.log(np.exp(z) / np.exp(z).sum()))


def test_softplus_and_elu_do_not_overflow():
    x = np.array([-1000.0, 1000.0], dtype=np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        np.testing.assert_allclose(forward("softplus", x), [0.0, 1000.0])
        np.testing.assert_allclose(forward("elu", x), [-1.0, 1000.0])


def test_sign_passes_exactly_zero_gradient():
    op = activation_op("sign")
    x = np.array([-2.0, 0.3, 5.0])
    (grad,) = op.backward(make_context(), np, (None,), None, np.ones(3))  # needs no forward state
    np.testing.assert_array_equal(grad, np.zeros(3))
    assert op.retain_inputs == () and not op.retain_output
    np.testing.assert_array_equal(op.forward(make_context(), np, x), [-1, 1, 1])


def test_activations_keep_only_what_backward_reads():
    assert activation_op("leaky_relu").retain_inputs == (0,)
    assert not activation_op("leaky_relu").retain_output
    assert activation_op("softplus").retain_inputs == (0,)
    assert activation_op("log_softmax").retain_inputs == () and activation_op("log_softmax").retain_output


def test_bad_hyperparameters_are_rejected():
    g = ge.Graph()
    x = g.input("x", (None, 3))
    with pytest.raises(GraphBuildError, match="slope must be a number"):
        g.activation("leaky_relu", x, slope="big")
    with pytest.raises(GraphBuildError, match="alpha must be a positive number"):
        g.activation("elu", x, alpha=-1)


# --------------------------------------------------------------------------- PReLU

@pytest.mark.parametrize("shape, axis, slope_shape", [((4, 5), -1, (5,)), ((3, 2, 4, 4), 1, (2,)),
                                                      ((4, 5), None, (1,))])
def test_prelu_backward(shape, axis, slope_shape, backend):
    rng = np.random.default_rng(2)
    check_backward(PReLUOp(axis), [rng.standard_normal(shape), rng.uniform(0, 0.5, slope_shape)],
                   backend=backend)


def test_prelu_is_a_layer_with_one_learned_slope_per_unit():
    g = ge.Graph()
    x = g.input("x", (None, 3))
    y = g.layer("prelu", x, name="act")
    model = g.compile(outputs=[y])
    assert model.parameters()["act/alpha"].shape == (3,)
    np.testing.assert_allclose(model.parameters()["act/alpha"], 0.25)
    model.parameters()["act/alpha"][:] = [0.0, 0.5, 1.0]
    out = model.predict({"x": np.array([[-2.0, -2.0, -2.0], [1.0, 1.0, 1.0]], dtype=np.float32)})
    np.testing.assert_allclose(out, [[0.0, -1.0, -2.0], [1.0, 1.0, 1.0]])
    assert not g.nodes["act/alpha"].op.decay  # weight penalties skip slopes by default


def test_prelu_learns_its_slope():
    # target: leaky ReLU with slope 0.3; the layer starts at 0.25 and must find 0.3
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 4)).astype(np.float32)
    target = np.where(x > 0, x, 0.3 * x).astype(np.float32)
    g = ge.Graph()
    inp = g.input("x", (None, 4))
    t = g.input("t", (None, 4))
    loss = g.loss("mse", g.layer("prelu", inp, name="act"), t)
    model = g.compile(loss, optimizer=ge.optimizer("sgd", lr=2.0))
    for _ in range(100):
        model.train_step({"x": x, "t": target})
    np.testing.assert_allclose(model.parameters()["act/alpha"], 0.3, atol=1e-3)


def test_prelu_as_activation_points_to_the_layer():
    g = ge.Graph()
    x = g.input("x", (None, 3))
    with pytest.raises(GraphBuildError, match=r"layer, not an activation.*g\.layer\('prelu'"):
        g.activation("prelu", x)
    with pytest.raises(GraphBuildError, match=r"g\.layer\('maxout'"):
        g.activation("maxout", x)


def test_prelu_bad_axis():
    g = ge.Graph()
    x = g.input("x", (None, 3))
    with pytest.raises(ShapeError, match="prelu axis 0 must be a known dimension"):
        g.layer("prelu", x, axis=0)


# --------------------------------------------------------------------------- Maxout

def test_maxout_op_backward(backend):
    z = np.random.default_rng(3).standard_normal((4, 6))
    check_backward(lambda: MaxoutOp(3), [z], backend=backend)


def test_maxout_op_takes_the_max_of_each_group():
    z = np.array([[1.0, 5.0, -1.0, 7.0, 2.0, 0.0]])
    op = MaxoutOp(2)
    described = dict(vars(op))
    ctx = make_context()
    np.testing.assert_array_equal(op.forward(ctx, np, z), [[5.0, 7.0, 2.0]])
    assert vars(op) == described  # the winners are the call's state, kept on its context
    np.testing.assert_array_equal(ctx.winner, [[1, 1, 0]])
    (grad,) = op.backward(ctx, np, (None,), None, np.array([[10.0, 20.0, 30.0]]))
    np.testing.assert_array_equal(grad, [[0, 10, 0, 20, 30, 0]])


def test_maxout_rejects_widths_not_divisible_by_pieces():
    with pytest.raises(ShapeError, match="divisible by pieces=3"):
        MaxoutOp(3).infer(TensorSpec((None, 5), "float32"))
    g = ge.Graph()
    with pytest.raises(GraphBuildError, match="pieces must be a positive int"):
        g.layer("maxout", g.input("x", (None, 5)), units=2, pieces=0)


def maxout_model(units: int, pieces: int, features: int):
    g = ge.Graph()
    x = g.input("x", (None, features))
    return g.compile(outputs=[g.layer("maxout", x, units=units, pieces=pieces, name="mx")])


def test_maxout_can_represent_relu():
    # two pieces per unit: one is the ReLU's affine map, the other is zero
    rng = np.random.default_rng(4)
    W, b = rng.standard_normal((4, 3)), rng.standard_normal(3)
    model = maxout_model(units=3, pieces=2, features=4)
    params = model.parameters()
    params["mx/W"][:] = 0
    params["mx/b"][:] = 0
    params["mx/W"][:, 0::2] = W
    params["mx/b"][0::2] = b
    x = rng.standard_normal((50, 4)).astype(np.float32)
    np.testing.assert_allclose(model.predict({"x": x}), np.maximum(x @ W + b, 0), rtol=1e-5, atol=1e-6)


def test_maxout_learns_relu_from_data():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((512, 2)).astype(np.float32)
    w_true = np.array([[1.5], [-1.0]], dtype=np.float32)
    target = np.maximum(x @ w_true + 0.2, 0)
    g = ge.Graph()
    inp, t = g.input("x", (None, 2)), g.input("t", (None, 1))
    loss = g.loss("mse", g.layer("maxout", inp, units=1, pieces=2), t)
    model = g.compile(loss, optimizer=ge.optimizer("adam", lr=0.05), seed=1)
    first = model.forward({"x": x, "t": target})
    for _ in range(300):
        last = model.train_step({"x": x, "t": target})
    assert last < 1e-3 * first
