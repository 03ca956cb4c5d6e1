"""The README's training-output claims are the program's output: the summary table of the
three-step model, the format of fit's line, and the default recording interval."""

from __future__ import annotations

import re
from pathlib import Path

import graphengine as ge
from graphengine.train import loop

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def block_after(marker: str) -> str:
    """The first fenced block after ``marker`` in the README."""
    start = README.index(marker)
    match = re.compile(r"```\w*\n(.*?)```", re.S).search(README, start)
    return match.group(1).rstrip("\n")


def three_step_model() -> ge.Model:
    """The model of the README's "The three steps", as written there."""
    code = block_after("## The three steps")
    build = code[:code.index("history = model.fit")]  # building and compiling, not training
    namespace: dict = {}
    exec(build, namespace)
    return namespace["model"]


def test_the_quoted_summary_is_the_three_step_models():
    assert str(three_step_model()) == block_after("`model.summary()` prints, and returns")


def test_the_quoted_epoch_line_is_fits_format():
    logs = {"loss": 0.2345, "accuracy": 0.95, "error": 0.05, "val_loss": 0.3012,
            "val_accuracy": 0.93, "val_error": 0.07}
    quoted = block_after("`fit` prints one line per epoch")
    assert loop._epoch_line(3, 10, logs, 0.02) == quoted


def test_the_quoted_recording_interval_is_fits():
    assert f"gradient statistics recorded every {loop.MONITOR_EVERY} steps" in README


def test_the_primitive_level_block_builds_and_runs():
    """Every line of "The primitive level" builds, and the graph it makes runs and differentiates."""
    import numpy as np

    g = ge.Graph("primitives")
    namespace = {"ge": ge, "g": g, "x": g.input("x", (None, 64)),
                 "mask": g.input("mask", (None, 10), dtype="bool"),
                 "labels": g.input("labels", (None,), dtype="int64")}
    exec(block_after("### The primitive level"), namespace)
    parts = [namespace[k].mean() for k in ("e", "r", "s", "p", "t", "u")]
    model = g.compile(sum(parts[1:], parts[0]), outputs=[namespace["z"]], optimizer="sgd")
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((4, 64)).astype("float32"),
             "mask": rng.random((4, 10)) < 0.5, "labels": rng.integers(0, 10, 4)}
    assert np.isfinite(model.forward(feeds))
    model.backward()
    assert set(model.gradients()) == {"W", "b"}
