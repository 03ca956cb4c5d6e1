"""The CTC loss: value and gradient against PyTorch, finite differences, decoding, errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from graphengine.plugins.ctc import CTC, greedy_decode
from hypothesis import given, settings
from hypothesis import strategies as st

import graphengine as ge
from graphengine.ir.contracts import LossOp
from graphengine.testing import check_backward, make_context

# Repeats (2 2, 4 4) need a blank between them; row 1 is one label, row 3 fills T exactly
# (4 labels + 1 repeat = 5 frames: the shortest feasible T for it).
LABELS = np.array([[1, 2, 2, 3], [4, -1, -1, -1], [4, 4, 1, -1], [3, 1, 1, 2]])


def ctc_op(**config) -> LossOp:
    return LossOp("ctc", CTC(**config))


def ours(logits: np.ndarray, labels: np.ndarray, **config) -> tuple[np.ndarray, np.ndarray]:
    op, ctx = ctc_op(**config), make_context()  # one call: its backward reads its forward's context
    value = op.forward(ctx, np, logits, labels)
    grad = op.backward(ctx, np, (logits, labels), value, np.array(1.0, logits.dtype))[0]
    return value, grad


def pytorch(logits: np.ndarray, labels: np.ndarray, blank: int = 0,
            zero_infinity: bool = False) -> tuple[float, np.ndarray]:
    """PyTorch's ctc_loss with reduction="sum" over the batch size: the loss we promise (the
    tests that compare with it skip without torch; the others run anyway)."""
    torch = pytest.importorskip("torch")
    scores = torch.tensor(logits, requires_grad=True)
    lengths = torch.tensor((labels >= 0).sum(axis=1))
    targets = torch.tensor(np.where(labels >= 0, labels, blank if blank else 1))
    value = torch.nn.functional.ctc_loss(
        scores.log_softmax(-1).transpose(0, 1), targets, torch.full((len(labels),), logits.shape[1]),
        lengths, blank=blank, reduction="sum", zero_infinity=zero_infinity) / len(labels)
    value.backward()
    return value.item(), scores.grad.numpy()


def assert_matches_pytorch(logits, labels, **config):
    value, grad = ours(logits, labels, **config)
    expected_value, expected_grad = pytorch(logits, labels, **config)
    assert value == pytest.approx(expected_value, rel=1e-10)
    np.testing.assert_allclose(grad, expected_grad, atol=1e-10)


@pytest.mark.parametrize("steps", [5, 9, 30])
def test_value_and_gradient_match_pytorch_with_repeats_and_padding(steps):
    logits = np.random.default_rng(steps).standard_normal((4, steps, 5)) * 2
    assert_matches_pytorch(logits, LABELS)


def test_a_blank_other_than_zero():
    logits = np.random.default_rng(1).standard_normal((4, 7, 6))
    assert_matches_pytorch(logits, LABELS, blank=5)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), batch=st.integers(1, 4), max_length=st.integers(1, 5),
       classes=st.integers(2, 5), spare=st.integers(0, 4))
def test_random_cases_match_pytorch(seed, batch, max_length, classes, spare):
    gen = np.random.default_rng(seed)
    lengths = gen.integers(0, max_length + 1, batch)
    labels = np.full((batch, max_length), -1)
    for row, length in enumerate(lengths):
        labels[row, :length] = gen.integers(1, classes, length)
    repeats = ((labels[:, 1:] == labels[:, :-1]) & (labels[:, 1:] >= 0)).sum(axis=1)
    shortest = max(int((lengths + repeats).max()), 1)  # the fewest frames every row fits in
    logits = gen.standard_normal((batch, shortest + spare, classes)) * 3
    assert_matches_pytorch(logits, labels)


def test_the_likelihood_sums_every_path_that_reads_as_the_labels():
    # Brute force, independent of PyTorch: all 3^5 paths over blank, 1, 2; each path's
    # probability goes to the string it reads as (repeats merged, blanks dropped).
    gen = np.random.default_rng(4)
    logits = gen.standard_normal((1, 5, 3))
    probs = np.exp(logits[0]) / np.exp(logits[0]).sum(axis=1, keepdims=True)
    totals: dict[tuple[int, ...], float] = {}
    for path in itertools.product(range(3), repeat=5):
        merged = [s for k, s in enumerate(path) if s != 0 and (k == 0 or s != path[k - 1])]
        totals[tuple(merged)] = totals.get(tuple(merged), 0.0) + np.prod(probs[np.arange(5), path])
    assert sum(totals.values()) == pytest.approx(1.0)
    for labels in [(1,), (2, 2), (1, 2, 1), (2, 2, 2), (1, 1, 2)]:
        padded = np.array([list(labels) + [-1] * (3 - len(labels))])
        assert np.exp(-ours(logits, padded)[0]) == pytest.approx(totals[labels], rel=1e-12)


def test_float32_scores_give_float32_values_close_to_float64():
    logits = np.random.default_rng(5).standard_normal((4, 12, 5)) * 3
    value, grad = ours(logits.astype(np.float32), LABELS)
    expected_value, expected_grad = ours(logits, LABELS)
    assert np.asarray(value).dtype == grad.dtype == np.float32
    assert value == pytest.approx(expected_value, rel=1e-5)
    np.testing.assert_allclose(grad, expected_grad, atol=1e-5)


def test_finite_difference(backend):
    logits = np.random.default_rng(2).standard_normal((4, 6, 5))
    check_backward(ctc_op(), [logits, LABELS], backend=backend)
    check_backward(ctc_op(zero_infinity=True), [logits[:, :4], LABELS], backend=backend)


def test_too_few_frames_is_an_error_naming_the_sequence():
    logits = np.zeros((4, 4, 5))  # row 0 needs 5 frames (a blank between 2 2), row 3 too
    with pytest.raises(ge.DataError, match=r"2 label sequence\(s\) cannot fit in 4 frames "
                                           r"\(sequence 0 needs 5, sequence 3 needs 5.*zero_infinity"):
        ours(logits, LABELS)


def test_zero_infinity_counts_infeasible_sequences_zero_as_pytorch_does():
    logits = np.random.default_rng(3).standard_normal((4, 4, 5))
    value, grad = ours(logits, LABELS, zero_infinity=True)
    assert np.isfinite(value) and not grad[[0, 3]].any() and grad[1].any()
    assert_matches_pytorch(logits, LABELS, zero_infinity=True)


@pytest.mark.parametrize("labels, message", [
    ([[1, 0]], r"label 0 is the blank"),
    ([[1, 5]], r"labels must lie in \[0, 5\)"),
    ([[-1, 2]], r"padding \(-1\) must come after"),
])
def test_bad_labels_are_refused(labels, message):
    with pytest.raises(ge.DataError, match=message):
        ours(np.zeros((1, 6, 5)), np.array(labels))


def test_shapes_are_checked_when_the_graph_is_built():
    g = ge.Graph("ctc_shapes")
    scores = g.input("scores", (None, 6, 5))
    with pytest.raises(ge.ShapeError, match=r"ctc takes scores \(batch, time, classes\)"):
        g.loss("ctc", scores, g.input("flat", (None,), dtype="int64"))
    with pytest.raises(ge.ShapeError, match=r"blank=7 is not a class"):
        g.loss("ctc", scores, g.input("labels", (None, 3), dtype="int64"), blank=7)
    with pytest.raises(ge.GraphBuildError, match="blank must be a class index"):
        g.loss("ctc", scores, g.input("labels2", (None, 3), dtype="int64"), blank=-1)


def test_greedy_decoding_merges_repeats_then_drops_blanks(backend):
    be = ge.get_backend(backend)
    # the notes' example: 好好好棒棒棒棒 reads 好棒, 好ϕϕ棒ϕϕ棒 reads 好棒棒 (好 = 1, 棒 = 2, ϕ = 0)
    frames = np.array([[1, 1, 1, 2, 2, 2, 2], [1, 0, 0, 2, 0, 0, 2], [0, 0, 0, 0, 0, 0, 0]])
    scores = be.asarray(np.eye(3)[frames])
    decoded = be.to_numpy(greedy_decode(be.xp, scores, blank=0))
    np.testing.assert_array_equal(decoded[:, :3], [[1, 2, -1], [1, 2, 2], [-1, -1, -1]])
    assert (decoded[:, 3:] == -1).all()


def test_a_trained_model_reports_sequence_accuracy_and_frame_probabilities():
    g = ge.Graph("ctc_model")
    x = g.input("x", (None, 6, 3))
    labels = g.input("labels", (None, 2), dtype="int64")
    scores = g.layer("dense", x, units=3, name="out")
    model = g.compile(g.loss("ctc", scores, labels), optimizer=ge.optimizer("adam", lr=0.1))
    # Frames are one-hot symbols: the label is visible in each frame, so a linear map learns it.
    frames = np.array([[1, 1, 0, 2, 2, 0], [2, 0, 0, 0, 2, 2], [1, 0, 1, 1, 0, 0]])
    data = {"x": np.eye(3, dtype=np.float32)[frames], "labels": np.array([[1, 2], [2, 2], [1, 1]])}
    before = model.evaluate(data)
    model.fit(data, epochs=60, batch_size=3, verbose=False)
    after = model.evaluate(data)
    assert after["loss"] < before["loss"] / 10 and after["accuracy"] == 1.0
    probs = model.predict(data)
    assert probs.shape == (3, 6, 3) and np.allclose(probs.sum(axis=-1), 1)



def frame_model(name: str, frames: int, optimizer: str | None = None, **options) -> ge.Model:
    g = ge.Graph(name)
    scores = g.layer("dense", g.input("x", (None, frames, 2)), units=4, name="out")
    labels = g.input("labels", (None, 2), dtype="int64")
    return g.compile(g.loss("ctc", scores, labels, blank=3, **options), optimizer=optimizer)


def frames_and_labels(frames: int) -> dict[str, np.ndarray]:
    # row 1 repeats a label: it needs 3 frames
    return {"x": np.random.default_rng(0).standard_normal((2, frames, 2)).astype(np.float32),
            "labels": np.array([[0, 2], [1, 1]])}


def test_a_saved_model_keeps_its_ctc_options(tmp_path):
    model = frame_model("ctc_saved", 2, zero_infinity=True)
    model.save(tmp_path / "ctc.ge")
    loaded = ge.load(tmp_path / "ctc.ge")
    assert loaded.graph.nodes[loaded.loss_name].op.config() == {"blank": 3, "zero_infinity": True}
    data = frames_and_labels(2)
    assert loaded.evaluate(data)["loss"] == model.evaluate(data)["loss"] > 0


def test_an_infeasible_batch_stops_training_with_the_sequence_named():
    model = frame_model("ctc_short", 2, optimizer="sgd")
    with pytest.raises(ge.DataError, match="sequence 1 needs 3"):
        model.fit(frames_and_labels(2), epochs=1, batch_size=2, verbose=0)


def test_a_training_step_runs_the_forward_recursion_once(monkeypatch):
    """The backward reads alpha from its call's context (Loss.uses_context) instead of
    running the recursion over time again."""
    calls = []
    recursion = CTC._forward_variables
    monkeypatch.setattr(CTC, "_forward_variables",
                        lambda self, xp, lattice: calls.append(1) or recursion(self, xp, lattice))
    g = ge.Graph("ctc_once")
    x = g.input("x", (None, 6, 3))
    labels = g.input("labels", (None, 2), dtype="int64")
    model = g.compile(g.loss("ctc", g.layer("dense", x, units=5), labels), optimizer="sgd")
    model.train_step({"x": np.ones((2, 6, 3), np.float32), "labels": np.array([[1, 2], [3, -1]])})
    assert len(calls) == 1
