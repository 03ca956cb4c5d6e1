"""Masks on rnn, lstm, gru and bidirectional (sequences of different lengths), and rnn's relu:
gradients through time on every backend, PyTorch's packed sequences (outputs at valid steps,
final states, input and parameter gradients), padding that changes nothing, build-time errors."""

from __future__ import annotations

import numpy as np
import pytest
from graphengine.plugins.recurrent import SimpleRNN
from test_recurrent import CELLS, op_inputs
from torch_reference import graph_result, torch_result

import graphengine as ge
from graphengine.testing import check_backward, inferred, make_context

rng = np.random.default_rng(5)
LENGTHS = [5, 2, 4, 1]  # sequence 0 is full; the others end in padding




def lengths_mask(lengths, steps):
    return np.arange(steps)[None, :] < np.asarray(lengths)[:, None]


def masked_inputs(cell, mask, initial=False):
    inputs = op_inputs(CELLS[cell], batch=mask.shape[0], steps=mask.shape[1], initial=initial)
    return inputs + [mask]


HOLES = np.array([[True, False, True, True], [False, True, False, False], [True, True, True, False]])


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("return_sequences", [False, True], ids=["last", "sequence"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("initial", [False, True], ids=["zero_state", "initial_state"])
def test_gradient_through_time_with_a_mask(cell, return_sequences, reverse, initial, backend):
    inputs = masked_inputs(cell, HOLES, initial)  # gaps anywhere, and a sequence with one step
    check_backward(inferred(lambda: CELLS[cell](return_sequences, reverse, masked=True), inputs),
                   inputs, backend=backend)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_gradient_of_relu_rnn(reverse, backend):
    inputs = op_inputs(SimpleRNN, steps=4)
    check_backward(inferred(lambda: SimpleRNN(True, reverse, activation="relu"), inputs), inputs,
                   backend=backend)
    masked = masked_inputs("rnn", HOLES)
    check_backward(inferred(lambda: SimpleRNN(False, reverse, masked=True, activation="relu"), masked),
                   masked, backend=backend)


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_padded_steps_hold_the_state_and_output_zeros(cell, reverse):
    mask = lengths_mask(LENGTHS, 5)
    x, *params, _ = masked_inputs(cell, mask)
    op = inferred(lambda: CELLS[cell](True, reverse, masked=True), [x, *params, mask])()
    out = op.forward(make_context(), np, x, *params, mask)
    last = inferred(lambda: CELLS[cell](False, reverse, masked=True), [x, *params, mask])()
    final = last.forward(make_context(), np, x, *params, mask)
    for i, length in enumerate(LENGTHS):
        # each sequence alone, cut to its length, with no mask: what padding must not change
        alone = inferred(lambda: CELLS[cell](True, reverse), [x[i:i + 1, :length], *params])()
        expected = alone.forward(make_context(), np, x[i:i + 1, :length], *params)[0]
        np.testing.assert_allclose(out[i, :length], expected, atol=1e-12)
        assert not out[i, length:].any()
        np.testing.assert_allclose(final[i], expected[0 if reverse else -1], atol=1e-12)


# --------------------------------------------------------------------------- PyTorch

UNITS, FEATURES, STEPS = 3, 2, 5
TORCH_GATES = {"rnn": [0], "lstm": [0, 1, 3, 2], "gru": [0, 1, 2]}  # ours i, f, o, g; PyTorch i, f, g, o


def to_torch(cell, params, suffix=""):
    """Our W, U, b (and gru's bh) as PyTorch's weight_ih, weight_hh, bias_ih, bias_hh."""
    import torch

    order = TORCH_GATES[cell]

    def blocks(a):  # our gate blocks, in PyTorch's order, along the last axis
        return np.concatenate([a[..., k * UNITS:(k + 1) * UNITS] for k in order], axis=-1)

    bias_hh = np.zeros(len(order) * UNITS)
    if cell == "gru":
        bias_hh[2 * UNITS:] = params["bh"]
    arrays = {"weight_ih": blocks(params["W"]).T, "weight_hh": blocks(params["U"]).T,
              "bias_ih": blocks(params["b"]), "bias_hh": bias_hh}
    return {f"{name}_l0{suffix}": torch.tensor(a) for name, a in arrays.items()}


def from_torch_grads(cell, module, suffix=""):
    """PyTorch's parameter gradients as ours (W, U, b; gru's bh)."""
    order = TORCH_GATES[cell]
    inverse = [order.index(k) for k in range(len(order))]

    def blocks(a):
        return np.concatenate([a[..., k * UNITS:(k + 1) * UNITS] for k in inverse], axis=-1)

    grad = {name: p.grad.numpy() for name, p in module.named_parameters()}
    ours = {"W": blocks(grad[f"weight_ih_l0{suffix}"].T), "U": blocks(grad[f"weight_hh_l0{suffix}"].T),
            # b serves as PyTorch's bias_ih, and as its bias_hh except gru's candidate block
            "b": blocks(grad[f"bias_ih_l0{suffix}"])}
    if cell == "gru":
        ours["bh"] = grad[f"bias_hh_l0{suffix}"][2 * UNITS:]
    return ours


def torch_module(cell, bidirectional, activation):
    import torch

    kinds = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}
    extra = {"nonlinearity": activation} if cell == "rnn" else {}
    return kinds[cell](FEATURES, UNITS, batch_first=True, bidirectional=bidirectional,
                       dtype=torch.float64, **extra)


CASES = [("rnn", "tanh"), ("rnn", "relu"), ("lstm", None), ("gru", None)]


@pytest.mark.parametrize("cell,activation", CASES, ids=[c + (f"_{a}" if a else "") for c, a in CASES])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["one_way", "bidirectional"])
@pytest.mark.parametrize("return_sequences", [False, True], ids=["last", "sequence"])
def test_matches_pytorch_packed_sequences(cell, activation, bidirectional, return_sequences):
    torch = pytest.importorskip("torch")
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    g = ge.Graph()
    x = g.input("x", (None, STEPS, FEATURES), dtype="float64")
    mask = g.input("mask", (None, STEPS), dtype="bool")
    options = {"activation": activation} if activation else {}
    if bidirectional:
        out = g.layer("bidirectional", x, mask, layer=cell, units=UNITS, return_sequences=return_sequences,
                      name="layer", **options)
    else:
        out = g.layer(cell, x, mask, units=UNITS, return_sequences=return_sequences, name="layer",
                      **options)
    feeds = {"x": rng.standard_normal((len(LENGTHS), STEPS, FEATURES)), "mask": lengths_mask(LENGTHS, STEPS)}
    weight = rng.standard_normal((len(LENGTHS), *out.shape[1:]))
    value, input_grads, grads, params = graph_result(g, out, feeds, weight)

    directions = {"": "forward", "_reverse": "backward"} if bidirectional else {"": None}
    module = torch_module(cell, bidirectional, activation)
    with torch.no_grad():
        for suffix, scope in directions.items():
            prefix = f"layer/{scope}/" if scope else "layer/"
            ours = {name[len(prefix):]: v for name, v in params.items() if name.startswith(prefix)}
            for name, tensor in to_torch(cell, ours, suffix).items():
                getattr(module, name).copy_(tensor)

    def run(x, mask):
        packed = pack_padded_sequence(x, torch.tensor(LENGTHS), batch_first=True, enforce_sorted=False)
        sequence, state = module(packed)
        if return_sequences:
            return pad_packed_sequence(sequence, batch_first=True, total_length=STEPS)[0]
        state = state[0] if cell == "lstm" else state  # h_n, (directions, batch, units)
        return torch.cat(list(state), dim=-1)

    expected, expected_grads = torch_result(run, feeds, weight)
    np.testing.assert_allclose(value, expected, atol=1e-12)
    np.testing.assert_allclose(input_grads["x"], expected_grads["x"], atol=1e-12)
    padded = ~feeds["mask"]
    assert not input_grads["x"][padded].any()  # padded steps receive no gradient
    for suffix, scope in directions.items():
        prefix = f"layer/{scope}/" if scope else "layer/"
        for name, expected_grad in from_torch_grads(cell, module, suffix).items():
            np.testing.assert_allclose(grads[prefix + name], expected_grad, atol=1e-12, err_msg=prefix + name)


# --------------------------------------------------------------------------- layers, errors

def test_mask_goes_after_the_initial_states_and_through_a_stack():
    g = ge.Graph()
    x = g.input("x", (None, 4, 2))
    mask = g.input("mask", (None, 4), dtype="bool")
    h0, c0 = g.input("h0", (None, 3)), g.input("c0", (None, 3))
    single = g.layer("lstm", x, h0, c0, mask, units=3, name="single")
    deep = g.layer("gru", x, mask, units=3, num_layers=2, return_sequences=True, name="deep")
    assert g.nodes["single/lstm"].inputs[-3:] == ("h0", "c0", "mask")
    assert g.nodes["deep/layer1/gru"].inputs[-1] == "mask"
    data = {"x": rng.standard_normal((2, 4, 2)).astype(np.float32), "h0": np.ones((2, 3), np.float32),
            "c0": np.ones((2, 3), np.float32), "mask": np.array([[True] * 4, [False] * 4])}
    out = g.compile(outputs=[single, deep]).run(data)
    # a sequence with no valid step keeps its initial state, and outputs only zeros
    np.testing.assert_array_equal(out[single.name][1], np.ones(3))
    assert not out[deep.name][1].any() and out[deep.name][0].all()


@pytest.mark.parametrize("build,message", [
    (lambda g, x: g.layer("lstm", x, g.input("m", (None, 5), dtype="bool"), units=2),
     r"mask must be bool \(batch, time\) = \(None, 6\)"),
    (lambda g, x: g.layer("bidirectional", x, g.input("m", (None, 6, 1), dtype="bool"), units=2),
     r"bidirectional on 'x': the mask must be bool"),
    (lambda g, x: g.layer("rnn", x, units=2, activation="sigmoid"), "activation must be one of tanh, relu"),
])
def test_mask_and_activation_errors(build, message):
    g = ge.Graph()
    x = g.input("x", (None, 6, 3))
    with pytest.raises(ge.GraphBuildError, match=message):
        build(g, x)


# --------------------------------------------------------------------------- training

def last_valid_step_task(n, seed):
    """Sequences of 1 to 8 steps padded to 8 with zeros; the target is the last valid step."""
    gen = np.random.default_rng(seed)
    lengths = gen.integers(1, 9, n)
    mask = lengths_mask(lengths, 8)
    x = gen.uniform(-1, 1, (n, 8, 1)) * mask[..., None]
    return {"x": x.astype(np.float32), "mask": mask, "y": x[np.arange(n), lengths - 1].astype(np.float32)}


def test_a_masked_gru_learns_the_last_valid_step_and_an_unmasked_one_does_not():
    errors = {}
    for masked in (True, False):
        g = ge.Graph()
        x, y = g.input("x", (None, 8, 1)), g.input("y", (None, 1))
        masks = [g.input("mask", (None, 8), dtype="bool")] if masked else []
        h = g.layer("gru", x, *masks, units=8)
        model = g.compile(g.loss("mse", g.layer("dense", h, units=1), y),
                          optimizer=ge.optimizer("adam", lr=0.02), seed=0)
        train, test = last_valid_step_task(512, 0), last_valid_step_task(256, 1)
        if not masked:  # the same data; the padding is read as data
            train.pop("mask"), test.pop("mask")
        model.fit(train, epochs=15, batch_size=32, verbose=0)
        errors[masked] = model.evaluate(test)["loss"]
    assert errors[True] < 0.005 and errors[False] > 10 * errors[True], errors
