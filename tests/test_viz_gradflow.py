"""Diagnosis without rendering: flags, thresholds, and the advice in words."""

from __future__ import annotations

import numpy as np
import pytest
from graphengine.viz.demo import deep_mlp
from graphengine.viz.gradflow import diagnose, diagnose_history, ranges

import graphengine as ge
from graphengine.tools.monitor import GradientMonitor, find_monitor


def batch(n: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.random((n, 64), dtype=np.float32), "y": rng.integers(0, 10, n)}


def captured(activation: str, init: str, depth: int = 8, width: int = 32):
    g, loss = deep_mlp(activation, init, depth, width, f"{activation}{depth}")
    model = g.compile(loss, optimizer="sgd")
    GradientMonitor().capture(model, batch())
    return model


def test_deep_sigmoid_flags_the_early_layers_and_relu_none():
    sigmoid = diagnose(captured("sigmoid", "xavier"))
    flagged = sigmoid.flagged_layers("vanishing")
    assert flagged[0] == "fc1" and "out" not in flagged and "fc8" not in flagged
    # flagged layers are exactly those below the relative threshold of the strongest
    for layer in sigmoid.layers:
        assert ("vanishing" in layer.flags) == (layer.relative < 1e-3)
    assert sigmoid.layer("fc1").grad_rms < 1e-3 * sigmoid.layer("out").grad_rms
    assert "fc1/W" in sigmoid.flagged("vanishing") and "out/W" not in sigmoid.flagged("vanishing")
    text = str(sigmoid)
    assert f"layers {flagged[0]}-{flagged[-1]}" in text
    for advice in ("relu or maxout instead of sigmoid", "he initialization", "batch_norm", "adam"):
        assert advice in text

    relu = diagnose(captured("relu", "he"))
    assert relu.flagged_layers("vanishing") == [] and relu.flagged("vanishing") == []
    assert "healthy" in str(relu)


def test_relative_threshold_is_configurable():
    model = captured("sigmoid", "xavier")
    assert diagnose(model, vanishing=1e-12).flagged_layers("vanishing") == []
    everything_but_the_top = diagnose(model, vanishing=1.0).flagged_layers("vanishing")
    assert len(everything_but_the_top) == len(diagnose(model).layers) - 1
    with pytest.raises(ge.GraphEngineError, match="unknown threshold"):
        diagnose(model, vanishng=1e-3)


def test_exploding_and_nan_are_flagged():
    model = captured("relu", "he", depth=2)
    assert diagnose(model, exploding=1e-9).flagged_layers("exploding")
    model.parameters()["fc2/W"][0, 0] = np.nan
    find_monitor(model).capture(model, batch())
    diagnosis = diagnose(model, window=1)
    assert "exploding" in diagnosis.layer("fc1").flags
    assert "NaN/Inf" in str(diagnosis)


def test_dead_relus_are_flagged_with_advice():
    model = captured("relu", "he", depth=2)
    model.parameters()["fc2/b"][:] = -1000.0
    find_monitor(model).capture(model, batch())
    diagnosis = diagnose(model, window=1)
    dead = diagnosis.flagged("dead")
    assert dead == ["relu_1"]
    assert diagnosis.nodes["relu_1"].stats.dead_fraction == 1.0
    assert "dead ReLUs after fc2" in str(diagnosis) and "leaky_relu" in str(diagnosis)


def test_saturated_sigmoids_are_flagged():
    model = captured("sigmoid", "xavier", depth=2)
    model.parameters()["fc1/W"][:] *= 50.0
    find_monitor(model).capture(model, batch())
    diagnosis = diagnose(model, window=1)
    assert "sigmoid_0" in diagnosis.flagged("saturated")
    assert "saturated sigmoid after fc1" in str(diagnosis)


def test_diagnosis_needs_statistics():
    g, loss = deep_mlp("relu", "he", 1, 4, "bare")
    model = g.compile(loss, optimizer="sgd")
    with pytest.raises(ge.GraphEngineError, match="attach a monitor"):
        diagnose(model)


def test_table_lists_layers_and_nodes():
    table = diagnose(captured("sigmoid", "xavier", depth=2)).table()
    assert table.splitlines()[0].split()[:2] == ["layer", "kind"]
    assert "fc1/W" in table and "sigmoid_0" in table


def history(loss, val_loss=None) -> ge.History:
    h = ge.History()
    for i, value in enumerate(loss):
        logs = {"loss": value}
        if val_loss is not None:
            logs["val_loss"] = val_loss[i]
        h.append(i + 1, logs)
    return h


def test_history_advice():
    overfit = diagnose_history(history([1.0, 0.5, 0.3, 0.2, 0.1, 0.05], [1.1, 0.6, 0.45, 0.5, 0.6, 0.7]))
    assert [f.flag for f in overfit] == ["overfitting"]
    assert "validation loss rises after epoch 3" in overfit[0].message
    for advice in ("early stopping", "dropout", "L2"):
        assert advice in overfit[0].message

    stuck = diagnose_history(history([2.31, 2.30, 2.30], [2.31, 2.31, 2.31]))
    assert stuck[0].flag == "not-learning" and "not overfitting" in stuck[0].message

    fine = diagnose_history(history([1.0, 0.5, 0.3], [1.0, 0.6, 0.4]))
    assert [f.flag for f in fine] == ["fitting"]


def test_ranges_join_consecutive_layers():
    order = ["fc1", "fc2", "fc3", "fc4", "fc5", "out"]
    assert ranges(["fc3", "fc1", "fc2", "fc5"], order) == "fc1-fc3, fc5"


def test_a_snapshot_after_a_hand_written_loop_says_how_many_steps():
    """A loop of train_step calls advances steps, not epochs: the diagram's title counts those."""
    model = captured("relu", "he", depth=2)
    assert diagnose(model).when() == "on one batch, before training"
    for _ in range(3):
        model.train_step(batch())
    find_monitor(model).capture(model, batch())
    assert diagnose(model).when() == "on one batch after 3 steps"
    model.epoch = 2
    find_monitor(model).capture(model, batch())
    assert diagnose(model).when() == "on one batch after 2 epochs (step 3)"
