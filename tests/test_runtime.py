"""One graph serves many runs: run state lives on each run's tape, never on the operators.

Every registered layer, activation and loss kind is checked (the loops read the registry, so a
new plugin is covered as it arrives): runs between a forward and its backward change nothing,
two models over one graph do not disturb each other, threads predict correctly, and the errors
of a misused tape are clear.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable

import numpy as np
import pytest

import graphengine as ge

MANAGER = ge.get_plugin_manager()


def canonical(registry) -> list[str]:
    """The registered names, aliases left out."""
    return sorted({registry.entry(name).name for name in registry.names()})


def seq(g, n_features=4):
    return g.input("x", (None, 5, n_features))


def image(g):
    return g.input("x", (None, 2, 6, 6))


def flat(g):
    return g.input("x", (None, 4))


def ids(g):
    return g.input("x", (None, 5), dtype="int64")


#: How to build each registered layer kind on a suitable input. A layer kind missing here that
#: cannot be built on a (None, 4) input with no arguments fails the test: add its case.
LAYER_CASES: dict[str, Callable] = {
    "dense": lambda g: g.layer("dense", flat(g), units=3),
    "flatten": lambda g: g.layer("dense", g.layer("flatten", image(g)), units=2),
    "add": lambda g: (lambda x: g.layer("add", x, g.layer("dense", x, units=4)))(flat(g)),
    "prelu": lambda g: g.layer("prelu", flat(g)),
    "maxout": lambda g: g.layer("maxout", flat(g), units=3, pieces=2),
    "conv2d": lambda g: g.layer("conv2d", image(g), filters=3, kernel_size=3, padding=1),
    "conv1d": lambda g: g.layer("conv1d", seq(g), filters=3, kernel_size=3, padding=1),
    "conv_transpose2d": lambda g: g.layer("conv_transpose2d", image(g), filters=3, kernel_size=3, stride=2,
                                          padding=1, output_padding=1),
    "global_avg_pool2d": lambda g: g.layer("global_avg_pool2d",
                                           g.layer("conv2d", image(g), filters=2, kernel_size=1)),
    "max_pool2d": lambda g: g.layer("max_pool2d", g.layer("conv2d", image(g), filters=2, kernel_size=1),
                                    kernel_size=2),
    "avg_pool2d": lambda g: g.layer("avg_pool2d", g.layer("conv2d", image(g), filters=2, kernel_size=1),
                                    kernel_size=2),
    "embedding": lambda g: g.layer("embedding", ids(g), vocab_size=7, dim=3),
    "one_hot": lambda g: g.layer("dense", g.layer("one_hot", ids(g), depth=7), units=2),
    "dropout": lambda g: g.layer("dropout", g.layer("dense", flat(g), units=6), rate=0.5),
    "batch_norm": lambda g: g.layer("batch_norm", g.layer("dense", flat(g), units=3)),
    "rnn": lambda g: g.layer("rnn", seq(g), units=3, return_sequences=True),
    "lstm": lambda g: g.layer("lstm", seq(g), units=3),
    "gru": lambda g: g.layer("gru", seq(g), units=3, return_sequences=True),
    "bidirectional": lambda g: g.layer("bidirectional", seq(g), layer="lstm", units=3),
    "attention": lambda g: (lambda x: g.layer("attention", g.layer("dense", x, units=4), x, x, g.input(
        "mask", (None, 1, 5), dtype="bool")))(seq(g)),
    "multi_head_attention": lambda g: (lambda x: g.layer("multi_head_attention", x, x, heads=2, units=4,
                                                         causal=True))(seq(g)),
    "layer_norm": lambda g: g.layer("layer_norm", seq(g)),
    "mean_subtraction": lambda g: g.layer("dense", g.layer("mean_subtraction", flat(g)), units=2),
    "minmax": lambda g: g.layer("dense", g.layer("minmax", flat(g)), units=2),
    "zscore": lambda g: g.layer("dense", g.layer("zscore", flat(g)), units=2),
    "pca": lambda g: g.layer("dense", g.layer("pca", flat(g), components=2), units=2),
    # an imported ONNX node (graphengine.onnx): the ONNX operator and its attributes
    "onnx_node": lambda g: g.layer("onnx_node", g.layer("dense", flat(g), units=3), op_type="LeakyRelu",
                                   attributes={"alpha": 0.2}),
}


def feeds_for(g: ge.Graph, batch: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name in g.inputs():
        spec = g.nodes[name].spec
        shape = tuple(batch if d is None else d for d in spec.shape)
        if spec.dtype.startswith("int"):
            out[name] = rng.integers(0, 3, shape).astype(spec.dtype)
        else:
            out[name] = rng.uniform(0.05, 0.95, shape).astype(spec.dtype)
    return out


def layer_graph(kind: str) -> tuple[ge.Graph, ge.Tensor]:
    g = ge.Graph(f"layer_{kind}")
    if kind in LAYER_CASES:
        h = LAYER_CASES[kind](g)
    else:
        h = g.layer(kind, flat(g))  # a plugin's layer: add a case above if it needs more
    return g, (h * h).mean(), h


def activation_graph(kind: str) -> tuple[ge.Graph, ge.Tensor]:
    g = ge.Graph(f"activation_{kind}")
    h = g.activation(kind, g.layer("dense", flat(g), units=4))
    out = g.layer("dense", h, units=2)
    return g, (out * out).mean(), out


def loss_graph(kind: str) -> tuple[ge.Graph, ge.Tensor]:
    g = ge.Graph(f"loss_{kind}")
    if kind == "ctc":  # scores per frame and label sequences; feeds_for's labels 0..2 leave 3 blank
        frames = g.layer("dense", seq(g), units=4)
        return g, g.loss(kind, frames, g.input("y", (None, 2), dtype="int64"), blank=3), frames
    logits = g.layer("dense", flat(g), units=3)
    if MANAGER.losses.get(kind).target_kind == "int":
        y = g.input("y", (None,), dtype="int64")
    else:
        y = g.input("y", (None, 3))
    pred = g.activation("log_softmax", logits) if kind == "nll" else logits
    return g, g.loss(kind, pred, y), pred


CASES = ([("layer", k) for k in canonical(MANAGER.layers)]
         + [("activation", k) for k in canonical(MANAGER.activations)]
         + [("loss", k) for k in canonical(MANAGER.losses)])
BUILDERS = {"layer": layer_graph, "activation": activation_graph, "loss": loss_graph}


def host_grads(model: ge.Model) -> dict[str, np.ndarray]:
    return {name: np.array(model.backend.to_numpy(g)) for name, g in model.gradients().items()}


@pytest.mark.parametrize("what,kind", CASES, ids=[f"{w}-{k}" for w, k in CASES])
def test_runs_between_a_forward_and_its_backward_change_nothing(what, kind):
    g, loss, out = BUILDERS[what](kind)
    a, b = feeds_for(g, 4, seed=1), feeds_for(g, 6, seed=2)  # B has another batch size too
    disturbed = g.compile(loss, outputs=[out], optimizer="sgd", seed=3)
    alone = g.compile(loss, outputs=[out], optimizer="sgd", seed=3)
    loss_a = disturbed.forward(a)
    disturbed.run(b)
    disturbed.run(b, training=True)
    disturbed.predict(b)
    disturbed.evaluate(b)
    disturbed.backward()
    assert alone.forward(a) == loss_a
    alone.backward()
    got, expected = host_grads(disturbed), host_grads(alone)
    assert got.keys() == expected.keys() and expected
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def stochastic_graph() -> tuple[ge.Graph, ge.Tensor]:
    g = ge.Graph("two_models")
    x = g.input("x", (None, 6))
    y = g.input("y", (None,), dtype="int64")
    h = g.layer("batch_norm", g.layer("dense", x, units=8, name="fc1"), name="bn")
    h = g.layer("dropout", g.activation("relu", h), rate=0.3, name="drop")
    return g, g.loss("softmax_cross_entropy", g.layer("dense", h, units=3, name="out"), y)


def digits_like(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 6)).astype(np.float32)
    return {"x": x, "y": (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 1)}


def snapshot(model):
    return {k: np.array(v) for k, v in model.parameters().items()}


@pytest.mark.parametrize("other_mode", ["train", "eval"])
def test_two_models_over_one_graph_do_not_disturb_each_other(other_mode):
    data = digits_like()
    g, loss = stochastic_graph()
    reference = g.compile(loss, optimizer=ge.optimizer("adam", lr=0.01), seed=1)
    reference.fit(data, epochs=2, batch_size=16)
    a = g.compile(loss, optimizer=ge.optimizer("adam", lr=0.01), seed=1)
    b = g.compile(loss, optimizer=ge.optimizer("adam", lr=0.01), seed=2)
    getattr(b, other_mode)()
    b_before = snapshot(b)
    for _epoch in range(2):
        order = a.data_rng.permutation(64)
        for start in range(0, 64, 16):
            rows = order[start:start + 16]
            b.predict(data)  # the other model runs between every step of a
            b.run(data)
            a.forward({k: v[rows] for k, v in data.items()}, training=True)
            a.backward()
            a.step()
        a.epoch += 1
    for name, value in snapshot(reference).items():
        np.testing.assert_allclose(a.parameters()[name], value, rtol=1e-6, atol=1e-7, err_msg=name)
    assert b.training == (other_mode == "train")
    for name, value in b_before.items():  # running statistics included
        np.testing.assert_array_equal(b.parameters()[name], value, err_msg=name)


def cnn_model():
    g = ge.Graph("cnn_threads")
    x = g.input("x", (None, 1, 8, 8))
    y = g.input("y", (None,), dtype="int64")
    h = g.activation("relu", g.layer("conv2d", x, filters=4, kernel_size=3, padding=1))
    h = g.layer("batch_norm", g.layer("max_pool2d", h, kernel_size=2), axis=1)
    h = g.layer("dropout", g.layer("flatten", h), rate=0.5)
    return g.compile(g.loss("softmax_cross_entropy", g.layer("dense", h, units=3), y),
                     optimizer="sgd")


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_threads_predicting_at_once_get_the_single_thread_answers(mode):
    model = cnn_model()
    getattr(model, mode)()
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((n, 1, 8, 8)).astype(np.float32) for n in (3, 5, 7, 9)]
    expected = [model.predict({"x": b}) for b in batches]
    before = snapshot(model)
    failures: list[str] = []

    def work(k: int) -> None:
        for _ in range(15):
            for i in (k, (k + 1) % 4):
                got = model.predict({"x": batches[i]})
                if not np.array_equal(got, expected[i]):
                    failures.append(f"thread {k}, batch {i}")

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not failures
    assert model.training == (mode == "train")
    for name, value in before.items():
        np.testing.assert_array_equal(model.parameters()[name], value, err_msg=name)


def small_model():
    g = ge.Graph("small")
    x = g.input("x", (None, 3))
    y = g.input("y", (None,), dtype="int64")
    return g.compile(g.loss("softmax_cross_entropy", g.layer("dense", x, units=2, name="fc"), y),
                     optimizer="sgd")


FEEDS = {"x": np.ones((2, 3), np.float32), "y": np.array([0, 1])}


def test_a_second_backward_says_the_tape_was_consumed():
    model = small_model()
    model.forward(FEEDS)
    model.backward()
    with pytest.raises(ge.GraphEngineError, match=r"already consumed the tape .* call forward\(\) "
                                                  r"again") as info:
        model.backward()
    assert "bug" not in str(info.value)


def test_backward_after_a_parameter_changed_is_refused():
    model = small_model()
    model.forward(FEEDS)
    model.set_parameters({"fc/b": np.ones(2)})
    with pytest.raises(ge.GraphEngineError, match=r"\['fc/b'\] changed between forward\(\) and "
                                                  r"backward\(\)"):
        model.backward()
    model.forward(FEEDS)
    model.backward()
    model.step()
    model.forward(FEEDS)
    model.backward()  # a step after a backward is the normal order


def test_an_in_place_change_between_forward_and_backward_is_caught_in_debug_mode():
    model = small_model()
    model.debug = True
    model.forward(FEEDS)
    model.parameters()["fc/W"][0, 0] += 1.0  # behind the model's back
    with pytest.raises(ge.GraphEngineError, match=r"\['fc/W'\] were changed in place"):
        model.backward()


def test_step_without_gradients_is_an_error():
    with pytest.raises(ge.GraphEngineError, match=r"step\(\) needs gradients"):
        small_model().step()


def test_pow_zero_has_gradient_zero_everywhere():
    g = ge.Graph("pow0")
    x = g.input("x", (None, 3), dtype="float64")
    s = g.parameter("s", (1,), init="ones", dtype="float64")
    out = (x ** 0) * s
    model = g.compile(out.sum(), outputs=[out], optimizer="sgd")
    model.forward({"x": np.array([[0.0, 1.0, -2.0]])})
    model.backward(wrt=["x"])
    np.testing.assert_array_equal(model.input_gradient("x"), [[0.0, 0.0, 0.0]])


def test_batch_norm_gradients_are_those_of_the_forward_not_of_a_run_between():
    # The reproduction: run(B) used to overwrite the batch statistics of forward(A).
    g = ge.Graph("bn")
    x = g.input("x", (None, 4))
    h = g.layer("dense", g.layer("batch_norm", g.layer("dense", x, units=5, name="fc1")), units=1)
    loss = (h * h).mean()
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((8, 4)), 5 + 3 * rng.standard_normal((8, 4))
    m1, m2 = (g.compile(loss, outputs=[h], optimizer="sgd") for _ in range(2))
    m1.forward({"x": a})
    m1.run({"x": b})
    m1.backward()
    m2.forward({"x": a})
    m2.backward()
    np.testing.assert_array_equal(m1.gradients()["fc1/W"], m2.gradients()["fc1/W"])


def test_debug_mode_checks_the_fused_program_that_normally_runs():
    g = ge.Graph("fused_debug")
    x = g.input("x", (None, 3))
    y = g.input("y", (None,), dtype="int64")
    h = g.activation("relu", g.layer("dense", x, units=4, name="fc"))
    model = g.compile(g.loss("softmax_cross_entropy", g.layer("dense", h, units=2, name="out"), y),
                      optimizer="sgd")
    model.debug = True
    model.forward(FEEDS)
    assert model.tape.fused  # debug mode watches the program that runs, not another one
    model.backward()
    bad = dict(FEEDS, x=np.array([[np.nan, 0, 0], [0, 0, 0]], np.float32))
    with pytest.raises(ge.NumericalError, match=r"fed to input 'x' \(read by node 'fc/matmul'"):
        model.forward(bad)
