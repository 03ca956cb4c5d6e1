"""The losses and loss options PyTorch and Keras users expect: huber, kl_divergence,
binary_cross_entropy on probabilities, softmax_cross_entropy with soft targets, label smoothing,
class weights, ignore_index and sequences, and reduction="sum" on every built-in loss.
Gradients on every backend; values and input gradients against PyTorch in float64."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import graphengine as ge
from graphengine.errors import GraphEngineError, ShapeError
from graphengine.ir.contracts import LossOp
from graphengine.testing import check_backward, make_context

rng = np.random.default_rng(0)
SCORES = rng.standard_normal((6, 4)) * 2
LABELS = np.array([0, 3, 1, 2, 3, 0])
PADDED = np.array([0, -100, 1, 2, -100, 0])  # rows 1 and 4 are padding
SOFT = rng.dirichlet(np.ones(4), 6)
ONE_HOT = np.eye(4)[LABELS]
WEIGHTS = [0.5, 2.0, 1.0, 3.0]
SEQ_SCORES = rng.standard_normal((3, 5, 4)) * 2  # (batch, steps, classes)
SEQ_LABELS = np.array([[1, 2, 3, 0, 0], [2, 2, 0, 0, 0], [3, 1, 2, 1, 3]])  # 0 pads
REGRESSION = (rng.standard_normal((5, 3)) * 2, rng.standard_normal((5, 3)))
PROBS = rng.uniform(0.05, 0.95, (6, 1))
BIT_TARGETS = rng.uniform(0, 1, (6, 1))
LOGITS = rng.standard_normal((6, 1)) * 3

#: id: (loss, options, pred, target, PyTorch's call on the prediction tensor, or None where
#: PyTorch has no such loss). Every new option on its own and in combination, sequences too.
CASES = {
    "huber": ("huber", {}, *REGRESSION, lambda F, p, t: F.huber_loss(p, t)),
    "huber_delta": ("huber", {"delta": 0.5}, *REGRESSION, lambda F, p, t: F.huber_loss(p, t, delta=0.5)),
    "huber_sum": ("huber", {"delta": 2.0, "reduction": "sum"}, *REGRESSION,
                  lambda F, p, t: F.huber_loss(p, t, delta=2.0, reduction="sum")),
    "kl": ("kl_divergence", {}, SCORES, SOFT,
           lambda F, p, t: F.kl_div(F.log_softmax(p, -1), t, reduction="batchmean")),
    "kl_one_hot_sum": ("kl_divergence", {"reduction": "sum"}, SCORES, ONE_HOT,
                       lambda F, p, t: F.kl_div(F.log_softmax(p, -1), t, reduction="sum")),
    "bce_probabilities": ("binary_cross_entropy", {"from_logits": False}, PROBS, BIT_TARGETS,
                          lambda F, p, t: F.binary_cross_entropy(p, t)),
    "bce_probabilities_sum": ("binary_cross_entropy", {"from_logits": False, "reduction": "sum"},
                              PROBS, BIT_TARGETS,
                              lambda F, p, t: F.binary_cross_entropy(p, t, reduction="sum")),
    "bce_logits_sum": ("binary_cross_entropy", {"reduction": "sum"}, LOGITS, BIT_TARGETS,
                       lambda F, p, t: F.binary_cross_entropy_with_logits(p, t, reduction="sum")),
    "ce_soft": ("softmax_cross_entropy", {}, SCORES, SOFT, lambda F, p, t: F.cross_entropy(p, t)),
    "ce_one_hot": ("softmax_cross_entropy", {}, SCORES, ONE_HOT, lambda F, p, t: F.cross_entropy(p, t)),
    "ce_soft_smoothed_weighted": (
        "softmax_cross_entropy", {"label_smoothing": 0.2, "weights": WEIGHTS}, SCORES, SOFT,
        lambda F, p, t: F.cross_entropy(p, t, label_smoothing=0.2, weight=weight(t))),
    "ce_labels_smoothed": ("softmax_cross_entropy", {"label_smoothing": 0.1}, SCORES, LABELS,
                           lambda F, p, t: F.cross_entropy(p, t, label_smoothing=0.1)),
    "ce_labels_weighted": ("softmax_cross_entropy", {"weights": WEIGHTS}, SCORES, LABELS,
                           lambda F, p, t: F.cross_entropy(p, t, weight=weight(p))),
    "ce_labels_ignored": ("softmax_cross_entropy", {"ignore_index": -100}, SCORES, PADDED,
                          lambda F, p, t: F.cross_entropy(p, t, ignore_index=-100)),
    "ce_labels_everything": (
        "softmax_cross_entropy",
        {"weights": WEIGHTS, "ignore_index": -100, "label_smoothing": 0.3}, SCORES, PADDED,
        lambda F, p, t: F.cross_entropy(p, t, weight=weight(p), ignore_index=-100,
                                        label_smoothing=0.3)),
    "ce_labels_everything_sum": (
        "softmax_cross_entropy",
        {"weights": WEIGHTS, "ignore_index": -100, "label_smoothing": 0.3, "reduction": "sum"},
        SCORES, PADDED,
        lambda F, p, t: F.cross_entropy(p, t, weight=weight(p), ignore_index=-100,
                                        label_smoothing=0.3, reduction="sum")),
    # PyTorch puts the classes on axis 1: (batch, classes, steps)
    "ce_sequence_padded": (
        "softmax_cross_entropy", {"ignore_index": 0, "weights": WEIGHTS, "label_smoothing": 0.1},
        SEQ_SCORES, SEQ_LABELS,
        lambda F, p, t: F.cross_entropy(p.permute(0, 2, 1), t, ignore_index=0, weight=weight(p),
                                        label_smoothing=0.1)),
    "nll_weighted_ignored": ("nll", {"weights": WEIGHTS, "ignore_index": -100}, SCORES, PADDED,
                             lambda F, p, t: F.nll_loss(p, t, weight=weight(p), ignore_index=-100)),
    "nll_sequence_sum": ("nll", {"ignore_index": 0, "reduction": "sum"}, SEQ_SCORES, SEQ_LABELS,
                         lambda F, p, t: F.nll_loss(p.permute(0, 2, 1), t, ignore_index=0,
                                                    reduction="sum")),
    "mse_sum": ("mse", {"reduction": "sum"}, *REGRESSION,
                lambda F, p, t: F.mse_loss(p, t, reduction="sum")),
    "l1_sum": ("l1", {"reduction": "sum"}, *REGRESSION, lambda F, p, t: F.l1_loss(p, t, reduction="sum")),
    "hinge_multiclass_sum": ("hinge", {"reduction": "sum"}, SCORES, LABELS,
                             lambda F, p, t: F.multi_margin_loss(p, t, reduction="sum") * p.shape[1]),
    "hinge_binary_sum": ("hinge", {"reduction": "sum", "margin": 0.5}, LOGITS, (LOGITS > 0.5).astype(int),
                         None),
}


def weight(like):
    """The class weights as a tensor of ``like``'s dtype."""
    import torch

    return torch.tensor(WEIGHTS, dtype=like.dtype)


def make(kind: str, **options) -> ge.Loss:
    return ge.get_plugin_manager().losses.get(kind)(**options)


def value_and_grad(kind: str, pred, target, **options) -> tuple[float, np.ndarray]:
    loss = make(kind, **options)
    op = LossOp(kind, loss)
    value = float(op.forward(make_context(), np, pred, target))
    return value, loss.backward(np, pred, target)


@pytest.mark.parametrize("case", sorted(CASES))
def test_backward_matches_finite_differences(case, backend):
    kind, options, pred, target, _ = CASES[case]
    check_backward(lambda: make(kind, **options), [pred, target], backend=backend)


@pytest.mark.parametrize("case", sorted(c for c in CASES if CASES[c][4] is not None))
def test_matches_pytorch_in_float64(case):
    torch = pytest.importorskip("torch")
    kind, options, pred, target, torch_loss = CASES[case]
    value, grad = value_and_grad(kind, pred, target, **options)
    p = torch.tensor(pred, requires_grad=True)
    expected = torch_loss(torch.nn.functional, p, torch.tensor(target))
    expected.backward()
    # exact formulas on both sides: float64 round-off, summed over a few dozen terms
    assert value == pytest.approx(expected.item(), rel=1e-12, abs=1e-14)
    np.testing.assert_allclose(grad, p.grad.numpy(), rtol=1e-10, atol=1e-15)


def test_float32_stays_float32_and_matches_pytorch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    pred, target = SEQ_SCORES.astype(np.float32), SEQ_LABELS
    options = {"weights": WEIGHTS, "ignore_index": 0, "label_smoothing": 0.1}
    value, grad = value_and_grad("softmax_cross_entropy", pred, target, **options)
    assert grad.dtype == np.float32
    p = torch.tensor(pred, requires_grad=True)
    expected = F.cross_entropy(p.permute(0, 2, 1), torch.tensor(target), ignore_index=0,
                               weight=torch.tensor(WEIGHTS), label_smoothing=0.1)
    expected.backward()
    # both sides in float32: a few units in the last place of values near 1
    assert value == pytest.approx(expected.item(), rel=1e-6)
    np.testing.assert_allclose(grad, p.grad.numpy(), rtol=1e-5, atol=1e-7)


# -- properties ------------------------------------------------------------------------------

scores_and_labels = st.integers(1, 5).flatmap(lambda n: st.integers(2, 5).flatmap(lambda c: st.tuples(
    st.lists(st.floats(-20, 20), min_size=n * c, max_size=n * c).map(lambda v: np.reshape(v, (n, c))),
    st.lists(st.integers(0, c - 1), min_size=n, max_size=n).map(np.array),
    st.lists(st.floats(0.1, 5), min_size=c, max_size=c),
    st.floats(0, 0.9))))


@settings(max_examples=60, deadline=None)
@given(scores_and_labels)
def test_integer_labels_and_their_one_hot_rows_agree(case):
    """Labels go a sparse way (a gather), one-hot targets the dense way: with reduction="sum"
    (the means divide differently, as PyTorch's do) they give the same loss and gradient,
    weights and label smoothing included."""
    scores, labels, weights, smoothing = case
    options = {"weights": weights, "label_smoothing": smoothing, "reduction": "sum"}
    sparse = value_and_grad("softmax_cross_entropy", scores, labels, **options)
    dense = value_and_grad("softmax_cross_entropy", scores, np.eye(scores.shape[1])[labels], **options)
    assert sparse[0] == pytest.approx(dense[0], rel=1e-9, abs=1e-9)
    np.testing.assert_allclose(sparse[1], dense[1], rtol=1e-9, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(scores_and_labels)
def test_nll_of_log_softmax_is_cross_entropy_and_kl_of_itself_is_zero(case):
    from graphengine.plugins.activations import log_softmax, softmax

    scores, labels, weights, _ = case
    labels = np.where(np.arange(len(labels)) % 3 == 1, -1, labels)  # some rows ignored
    options = {"weights": weights, "ignore_index": -1}
    ce = value_and_grad("softmax_cross_entropy", scores, labels, **options)[0]
    assert value_and_grad("nll", log_softmax(np, scores), labels, **options)[0] == pytest.approx(ce)
    kl, grad = value_and_grad("kl_divergence", scores, softmax(np, scores))
    assert kl == pytest.approx(0, abs=1e-12) and np.abs(grad).max() < 1e-12


# -- sequences, padding, accuracy --------------------------------------------------------------

def test_a_padded_sequence_model_trains_on_the_real_steps_only():
    g = ge.Graph()
    x = g.input("x", (None, 5, 3))
    y = g.input("y", (None, 5), dtype="int64")
    logits = g.layer("dense", x, units=4, name="out")
    model = g.compile(g.loss("softmax_cross_entropy", logits, y, ignore_index=0), optimizer="sgd")
    feeds = {"x": rng.standard_normal((3, 5, 3)).astype(np.float32), "y": SEQ_LABELS}
    loss = model.forward(feeds)
    model.backward()
    grads = {k: np.array(v) for k, v in model.gradients().items()}
    # the padding's inputs and scores can be anything: they change neither loss nor gradient
    feeds["x"][SEQ_LABELS == 0] = 1e3
    assert model.forward(feeds) == pytest.approx(loss, rel=1e-6)
    model.backward()
    for name, grad in model.gradients().items():
        np.testing.assert_allclose(grad, grads[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_accuracy_leaves_out_ignored_rows_and_reads_soft_targets_by_their_arg_max():
    scores = np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])
    labels = np.array([0, 0, -1, -1])  # one right, one wrong, two ignored (both "wrong")
    ce = make("softmax_cross_entropy", ignore_index=-1)
    assert float(ce.accuracy(np, scores, labels)) == 0.5
    assert float(make("nll", ignore_index=-1).accuracy(np, scores, labels)) == 0.5
    assert float(ce.accuracy(np, scores, np.full(4, -1))) == 0.0  # nothing to score
    soft = np.array([[0.7, 0.3], [0.6, 0.4], [0.1, 0.9], [0.2, 0.8]])
    assert float(make("softmax_cross_entropy").accuracy(np, scores, soft)) == 0.5
    assert float(make("kl_divergence").accuracy(np, scores, soft)) == 0.5
    probs = np.array([[0.9], [0.4], [0.6], [0.2]])
    bce = make("binary_cross_entropy", from_logits=False)
    assert float(bce.accuracy(np, probs, np.array([1.0, 1.0, 0.0, 0.0]))) == 0.5
    assert bce.predict(np, probs) is probs


def test_a_batch_of_padding_only_has_loss_and_gradient_zero():
    value, grad = value_and_grad("softmax_cross_entropy", SCORES, np.full(6, -100), ignore_index=-100,
                                 label_smoothing=0.2)
    assert value == 0 and not grad.any()


def test_huber_is_squared_error_near_and_absolute_error_far():
    error = np.array([[-3.0, -0.5, 0.0, 0.5, 3.0]])
    value, _ = value_and_grad("huber", error, np.zeros_like(error), reduction="sum")
    assert value == pytest.approx(2.5 + 0.125 + 0 + 0.125 + 2.5)


def test_binary_cross_entropy_on_probabilities_of_0_and_1_is_finite():
    probs = np.array([[0.0], [1.0], [1.0]])
    targets = np.array([[1.0], [1.0], [0.0]])
    value, grad = value_and_grad("binary_cross_entropy", probs, targets, from_logits=False)
    assert value == pytest.approx(200 / 3)  # PyTorch's floor: log(0) counts as -100
    assert np.isfinite(grad).all()


# -- build-time checks and options -----------------------------------------------------------

def build(kind: str, pred_shape, target_shape, target_dtype="float32", pred=None, **options):
    g = ge.Graph()
    p = g.input("p", pred_shape)
    return g.loss(kind, pred(g, p) if pred else p, g.input("t", target_shape, dtype=target_dtype),
                  **options)


@pytest.mark.parametrize("kind, options, message", [
    ("huber", {"delta": -1.0}, r"huber: delta must be a positive number, got -1"),
    ("huber", {"delta": 0}, r"huber: delta must be a positive number"),
    ("softmax_cross_entropy", {"label_smoothing": 1.0},
     r"softmax_cross_entropy: label_smoothing must be a number >= 0 and < 1, got 1"),
    ("softmax_cross_entropy", {"label_smoothing": -0.1}, r"label_smoothing must be a number >= 0"),
    ("softmax_cross_entropy", {"weights": [1.0, -2.0]}, r"weights\[1\] must be a non-negative number"),
    ("softmax_cross_entropy", {"weights": "heavy"}, r"weights must be a non-empty sequence"),
    ("softmax_cross_entropy", {"ignore_index": 1.5}, r"ignore_index must be an int"),
    ("nll", {"weights": []}, r"nll: weights must be a non-empty sequence"),
    ("binary_cross_entropy", {"from_logits": "no"}, r"from_logits must be True or False"),
    ("hinge", {"margin": 0}, r"hinge: margin must be a positive number"),
])
def test_bad_options_are_errors_naming_the_loss(kind, options, message):
    with pytest.raises(GraphEngineError, match=rf"loss '{kind}' from plugin 'losses'.*{message}"):
        build(kind, (None, 2), (None,), "int64", **options)


@pytest.mark.parametrize("kind", ["mse", "l1", "huber", "binary_cross_entropy",
                                  "softmax_cross_entropy", "nll", "kl_divergence", "hinge"])
def test_every_built_in_loss_takes_mean_or_sum_and_nothing_else(kind):
    assert make(kind, reduction="sum").config()["reduction"] == "sum"
    with pytest.raises(GraphEngineError, match=rf"loss '{kind}'.*{kind}: reduction must be one of "
                                               rf"\('mean', 'sum'\), got 'average'"):
        build(kind, (None, 2), (None,), reduction="average")


def test_shape_errors_name_the_loss():
    with pytest.raises(ShapeError, match=r"softmax_cross_entropy: 3 class weights for scores "
                                         r"\(None, 4\) with 4 classes"):
        build("softmax_cross_entropy", (None, 4), (None,), "int64", weights=[1, 2, 3])
    with pytest.raises(ShapeError, match=r"softmax_cross_entropy takes float targets .* of the "
                                         r"prediction's shape; got prediction \(None, 4\)"):
        build("softmax_cross_entropy", (None, 4), (None, 3))
    with pytest.raises(ShapeError, match=r"ignore_index applies to integer labels"):
        build("softmax_cross_entropy", (None, 4), (None, 4), ignore_index=0)
    with pytest.raises(ShapeError, match=r"nll takes scores \(\.\.\., classes\) and integer labels"):
        build("nll", (None, 5, 4), (None, 4), "int64")
    with pytest.raises(ShapeError, match=r"kl_divergence takes target distributions"):
        build("kl_divergence", (None, 4), (None,))
    with pytest.raises(ShapeError, match="target must be float"):
        build("kl_divergence", (None, 4), (None, 4), "int64")


def test_out_of_range_values_are_data_errors():
    with pytest.raises(ge.DataError, match=r"binary_cross_entropy probabilities \(from_logits=False\) "
                                           r"must lie in \[0, 1\]"):
        value_and_grad("binary_cross_entropy", LOGITS, BIT_TARGETS, from_logits=False)
    with pytest.raises(ge.DataError, match=r"kl_divergence targets must lie in \[0, 1\]"):
        value_and_grad("kl_divergence", SCORES, SOFT * 3)
    with pytest.raises(ge.DataError, match=r"softmax_cross_entropy: labels must lie in \[0, 4\)"):
        value_and_grad("softmax_cross_entropy", SCORES, PADDED)  # -100 without ignore_index


def test_the_double_activation_warning_follows_from_logits():
    def sigmoid_of(g, p):
        return g.activation("sigmoid", p)

    with pytest.warns(ge.GraphBuildWarning, match="applies sigmoid to its prediction itself"):
        build("binary_cross_entropy", (None, 1), (None, 1), pred=sigmoid_of)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build("binary_cross_entropy", (None, 1), (None, 1), pred=sigmoid_of, from_logits=False)
    with pytest.warns(ge.GraphBuildWarning, match="applies softmax to its prediction itself"):
        build("kl_divergence", (None, 3), (None, 3), pred=lambda g, p: g.activation("softmax", p))


def test_options_survive_save_and_load(tmp_path):
    g = ge.Graph()
    x, y = g.input("x", (None, 3)), g.input("y", (None,), dtype="int64")
    loss = g.loss("softmax_cross_entropy", g.layer("dense", x, units=4), y, weights=WEIGHTS,
                  ignore_index=-100, label_smoothing=0.1, reduction="sum", name="ce")
    model = g.compile(loss, optimizer="sgd")
    model.save(tmp_path / "m.gem")
    feeds = {"x": rng.standard_normal((6, 3)).astype(np.float32), "y": PADDED}
    loaded = ge.load(tmp_path / "m.gem")
    assert loaded.graph.nodes["ce"].op.config() == model.graph.nodes["ce"].op.config()
    assert loaded.forward(feeds) == model.forward(feeds)
