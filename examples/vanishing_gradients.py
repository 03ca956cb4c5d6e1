"""Vanishing gradients and the skip connection, through the visualizer's Python API.

    .venv/bin/python examples/vanishing_gradients.py

A deep sigmoid network (8 hidden layers) starves its early layers of gradient. The same sigmoid
layers stacked as residual blocks, ``h = h + sigmoid(dense(h))``, pass the gradient back along the
identity path: the diagram shows it arriving through each skip connection, and the diagnosis
flags nothing. Writes the residual network's diagram to docs/images/ as SVG, one node per layer
(residual_sigmoid.svg) and in full (residual_sigmoid_full.svg, 80+ nodes).
(``graphengine demo vanishing`` is the other fix, ReLU and He initialization, with charts.)
"""

from __future__ import annotations

import sys
from pathlib import Path

from graphengine.viz.demo import deep_mlp, digits
from graphengine.viz.gradflow import diagnose
from graphengine.viz.render import GraphvizMissingError, render

import graphengine as ge
from graphengine.tools.monitor import GradientMonitor

IMAGES = Path(__file__).resolve().parent.parent / "docs" / "images"


def residual_sigmoid(blocks: int, width: int = 64) -> tuple[ge.Graph, ge.Tensor]:
    """dense -> ``blocks`` x (h + sigmoid(dense(h))) -> dense 10."""
    g = ge.Graph("residual_sigmoid")
    x = g.input("x", shape=(None, 64))
    labels = g.input("y", shape=(None,), dtype="int64")
    h = g.layer("dense", x, units=width, name="fc0")
    for i in range(1, blocks + 1):
        h = h + g.activation("sigmoid", g.layer("dense", h, units=width, name=f"fc{i}"))
    logits = g.layer("dense", h, units=10, name="out")
    return g, g.loss("softmax_cross_entropy", logits, labels)


def train(graph: ge.Graph, loss: ge.Tensor, epochs: int) -> tuple[ge.Model, float]:
    train_set, _ = digits()
    model = graph.compile(loss, optimizer=ge.optimizer("sgd", lr=0.05))
    GradientMonitor(every=10).attach(model)
    history = model.fit(train_set, epochs=epochs, batch_size=32, verbose=0)
    return model, history["loss"][-1]


def main(epochs: int = 10, blocks: int = 12, out: Path = IMAGES) -> dict[str, float]:
    results = {}
    plain, plain_loss = train(*deep_mlp("sigmoid", "xavier", 8, 64, "deep_sigmoid"), epochs)
    residual, residual_loss = train(*residual_sigmoid(blocks), epochs)
    for label, model, loss in (("8 hidden sigmoid layers", plain, plain_loss),
                               (f"{blocks} residual sigmoid blocks", residual, residual_loss)):
        diagnosis = diagnose(model)
        first, last = diagnosis.layers[0], diagnosis.layers[-1]
        print(f"{label}: training loss {loss:.4f} after {epochs} epochs; gradient RMS {first.name} "
              f"{first.grad_rms:.2e}, {last.name} {last.grad_rms:.2e} (ratio {first.relative:.1e})")
        print(str(diagnosis).split("\n", 1)[1])
        results[label] = first.relative
    # the first block's input fans out: the skip edge and the edge into the sigmoid branch
    edges = diagnose(residual).edges
    skip = next(norm for (tail, head), (_, norm) in edges.items()
                if tail == "fc0/add" and not head.startswith("fc1/"))
    branch = edges[("fc0/add", "fc1/matmul")][1]
    print(f"gradient norm back from block 1: through the skip connection {skip:.2e}, "
          f"through the sigmoid branch {branch:.2e}")
    results.update(plain_loss=plain_loss, residual_loss=residual_loss, skip=skip, branch=branch)
    try:
        full = render(residual, out / "residual_sigmoid_full.svg")
        layers = render(residual, out / "residual_sigmoid.svg", collapse=True)
        print(f"wrote {layers} (one node per layer) and {full} ({len(residual.graph.nodes)} nodes)")
    except GraphvizMissingError as exc:
        print(exc, file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
