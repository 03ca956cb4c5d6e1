"""The visualizer tells the truth by default: one colour scale for every diagram, gradients from one
batch on request, a note when there are none, honest epochs, legible pictures, bounded --data."""

from __future__ import annotations

import math
import re
import shutil
import zipfile

import numpy as np
import pytest
from graphengine.viz.charts import gradient_flow_chart
from graphengine.viz.cli import load_batch
from graphengine.viz.demo import deep_mlp
from graphengine.viz.gradflow import diagnose, diagnose_history, snapshot
from graphengine.viz.render import SCALE, render, to_dot
from test_viz_render import ATTR, batch, captured, node_attrs

import graphengine as ge
from graphengine.cli import main
from graphengine.tools.monitor import GradientMonitor, find_monitor
from graphengine.train.loop import EarlyStopping

needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz 'dot' is not installed")


def fills(source: str, model: ge.Model) -> dict[str, str]:
    """Fill of every node that receives a gradient and has a shape, by node name."""
    diagnosis = diagnose(model)
    return {name: node_attrs(source, model, name)["fillcolor"] for name, health in diagnosis.nodes.items()
            if health.stats.grad_rms is not None and model.graph.nodes[name].shape}


def test_the_same_colour_means_the_same_share_in_every_diagram():
    sigmoid, relu = captured("sigmoid", "xavier"), captured("relu", "he")
    for model in (sigmoid, relu):
        diagnosis = diagnose(model)
        strongest = max(layer.grad_rms for layer in diagnosis.layers)
        source = to_dot(model).source
        for name, fill in fills(source, model).items():
            share = diagnosis.nodes[name].stats.grad_rms / strongest
            assert fill == SCALE.colours(share)[0], name
    # so the ReLU network, whose gradients all lie within a few x of each other, looks healthy:
    # every node in the upper quarter of the scale (a share above 10^-2), none dark
    positions = [SCALE.fraction(10 ** -2)]
    relu_source = to_dot(relu).source
    relu_diag = diagnose(relu)
    strongest = max(layer.grad_rms for layer in relu_diag.layers)
    for name in fills(relu_source, relu):
        assert SCALE.fraction(relu_diag.nodes[name].stats.grad_rms / strongest) > positions[0], name
    # while the deep sigmoid network's first layer sits in the lower half
    sig_diag = diagnose(sigmoid)
    first = sig_diag.layer("fc1").grad_rms / max(layer.grad_rms for layer in sig_diag.layers)
    assert SCALE.fraction(first) < 0.5


def test_a_layer_box_is_filled_by_its_parameter_gradient():
    model = captured("sigmoid", "xavier")
    diagnosis = diagnose(model)
    strongest = max(layer.grad_rms for layer in diagnosis.layers)
    source = to_dot(model).source
    for layer in ("fc1", "fc8", "out"):
        block = source.split(f"subgraph cluster_{layer} {{", 1)[1].split("\n", 2)[1]
        attrs = dict(ATTR.findall(block))
        expected, ink = SCALE.colours(diagnosis.layer(layer).grad_rms / strongest)
        assert attrs["bgcolor"].strip('"') == expected and attrs["fontcolor"].strip('"') == ink


def test_a_box_around_one_node_is_not_drawn_and_no_box_says_0_params():
    g = ge.Graph("flat")
    x = g.input("x", shape=(None, 2, 4))
    labels = g.input("y", shape=(None,), dtype="int64")
    h = g.layer("flatten", x, name="flat")
    logits = g.layer("dense", h, units=3, name="fc")
    model = g.compile(g.loss("softmax_cross_entropy", logits, labels), optimizer="sgd")
    GradientMonitor().capture(model, {"x": np.ones((4, 2, 4), np.float32), "y": np.zeros(4, np.int64)})
    source = to_dot(model).source
    assert "cluster_flat" not in source and "cluster_fc" in source
    assert "0 params" not in source
    (flat,) = [n for n in model.graph.nodes if n.startswith("flat/")]
    assert node_attrs(source, model, flat)["label"].startswith(flat)  # its full name, outside a box


def test_a_render_without_statistics_says_so_on_stderr(tmp_path, capsys, monkeypatch):
    g, loss = deep_mlp("relu", "he", 2, 8, "bare")
    model = g.compile(loss, optimizer="sgd")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no dot needed: the note comes first
    with pytest.raises(ge.GraphEngineError):
        render(model, tmp_path / "bare.svg")
    err = capsys.readouterr().err
    assert "'bare' has no gradient statistics" in err and "data=" in err
    with pytest.raises(ge.GraphEngineError):
        render(model, tmp_path / "bare.svg", forward_only=True)
    assert capsys.readouterr().err == ""


def trained(epochs: int = 2) -> ge.Model:
    g, loss = deep_mlp("sigmoid", "xavier", 3, 16, "trained")
    model = g.compile(loss, optimizer=ge.optimizer("sgd", lr=0.1))
    if find_monitor(model) is None:
        GradientMonitor(every=2).attach(model)
    model.fit(batch(64), epochs=epochs, batch_size=16, verbose=0)
    return model


def test_render_data_takes_a_fresh_snapshot_and_leaves_the_training_history_alone():
    model = trained(epochs=2)
    monitor = find_monitor(model)
    history = [(r.step, r.epoch) for r in monitor.records]
    # training records: the epoch being trained
    assert diagnose(model).epoch == 2 and "(epoch 2" in to_dot(model).source
    source = to_dot(model, snapshot(model, batch(8, seed=5))).source
    # a snapshot is labelled with the epochs trained before it, never the one after
    assert "gradient flow on one batch after 2 epochs" in source and "epoch 3" not in source
    assert [(r.step, r.epoch) for r in monitor.records] == history
    assert find_monitor(model) is monitor and model.observers.count(monitor) == 1


@needs_dot
def test_render_with_data_draws_the_gradients_of_that_batch(tmp_path):
    g, loss = deep_mlp("sigmoid", "xavier", 6, 16, "fresh")
    model = g.compile(loss, optimizer="sgd")  # never trained: nothing recorded
    path = render(model, tmp_path / "fresh.svg", data=batch(16))
    svg = path.read_text()
    assert "gradient flow on one batch, before training" in svg and "VANISHING" in svg
    assert find_monitor(model) is None
    with pytest.raises(ge.GraphEngineError, match="not both"):
        render(model, tmp_path / "x.svg", data=batch(4), source=snapshot(model, batch(4)))


def test_history_advice_knows_early_stopping_restored_the_best_epoch():
    rng = np.random.default_rng(0)
    x = rng.random((40, 64), dtype=np.float32)
    train = {"x": x, "y": rng.integers(0, 10, 40)}
    val = {"x": rng.random((40, 64), dtype=np.float32), "y": rng.integers(0, 10, 40)}  # noise
    g, loss = deep_mlp("relu", "he", 2, 64, "overfit")
    model = g.compile(loss, optimizer=ge.optimizer("adam", lr=0.01), seed=0)
    stop = EarlyStopping(patience=3)
    history = model.fit(train, epochs=30, batch_size=8, validation=val, verbose=0, callbacks=[stop])
    assert stop.best_epoch < history.epochs[-1]  # validation loss rose, and training stopped
    plain = " ".join(str(f) for f in diagnose_history(history))
    assert "try early stopping" in plain
    told = [str(f) for f in diagnose_history(history, early_stopping=stop)]
    assert not any("try early stopping" in f for f in told)
    assert any(f"early stopping restored epoch {stop.best_epoch}'s weights" in f for f in told), told


def test_chart_legends_sit_beside_the_data(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    model = trained(epochs=3)
    drawn: list[Figure] = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (drawn.append(fig), save(fig, *a, **k)))
    gradient_flow_chart({"a": model, "b": model}, tmp_path / "chart.png", title="t")
    (fig,) = drawn
    boxes = [(axes.get_legend().get_window_extent(), axes.get_window_extent()) for axes in fig.axes]
    assert len(boxes) == 4
    for legend, area in boxes:  # outside the plotting area: on no line, no point
        assert legend.x0 >= area.x1 or legend.x1 <= area.x0 or legend.y0 >= area.y1 or legend.y1 <= area.y0


# --------------------------------------------------------------------------- the command line

@pytest.fixture
def saved(tmp_path):
    g, loss = deep_mlp("sigmoid", "xavier", 2, 8, "saved")
    model = g.compile(loss, optimizer="sgd")
    model.save(tmp_path / "model.gem")
    return tmp_path / "model.gem", model


@needs_dot
def test_render_takes_format(saved, tmp_path):
    path, _ = saved
    out = tmp_path / "picture"
    assert main(["render", str(path), "-o", str(out), "--format", "png", "--forward-only"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def zeros_npz(path, rows: int) -> None:
    np.savez_compressed(path, x=np.zeros((rows, 64), np.float32), y=np.zeros(rows, np.int64))


def test_data_is_checked_from_the_headers_before_loading(saved, tmp_path, capsys):
    path, model = saved
    # 70,000 rows of zeros: 23 MB unpacked, a few kB on disk
    zeros_npz(tmp_path / "bomb.npz", 70_000)
    assert (tmp_path / "bomb.npz").stat().st_size < 100_000
    args = ["render", str(path), "-o", str(tmp_path / "g.svg"), "--data", str(tmp_path / "bomb.npz")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "holds 70,000 rows; one batch of at most 65,536" in err and "Traceback" not in err
    # the byte bound, on the declared sizes
    zeros_npz(tmp_path / "small.npz", 100)
    with pytest.raises(ge.DataError, match=r"hold 26,400 bytes unpacked; one batch of at most 1,000"):
        load_batch(tmp_path / "small.npz", model, max_bytes=1000)
    assert set(load_batch(tmp_path / "small.npz", model)) == {"x", "y"}
    # names and shapes against the model's inputs
    np.savez(tmp_path / "names.npz", pixels=np.zeros((2, 64), np.float32))
    with pytest.raises(ge.DataError, match=r"'pixels' is not an input of the model; its inputs are \['x', "):
        load_batch(tmp_path / "names.npz", model)
    np.savez(tmp_path / "shape.npz", x=np.zeros((2, 63), np.float32))
    with pytest.raises(ge.DataError, match=r"takes shape \('N', 64\)"):
        load_batch(tmp_path / "shape.npz", model)
    # a member whose header understates what it unpacks to
    with zipfile.ZipFile(tmp_path / "lie.npz", "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("x.npy", "w") as member:
            np.lib.format.write_array_header_1_0(member, {"descr": "<f4", "fortran_order": False,
                                                          "shape": (1, 64)})
            member.write(bytes(10_000_000))
    with pytest.raises(ge.DataError, match="unpacked but declares 256"):
        load_batch(tmp_path / "lie.npz", model)
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ge.DataError, match="not an .npz file"):
        load_batch(tmp_path / "text.npz", model)
    with pytest.raises(ge.DataError, match="no such file"):
        load_batch(tmp_path / "missing.npz", model)


# --------------------------------------------------------------------------- the README's numbers

def quoted_demo_output(text: str) -> str:
    """The block the document quotes after "It prints (seed 0):"."""
    match = re.search(r"It prints \(seed 0\):\n\n```\n(.*?)```", text, re.S)
    assert match, "no quoted demo output"
    return match.group(1)


@pytest.mark.slow
def test_the_quoted_demo_output_is_what_the_demo_prints(tmp_path):
    import io
    from pathlib import Path

    from graphengine.viz.demo import DemoConfig, vanishing_demo

    stream = io.StringIO()
    vanishing_demo(tmp_path, DemoConfig(), progress=False, stream=stream)
    printed = stream.getvalue()
    # from the table on, up to the list of files written (paths and timings vary)
    fresh = printed[printed.index("final training loss"):printed.index("\n\nwrote ")] + "\n"
    root = Path(__file__).resolve().parent.parent
    for document in ("README.md", "docs/visualizer.md"):
        quoted = quoted_demo_output((root / document).read_text())
        assert_same_text(quoted, fresh, document)


def assert_same_text(quoted: str, fresh: str, where: str) -> None:
    """Equal words; numbers equal to 1% (another CPU's BLAS may round a last digit differently)."""
    number = re.compile(r"-?\d+(?:\.\d+)?(?:e[+-]?\d+)?")
    assert number.sub("#", quoted) == number.sub("#", fresh), f"{where} quotes another text than printed"
    for a, b in zip(number.findall(quoted), number.findall(fresh)):
        assert math.isclose(float(a), float(b), rel_tol=0.01), f"{where}: quotes {a}, the demo prints {b}"
