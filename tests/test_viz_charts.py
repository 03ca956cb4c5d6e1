"""The gradient-flow chart and the per-epoch numbers it plots."""

from __future__ import annotations

import numpy as np
import pytest
from graphengine.viz.charts import gradient_flow_chart, parameter_order, per_epoch, pick_epochs
from graphengine.viz.demo import deep_mlp
from matplotlib.figure import Figure

import graphengine as ge
from graphengine.tools.monitor import GradientMonitor, find_monitor


def trained(activation: str, init: str, epochs: int = 3) -> ge.Model:
    rng = np.random.default_rng(0)
    data = {"x": rng.random((64, 64), dtype=np.float32), "y": rng.integers(0, 10, 64)}
    g, loss = deep_mlp(activation, init, 3, 16, activation)
    model = g.compile(loss, optimizer=ge.optimizer("sgd", lr=0.1))
    GradientMonitor(every=2).attach(model)
    model.fit(data, epochs=epochs, batch_size=16, verbose=0)
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


@pytest.fixture
def drawn_figures(monkeypatch) -> list[Figure]:
    """Every matplotlib figure saved while the test runs (the chart builds its figure inside)."""
    figures = []
    save = Figure.savefig

    def keeping(figure, *args, **kwargs):
        figures.append(figure)
        return save(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keeping)
    return figures


@pytest.fixture(scope="module")
def models() -> dict[str, ge.Model]:
    return {"sigmoid": trained("sigmoid", "xavier"), "relu": trained("relu", "he")}


def test_chart_draws_every_parameter_on_log_axes_from_input_to_output(models, tmp_path, drawn_figures):
    png = gradient_flow_chart(models, tmp_path / "flow.png", title="test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (figure,) = drawn_figures
    assert len(figure.axes) == 2 * len(models)  # per model: per layer, and over training
    for row, (label, model) in enumerate(models.items()):
        left, right = figure.axes[2 * row: 2 * row + 2]
        assert left.get_title().startswith(f"{label}: per layer, input side -> output side")
        assert left.get_yscale() == "log" and right.get_yscale() == "log"
        names = parameter_order(model)
        is_weight = np.array([name.endswith("/W") for name in names])
        layers = ["fc1", "fc2", "fc3", "out"]
        assert [t.get_text() for t in left.get_xticklabels()] == layers
        table = per_epoch(find_monitor(model).records, names)
        # one solid line of weights and one dotted line of biases per epoch: every parameter is a
        # point, at its layer's position, with the median gradient RMS of that epoch
        epochs = [line for line in left.get_lines() if line.get_linestyle() == "-"]
        biases = [line for line in left.get_lines() if line.get_linestyle() == ":"]
        assert [line.get_label() for line in epochs] == [f"epoch {e}" for e in table]
        assert len(biases) == len(table)
        for weight_line, bias_line, medians in zip(epochs, biases, table.values()):
            assert list(weight_line.get_xdata()) == list(bias_line.get_xdata()) == [0, 1, 2, 3]
            np.testing.assert_allclose(weight_line.get_ydata(), medians[is_weight])
            np.testing.assert_allclose(bias_line.get_ydata(), medians[~is_weight])
        (threshold,) = [line for line in left.get_lines() if line.get_linestyle() == "--"]
        last_epoch = list(table.values())[-1]
        np.testing.assert_allclose(threshold.get_ydata(), 1e-3 * last_epoch[is_weight].max())
        assert {"weights", "biases"} <= {t.get_text() for t in left.get_legend().get_texts()}
        # right: each layer's weight gradient over the steps, in the same order
        assert [line.get_label() for line in right.get_lines()] == layers
        for line, name in zip(right.get_lines(), [n for n in names if n.endswith("/W")]):
            recorded = [r.value(name, "grad_rms") for r in find_monitor(model).records]
            np.testing.assert_allclose(line.get_ydata(), recorded)
    # the input side is on the left: there the sigmoid network's gradient is weakest, by far
    sigmoid_weights = figure.axes[0].get_lines()[0].get_ydata()
    assert np.all(np.diff(sigmoid_weights) > 0) and sigmoid_weights[-1] > 10 * sigmoid_weights[0]
    relu_weights = figure.axes[2].get_lines()[0].get_ydata()
    assert relu_weights.max() < 10 * relu_weights.min()


def test_chart_is_written_as_svg(models, tmp_path):
    svg = gradient_flow_chart(models, tmp_path / "flow.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg


def test_chart_needs_records(tmp_path):
    g, loss = deep_mlp("relu", "he", 1, 4, "bare")
    with pytest.raises(ge.GraphEngineError, match="no recorded gradient statistics"):
        gradient_flow_chart({"bare": g.compile(loss, optimizer="sgd")}, tmp_path / "x.png")
