"""Diagrams: the DOT source is checked without Graphviz; images only where `dot` is installed."""

from __future__ import annotations

import math
import re
import shutil

import matplotlib
import numpy as np
import pytest
from graphengine.viz.demo import deep_mlp
from graphengine.viz.gradflow import diagnose
from graphengine.viz.render import GraphvizMissingError, render, to_dot

import graphengine as ge
from graphengine.tools.monitor import GradientMonitor, find_monitor

needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz 'dot' is not installed")
ATTR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|[^\s\]]+)')
DOT_NODE = re.compile(r"^\s+(n\d+|L\d+|legend) \[", re.M)
#: a colour cell of the legend: its fill and its decade (1e-3 -> -3)
LEGEND_CELL = re.compile(r'<TD BGCOLOR="(#[0-9a-f]{6})" WIDTH="26"><FONT [^>]*>(1|1e-\d+)<')
#: viridis as the renderer writes its colours: 256 entries, each channel rounded to 0..255
VIRIDIS = np.round(255 * matplotlib.colormaps["viridis"](np.linspace(0, 1, 256))[:, :3]).astype(int)


def batch(n: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.random((n, 64), dtype=np.float32), "y": rng.integers(0, 10, n)}


def captured(activation: str = "sigmoid", init: str = "xavier", depth: int = 8, width: int = 32):
    g, loss = deep_mlp(activation, init, depth, width, f"{activation}{depth}")
    model = g.compile(loss, optimizer="sgd")
    GradientMonitor().capture(model, batch())
    return model


def node_attrs(source: str, model: ge.Model, name: str) -> dict[str, str]:
    """The attributes of the DOT node drawing graph node ``name`` (ids are n<position>)."""
    node_id = f"n{list(model.graph.nodes).index(name)}"
    (line,) = [ln for ln in source.splitlines() if ln.strip().startswith(f"{node_id} [")]
    return {k: v.strip('"') for k, v in ATTR.findall(line.split("[", 1)[1])}


def edge_attrs(source: str, model: ge.Model, tail: str, head: str) -> dict[str, str]:
    ids = [f"n{list(model.graph.nodes).index(n)}" for n in (tail, head)]
    (line,) = [ln for ln in source.splitlines() if ln.strip().startswith(f"{ids[0]} -> {ids[1]} ")]
    return {k: v.strip('"') for k, v in ATTR.findall(line.split("[", 1)[1])}


def viridis_position(fill: str) -> int:
    """Where a ``#rrggbb`` fill lies on viridis, 0 (dark purple) to 255 (yellow)."""
    rgb = np.array([int(fill[i:i + 2], 16) for i in (1, 3, 5)])
    (matches,) = np.nonzero((VIRIDIS == rgb).all(axis=1))
    assert len(matches), f"{fill} is not a viridis colour"
    return int(matches[0])


def test_dot_marks_vanishing_nodes_twice_with_colour_and_tooltips():
    model = captured()
    diagnosis = diagnose(model)
    source = to_dot(model).source
    weak, strong = node_attrs(source, model, "fc1/W"), node_attrs(source, model, "out/W")
    # the flag: a dashed border and a text badge on the weak node, neither on the strong one
    assert "dashed" in weak["style"] and "[VANISHING 10^" in weak["label"]
    assert "dashed" not in strong["style"] and "VANISHING" not in strong["label"]
    # labels: name, shape, parameter count, gradient RMS
    assert weak["label"].startswith("W\\n(64, 32) · 2,048 params\\ngrad rms ")
    # fill on viridis: the weak gradient dark (low end), the strong one light
    assert viridis_position(weak["fillcolor"]) < viridis_position(strong["fillcolor"])
    assert weak["fontcolor"] == "white" and strong["fontcolor"] == "black"
    # tooltips carry the exact numbers
    stats = diagnosis.nodes["fc1/W"].stats
    assert f"gradient RMS {stats.grad_rms:.3e}" in weak["tooltip"]
    assert f"max |gradient| {stats.grad_max:.3e}" in weak["tooltip"]
    assert "flags: vanishing" in weak["tooltip"]
    # the layer cluster says it too, and the legend explains scale and borders
    assert re.search(r'subgraph cluster_fc1 \{\n\s+.*label="fc1 · dense · 2,080 params\\n\[VANISHING', source)
    assert "fill: gradient RMS / strongest parameter gradient" in source
    assert "[VANISHING] dashed border" in source
    assert 'rankdir=TB' in source


def test_fill_is_the_share_of_the_strongest_parameter_gradient_on_the_fixed_legend():
    model = captured()
    diagnosis = diagnose(model)
    source = to_dot(model).source
    strongest = max(layer.grad_rms for layer in diagnosis.layers)
    rms = {name: health.stats.grad_rms for name, health in diagnosis.nodes.items()
           if health.stats.grad_rms is not None and model.graph.nodes[name].shape}
    assert len(rms) > 30 and max(rms.values()) > 1e4 * min(rms.values())
    # the legend: the decades 1e-8 .. 1, dark to light, in every diagram
    cells = LEGEND_CELL.findall(source)
    decades = [0 if text == "1" else int(text[2:]) for _, text in cells]
    ticks = [viridis_position(fill) for fill, _ in cells]
    assert decades == list(range(-8, 1)) and ticks == sorted(ticks) and ticks[0] == 0 and ticks[-1] == 255
    # each node's colour lies between those of the decades around its share of the strongest
    position = {name: viridis_position(node_attrs(source, model, name)["fillcolor"]) for name in rms}
    for name, value in rms.items():
        exponent = min(0.0, max(-8.0, math.log10(value / strongest)))
        below = math.floor(exponent)
        assert ticks[below + 8] <= position[name] <= ticks[min(below + 9, 8)], name
    assert [position[n] for n in sorted(rms, key=rms.get)] == sorted(position.values())


def test_nodes_without_gradient_stay_grey():
    model = captured(depth=2)
    source = to_dot(model).source
    labels = node_attrs(source, model, "y")
    assert labels["fillcolor"] == "#f2f2f2" and "no gradient recorded" in labels["tooltip"]
    assert edge_attrs(source, model, "y", "softmax_cross_entropy_0")["color"] == "#9a9a9a"


def test_dead_and_saturated_borders_and_badges():
    relu = captured("relu", "he", depth=2)
    relu.parameters()["fc2/b"][:] = -1000.0
    find_monitor(relu).capture(relu, batch())
    dead = node_attrs(to_dot(relu, window=1).source, relu, "relu_1")
    assert "dotted" in dead["style"] and "[DEAD 100%]" in dead["label"]

    sigmoid = captured(depth=2)
    sigmoid.parameters()["fc1/W"][:] *= 50.0
    find_monitor(sigmoid).capture(sigmoid, batch())
    saturated = node_attrs(to_dot(sigmoid, window=1).source, sigmoid, "sigmoid_0")
    assert "diagonals" in saturated["style"] and "[SATURATED" in saturated["label"]


def residual_sigmoid(blocks: int = 10, width: int = 32):
    g = ge.Graph("residual")
    x = g.input("x", shape=(None, 64))
    labels = g.input("y", shape=(None,), dtype="int64")
    h = g.layer("dense", x, units=width, name="fc0")
    adds = []
    for i in range(1, blocks + 1):
        h = h + g.activation("sigmoid", g.layer("dense", h, units=width, name=f"fc{i}"))
        adds.append(h.name)
    logits = g.layer("dense", h, units=10, name="out")
    model = g.compile(g.loss("softmax_cross_entropy", logits, labels), optimizer="sgd")
    return model, adds


def test_residual_gradient_arrives_through_the_skip_connection():
    model, adds = residual_sigmoid()
    record = GradientMonitor().capture(model, batch())
    diagnosis = diagnose(model)
    # the first block's input fans out: into fc1 (the sigmoid branch) and the skip to the add
    skip_rms, skip_norm = record.edges[("fc0/add", adds[0])]
    branch_rms, branch_norm = record.edges[("fc0/add", "fc1/matmul")]
    assert skip_rms == pytest.approx(record.node(adds[0]).grad_rms, rel=1e-6)  # the identity path
    assert skip_norm > 2 * branch_norm
    # so the early layers are not starved as in the plain deep sigmoid network
    assert diagnosis.flagged_layers("vanishing") == []
    assert diagnosis.layer("fc0").relative > 1e-2
    source = to_dot(model).source
    skip, branch = (edge_attrs(source, model, "fc0/add", adds[0]),
                    edge_attrs(source, model, "fc0/add", "fc1/matmul"))
    assert float(skip["penwidth"]) > float(branch["penwidth"])
    assert f"RMS {skip_rms:.3e}" in skip["tooltip"] and f"RMS {branch_rms:.3e}" in branch["tooltip"]


def test_forward_only_draws_the_structure():
    model = captured(depth=2)
    source = to_dot(model, forward_only=True).source
    assert "grad rms" not in source and "legend" not in source
    assert "structure (no gradient statistics)" in source
    attrs = node_attrs(source, model, "fc1/matmul")
    assert attrs["label"] == "matmul\\n(N, 32)" and attrs["fillcolor"] == "#f2f2f2"
    assert edge_attrs(source, model, "x", "fc1/matmul")["label"] == "(N, 64)"


def test_a_threshold_typo_is_an_error_even_without_statistics():
    g, loss = deep_mlp("relu", "he", 1, 4, "bare")
    with pytest.raises(ge.GraphEngineError, match="unknown threshold"):
        to_dot(g.compile(loss, optimizer="sgd"), vanishng=1e-3)


def test_collapsed_layers_and_rankdir():
    model = captured(depth=8)
    source = to_dot(model, collapse=True, rankdir="LR").source
    assert "rankdir=LR" in source and "cluster_" not in source
    # each layer is one node, and the activation applied to it joins it: one step of the network
    layer_nodes = re.findall(r'^\s+(L\d+) \[label="(\w+): ([\w +]+)\\n', source, re.M)
    assert [(name, kind) for _, name, kind in layer_nodes] == (
        [(f"fc{i}", "dense + sigmoid") for i in range(1, 9)] + [("out", "dense")])
    assert re.search(r"^\s+L0 -> L1 ", source, re.M)
    first, last = source.split("\tL0 [", 1)[1].splitlines()[0], source.split("\tL8 [", 1)[1].splitlines()[0]
    assert "[VANISHING" in first and "dashed" in first and "VANISHING" not in last
    assert "sigmoid_0" in first  # the tooltip lists the nodes it draws
    with pytest.raises(ge.GraphEngineError, match="rankdir"):
        to_dot(model, rankdir="UP")
    with pytest.raises(ge.GraphEngineError, match="unknown layer"):
        to_dot(model, collapse=["fc9"])



def test_collapsing_keeps_name_scopes_as_boxes_around_their_layers():
    """A GAN's generator graph: the scopes "gen" and "disc" hold layers; collapsed, each layer
    is one node (its activation joined) inside its scope's box, not the whole discriminator
    one node. A scope written by hand from primitives is one node, as a layer is."""
    g = ge.Graph("gan")
    z, y = g.input("z", (None, 4)), g.input("y", (None, 1))
    with g.name_scope("gen"):
        h = g.layer("dense", g.activation("relu", g.layer("dense", z, units=8, name="fc1")),
                    units=2, name="fc2")
    with g.name_scope("disc"):
        d = g.layer("dense", g.activation("leaky_relu", g.layer("dense", h, units=8, name="fc1")),
                    units=1, name="out")
    with g.name_scope("by_hand"):
        q = (z * 2.0).sum(axis=1, keepdims=True)
    model = g.compile(g.loss("binary_cross_entropy", d + q, y), optimizer="sgd")
    source = to_dot(model, collapse=True).source
    nodes = re.findall(r'^\s+L\d+ \[label="([\w/]+): ([\w +]+)\\n', source, re.M)
    assert sorted(nodes) == [("by_hand", "layer"), ("fc1", "dense + leaky_relu"),
                             ("fc1", "dense + relu"), ("fc2", "dense"), ("out", "dense")]
    assert "cluster_gen" in source and "cluster_disc" in source

def test_without_dot_nothing_next_to_the_picture_is_overwritten(tmp_path, monkeypatch):
    model = captured(depth=2)
    (tmp_path / "graph.txt").write_text("my notes")
    (tmp_path / "graph.gv").write_text("my source")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(GraphvizMissingError, match="apt-get install graphviz") as caught:
        render(model, tmp_path / "graph.svg")
    # the user's files are untouched; the source and the table went to a new folder, named
    assert (tmp_path / "graph.txt").read_text() == "my notes"
    assert (tmp_path / "graph.gv").read_text() == "my source"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graph.gv", "graph.txt"]
    error = caught.value
    assert error.table_path.parent != tmp_path and str(error.table_path) in str(error)
    assert str(error.source_path) in str(error) and "digraph" in error.source_path.read_text()
    table = error.table_path.read_text()
    assert "fc1/W" in table and "grad rms" in table


def test_unknown_format_is_refused(tmp_path):
    with pytest.raises(ge.GraphEngineError, match="format 'jpg'"):
        render(captured(depth=1), tmp_path / "graph.jpg")


@needs_dot
def test_renders_svg_png_pdf(tmp_path):
    model = captured(depth=2)
    stats = diagnose(model).nodes["fc1/W"].stats
    svg = render(model, tmp_path / "g.svg").read_text()
    assert f"gradient RMS {stats.grad_rms:.3e}" in svg.replace("&#45;", "-")
    # every node of the DOT source is drawn, and the source itself is not left behind
    drawn = set(re.findall(r'<g id="node\d+" class="node">\s*<title>([^<]+)</title>', svg))
    assert drawn == set(DOT_NODE.findall(to_dot(model).source))
    assert [p.name for p in tmp_path.iterdir()] == ["g.svg"]
    assert render(model, tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert render(model, tmp_path / "g.pdf", forward_only=True).read_bytes()[:5] == b"%PDF-"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.pdf", "g.png", "g.svg"]
    render(model, tmp_path / "kept.svg", keep_source=True)
    assert (tmp_path / "kept.gv").read_text() == to_dot(model).source


@needs_dot
def test_render_writes_only_the_file_it_names(tmp_path):
    (tmp_path / "graph.gv").write_text("my own source")
    render(captured(depth=1), tmp_path / "graph.svg")
    assert (tmp_path / "graph.gv").read_text() == "my own source"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graph.gv", "graph.svg"]


@pytest.fixture(scope="module")
def large_model() -> ge.Model:
    model, _ = residual_sigmoid(blocks=12)
    GradientMonitor().capture(model, batch())
    return model


def test_a_large_graph_draws_every_node_with_its_label(large_model):
    nodes = large_model.graph.nodes
    assert len(nodes) >= 60
    source = to_dot(large_model).source
    assert len(DOT_NODE.findall(source)) == len(nodes) + 1  # and the legend
    for name in nodes:
        # first line: the name within its layer's box, then ": kind" where the name does not say it
        first_line = node_attrs(source, large_model, name)["label"].split("\\n")[0]
        assert first_line.split(": ")[0] == name.rsplit("/", 1)[-1], (name, first_line)


@needs_dot
def test_a_large_graph_renders(large_model, tmp_path):
    png = render(large_model, tmp_path / "large.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = np.frombuffer(data[16:24], dtype=">u4")
    assert width > 500 and height > 2000
