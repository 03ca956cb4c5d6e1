"""The gradient-statistics recorder: exact numbers, intervals, bounded history, backends."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

import graphengine as ge
from graphengine.tools.monitor import GradientMonitor, find_monitor


def rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(a, dtype=np.float64))))


def tiny(activation: str = "relu", backend: str = "numpy", lr: float = 0.1):
    """x (3) -> fc (4) -> activation -> out (2), mean squared error."""
    g = ge.Graph("tiny")
    x = g.input("x", shape=(None, 3))
    t = g.input("t", shape=(None, 2))
    h = g.layer("dense", x, units=4, name="fc")
    a = g.activation(activation, h)
    y = g.layer("dense", a, units=2, name="out")
    model = g.compile(g.loss("mse", y, t), optimizer=ge.optimizer("sgd", lr=lr), backend=backend)
    return model, h.name, a.name, y.name


def feeds(n: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.random((n, 3), dtype=np.float32), "t": rng.random((n, 2), dtype=np.float32)}


def test_gradient_statistics_are_exact():
    model, h, a, y = tiny()
    data = feeds()
    record = GradientMonitor().capture(model, data)
    grads = model.gradients()
    for name in ("fc/W", "fc/b", "out/W", "out/b"):
        stats = record.node(name)
        assert stats.grad_rms == pytest.approx(rms(grads[name]), rel=1e-5)
        assert stats.grad_norm == pytest.approx(float(np.linalg.norm(grads[name])), rel=1e-5)
        assert stats.grad_max == pytest.approx(float(np.abs(grads[name]).max()), rel=1e-6)
    # an intermediate: d mean((y - t)^2) / dy = 2 (y - t) / size
    pred = model.run(data, fetches=[y])[y]
    expected = 2 * (pred - data["t"]) / pred.size
    assert record.node(y).grad_rms == pytest.approx(rms(expected), rel=1e-5)
    assert record.node(y).grad_max == pytest.approx(float(np.abs(expected).max()), rel=1e-5)
    assert record.node("x") is None  # no gradient asked for the input
    assert record.loss == pytest.approx(float(np.mean((pred - data["t"]) ** 2)), rel=1e-5)


def test_dead_relu_fraction():
    model, h, a, _ = tiny("relu")
    model.parameters()["fc/b"][:] = [-100, -100, -100, 100]  # three units can never fire
    record = GradientMonitor().capture(model, feeds())
    assert record.node(a).dead_fraction == 0.75
    assert record.node(a).saturation is None


def test_sigmoid_saturation_fraction():
    model, h, a, _ = tiny("sigmoid")
    model.parameters()["fc/b"][:] = [100, -100, 0, 0]  # two units pinned to 1 and 0
    data = feeds()
    record = GradientMonitor().capture(model, data)
    out = model.run(data, fetches=[a])[a]
    expected = float(np.mean(out * (1 - out) < 0.25 * 0.05))
    assert expected == 0.5
    assert record.node(a).saturation == pytest.approx(expected)
    assert record.node(a).dead_fraction is None


def test_update_to_weight_ratio_follows_sgd():
    model, *_ = tiny(lr=0.1)
    monitor = GradientMonitor(every=1).attach(model)
    before = model.parameters()["fc/W"].copy()
    model.train_step(feeds())
    grad = model.gradients()["fc/W"]
    expected = 0.1 * np.linalg.norm(grad) / np.linalg.norm(before)
    record = monitor.latest()
    assert record.node("fc/W").update_ratio == pytest.approx(expected, rel=1e-5)
    assert record.node("fc/b").update_ratio is None  # a zero bias has no ratio


def test_fanned_out_tensor_records_each_edge():
    g = ge.Graph("residual")
    x = g.input("x", shape=(None, 3))
    t = g.input("t", shape=(None, 3))
    h = g.layer("dense", x, units=3, name="fc")
    s = g.activation("sigmoid", h)
    z = h + s
    y = g.layer("dense", z, units=3, name="out")
    model = g.compile(g.loss("mse", y, t), optimizer="sgd")
    rng = np.random.default_rng(1)
    data = {"x": rng.random((5, 3), dtype=np.float32), "t": rng.random((5, 3), dtype=np.float32)}
    record = GradientMonitor().capture(model, data)
    values = model.run(data, fetches=[y, s])
    dy = 2 * (values[y.name] - data["t"]) / values[y.name].size
    dz = dy @ model.parameters()["out/W"].T
    through_sigmoid = dz * values[s.name] * (1 - values[s.name])
    skip_rms, skip_norm = record.edges[(h.name, z.name)]
    assert skip_rms == pytest.approx(rms(dz), rel=1e-5)
    assert skip_norm == pytest.approx(float(np.linalg.norm(dz)), rel=1e-5)
    assert record.edges[(h.name, s.name)][0] == pytest.approx(rms(through_sigmoid), rel=1e-5)
    assert record.node(h.name).grad_rms == pytest.approx(rms(dz + through_sigmoid), rel=1e-5)
    assert (x.name, h.name) not in record.edges  # one consumer: the node's own numbers say it


def test_shared_parameter_sums_its_pieces():
    g = ge.Graph("tied")
    x = g.input("x", shape=(None, 3))
    t = g.input("t", shape=(None, 3))
    w = g.parameter("W", (3, 3))
    y = x @ w + (x * 2.0) @ w
    model = g.compile(g.loss("mse", y, t), optimizer="sgd")
    record = GradientMonitor().capture(model, feeds(6) | {"t": np.zeros((6, 3), np.float32)})
    assert record.node("W").grad_rms == pytest.approx(rms(model.gradients()["W"]), rel=1e-5)


def test_nan_gradient_is_marked_nonfinite():
    model, *_ = tiny()
    model.parameters()["out/W"][0, 0] = np.nan
    record = GradientMonitor().capture(model, feeds())
    stats = record.node("fc/W")
    assert stats.nonfinite and stats.grad_rms == math.inf


def test_records_every_n_steps_with_updates():
    model, *_ = tiny()
    monitor = GradientMonitor(every=3).attach(model)
    for _ in range(10):
        model.train_step(feeds())
    records = monitor.records
    assert [r.step for r in records] == [0, 3, 6, 9]
    assert all(r.node("fc/W").update_ratio is not None for r in records)
    assert all(r.loss is not None for r in records)


def test_history_is_bounded_and_spans_the_run():
    model, *_ = tiny()
    monitor = GradientMonitor(every=1, keep=4).attach(model)
    for _ in range(20):
        model.train_step(feeds())
    steps = [r.step for r in monitor.records]
    assert len(steps) <= 5
    assert monitor.stride > 1
    spacing = monitor.every * monitor.stride
    assert steps[0] == 0 and steps[-1] > 19 - spacing  # from the start to the latest interval
    assert all(s % spacing == 0 for s in steps[:-1])


def test_fit_records_epochs_and_leaves_training_unchanged():
    data = feeds(32, seed=3)
    plain, *_ = tiny()
    watched, *_ = tiny()
    monitor = GradientMonitor(every=2).attach(watched)
    a = plain.fit(data, epochs=3, batch_size=8, shuffle=False, verbose=0, monitor=False)
    b = watched.fit(data, epochs=3, batch_size=8, shuffle=False, verbose=0)
    assert a["loss"] == b["loss"]
    assert sorted({r.epoch for r in monitor.records}) == [1, 2, 3]
    assert find_monitor(watched) is monitor and find_monitor(plain) is None


def test_same_numbers_on_every_backend(backend):
    reference, *_ = tiny("sigmoid")
    model, *_ = tiny("sigmoid", backend=backend)
    data = feeds()
    expected = GradientMonitor().capture(reference, data)
    record = GradientMonitor().capture(model, data)
    np.testing.assert_allclose(record.table, expected.table, rtol=1e-5, equal_nan=True)


def test_bad_settings_are_clear_errors():
    with pytest.raises(ge.GraphEngineError, match="every"):
        GradientMonitor(every=0)
    with pytest.raises(ge.GraphEngineError, match="keep"):
        GradientMonitor(keep=1)
    model, *_ = tiny()
    GradientMonitor().attach(model)
    with pytest.raises(ge.GraphEngineError, match="already has a GradientMonitor"):
        GradientMonitor().attach(model)


def test_the_core_never_imports_viz():
    code = ("import sys, graphengine, graphengine.tools.monitor, graphengine.cli; "
            "print([m for m in sys.modules if m == 'viz' or m.startswith('viz.')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
