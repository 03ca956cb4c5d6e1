"""The execution optimizations change no number: fused dense steps, flat parameter updates and
the profile mode, on every backend. (Speed is measured by benchmarks/run.py, never asserted.)"""

from __future__ import annotations

import numpy as np
import pytest

import graphengine as ge
from graphengine.compiler.fusion import FusedDense, fusible_activation
from graphengine.ir.contracts import ActivationOp
from graphengine.testing import check_backward


def activation_op(kind: str) -> ActivationOp:
    return ActivationOp(kind, ge.get_plugin_manager().activations.get(kind)())


#: Every registered activation a dense chain takes into one FusedDense step.
FUSIBLE_ACTIVATIONS = [e.name for e in ge.get_plugin_manager().activations.entries()
                       if fusible_activation(activation_op(e.name))]
#: Every registered optimizer the flat path updates with one call per parameter group.
ELEMENTWISE_OPTIMIZERS = [e.name for e in ge.get_plugin_manager().optimizers.entries()
                          if e.obj.elementwise]


class Watcher(ge.Observer):
    """An observer that watches every step node by node: the model then runs one step per graph
    node and updates parameters one by one, the reference the fast paths must match."""

    every_node = True


def mlp(activation="sigmoid", optimizer=("adam", {"lr": 0.01}), backend="numpy", depth=3,
        dtype="float32"):
    g = ge.Graph("mlp")
    x = g.input("x", (None, 6), dtype=dtype)
    y = g.input("y", (None,), dtype="int64")
    h = x
    for i in range(depth):
        h = g.activation(activation, g.layer("dense", h, units=5, name=f"fc{i}"))
    logits = g.layer("dense", h, units=3, name="out")
    loss = g.loss("softmax_cross_entropy", logits, y)
    name, hyper = optimizer
    return g.compile(loss, optimizer=ge.optimizer(name, **hyper), backend=backend, seed=3)


def feeds(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, 6)).astype(np.float32), "y": rng.integers(0, 3, n)}


def host(model, arrays):
    return {k: model.backend.to_numpy(v).copy() for k, v in arrays.items()}


def test_dense_chains_fuse_and_the_graph_keeps_its_nodes():
    model = mlp()
    plan = model.train_plan
    fused = [s for s in plan.fast.steps if isinstance(s.op, FusedDense)]
    assert [s.op.nodes for s in fused][0] == ("fc0/matmul", "fc0/add", "sigmoid_0")
    assert len(fused) == 4 and len(plan.fast.steps) == 5 and len(plan.steps) == 12
    assert "fc0/matmul" in model.graph.nodes and any(s.name == "fc0/matmul" for s in plan.steps)
    # backward: the activation's step, then the dense part's, which skips the first layer's
    # gradient with respect to the input (nobody needs it)
    parts = [b.step for b in plan.fast.backward]
    assert [p.name for p in parts[-2:]] == ["sigmoid_0", "fc0/add"]
    assert plan.fast.backward[-1].wanted == (False, True, True)
    assert plan.fast.backward[-3].wanted == (True, True, True)
    model.forward(feeds())
    assert model.tape.fused  # what normally runs is the fused plan
    model.backward()


def test_an_input_gradient_is_computed_only_where_the_plan_wants_it():
    g = ge.Graph("conv")
    x = g.input("x", (None, 1, 6, 6))
    y = g.input("y", (None,), dtype="int64")
    h = g.activation("relu", g.layer("conv2d", x, filters=2, kernel_size=3, name="conv"))
    loss = g.loss("softmax_cross_entropy", g.layer("dense", g.layer("flatten", h), units=3), y)
    model = g.compile(loss, optimizer=ge.optimizer("sgd", lr=0.1))
    conv = g.nodes["conv/conv2d"].op
    seen = []
    original = conv.backward

    def backward(ctx, xp, inputs, output, grad):
        grads = original(ctx, xp, inputs, output, grad)
        seen.append(grads[0] is None)
        return grads
    conv.backward = backward
    images = {"x": np.random.default_rng(0).standard_normal((4, 1, 6, 6)).astype(np.float32),
              "y": np.arange(4) % 3}
    model.forward(images)
    model.backward()
    assert seen == [True] and "x" not in model.gradients()
    model.forward(images)
    model.backward(wrt=["x"])
    assert seen == [True, False] and model.input_gradient("x").shape == (4, 1, 6, 6)


def test_a_fetched_intermediate_is_not_fused_away():
    model = mlp()
    out = model.run(feeds(), fetches=["fc0/add", "out/add"])
    reference = mlp()
    reference.observers.append(Watcher())
    expected = reference.run(feeds(), fetches=["fc0/add", "out/add"])
    for name in out:
        np.testing.assert_allclose(out[name], expected[name], rtol=1e-6)


def test_the_registry_derived_lists_hold_the_built_ins():
    assert {"identity", "relu", "sigmoid", "tanh", "softmax"} <= set(FUSIBLE_ACTIVATIONS)
    assert "leaky_relu" not in FUSIBLE_ACTIVATIONS  # its backward reads the pre-activation
    assert {"sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam"} <= set(ELEMENTWISE_OPTIMIZERS)


def count_update_calls(model) -> list[tuple[int, ...]]:
    """Record the shape of the parameter array of every optimizer update call on ``model``."""
    shapes = []
    update = model.optimizer.update

    def counting(xp, param, grad, state, step):
        shapes.append(tuple(param.shape))
        update(xp, param, grad, state, step)

    model.optimizer.update = counting
    return shapes


@pytest.mark.parametrize("activation", ["sigmoid", "relu", "tanh", "leaky_relu"])
@pytest.mark.parametrize("optimizer", ELEMENTWISE_OPTIMIZERS)
def test_fast_training_matches_the_node_by_node_reference(backend, activation, optimizer):
    # lr 0.05: steps large enough that a wrong update would show in every optimizer
    fast, slow = (mlp(activation, (optimizer, {"lr": 0.05}), backend) for _ in range(2))
    slow.observers.append(Watcher())
    fast_updates = count_update_calls(fast)
    data = feeds()
    for _ in range(4):
        assert fast.train_step(data) == pytest.approx(slow.train_step(data), rel=1e-6)
    # the fast model really took the flat path: one call per step over all parameters at once
    total = sum(int(np.prod(p.shape)) for p in fast.parameters().values())
    assert fast_updates == [(total,)] * 4
    got, want = host(fast, fast.parameters()), host(slow, slow.parameters())
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-7)
    for name, state in slow.optimizer_state.items():
        for key, value in state.items():
            other = fast.optimizer_state[name][key]
            if hasattr(value, "shape"):
                np.testing.assert_allclose(fast.backend.to_numpy(other), slow.backend.to_numpy(value),
                                           rtol=1e-5, atol=1e-8)
            else:
                assert other == value


def test_observed_and_fast_steps_interleave_without_losing_optimizer_state():
    mixed, reference = mlp(), mlp()
    reference.observers.append(Watcher())
    watcher, data = Watcher(), feeds()
    for i in range(6):
        if i % 3 == 1:
            mixed.observers.append(watcher)
        mixed.train_step(data)
        reference.train_step(data)
        if watcher in mixed.observers:
            mixed.observers.remove(watcher)
    got, want = host(mixed, mixed.parameters()), host(reference, reference.parameters())
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-7)


def test_parameters_are_views_updated_in_place_and_state_is_per_parameter():
    model = mlp()
    weight = model.parameters()["fc0/W"]
    before = weight.copy()
    model.train_step(feeds())
    assert not np.array_equal(weight, before)  # the caller's array is the model's
    state = model.optimizer_state["fc0/W"]
    assert state["m"].shape == weight.shape and state["t"] == 1


def small_cnn(backend: str) -> tuple[ge.Model, dict[str, np.ndarray]]:
    g = ge.Graph("cnn")
    x = g.input("x", (None, 1, 6, 6))
    y = g.input("y", (None,), dtype="int64")
    h = g.activation("relu", g.layer("conv2d", x, filters=3, kernel_size=3, padding=1, name="conv1"))
    h = g.layer("max_pool2d", h, kernel_size=2)
    h = g.activation("relu", g.layer("conv2d", h, filters=4, kernel_size=3, stride=2, name="conv2"))
    h = g.layer("avg_pool2d", h, kernel_size=1)
    logits = g.layer("dense", g.layer("flatten", h), units=3, name="out")
    model = g.compile(g.loss("softmax_cross_entropy", logits, y), optimizer=ge.optimizer("adam"),
                      backend=backend, seed=3)
    rng = np.random.default_rng(0)
    return model, {"x": rng.standard_normal((4, 1, 6, 6)).astype(np.float32), "y": rng.integers(0, 3, 4)}


def small_lstm(backend: str) -> tuple[ge.Model, dict[str, np.ndarray]]:
    g = ge.Graph("lstm")
    x = g.input("x", (None, 5, 3))
    y = g.input("y", (None,), dtype="int64")
    h = g.layer("lstm", x, units=4, return_sequences=True, name="lstm_1")
    h = g.layer("lstm", h, units=4, name="lstm_2")
    logits = g.layer("dense", h, units=3, name="out")
    model = g.compile(g.loss("softmax_cross_entropy", logits, y), optimizer=ge.optimizer("adam"),
                      backend=backend, seed=3)
    rng = np.random.default_rng(0)
    return model, {"x": rng.standard_normal((4, 5, 3)).astype(np.float32), "y": rng.integers(0, 3, 4)}


def small_mlp(backend: str) -> tuple[ge.Model, dict[str, np.ndarray]]:
    return mlp(backend=backend), feeds()


class DtypeRecorder(Watcher):
    """Collects the dtype of every forward value, gradient and updated parameter, by node."""

    def __init__(self) -> None:
        self.dtypes: dict[str, set[np.dtype]] = {}

    def _add(self, what: str, array) -> None:
        if array is not None:
            self.dtypes.setdefault(what, set()).add(np.dtype(array.dtype))

    def on_forward(self, model, tape, step, args, value):
        self._add(f"value of {step.name}", value)

    def on_backward(self, model, tape, bstep, grad, input_grads):
        step = bstep.step
        self._add(f"gradient into {step.name}", grad)
        for i, g in enumerate(input_grads):
            self._add(f"gradient {i} out of {step.name}", g)

    def on_update(self, model, name, before, after):
        self._add(f"updated {name}", after)


@pytest.mark.parametrize("network", [small_mlp, small_cnn, small_lstm], ids=["mlp", "cnn", "lstm"])
def test_float32_stays_float32_end_to_end(backend, network):
    model, data = network(backend)
    recorder = DtypeRecorder()
    model.observers.append(recorder)
    model.train_step(data)  # node by node: every value and gradient passes the recorder
    model.observers.remove(recorder)
    model.train_step(data)  # the fast path: fused steps, flat update
    arrays = {**{f"parameter {n}": a for n, a in model.parameters().items()},
              **{f"gradient of {n}": a for n, a in model.gradients().items()},
              **{f"{key} of {n}": a for n, state in model.optimizer_state.items()
                 for key, a in state.items() if hasattr(a, "dtype")}}
    assert any(name.startswith("value of") for name in recorder.dtypes)
    assert any(name.startswith("m of") for name in arrays)  # Adam's moments are checked too
    dtypes = {**recorder.dtypes, **{name: {np.dtype(a.dtype)} for name, a in arrays.items()}}
    upcast = {name: found for name, found in dtypes.items() if found != {np.dtype("float32")}}
    assert upcast == {}  # no accidental upcast anywhere


def test_replacing_optimizer_state_is_picked_up():
    model, reference = mlp(), mlp()
    reference.observers.append(Watcher())
    data = feeds()
    model.train_step(data)
    reference.train_step(data)
    # as a checkpoint load does: fresh per-parameter arrays
    model.optimizer_state = {name: {k: (v.copy() if hasattr(v, "copy") else v) for k, v in s.items()}
                             for name, s in reference.optimizer_state.items()}
    for _ in range(2):
        model.train_step(data)
        reference.train_step(data)
    for name, value in host(reference, reference.parameters()).items():
        np.testing.assert_allclose(model.parameters()[name], value, rtol=1e-5, atol=1e-7)


def test_frozen_layers_and_input_gradients_still_work():
    model, reference = mlp(), mlp()
    reference.observers.append(Watcher())
    for m in (model, reference):
        m.freeze("fc1")
    data = feeds()
    frozen = model.parameters()["fc1/W"].copy()
    for _ in range(2):
        model.train_step(data)
        reference.train_step(data)
    np.testing.assert_array_equal(model.parameters()["fc1/W"], frozen)
    np.testing.assert_allclose(model.parameters()["fc0/W"], reference.parameters()["fc0/W"], rtol=1e-5)
    for m in (model, reference):
        m.forward(data)
        m.backward(wrt=["x"])
    np.testing.assert_allclose(model.input_gradient("x"), reference.input_gradient("x"), rtol=1e-5)


@pytest.mark.parametrize("activation", [*FUSIBLE_ACTIVATIONS, None])
def test_fused_dense_backward_passes_the_gradient_check(backend, activation):
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((4, 3)), rng.standard_normal((3, 2)), rng.standard_normal(2)]
    op = None if activation is None else activation_op(activation)
    nodes = ("m", "a") if activation is None else ("m", "a", activation)
    check_backward(lambda: FusedDense(nodes, op), inputs, backend=backend)


def test_profile_reports_every_step_with_time_and_memory():
    model = mlp(depth=2)
    report = model.profile(feeds(32), steps=3, update=True)
    names = [row.name for row in report.rows]
    assert names[0] == "fc0/matmul+add+sigmoid_0" and "softmax_cross_entropy" in names[-1]
    assert all(row.forward_ms > 0 for row in report.rows)
    assert all(row.backward_ms > 0 for row in report.rows)
    first = report.rows[0]
    assert first.shape == (32, 5) and first.output_bytes == 32 * 5 * 4
    assert first.forward_bytes >= first.output_bytes  # what the step allocated, at its peak
    assert report.update_ms > 0 and report.engine_ms > 0
    assert report.total_ms > sum(r.total_ms for r in report.rows)
    table = str(report)
    assert "fc0/matmul+add+sigmoid_0" in table and "optimizer update" in table
    per_node = ge.profile(model, feeds(32), steps=2, fused=False, memory=False)
    assert "fc0/matmul" in [row.name for row in per_node.rows]
    assert per_node.update_ms == 0.0


def test_profile_runs_the_operators_as_the_model_does_skipping_unused_input_gradients():
    model = mlp(depth=2)
    first_dense = model.train_plan.fast.backward[-1].step.op
    told = []
    original = first_dense.backward

    def backward(ctx, xp, inputs, output, grad):
        told.append(tuple(map(ctx.grad_wanted, range(3))))
        return original(ctx, xp, inputs, output, grad)
    first_dense.backward = backward
    model.profile(feeds(8), steps=1, memory=False)
    assert told and set(told) == {(False, True, True)}


def test_profile_of_a_model_without_loss_is_refused():
    g = ge.Graph()
    x = g.input("x", (None, 2))
    model = g.compile(outputs=[g.layer("dense", x, units=2)])
    with pytest.raises(ge.GraphEngineError, match="loss"):
        model.profile({"x": np.ones((1, 2), np.float32)})


def test_run_state_lives_on_the_tape_and_is_dropped_with_it():
    g = ge.Graph("conv")
    x = g.input("x", (None, 1, 6, 6))
    y = g.input("y", (None,), dtype="int64")
    h = g.layer("max_pool2d", g.layer("conv2d", x, filters=2, kernel_size=3, name="conv"), kernel_size=2)
    loss = g.loss("softmax_cross_entropy", g.layer("dense", g.layer("flatten", h), units=3), y)
    model = g.compile(loss, optimizer=ge.optimizer("sgd", lr=0.1))
    conv = g.nodes["conv/conv2d"].op
    images = {"x": np.random.default_rng(1).standard_normal((4, 1, 6, 6)).astype(np.float32),
              "y": np.arange(4) % 3}
    before = dict(vars(conv))
    model.forward(images)
    assert vars(conv) == before  # the operator keeps nothing of the run
    index = [s.name for s in model.tape.plan.steps].index("conv/conv2d")
    assert model.tape.contexts[index].kernel is not None  # the tape keeps it for the backward
    model.backward()
    assert model.tape.contexts == []  # released with the backward
    reference = {k: v.copy() for k, v in model.gradients().items()}
    model.forward(images)
    model.predict(images)  # an inference pass between a forward and its backward: its own tape
    model.run(images)
    model.backward()
    for name, grad in model.gradients().items():
        np.testing.assert_array_equal(grad, reference[name])
    assert set(model.gradients()) == {"conv/W", "conv/b", "dense_0/W", "dense_0/b"}
