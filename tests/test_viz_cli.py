"""`graphengine render` and `graphengine demo vanishing`."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest

from graphengine.cli import main
from viz.demo import DemoConfig, deep_mlp, vanishing_demo

needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz 'dot' is not installed")


@pytest.fixture
def saved_model(tmp_path):
    g, loss = deep_mlp("sigmoid", "xavier", 6, 16, "saved")
    model = g.compile(loss, optimizer="sgd")
    path = tmp_path / "model.gem"
    model.save(path)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "batch.npz", x=rng.random((32, 64), dtype=np.float32), y=rng.integers(0, 10, 32))
    return path


@needs_dot
def test_render_a_saved_model(saved_model, tmp_path, capsys):
    out = tmp_path / "graph.svg"
    assert main(["render", str(saved_model), "-o", str(out)]) == 0
    svg = out.read_text()
    assert "structure (no gradient statistics)" in svg and "fc6" in svg
    assert f"wrote {out}" in capsys.readouterr().out


@needs_dot
def test_render_with_data_annotates_and_diagnoses(saved_model, tmp_path, capsys):
    out = tmp_path / "graph.png"
    code = main(["render", str(saved_model), "-o", str(out), "--data", str(tmp_path / "batch.npz"),
                 "--rankdir", "LR", "--collapse", "--keep-source"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "vanishing gradients: layers fc1-" in printed
    assert out.read_bytes()[:4] == b"\x89PNG"
    source = (tmp_path / "graph.gv").read_text()
    assert "rankdir=LR" in source and "[VANISHING" in source


def test_render_reports_a_bad_file(tmp_path, capsys):
    bad = tmp_path / "nothing.gem"
    bad.write_bytes(b"not a model")
    assert main(["render", str(bad), "-o", str(tmp_path / "g.svg")]) == 1
    assert "graphengine render:" in capsys.readouterr().err


@pytest.mark.slow
def test_vanishing_demo(tmp_path):
    stream = io.StringIO()
    code = vanishing_demo(tmp_path, DemoConfig(epochs=4), progress=False, stream=stream)
    text = stream.getvalue()
    # four epochs show the flags; whether depth hurts ReLU yet is for the full demo to say
    assert code == (1 if "[NO ]" in text else 0), text
    assert "[yes] early sigmoid layers flagged vanishing (fc1" in text
    assert "[yes] no ReLU layer flagged vanishing (none)" in text
    assert "sigmoid + xavier   fc1 " in text and "first/last" in text
    names = {p.name for p in tmp_path.iterdir()}
    assert {"gradient_flow.png", "sigmoid_deep.txt", "relu_deep.txt"} <= names
    if shutil.which("dot"):
        assert {"sigmoid_deep.svg", "sigmoid_deep.png", "relu_deep.svg", "relu_deep.png"} <= names
