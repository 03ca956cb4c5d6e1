"""Debug mode: NaN/Inf hunting and operator-contract checks, named down to the line of user code."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import graphengine as ge
import graphengine.model
from graphengine.errors import GraphEngineError, NumericalError, ShapeError
from graphengine.ir.operators import Operator
from graphengine.testing import isolated_plugin_manager

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

X = np.array([[0.5, 1.0, 2.0], [1.5, 0.25, 3.0], [2.0, 2.0, 0.5], [0.1, 0.2, 0.3]], np.float32)
Y = np.array([0, 1, 2, 1])


def here() -> int:
    """The caller's line number."""
    return sys._getframe(1).f_lineno


def classifier(backend: str = "numpy", lr: float = 0.1) -> ge.Model:
    g = ge.Graph("clf")
    x = g.input("x", (None, 3))
    y = g.input("y", (None,), dtype="int64")
    h = g.activation("tanh", g.layer("dense", x, units=4, name="fc"))
    loss = g.loss("softmax_cross_entropy", g.layer("dense", h, units=3, name="out"), y)
    return g.compile(loss, optimizer=ge.optimizer("sgd", lr=lr), backend=backend)


def test_off_by_default_and_no_check_runs(monkeypatch):
    def fail(model):
        raise AssertionError("the debug observer ran while debug mode was off")

    monkeypatch.setattr(graphengine.model, "debug_observer", fail)
    model = classifier()
    assert model.debug is False
    assert model.active_observers() == [] and model.active_observers(inference=True) == []
    bad = X.copy()
    bad[0, 0] = np.nan
    assert np.isnan(model.forward({"x": bad, "y": Y}))  # unchecked: NaN flows through
    model.train_step({"x": X, "y": Y})
    model.predict({"x": X})
    model.evaluate({"x": X, "y": Y})


def test_a_forward_nan_names_node_operator_shapes_pass_and_line(backend):
    g = ge.Graph()
    x = g.input("x", (None, 3))
    shifted = x - 1.0
    line = here() + 1
    logs = shifted.log()
    model = g.compile(outputs=[logs.sum()], backend=backend)
    model.debug = True
    with pytest.raises(NumericalError) as info:
        model.run({"x": X})
    message = str(info.value)
    assert info.value.node == logs.name == "log_0"
    assert "6 NaN and 1 Inf among 12 values in the forward pass at node 'log_0' (log, built at " in message
    assert f"test_debug.py:{line})" in message
    assert "from finite inputs of shapes (4, 3) float32" in message
    assert "keep its input positive" in message


def test_a_nan_fed_in_is_blamed_on_the_input_not_on_the_operator():
    model = classifier()
    model.debug = True
    bad = X.copy()
    bad[2, 1] = np.nan
    with pytest.raises(NumericalError, match="1 NaN among 12 values in the value fed to input 'x' "
                                             r"\(read by node 'fc/matmul'") as info:
        model.forward({"x": bad, "y": Y})
    assert info.value.node == "x"
    assert "clean the data" in str(info.value)


def test_a_backward_inf_names_the_operator_that_made_it(backend):
    g = ge.Graph()
    x = g.input("x", (None, 3))
    h = x @ g.parameter("W", (3, 2), init="zeros")
    line = here() + 1
    root = h.sqrt()
    model = g.compile(root.mean(), outputs=[h], optimizer="sgd", backend=backend)
    model.debug = True
    assert model.forward({"x": X}) == 0.0  # sqrt(0) is finite; its derivative is not
    with pytest.raises(NumericalError) as info:
        model.backward()
    message = str(info.value)
    assert info.value.node == "sqrt_0"
    assert "8 Inf among 8 values in the backward pass at node 'sqrt_0' (sqrt, built at" in message
    assert f"test_debug.py:{line})" in message
    assert "the gradient it sends to input 0 'matmul_0' (shape (4, 2))" in message
    assert "its inputs had shapes (4, 2)" in message
    assert "Likely cause: sqrt of a negative number, or its gradient at 0" in message


def test_an_update_that_makes_a_parameter_nan_is_caught():
    model = classifier()
    model.optimizer.lr = float("nan")  # the constructor refuses it; a broken schedule could set it
    model.debug = True
    model.forward({"x": X, "y": Y})
    model.backward()
    with pytest.raises(NumericalError, match=r"in parameter '(fc|out)/[Wb]' after optimizer update 1 "
                                             r"\(SGD\(lr=nan"):
        model.step()


def test_a_nan_parameter_is_blamed_on_the_parameter():
    model = classifier()
    model.parameters()["out/W"][1, 2] = np.inf
    with ge.debug(), pytest.raises(NumericalError, match="1 Inf among 12 values in parameter 'out/W' "
                                                         r"\(read by node 'out/matmul'"):
        model.predict({"x": X})


def test_the_context_manager_turns_debug_on_for_every_model_and_off_after():
    model = classifier()
    assert not model.debug
    with ge.debug():
        assert model.debug and classifier().debug
        with ge.debug(False):
            assert not model.debug
        assert model.debug
    assert not model.debug
    model.debug = True
    with ge.debug(False):
        assert model.debug  # the model's own setting is not overridden


def test_debug_mode_changes_no_number():
    plain, checked = classifier(), classifier()
    checked.debug = True
    for _ in range(3):
        assert plain.train_step({"x": X, "y": Y}) == checked.train_step({"x": X, "y": Y})
    for name, value in plain.parameters().items():
        assert np.array_equal(value, checked.parameters()[name])
    assert np.array_equal(plain.predict({"x": X}), checked.predict({"x": X}))


def test_fit_in_debug_mode_names_the_node_instead_of_the_epoch():
    g = ge.Graph()
    x = g.input("x", (None, 3))
    h = g.layer("dense", x, units=2, name="fc")
    model = g.compile((h / (h - h)).mean(), outputs=[h], optimizer="sgd")
    with pytest.raises(NumericalError, match="the loss became nan"):
        model.fit({"x": X}, batch_size=4)
    model.debug = True
    with pytest.raises(NumericalError, match=r"in the forward pass at node 'div_0' \(div, built at .*"
                                             r"division by zero"):
        model.fit({"x": X}, batch_size=4)


# --------------------------------------------------------------------------- operator contract

class WrongGradientShape(ge.Activation):
    """A plugin bug: the gradient is summed over the batch."""

    keeps = ()

    def forward(self, xp, x):
        return 2 * x

    def backward(self, xp, x, y, dy):
        return 2 * dy.sum(axis=0)


class WrongDtype(ge.Activation):
    """A plugin bug: float32 in, float64 out."""

    keeps = ()

    def forward(self, xp, x):
        return x.astype("float64")

    def backward(self, xp, x, y, dy):
        return dy


class PairSum(Operator):
    """A plugin bug: one gradient for two inputs."""

    kind = "pair_sum"

    def infer(self, a, b):
        return a

    def forward(self, ctx, xp, a, b):
        return a + b

    def backward(self, ctx, xp, inputs, output, grad):
        return (grad,)


class PairLayer(ge.Layer):
    def build(self, g, x):
        return g.apply(PairSum(), x, g.layer("dense", x, units=x.shape[-1], name="inner"))


@ge.hookimpl
def graphengine_register_activations(register):
    register("wrong_gradient_shape", WrongGradientShape)
    register("wrong_dtype", WrongDtype)


@ge.hookimpl
def graphengine_register_layers(register):
    register("pair", PairLayer)


@pytest.fixture
def buggy_plugins():
    with isolated_plugin_manager(sys.modules[__name__], entry_points=True) as manager:
        yield manager


def model_with(build) -> ge.Model:
    g = ge.Graph()
    x = g.input("x", (None, 3))
    y = g.input("y", (None,), dtype="int64")
    h = build(g, g.layer("dense", x, units=3, name="fc"))
    return g.compile(g.loss("softmax_cross_entropy", h, y), optimizer="sgd")


def test_a_gradient_of_the_wrong_shape_is_named_with_its_plugin_class(buggy_plugins):
    model = model_with(lambda g, h: g.activation("wrong_gradient_shape", h))
    model.forward({"x": X, "y": Y})
    with pytest.raises(GraphEngineError):  # without debug mode, it fails somewhere downstream
        model.backward()
        model.step()
    model.debug = True
    model.forward({"x": X, "y": Y})
    with pytest.raises(ShapeError) as info:
        model.backward()
    message = str(info.value)
    assert "node 'wrong_gradient_shape_0' (wrong_gradient_shape, built at" in message
    assert "backward returned a gradient of (3,) float32 for input 0 'fc/add', which is (4, 3) float32" \
        in message
    assert "fix test_debug.WrongGradientShape" in message


def test_a_forward_of_the_wrong_dtype_is_caught(buggy_plugins):
    model = model_with(lambda g, h: g.activation("wrong_dtype", h))
    model.debug = True
    with pytest.raises(ShapeError, match=r"forward returned \(4, 3\) float64, but shape inference said "
                                         r"\(None, 3\) float32.*fix test_debug.WrongDtype"):
        model.forward({"x": X, "y": Y})


def test_a_missing_gradient_is_an_error_not_silently_dropped(buggy_plugins):
    model = model_with(lambda g, h: g.layer("pair", h, name="pair"))
    model.forward({"x": X, "y": Y})
    with pytest.raises(ge.OperatorError, match=r"node 'pair/pair_sum' .* in the backward pass"):
        model.backward()
    model.debug = True
    model.forward({"x": X, "y": Y})
    with pytest.raises(ShapeError, match=r"backward returned 1 gradients for 2 inputs; fix "
                                         r"test_debug.PairSum"):
        model.backward()


def test_a_wrongly_shaped_parameter_gradient_never_reaches_the_optimizer():
    model = classifier()
    model.forward({"x": X, "y": Y})
    model.backward()
    model.gradient_transforms.append(lambda m, grads: grads.update({"fc/b": grads["fc/b"][:2]}))
    before = {k: v.copy() for k, v in model.parameters().items()}
    with pytest.raises(ShapeError, match=r"the gradient of parameter 'fc/b' has shape \(2,\), the "
                                         r"parameter \(4,\)"):
        model.step()
    assert np.array_equal(model.parameters()["fc/b"], before["fc/b"])


def test_the_debug_nan_example_finds_the_log_that_made_the_nan():
    from examples_loader import load_example

    example = load_example("debug_nan")
    plain, debugged = example.main()
    assert "the loss became nan at epoch 1, batch 1" in str(plain) and plain.node is None
    assert debugged.node == "log_0"
    line = next(n for n, text in enumerate(open(example.__file__), 1) if "p.log()" in text)
    assert f"in the forward pass at node 'log_0' (log, built at {example.__file__}:{line})" \
        in str(debugged)
