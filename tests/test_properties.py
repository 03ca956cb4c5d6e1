"""Property-based tests: random graphs and feeds through build, compile, forward and backward.

The engine either works or raises a GraphEngineError, never another exception; a failed builder
call leaves the graph as it was; every value has the shape and dtype inferred at build time;
gradients have their inputs' shapes; and on smooth graphs the gradient matches a finite
difference of the loss.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

import graphengine as ge
from graphengine.errors import GraphEngineError, NumericalError, OperatorError

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

# About 10 s for this file on a 2-core machine; the hypothesis suite must stay within ~30 s.
FAST = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])

PRIMITIVE_UNARY = ["neg", "exp", "log", "sqrt", "abs"]
#: Every registered activation (plugins' included) is held to the operator contract too.
ACTIVATIONS = ge.get_plugin_manager().activations.names()
UNARY = PRIMITIVE_UNARY + ACTIVATIONS
BINARY = ["add", "sub", "mul", "div", "maximum", "matmul", "concat"]
SMOOTH_UNARY = ["neg", "tanh", "sigmoid", "softmax", "square"]
SMOOTH_BINARY = ["add", "sub", "mul", "matmul", "concat"]
#: Tensor arithmetic with a NumPy array (a constant node, then the operator), both ways round.
WITH_ARRAY = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv,
    "matmul": operator.matmul, "maximum": ge.maximum,
    "rsub": lambda x, array: array - x, "rmatmul": lambda x, array: array @ x,
}

dims = st.integers(1, 4)
index_key = st.one_of(st.integers(-4, 4), st.builds(slice, st.none() | st.integers(-3, 3),
                                                    st.none() | st.integers(-3, 3),
                                                    st.sampled_from([None, 1, 2, -1])))


def instruction(unary: list[str], binary: list[str]) -> st.SearchStrategy:
    """One builder call, picking its operands among the tensors built so far by position."""
    pick = st.integers(0, 1000)
    return st.one_of(
        st.tuples(st.just("unary"), st.sampled_from(unary), pick),
        st.tuples(st.just("binary"), st.sampled_from(binary), pick, pick, st.integers(-3, 2)),
        st.tuples(st.just("array"), st.sampled_from(sorted(WITH_ARRAY)), pick,
                  st.lists(dims, max_size=3).map(tuple)),
        st.tuples(st.just("reduce"), st.sampled_from(["sum", "mean"]), pick,
                  st.none() | st.integers(-3, 2), st.booleans()),
        st.tuples(st.just("reshape"), pick,
                  st.lists(st.sampled_from([None, -1, 1, 2, 3, 4, 6]), max_size=3).map(tuple)),
        st.tuples(st.just("transpose"), pick, st.none() | st.permutations(range(3))),
        st.tuples(st.just("index"), pick, st.lists(index_key, min_size=1, max_size=2).map(tuple)),
        st.tuples(st.just("dense"), pick, st.integers(1, 3)),
    )


def apply(g: ge.Graph, tensors: list[ge.Tensor], step: tuple, rng: np.random.Generator) -> ge.Tensor:
    kind, *args = step
    if kind == "unary":
        name, i = args
        x = tensors[i % len(tensors)]
        if name == "square":
            return x ** 2
        if name in PRIMITIVE_UNARY:
            return g.op(name, x)
        return g.activation(name, x)
    if kind == "binary":
        name, i, j, axis = args
        a, b = tensors[i % len(tensors)], tensors[j % len(tensors)]
        return g.op(name, a, b, axis=axis) if name == "concat" else g.op(name, a, b)
    if kind == "array":
        name, i, shape = args
        return WITH_ARRAY[name](tensors[i % len(tensors)], rng.uniform(0.5, 1.5, shape))
    if kind == "reduce":
        name, i, axis, keepdims = args
        return g.op(name, tensors[i % len(tensors)], axis=axis, keepdims=keepdims)
    if kind == "reshape":
        i, shape = args
        return tensors[i % len(tensors)].reshape(shape)
    if kind == "transpose":
        i, axes = args
        x = tensors[i % len(tensors)]
        return x.transpose(*axes[:x.ndim]) if axes is not None else x.T
    if kind == "index":
        i, key = args
        return tensors[i % len(tensors)][key]
    i, units = args
    return g.layer("dense", tensors[i % len(tensors)], units=units)


def snapshot(g: ge.Graph) -> tuple:
    return list(g.nodes), sorted(g.dag.edges), len(g.calls)


def build(steps: list[tuple], dtype: str, shape: tuple, seed: int):
    """Build what the steps allow; each failure must be a GraphEngineError that changes nothing."""
    rng = np.random.default_rng(seed)
    g = ge.Graph("random")
    x = g.input("x", shape, dtype=dtype)
    # Every later tensor depends on x and on a parameter: there is always something to train.
    tensors = [x * g.parameter("scale", (shape[-1],), init="ones", dtype=dtype)]
    for step in steps:
        before = snapshot(g)
        try:
            tensors.append(apply(g, tensors, step, rng))
        except GraphEngineError:
            assert snapshot(g) == before, f"{step} failed but left nodes behind"
    return g, tensors


def fits(value: np.ndarray, spec: ge.TensorSpec) -> bool:
    return value.dtype == spec.dtype and value.ndim == len(spec.shape) and all(
        d is None or d == v for d, v in zip(spec.shape, value.shape))


def scaled_loss(g: ge.Graph, out: ge.Tensor) -> ge.Tensor:
    """``mean(out * scale)`` with a trainable ``scale`` of 1: the model then has a training plan
    of its own, and ``backward(wrt=["x"])`` after a plain ``forward()`` must find what the
    input's path needs although nothing on that path depends on a parameter."""
    scale = g.parameter("scale", (1,), init="ones", dtype=out.dtype)
    return (out * scale).mean()


def feed_for(spec_shape: tuple, dtype: str, batch: int, corruption: str, rng) -> Any:
    shape = tuple(batch if d is None else d for d in spec_shape)
    if corruption == "wrong size":
        shape = shape[:-1] + (shape[-1] + 1,)
    elif corruption == "wrong rank":
        shape = shape + (1,)
    value = rng.uniform(0.5, 2.0, shape).astype(dtype)
    if corruption == "strings":
        return value.astype(str)
    if corruption == "nested lists":
        return value.tolist()
    if corruption == "nan":
        value.flat[0] = np.nan
    return value


@FAST
@given(steps=st.lists(instruction(UNARY, BINARY), min_size=1, max_size=8),
       dtype=st.sampled_from(["float32", "float64"]),
       inner=st.lists(dims, min_size=1, max_size=2).map(tuple),
       batch=st.integers(1, 3),
       corruption=st.sampled_from(["none", "none", "none", "wrong size", "wrong rank", "strings",
                                   "nested lists", "nan"]),
       debug=st.booleans(), backend=st.sampled_from(["numpy", "strict"]),
       seed=st.integers(0, 2**16))
def test_random_graphs_work_or_raise_graphengine_errors(steps, dtype, inner, batch, corruption,
                                                        debug, backend, seed):
    shape = (None, *inner)
    g, tensors = build(steps, dtype, shape, seed)
    out = tensors[-1]
    event("every builder call worked" if len(tensors) == len(steps) + 1 else "some were refused")
    try:
        model = g.compile(scaled_loss(g, out), outputs=[out], optimizer="sgd", backend=backend)
    except GraphEngineError as error:
        event(f"compile: {type(error).__name__}")
        return
    model.debug = debug
    rng = np.random.default_rng(seed)
    feed = feed_for(shape, dtype, batch, corruption, rng)
    try:
        loss = model.forward({"x": feed})
        model.backward(wrt=["x"])
    except (NumericalError, OperatorError) as error:
        event(f"run: {type(error).__name__}")
        if corruption == "none" and isinstance(error, OperatorError):
            # Only sizes known at run time can fail a clean feed: those of batch dimensions.
            inputs = g.nodes[error.node].inputs
            assert any(None in g.nodes[i].shape for i in inputs), error
        return
    except GraphEngineError as error:
        event(f"run: {type(error).__name__}")
        assert corruption != "none", "a clean feed was refused"
        return
    event("forward and backward worked")
    assert isinstance(loss, float)
    host = np.asarray(feed, dtype=dtype)
    grad = model.input_gradient("x")
    assert grad.shape == host.shape and grad.dtype == host.dtype
    for name, gradient in model.gradients().items():
        assert gradient.shape == model.parameters()[name].shape
    # Every node the forward computed has the shape and dtype inferred at build time.
    fetched = model.run({"x": feed}, fetches=[t for t in tensors if t.name in model.train_plan.slots])
    for name, value in fetched.items():
        assert fits(value, g.nodes[name].spec), (name, value.shape, value.dtype, g.nodes[name].spec)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(instruction(SMOOTH_UNARY, SMOOTH_BINARY), min_size=1, max_size=6),
       inner=st.lists(dims, min_size=1, max_size=2).map(tuple),
       batch=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_random_smooth_graphs_have_gradients_matching_finite_differences(steps, inner, batch, seed):
    shape = (None, *inner)
    g, tensors = build(steps, "float64", shape, seed)
    out = tensors[-1]
    try:
        model = g.compile(scaled_loss(g, out), outputs=[out], optimizer="sgd")
    except GraphEngineError:
        return
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, (batch, *inner))
    direction = rng.standard_normal(x.shape)
    try:
        model.forward({"x": x})
    except OperatorError:  # sizes that only some batch sizes fit (see the test above)
        assume(False)
    model.backward(wrt=["x"])
    analytic = float(np.sum(model.input_gradient("x") * direction))
    eps = 1e-6
    numeric = (model.forward({"x": x + eps * direction})
               - model.forward({"x": x - eps * direction})) / (2 * eps)
    assume(np.isfinite(analytic) and np.isfinite(numeric) and abs(analytic) < 1e6)  # no mean of []
    assert np.isclose(analytic, numeric, rtol=1e-4, atol=1e-6), (analytic, numeric)


@FAST
@given(spec=st.lists(st.none() | dims, max_size=3).map(tuple),
       value_shape=st.lists(st.integers(0, 4), max_size=3).map(tuple),
       dtype=st.sampled_from(["float32", "float64", "int64", "uint8", "bool", "complex64", "<U2"]))
def test_any_feed_is_taken_or_refused_with_a_feed_error(spec, value_shape, dtype):
    g = ge.Graph()
    doubled = g.input("x", spec) * 2.0
    model = g.compile(outputs=[doubled])
    try:
        out = model.run({"x": np.zeros(value_shape, dtype=dtype)})[doubled.name]
    except ge.FeedError:
        return
    assert out.shape == value_shape and out.dtype == np.float32
