"""Metrics beside the loss: regression (mae, rmse, r2), top-k accuracy and a user's functions,
given to compile or fit, reported by fit (History, val_) and evaluate, exact over batches."""

from __future__ import annotations

import numpy as np
import pytest

import graphengine as ge
from graphengine.train.metrics import R2, TopKAccuracy, get_metrics

rng = np.random.default_rng(3)


def regressor(metrics=None, backend: str = "numpy") -> ge.Model:
    g = ge.Graph("reg")
    x = g.input("x", (None, 3))
    y = g.input("y", (None, 1))
    out = g.layer("dense", g.activation("tanh", g.layer("dense", x, units=8)), units=1)
    return g.compile(g.loss("mse", out, y), optimizer=ge.optimizer("sgd", lr=0.05),
                     metrics=metrics, backend=backend)


def regression(n: int) -> dict[str, np.ndarray]:
    x = rng.standard_normal((n, 3)).astype(np.float32)
    return {"x": x, "y": (x @ [[1.0], [-0.5], [0.2]] + 0.1).astype(np.float32)}


def classifier(classes: int = 5) -> ge.Model:
    g = ge.Graph("clf")
    x = g.input("x", (None, 4))
    y = g.input("y", (None,), dtype="int64")
    out = g.layer("dense", x, units=classes)
    return g.compile(g.loss("softmax_cross_entropy", out, y), optimizer="sgd")


def labelled(n: int, classes: int = 5) -> dict[str, np.ndarray]:
    return {"x": rng.standard_normal((n, 4)).astype(np.float32),
            "y": rng.integers(0, classes, n).astype(np.int64)}


def test_regression_metrics_are_exact_over_uneven_batches(backend):
    model = regressor(["mae", "rmse", "r2"], backend=backend)
    model.fit(regression(64), epochs=2, batch_size=16, verbose=0)
    data = regression(50)
    pred, y = model.predict(data).astype(np.float64), data["y"].astype(np.float64)
    scores = model.evaluate(data, batch_size=7)  # 7 batches of 7 and one of 1
    assert scores["mae"] == pytest.approx(np.abs(pred - y).mean(), rel=1e-4)
    assert scores["rmse"] == pytest.approx(np.sqrt(((pred - y) ** 2).mean()), rel=1e-4)
    r2 = 1 - ((pred - y) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    assert scores["r2"] == pytest.approx(r2, rel=1e-4)
    assert scores["rmse"] ** 2 == pytest.approx(scores["loss"], rel=1e-4)  # mse is the loss


def test_fit_reports_metrics_and_their_validation_in_the_history():
    model = regressor(["mae", "r2"])
    history = model.fit(regression(64), epochs=3, batch_size=16, validation=regression(20), verbose=0)
    for key in ("mae", "r2", "val_mae", "val_r2"):
        assert len(history[key]) == 3
    assert history["r2"][-1] > history["r2"][0]  # the fit improves
    assert "accuracy" not in history  # regression: the loss defines no accuracy


def test_top_k_accuracy_counts_the_label_among_the_k_best_scores():
    scores = np.array([[0.1, 0.5, 0.4], [0.7, 0.2, 0.1], [0.3, 0.3, 0.4]])
    labels = np.array([2, 2, 0])
    # the third example's label ties for second place: a tie counts in the label's favour
    for k, expected in [(1, 0), (2, 2), (3, 3)]:
        correct, count = TopKAccuracy(k).sums(np, scores, labels)
        assert (int(correct), count) == (expected, 3)
    one_hot = np.eye(3)[labels]  # one-hot labels count the same
    assert int(TopKAccuracy(2).sums(np, scores, one_hot)[0]) == 2


def test_top_1_accuracy_is_the_accuracy_and_top_all_is_one():
    model = classifier(5)
    scores = model.evaluate(labelled(60), metrics=["top1_accuracy", "top_5_accuracy",
                                                   TopKAccuracy(3)])
    assert scores["top1_accuracy"] == pytest.approx(scores["accuracy"])
    assert scores["top5_accuracy"] == 1.0
    assert scores["accuracy"] <= scores["top3_accuracy"] <= 1.0


def test_a_user_function_gets_host_arrays_of_each_batch_and_is_averaged_by_size():
    seen = []

    def share_of_class_0(pred, target):
        seen.append((type(pred), pred.shape))
        return float(np.mean(target == 0))

    data = labelled(25)
    model = classifier(5)
    scores = model.evaluate(data, batch_size=10, metrics={"share_of_class_0": share_of_class_0,
                                                                "rows": lambda p, t: 1})
    assert scores["share_of_class_0"] == pytest.approx(np.mean(data["y"] == 0))
    assert scores["rows"] == 1.0
    assert seen == [(np.ndarray, (10, 5)), (np.ndarray, (10, 5)), (np.ndarray, (5, 5))]
    np.testing.assert_allclose(model.predict(data).sum(axis=1), 1, rtol=1e-5)  # probabilities


def test_fit_metrics_replace_those_given_to_compile_for_that_call():
    model = regressor(["mae"])
    history = model.fit(regression(32), epochs=1, batch_size=16, verbose=0, metrics=["rmse"])
    assert "rmse" in history and "mae" not in history
    assert "mae" in model.evaluate(regression(10))  # compile's stay the model's own
    assert set(model.evaluate(regression(10), metrics=[])) == {"loss"}


@pytest.mark.parametrize("metrics, message", [
    (["rsme"], "unknown metric 'rsme'. Did you mean 'rmse'?"),
    (["mae", "mae"], r"must be unique .*\['mae'\]"),
    (["accuracy"], "unknown metric 'accuracy'.*accuracy and error are reported where the loss"),
    ([3], "a metric is a name, a graphengine Metric or a function"),
    ({"fit": "r2"}, "a built-in metric keeps its name"),
    (["top0_accuracy"], "top-k accuracy needs a positive int k, got 0"),
])
def test_a_bad_metric_is_refused_at_compile(metrics, message):
    with pytest.raises(ge.GraphEngineError, match=message):
        regressor(metrics)


def test_a_regression_metric_on_class_scores_says_what_it_compares():
    with pytest.raises(ge.GraphEngineError, match=r"metric 'mae' compares prediction and target "
                                                  r"element by element.*\(8, 5\).*\(8,\)"):
        classifier(5).evaluate(labelled(8), metrics=["mae"])


def test_a_function_returning_no_number_is_named():
    with pytest.raises(ge.GraphEngineError, match=r"metric 'bad' returned 'high', not a number"):
        classifier(5).evaluate(labelled(8), metrics={"bad": lambda p, t: "high"})


def test_metrics_need_a_loss_that_names_its_prediction_and_target():
    g = ge.Graph("hand")
    x = g.input("x", (None, 3))
    y = g.input("y", (None, 1))
    diff = g.layer("dense", x, units=1) - y
    model = g.compile((diff * diff).mean(), optimizer="sgd", outputs=[diff])
    with pytest.raises(ge.GraphEngineError, match=r"metrics \['mae'\] need a loss built with g.loss"):
        model.evaluate(regression(8), metrics=["mae"])
    assert set(model.evaluate(regression(8))) == {"loss"}


def test_r2_of_a_constant_target_is_nan_not_a_division_error():
    assert np.isnan(R2().result(np.array([1.0, 6.0, 12.0, 3.0])))  # sum 6, squares 12: no spread
    assert get_metrics(None) == []
