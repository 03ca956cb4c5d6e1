"""rnn, lstm, gru and bidirectional: gradients through time on every backend, forward values
against step-by-step reference formulas, stacking, initial states, build-time errors, clipping."""

from __future__ import annotations

import numpy as np
import pytest
from graphengine.plugins import recurrent
from graphengine.plugins.recurrent import GRU, LSTM, Orthogonal, SimpleRNN

import graphengine as ge
from graphengine.ir.operators import TensorSpec
from graphengine.testing import check_backward, make_context

rng = np.random.default_rng(11)
UNITS = 3


def r(*shape):
    return rng.standard_normal(shape)


def prepared(factory, inputs):
    def make():
        op = factory()
        op.infer(*[TensorSpec(a.shape, "float64") for a in inputs])
        return op
    return make


def op_inputs(cls, batch=2, steps=4, features=5, initial=False):
    width = cls.gates * UNITS
    inputs = [r(batch, steps, features), r(features, width) * 0.5, r(UNITS, width) * 0.5, r(width)]
    inputs += [r(UNITS) for _ in cls.extra_params]
    if initial:
        inputs += [r(batch, UNITS) for _ in cls.states]
    return inputs


CELLS = {"rnn": SimpleRNN, "lstm": LSTM, "gru": GRU}


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("return_sequences", [False, True], ids=["last", "sequence"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("steps,initial", [(4, False), (1, False), (3, True)],
                         ids=["4steps", "1step", "initial_state"])
def test_gradient_through_time(cell, return_sequences, reverse, steps, initial, backend):
    cls = CELLS[cell]
    inputs = op_inputs(cls, steps=steps, initial=initial)
    check_backward(prepared(lambda: cls(return_sequences, reverse), inputs), inputs, backend=backend)


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_gradients_summed_over_chunks_of_steps(cell, reverse, monkeypatch):
    """The weight and input gradients sum over chunks of steps: 5 steps in chunks of 2, the
    last one short, give what one chunk gives."""
    cls = CELLS[cell]
    inputs = op_inputs(cls, steps=5, initial=True)
    monkeypatch.setattr(recurrent, "CHUNK", 2 * cls.gates * UNITS * 2)  # batch 2: 2 steps a chunk
    check_backward(prepared(lambda: cls(True, reverse), inputs), inputs)


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_initial_states_get_no_gradient_unless_wanted(cell):
    """Without a wanted initial state, backward stops at the first step; the other gradients
    are the same as with it."""
    cls = CELLS[cell]
    inputs = op_inputs(cls, initial=True)
    op = prepared(lambda: cls(True), inputs)()
    grads = {}
    for wanted in (True, False):
        ctx = make_context()
        output = op.forward(ctx, np, *inputs)
        ctx.wanted = (True,) * (len(inputs) - len(cls.states)) + (wanted,) * len(cls.states)
        grads[wanted] = op.backward(ctx, np, tuple(inputs), output, np.ones_like(output))
    assert all(g is None for g in grads[False][-len(cls.states):])
    assert all(g is not None for g in grads[True][-len(cls.states):])
    for with_states, without in zip(grads[True][:-len(cls.states)], grads[False][:-len(cls.states)]):
        np.testing.assert_allclose(with_states, without, atol=1e-12)


# --------------------------------------------------------------------------- reference formulas

def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def reference(cell, x, w, u, b, *rest):
    """The textbook recurrences, one time step at a time; returns (batch, time, units)."""
    units = u.shape[0]
    extras, initial = rest[:len(CELLS[cell].extra_params)], rest[len(CELLS[cell].extra_params):]
    h = initial[0] if initial else np.zeros((x.shape[0], units))
    c = initial[1] if len(initial) > 1 else np.zeros_like(h)
    outputs = []
    for t in range(x.shape[1]):
        xt = x[:, t]
        if cell == "rnn":
            h = np.tanh(xt @ w + h @ u + b)
        elif cell == "lstm":
            z = xt @ w + h @ u + b
            i, f, o = (sigmoid(z[:, k * units:(k + 1) * units]) for k in range(3))
            c = f * c + i * np.tanh(z[:, 3 * units:])
            h = o * np.tanh(c)
        else:
            xz, hz = xt @ w + b, h @ u
            reset = sigmoid(xz[:, :units] + hz[:, :units])
            update = sigmoid(xz[:, units:2 * units] + hz[:, units:2 * units])
            candidate = np.tanh(xz[:, 2 * units:] + reset * (hz[:, 2 * units:] + extras[0]))
            h = (1 - update) * candidate + update * h
        outputs.append(h)
    return np.stack(outputs, axis=1)


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("initial", [False, True])
def test_forward_matches_reference(cell, initial):
    inputs = op_inputs(CELLS[cell], steps=5, initial=initial)
    expected = reference(cell, *inputs)
    sequence = prepared(lambda: CELLS[cell](return_sequences=True), inputs)()
    np.testing.assert_allclose(sequence.forward(make_context(), np, *inputs), expected, atol=1e-12)
    last = prepared(lambda: CELLS[cell](return_sequences=False), inputs)()
    np.testing.assert_allclose(last.forward(make_context(), np, *inputs), expected[:, -1], atol=1e-12)


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_reverse_reads_the_sequence_backwards(cell):
    x, *params = op_inputs(CELLS[cell], steps=5)
    expected = reference(cell, x[:, ::-1], *params)[:, ::-1]  # output at t has seen t..T-1
    op = prepared(lambda: CELLS[cell](return_sequences=True, reverse=True), [x, *params])()
    np.testing.assert_allclose(op.forward(make_context(), np, x, *params), expected, atol=1e-12)


# --------------------------------------------------------------------------- layers

def sequence_graph(steps=6, features=3):
    g = ge.Graph()
    return g, g.input("x", (None, steps, features))


def test_layer_shapes_and_parameters():
    g, x = sequence_graph()
    assert g.layer("lstm", x, units=4, name="last").shape == (None, 4)
    assert g.layer("gru", x, units=4, return_sequences=True, name="seq").shape == (None, 6, 4)
    stacked = g.layer("rnn", x, units=5, num_layers=3, name="deep")
    assert stacked.shape == (None, 5)
    assert {n for n in g.parameters() if n.startswith("deep/")} == {
        f"deep/layer{i}/{p}" for i in range(3) for p in "WUb"}
    assert g.nodes["deep/layer1/W"].shape == (5, 5)  # layer 1 reads layer 0's sequence
    assert g.nodes["seq/bh"].shape == (4,)
    assert g.nodes["last/U"].shape == (4, 16)


def test_bidirectional_joins_both_directions():
    g, x = sequence_graph()
    tags = g.layer("bidirectional", x, layer="gru", units=4, return_sequences=True, name="bi")
    assert tags.shape == (None, 6, 8)
    summed = g.layer("bidirectional", x, layer="rnn", units=4, merge="sum", name="bisum")
    assert summed.shape == (None, 4)
    deep = g.layer("bidirectional", x, units=2, num_layers=2, name="deep")
    assert g.nodes["deep/layer1/forward/W"].shape == (4, 8)  # reads both directions of layer 0
    model = g.compile(outputs=[tags, g["bi/forward/gru"], g["bi/backward/gru"], summed, deep])
    out = model.run({"x": r(2, 6, 3).astype(np.float32)})
    forward, backward = out["bi/forward/gru"], out["bi/backward/gru"]
    np.testing.assert_array_equal(out[tags.name], np.concatenate([forward, backward], axis=-1))
    # the backward direction's step t has read t..T-1: its output at t=0 has seen everything
    assert not np.allclose(backward[:, 0], backward[:, -1])


def test_bidirectional_last_step_sees_both_ends():
    g, x = sequence_graph()
    both = g.layer("bidirectional", x, layer="lstm", units=4, name="bi")
    model = g.compile(outputs=[both])
    data = r(2, 6, 3).astype(np.float32)
    changed_first, changed_last = data.copy(), data.copy()
    changed_first[:, 0] += 1
    changed_last[:, -1] += 1
    base, first, last = (model.run({"x": d})[both.name] for d in (data, changed_first, changed_last))
    assert not np.allclose(base[:, :4], first[:, :4]) and not np.allclose(base[:, 4:], first[:, 4:])
    assert not np.allclose(base[:, :4], last[:, :4]) and not np.allclose(base[:, 4:], last[:, 4:])


def test_initial_state_is_an_input():
    g, x = sequence_graph()
    h0 = g.input("h0", (None, 4))
    c0 = g.input("c0", (None, 4))
    out = g.layer("lstm", x, h0, c0, units=4)
    model = g.compile(outputs=[out])
    data = r(2, 6, 3).astype(np.float32)
    zeros = np.zeros((2, 4), np.float32)
    default = g.compile(outputs=[g.layer("lstm", x, units=4, name="lstm0_again")],
                        parameters={f"lstm0_again/{p}": v for p, v in
                                    ((n.split("/")[1], v) for n, v in model.parameters().items())})
    np.testing.assert_allclose(model.run({"x": data, "h0": zeros, "c0": zeros})[out.name],
                               default.run({"x": data})["lstm0_again/lstm"], atol=1e-6)
    moved = model.run({"x": data, "h0": zeros + 1, "c0": zeros})[out.name]
    assert not np.allclose(moved, default.run({"x": data})["lstm0_again/lstm"])


@pytest.mark.parametrize("build,message", [
    (lambda g, x: g.layer("lstm", g.input("flat", (None, 5)), units=2), "batch, time, features"),
    (lambda g, x: g.layer("lstm", x, g.input("h0", (None, 2)), units=2), "initial h and c"),
    (lambda g, x: g.layer("gru", x, g.input("h0", (None, 3)), units=2), r"initial h must be \(batch, 2\)"),
    (lambda g, x: g.layer("rnn", x, g.input("h0", (None, 2)), units=2, num_layers=2), "num_layers=1"),
    (lambda g, x: g.layer("bidirectional", x, units=2, reverse=True), "sets reverse itself"),
    (lambda g, x: g.layer("bidirectional", x, units=2, merge="max"), "merge must be"),
    (lambda g, x: g.layer("rnn", x, units=0), "units must be a positive int"),
])
def test_build_time_errors(build, message):
    g, x = sequence_graph()
    with pytest.raises(ge.GraphBuildError, match=message):
        build(g, x)


def test_orthogonal_initializer_and_forget_bias():
    u = Orthogonal()(np.random.default_rng(0), (8, 32), 8, 32)
    np.testing.assert_allclose(u @ u.T, np.eye(8), atol=1e-12)
    g, x = sequence_graph()
    g.layer("lstm", x, units=4)
    model = g.compile(outputs=[g["lstm_0/lstm"]])
    np.testing.assert_array_equal(model.parameters()["lstm_0/b"], np.repeat([0, 1, 0, 0], 4))


# --------------------------------------------------------------------------- training

def test_gradient_clipping_bounds_an_exploding_rnn_update():
    g, x = sequence_graph(steps=30, features=2)
    y = g.input("y", (None, 1))
    h = g.layer("rnn", x, units=8, recurrent_init={"name": "orthogonal", "gain": 3.0})
    loss = g.loss("mse", g.layer("dense", h, units=1), y)
    data = {"x": r(16, 30, 2).astype(np.float32), "y": r(16, 1).astype(np.float32) * 10}
    lr, limit = 0.1, 1.0
    model = g.compile(loss, optimizer=ge.optimizer("sgd", lr=lr), clip_norm=limit)
    before = {n: v.copy() for n, v in model.parameters().items()}
    model.forward(data)
    model.backward()
    raw_norm = np.sqrt(sum(float((v ** 2).sum()) for v in model.gradients().values()))
    assert raw_norm > 10 * limit  # the gradient did explode
    model.step()
    step = np.sqrt(sum(float(((model.parameters()[n] - before[n]) ** 2).sum()) for n in before))
    np.testing.assert_allclose(step, lr * limit, rtol=1e-4)


def test_lstm_learns_to_recall_the_first_symbol(backend):
    steps, symbols = 8, 3
    gen = np.random.default_rng(0)
    ids = gen.integers(0, symbols, (256, steps))
    g = ge.Graph()
    seq = g.input("ids", (None, steps), dtype="int64")
    y = g.input("y", (None,), dtype="int64")
    h = g.layer("lstm", g.layer("one_hot", seq, depth=symbols), units=16)
    model = g.compile(g.loss("softmax_cross_entropy", g.layer("dense", h, units=symbols), y),
                      optimizer=ge.optimizer("adam", lr=0.02), backend=backend, clip_norm=5.0)
    model.fit({"ids": ids, "y": ids[:, 0]}, epochs=12, batch_size=32)
    test = gen.integers(0, symbols, (128, steps))
    assert model.evaluate({"ids": test, "y": test[:, 0]})["accuracy"] >= 0.95


def test_saved_recurrent_model_predicts_the_same(tmp_path):
    g = ge.Graph()
    x = g.input("x", (None, 5, 3))
    h = g.layer("bidirectional", x, layer="gru", units=4, return_sequences=True)
    h = g.layer("lstm", h, units=3, num_layers=2)
    model = g.compile(outputs=[h])
    data = r(2, 5, 3).astype(np.float32)
    model.save(tmp_path / "rnn.ge")
    loaded = ge.load(tmp_path / "rnn.ge")
    np.testing.assert_array_equal(loaded.predict({"x": data}), model.predict({"x": data}))
