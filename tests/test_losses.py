"""Losses: gradients on every backend, values against independent formulas, metrics, errors."""

from __future__ import annotations

import numpy as np
import pytest

import graphengine as ge
from graphengine.errors import ShapeError
from graphengine.ir.contracts import LossOp
from graphengine.testing import check_backward, make_context

rng = np.random.default_rng(0)
SCORES = rng.standard_normal((6, 4)) * 2
LABELS = np.array([0, 3, 1, 2, 3, 0])
LOGITS = rng.standard_normal((6, 1)) * 3
BITS = np.array([1, 0, 0, 1, 1, 0])
SIGNS = 2 * BITS - 1


def loss_op(kind: str, **config) -> LossOp:
    return LossOp(kind, ge.get_plugin_manager().losses.get(kind)(**config))


def loss_value(kind: str, pred, target, **config) -> float:
    op = loss_op(kind, **config)
    return float(op.forward(make_context(), np, np.asarray(pred, float), np.asarray(target)))


CASES = {
    "mse": (SCORES, rng.standard_normal((6, 4))),
    "l1": (SCORES, rng.standard_normal((6, 4))),
    "bce_soft_targets": (LOGITS, rng.uniform(0, 1, (6, 1))),
    "bce_column_of_labels": (LOGITS, BITS.astype(float)),
    "softmax_cross_entropy": (SCORES, LABELS),
    "nll": (SCORES, LABELS),
    "hinge_binary_01": (LOGITS, BITS),
    "hinge_binary_pm1": (LOGITS[:, 0], SIGNS),
    "hinge_multiclass": (SCORES, LABELS),
}
KINDS = {"bce_soft_targets": "binary_cross_entropy", "bce_column_of_labels": "binary_cross_entropy",
         "hinge_binary_01": "hinge", "hinge_binary_pm1": "hinge", "hinge_multiclass": "hinge"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_backward(case, backend):
    pred, target = CASES[case]
    check_backward(loss_op(KINDS.get(case, case)), [pred, target], backend=backend)


def test_hinge_backward_with_a_margin(backend):
    check_backward(loss_op("hinge", margin=0.5), [SCORES, LABELS], backend=backend)


def test_values_match_textbook_formulas():
    pred, target = CASES["l1"]
    assert loss_value("l1", pred, target) == pytest.approx(np.abs(pred - target).mean())
    p = 1 / (1 + np.exp(-LOGITS[:, 0]))
    bce = -np.mean(BITS * np.log(p) + (1 - BITS) * np.log(1 - p))
    assert loss_value("binary_cross_entropy", LOGITS, BITS.astype(float)) == pytest.approx(bce)
    assert loss_value("hinge", LOGITS, BITS) == pytest.approx(
        np.mean(np.maximum(0, 1 - SIGNS * LOGITS[:, 0])))
    svm = sum(max(0, SCORES[i, j] - SCORES[i, LABELS[i]] + 1)
              for i in range(6) for j in range(4) if j != LABELS[i]) / 6
    assert loss_value("hinge", SCORES, LABELS) == pytest.approx(svm)
    assert loss_value("nll", SCORES, LABELS) == pytest.approx(-SCORES[np.arange(6), LABELS].mean())


def test_cs231n_multiclass_svm_example():
    # the worked example of the CS231n notes: scores for cat, car, frog; correct class cat
    scores = np.array([[3.2, 5.1, -1.7]])
    assert loss_value("hinge", scores, [0]) == pytest.approx(2.9)


def test_binary_hinge_labels_01_and_pm1_agree():
    assert loss_value("hinge", LOGITS, BITS) == loss_value("hinge", LOGITS, SIGNS)
    with pytest.raises(ge.DataError, match=r"all in \{-1, \+1\} or all in \{0, 1\}"):
        loss_value("hinge", LOGITS, np.array([-1, 0, 1, 1, 0, 1]))
    with pytest.raises(ge.DataError, match="labels from 0 to 2"):
        loss_value("hinge", LOGITS, np.array([0, 1, 2, 1, 0, 1]))


def test_nll_on_log_softmax_equals_softmax_cross_entropy():
    logp = loss_op("nll")  # nll needs log-probabilities
    from graphengine.plugins.activations import log_softmax
    ce = loss_value("softmax_cross_entropy", SCORES, LABELS)
    assert float(logp.forward(make_context(), np, log_softmax(np, SCORES), LABELS)) == pytest.approx(ce)


def test_binary_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[1000.0], [-1000.0], [1000.0]])
    targets = np.array([[1.0], [0.0], [0.0]])
    op = loss_op("binary_cross_entropy")
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        value = float(op.forward(make_context(), np, logits, targets))
    # The backward's sigmoid overflows exp(1000) to inf on purpose, as models run it (overflow
    # warnings off): 1 / (1 + inf) is exactly 0, and nothing is invalid or divided by zero.
    with np.errstate(over="ignore", invalid="raise", divide="raise"):
        grad = op.loss.backward(np, logits, targets)
    assert value == pytest.approx(1000.0 / 3)
    np.testing.assert_allclose(grad[:, 0], [0, 0, 1 / 3])


def test_binary_cross_entropy_rejects_targets_outside_01():
    with pytest.raises(ge.DataError, match=r"targets must lie in \[0, 1\]"):
        loss_value("binary_cross_entropy", LOGITS, np.full((6, 1), 2.0))


def test_accuracy_of_every_classification_loss():
    logits = np.array([[2.0], [-1.0], [0.5], [-3.0]])
    bits = np.array([1, 1, 0, 0])
    for kind, target in [("binary_cross_entropy", bits.astype(float)), ("hinge", bits),
                         ("hinge", 2 * bits - 1)]:
        assert float(loss_op(kind).loss.accuracy(np, logits, target)) == 0.5, kind
    scores = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    for kind in ("softmax_cross_entropy", "nll", "hinge"):
        assert float(loss_op(kind).loss.accuracy(np, scores, np.array([1, 1, 1]))) == pytest.approx(2 / 3)
    assert loss_op("l1").loss.accuracy(np, scores, scores) is None


def test_predict_links():
    bce = loss_op("binary_cross_entropy").loss
    np.testing.assert_allclose(bce.predict(np, np.array([[0.0], [2.0]])),
                               [[0.5], [1 / (1 + np.exp(-2.0))]])
    nll = loss_op("nll").loss
    np.testing.assert_allclose(nll.predict(np, np.log(np.array([[0.25, 0.75]]))), [[0.25, 0.75]])


def build(kind: str, pred_shape, target_shape, target_dtype="float32"):
    g = ge.Graph()
    return g.loss(kind, g.input("p", pred_shape), g.input("t", target_shape, dtype=target_dtype))


def test_shape_and_dtype_errors_name_the_loss():
    with pytest.raises(ShapeError, match="binary_cross_entropy takes one score per example"):
        build("binary_cross_entropy", (None, 3), (None,))
    with pytest.raises(ShapeError, match="target must be float"):
        build("binary_cross_entropy", (None, 1), (None,), "int64")
    with pytest.raises(ShapeError, match="nll takes scores"):
        build("nll", (None, 3), (None, 3), "int64")
    with pytest.raises(ShapeError, match="hinge takes binary scores"):
        build("hinge", (None, 3, 2), (None,), "int64")
    with pytest.raises(ShapeError, match="target must be int"):
        build("hinge", (None, 3), (None,))
    with pytest.raises(ge.DataError, match=r"nll: labels must lie in \[0, 4\)"):
        loss_value("nll", SCORES, LABELS + 1)


def test_fit_reports_accuracy_and_error_for_binary_cross_entropy():
    data_rng = np.random.default_rng(1)
    x = data_rng.standard_normal((200, 2)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.float32)
    g = ge.Graph()
    inp, t = g.input("x", (None, 2)), g.input("y", (None,))
    model = g.compile(g.loss("binary_cross_entropy", g.layer("dense", inp, units=1), t),
                      optimizer=ge.optimizer("sgd", lr=0.5))
    history = model.fit({"x": x, "y": y}, epochs=20, batch_size=50, verbose=0)
    assert history["accuracy"][-1] > 0.95
    assert history["error"][-1] == pytest.approx(1 - history["accuracy"][-1])
    probs = model.predict({"x": x})
    assert probs.shape == (200, 1) and 0 < probs.min() and probs.max() < 1
