"""Graph building, shape inference, compile, feeds and reverse-mode autodiff over DAGs."""

from __future__ import annotations

import numpy as np
import pytest

import graphengine as ge
from graphengine.compiler.plan import build_plan


def mlp(dtype="float32"):
    g = ge.Graph("mlp")
    x = g.input("x", shape=(None, 4), dtype=dtype)
    y = g.input("y", shape=(None,), dtype="int64")
    h = g.activation("tanh", g.layer("dense", x, units=5, name="fc1"))
    logits = g.layer("dense", h, units=3, name="out")
    loss = g.loss("softmax_cross_entropy", logits, y)
    return g, x, y, logits, loss


def numeric_parameter_gradients(model, feeds, eps=1e-6):
    out = {}
    for name, p in model.parameters().items():
        host = model.backend.to_numpy(p).copy()  # numpy: to_numpy may return p itself
        grad = np.zeros_like(host)
        for i in np.ndindex(host.shape):
            for sign in (1, -1):
                p[i] = host[i] + sign * eps
                grad[i] += sign * model.forward(feeds) / (2 * eps)
            p[i] = host[i]
        out[name] = grad
    return out


# ------------------------------------------------------------------ building and shapes

def test_layer_names_scope_parameters_and_nodes():
    g, *_ = mlp()
    assert g.parameters() == ["fc1/W", "fc1/b", "out/W", "out/b"]
    assert g.nodes["fc1/matmul"].layer == "fc1"
    assert g["out/add"].shape == (None, 3)


def test_shape_mismatch_fails_at_build_time_naming_node_and_shapes():
    g = ge.Graph()
    x = g.input("x", shape=(None, 64))
    w = g.parameter("W", (32, 10))
    with pytest.raises(ge.ShapeError) as err:
        x @ w
    message = str(err.value)
    assert "matmul" in message and "(None, 64)" in message and "(32, 10)" in message
    assert "x" in message and "W" in message


def test_failed_layer_leaves_graph_unchanged():
    g = ge.Graph()
    x = g.input("x", shape=(None, 4))
    before = list(g.nodes)
    with pytest.raises(ge.GraphBuildError):
        g.layer("dense", x, units=-3, name="fc1")
    assert list(g.nodes) == before
    g.layer("dense", x, units=3, name="fc1")  # the name is still free


def test_duplicate_names_are_rejected():
    g = ge.Graph()
    x = g.input("x", shape=(None, 4))
    g.layer("dense", x, units=3, name="fc1")
    with pytest.raises(ge.GraphBuildError, match="fc1"):
        g.layer("dense", x, units=3, name="fc1")
    with pytest.raises(ge.GraphBuildError, match="already has a node"):
        g.input("x", shape=(None, 4))


def test_unknown_names_suggest_close_ones():
    g = ge.Graph()
    x = g.input("x", shape=(None, 4))
    with pytest.raises(ge.UnknownNameError, match="Did you mean 'relu'"):
        g.activation("rleu", x)
    with pytest.raises(ge.UnknownNameError, match="dense"):
        g.layer("dens", x, units=3)


def test_tensors_of_two_graphs_do_not_mix():
    a, b = ge.Graph("a"), ge.Graph("b")
    x = a.input("x", shape=(None, 2))
    w = b.parameter("W", (2, 2))
    with pytest.raises(ge.GraphBuildError, match="belongs to graph 'b'"):
        x @ w


def test_operators_on_tensor_handles():
    g = ge.Graph()
    x = g.input("x", shape=(None, 3))
    w = g.parameter("W", (3, 2), init="normal")
    b = g.parameter("b", (2,), init="zeros")
    z = x @ w + b
    out = ((-z) * 2.0 - 1.0) / 4.0 + z ** 2
    e = ge.concat([out.exp(), z.log().abs()], axis=1).sum(axis=1).mean()
    assert e.shape == () and out.shape == (None, 2)
    assert z.T.shape == (2, None) and z.reshape(None, 2, 1).shape == (None, 2, 1)
    assert x[:, -1].shape == (None,)
    model = g.compile(outputs=[out])
    X = np.ones((2, 3), np.float32)
    W, B = model.parameters()["W"], model.parameters()["b"]
    Z = X @ W + B
    np.testing.assert_allclose(model.predict({"x": X}), (-Z * 2 - 1) / 4 + Z ** 2, rtol=1e-6)


def test_user_code_line_is_recorded_on_nodes():
    g = ge.Graph()
    x = g.input("x", shape=(None, 4))
    h = g.layer("dense", x, units=2, name="fc1")
    origin = g.nodes[h.name].origin
    assert origin is not None and origin.startswith(__file__)


# ------------------------------------------------------------------ compile

def test_compile_prunes_what_the_targets_do_not_need():
    g, x, y, logits, loss = mlp()
    g.layer("dense", x, units=7, name="unused")
    plan = build_plan(g, [loss.name], loss=loss.name)
    assert not any(n.startswith("unused/") for n in plan.slots)
    infer = build_plan(g, [logits.name])
    assert infer.feeds == ("x",)  # labels are not needed to predict


def test_plan_releases_intermediates_after_last_use():
    g = ge.Graph()
    x = g.input("x", shape=(None, 3))
    a = x.exp()
    b = a.exp()
    c = b.exp()
    plan = build_plan(g, [c.name])
    released = {s for step in plan.steps for s in step.release}
    assert plan.slots[a.name] in released and plan.slots[b.name] in released
    assert plan.slots[c.name] not in released


def test_values_backward_needs_are_kept_until_backward():
    g, x, y, logits, loss = mlp()
    plan = build_plan(g, [loss.name], loss=loss.name)
    tanh = next(n for n in plan.slots if n.startswith("tanh"))
    assert plan.slots[tanh] in plan.retained  # tanh keeps its output for backward
    forward_released = {s for step in plan.steps for s in step.release}
    assert plan.slots[tanh] not in forward_released
    backward_released = {s for b in plan.backward for s in b.release}
    assert plan.slots[tanh] in backward_released


def test_loss_must_be_scalar():
    g = ge.Graph()
    x = g.input("x", shape=(None, 3))
    w = g.parameter("W", (3, 2))
    with pytest.raises(ge.CompileError, match="must be a scalar"):
        g.compile(x @ w, outputs=[x @ w])


def test_loss_that_no_parameter_influences_is_rejected():
    g = ge.Graph()
    x = g.input("x", shape=(None, 3))
    with pytest.raises(ge.CompileError, match="nothing to differentiate"):
        g.compile((x * x).mean(), outputs=[x])


def test_the_dag_is_a_networkx_view_of_the_nodes_and_editing_it_changes_nothing():
    """Builder calls only take existing tensors, so a graph cannot hold a cycle; ``g.dag`` is
    built from the nodes' inputs for analysis, and an edge added to it is not the graph's."""
    g = ge.Graph()
    x = g.input("x", shape=(None, 3))
    a = x.exp()
    b = a.log() * a
    assert sorted(g.dag.edges) == sorted([(x.name, a.name), (a.name, "log_0"), ("log_0", b.name),
                                          (a.name, b.name)])
    assert g.consumers(a.name) == ["log_0", b.name] and g.consumers(b.name) == []
    g.dag.add_edge(b.name, a.name)
    assert (b.name, a.name) not in g.dag.edges
    assert build_plan(g, [b.name]).names == [x.name, a.name, "log_0", b.name]


# ------------------------------------------------------------------ feeds

@pytest.fixture
def model():
    g, *_, loss = mlp()
    return g.compile(loss, optimizer=ge.optimizer("sgd", lr=0.1))


def test_missing_and_unknown_feeds(model):
    with pytest.raises(ge.FeedError, match=r"missing feed\(s\) \['y'\]"):
        model.forward({"x": np.zeros((2, 4))})
    with pytest.raises(ge.FeedError, match="unknown feed"):
        model.forward({"x": np.zeros((2, 4)), "y": np.zeros(2, int), "z": 1})


def test_wrong_feed_shape_and_dtype(model):
    with pytest.raises(ge.FeedError, match=r"shape \(2, 5\).*expects \(None, 4\)"):
        model.forward({"x": np.zeros((2, 5)), "y": np.zeros(2, int)})
    with pytest.raises(ge.FeedError, match="never truncated"):
        model.forward({"x": np.zeros((2, 4)), "y": np.zeros(2)})
    with pytest.raises(ge.FeedError, match="batch size"):
        model.forward({"x": np.zeros((2, 4)), "y": np.zeros(3, int)})


def test_float64_feeds_are_cast_to_the_input_dtype(model):
    model.forward({"x": np.zeros((2, 4), np.float64), "y": np.zeros(2, int)})
    assert all(p.dtype == np.float32 for p in model.parameters().values())
    assert all(g.dtype == np.float32 for g in (model.backward() or model.gradients()).values())


# ------------------------------------------------------------------ autodiff

def test_model_gradients_match_finite_differences(backend):
    g, *_, loss = mlp("float64")
    model = g.compile(loss, backend=backend)
    feeds = {"x": np.random.default_rng(0).standard_normal((6, 4)), "y": np.arange(6) % 3}
    model.forward(feeds)
    model.backward()
    analytic = {k: model.backend.to_numpy(v) for k, v in model.gradients().items()}
    numeric = numeric_parameter_gradients(model, feeds)
    assert sorted(analytic) == sorted(numeric) == ["fc1/W", "fc1/b", "out/W", "out/b"]
    for name, grad in analytic.items():
        np.testing.assert_allclose(grad, numeric[name], rtol=1e-5, atol=1e-7)


def test_fan_out_shared_parameter_and_skip_connection_accumulate(backend):
    g = ge.Graph()
    x = g.input("x", shape=(None, 3), dtype="float64")
    w = g.parameter("W", (3, 3), init="normal", dtype="float64")
    h = g.activation("tanh", x @ w)
    h2 = g.activation("tanh", h @ w)  # W used twice
    out = h2 + h + x  # skip connections: h and x fan out
    loss = (out * out).mean()
    model = g.compile(loss, outputs=[out], backend=backend)
    feeds = {"x": np.random.default_rng(1).standard_normal((4, 3))}
    model.forward(feeds)
    model.backward()
    analytic = model.backend.to_numpy(model.gradients()["W"])
    numeric = numeric_parameter_gradients(model, feeds)
    np.testing.assert_allclose(analytic, numeric["W"], rtol=1e-5, atol=1e-8)


def test_gradients_are_zeroed_at_each_backward():
    g, *_, loss = mlp()
    model = g.compile(loss)
    feeds = {"x": np.ones((2, 4), np.float32), "y": np.array([0, 1])}
    model.forward(feeds)
    model.backward()
    first = {k: v.copy() for k, v in model.gradients().items()}
    model.forward(feeds)
    model.backward()
    for k, v in model.gradients().items():
        np.testing.assert_array_equal(v, first[k])


def test_input_gradient_on_request(backend):
    g = ge.Graph()
    x = g.input("x", shape=(None, 3), dtype="float64")
    w = g.parameter("W", (3, 1), init="normal", dtype="float64")
    loss = (x @ w).sum()
    model = g.compile(loss, outputs=[x @ w], backend=backend)
    model.forward({"x": np.ones((2, 3))})
    model.backward(wrt=["x"])
    W = model.backend.to_numpy(model.parameters()["W"])
    np.testing.assert_allclose(model.backend.to_numpy(model.input_gradient("x")), np.tile(W.T, (2, 1)))
    with pytest.raises(ge.GraphEngineError, match="not one"):
        model.backward(wrt=["W"])


def test_shared_parameters_between_models():
    g, x, y, logits, loss = mlp()
    trained = g.compile(loss)
    score = logits[:, 0].sum()
    probe = g.compile(score, outputs=[logits], parameters=trained.parameters())
    assert probe.parameters()["fc1/W"] is trained.parameters()["fc1/W"]


def test_frozen_parameters_get_no_gradient_and_no_update():
    g, *_, loss = mlp()
    model = g.compile(loss, optimizer="sgd")
    model.freeze("fc1")
    before = model.parameters()["fc1/W"].copy()
    model.train_step({"x": np.ones((2, 4), np.float32), "y": np.array([0, 1])})
    assert "fc1/W" not in model.gradients()
    np.testing.assert_array_equal(model.parameters()["fc1/W"], before)
    assert "out/W" in model.gradients()


def test_predict_returns_probabilities_through_the_loss_link():
    g, *_, loss = mlp()
    model = g.compile(loss)
    probs = model.predict({"x": np.random.default_rng(0).standard_normal((5, 4))}, batch_size=2)
    assert probs.shape == (5, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-5)


def test_sgd_update_matches_formula():
    g, *_, loss = mlp()
    model = g.compile(loss, optimizer=ge.optimizer("sgd", lr=0.5))
    feeds = {"x": np.ones((2, 4), np.float32), "y": np.array([0, 1])}
    before = {k: v.copy() for k, v in model.parameters().items()}
    model.forward(feeds)
    model.backward()
    grads = {k: v.copy() for k, v in model.gradients().items()}
    model.step()
    for k, p in model.parameters().items():
        np.testing.assert_allclose(p, before[k] - 0.5 * grads[k], rtol=1e-6)


# ------------------------------------------------------------------ freezing

def ten_layers():
    """Layers fc1 ... fc10 in a chain: 'fc1' is a prefix of 'fc10' but not its layer."""
    g = ge.Graph("deep")
    h = x = g.input("x", (None, 2))
    for i in range(1, 11):
        h = g.layer("dense", h, units=2, name=f"fc{i}")
    return g.compile(((h - x) ** 2).mean(), outputs=[h], optimizer="sgd")


def test_freeze_and_unfreeze_match_a_layer_not_a_name_prefix():
    model = ten_layers()
    assert model.freeze("fc1") == ["fc1/W", "fc1/b"]
    model.freeze("fc10/")
    assert model.unfreeze("fc1") == ["fc1/W", "fc1/b"]
    assert model.frozen == {"fc10/W", "fc10/b"}
    assert "fc1/W" in model.trainable_parameters() and "fc10/W" not in model.trainable_parameters()
    assert model.unfreeze("fc10/W") == ["fc10/W"]
    assert model.frozen == {"fc10/b"}


def test_freeze_and_unfreeze_refuse_patterns_that_match_no_parameter():
    model = ten_layers()
    model.freeze("fc2")
    for change, pattern in ((model.freeze, "fc11"), (model.unfreeze, "fc21")):
        with pytest.raises(ge.GraphEngineError, match=rf"no parameter matches \('{pattern}',\)"):
            change(pattern)
    assert model.frozen == {"fc2/W", "fc2/b"}


def test_a_freeze_that_leaves_nothing_to_train_changes_nothing():
    model = ten_layers()
    model.freeze("fc1")
    plan = model.train_plan
    with pytest.raises(ge.CompileError, match="no trainable parameter"):
        model.freeze(*(f"fc{i}" for i in range(2, 11)))
    assert model.frozen == {"fc1/W", "fc1/b"}
    assert model.train_plan is plan
    feeds = {"x": np.ones((3, 2), np.float32)}
    before = model.parameters()["fc2/W"].copy()
    model.train_step(feeds)
    assert set(model.gradients()) == {f"fc{i}/{p}" for i in range(2, 11) for p in "Wb"}
    assert not np.array_equal(model.parameters()["fc2/W"], before)


def test_a_model_without_a_loss_records_what_is_frozen():
    g, x, *_ = mlp()
    model = g.compile(outputs=[g["out/add"]])
    assert model.freeze("out") == ["out/W", "out/b"]
    assert model.train_plan is None
    assert model.unfreeze("out") == ["out/W", "out/b"]
    assert model.frozen == set()


# ------------------------------------------------------------------ bad builder arguments

def snapshot(g):
    return list(g.nodes), sorted(g.dag.edges), len(g.calls)


def other_graphs_tensor():
    return ge.Graph("other").input("x", (None, 3))


BUILDERS = {
    "activation": lambda g, x, bad: g.activation("relu", bad),
    "loss_prediction": lambda g, x, bad: g.loss("mse", bad, x),
    "loss_target": lambda g, x, bad: g.loss("mse", x, bad),
    "layer": lambda g, x, bad: g.layer("dense", bad, units=2),
    "layer_second_input": lambda g, x, bad: g.layer("dense", x, bad, units=2),
    "op": lambda g, x, bad: g.op("exp", bad),
    "concat": lambda g, x, bad: ge.concat([x, bad], axis=1),
}
NOT_TENSORS = {"array": (np.zeros((2, 3)), "a numpy.ndarray of shape (2, 3)"),
               "string": ("x", "a str 'x' (the node of that name is g['x'])"),
               "unknown_string": ("h", "a str 'h', not"), "none": (None, "a NoneType, not"),
               "other_graph": (other_graphs_tensor, "tensor 'x', which belongs to graph 'other'")}


@pytest.mark.parametrize("build", BUILDERS.values(), ids=BUILDERS.keys())
@pytest.mark.parametrize("bad", NOT_TENSORS.values(), ids=NOT_TENSORS.keys())
def test_builders_refuse_what_is_not_a_tensor_of_their_graph(build, bad):
    g = ge.Graph("g")
    x = g.input("x", (None, 3))
    value, described = bad
    before = snapshot(g)
    with pytest.raises(ge.GraphBuildError, match="not a tensor of graph 'g'") as info:
        build(g, x, value() if callable(value) else value)
    assert described in str(info.value)
    assert "g.constant(" in str(info.value)
    assert snapshot(g) == before


def test_an_unknown_dtype_is_a_build_error_listing_the_dtypes():
    g = ge.Graph()
    for bad in ("bogus", "complex64", object()):
        with pytest.raises(ge.GraphBuildError, match="unsupported dtype .*; use one of float16"):
            g.input("x", (None, 3), dtype=bad)
    assert not g.nodes


@pytest.mark.parametrize("init, message", [
    ({"std": 1}, r"init \{'std': 1\} names no initializer: add its \"name\""),
    (3, "init must be an initializer name"),
    ({"name": "normal", "sdt": 1}, r"initializer 'normal' from plugin 'initializers'.* rejected its "
                                   r"arguments \{'sdt': 1\}: .*unexpected keyword argument 'sdt'"),
])
def test_a_bad_init_is_a_build_error(init, message):
    g = ge.Graph()
    with pytest.raises(ge.GraphBuildError, match=message):
        g.parameter("W", (3, 2), init=init)
    assert not g.nodes
    assert g.parameter("W", (3, 2), init={"name": "normal", "std": 1}).shape == (3, 2)


@pytest.mark.parametrize("backend", [3, None, ge.Backend], ids=["int", "none", "class"])
def test_a_backend_that_is_no_name_is_a_backend_error(backend):
    g, *_, loss = mlp()
    with pytest.raises(ge.BackendError, match="backend must be a registered backend name") as info:
        g.compile(loss, backend=backend)
    assert "'numpy'" in str(info.value)
