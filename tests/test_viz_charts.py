"""The gradient-flow chart and the per-epoch numbers it plots."""

from __future__ import annotations

import numpy as np
import pytest

import graphengine as ge
from graphengine.monitor import GradientMonitor, find_monitor
from viz.charts import gradient_flow_chart, parameter_order, per_epoch, pick_epochs
from viz.demo import deep_mlp


def trained(activation: str, init: str, epochs: int = 3) -> ge.Model:
    rng = np.random.default_rng(0)
    data = {"x": rng.random((64, 64), dtype=np.float32), "y": rng.integers(0, 10, 64)}
    g, loss = deep_mlp(activation, init, 3, 16, activation)
    model = g.compile(loss, optimizer=ge.optimizer("sgd", lr=0.1))
    GradientMonitor(every=2).attach(model)
    model.fit(data, epochs=epochs, batch_size=16, progress=False)
    return model


def test_per_epoch_medians():
    model = trained("sigmoid", "xavier")
    records = find_monitor(model).records
    names = parameter_order(model)
    assert names == ["fc1/W", "fc1/b", "fc2/W", "fc2/b", "fc3/W", "fc3/b", "out/W", "out/b"]
    table = per_epoch(records, names)
    assert sorted(table) == [1, 2, 3]
    second = [r.value("fc1/W", "grad_rms") for r in records if r.epoch == 2]
    assert table[2][0] == pytest.approx(np.median(second))


def test_pick_epochs_spreads_first_to_last():
    assert pick_epochs(list(range(1, 31)), most=4) == [1, 11, 20, 30]
    assert pick_epochs([1, 2], most=6) == [1, 2]


def test_chart_is_written(tmp_path):
    models = {"sigmoid": trained("sigmoid", "xavier"), "relu": trained("relu", "he")}
    png = gradient_flow_chart(models, tmp_path / "flow.png", title="test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert gradient_flow_chart(models, tmp_path / "flow.svg").read_text().lstrip().startswith("<?xml")


def test_chart_needs_records(tmp_path):
    g, loss = deep_mlp("relu", "he", 1, 4, "bare")
    with pytest.raises(ge.GraphEngineError, match="no recorded gradient statistics"):
        gradient_flow_chart({"bare": g.compile(loss, optimizer="sgd")}, tmp_path / "x.png")
