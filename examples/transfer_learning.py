"""Transfer learning: "using sufficient labeled data to learn a CNN, then using this CNN as a
feature extractor" (the notes' Part III).

The CNN of examples/digits_cnn.py (conv 16 - pool - conv 32 - pool - dense) learns the digits 0-4
from all their 901 images. The digits 5-9 are a new task with only a handful of labels: 5 images
per class. A new graph for the new task has the same convolution layers (same names) and a new
5-way ``out`` layer; it is compiled with the pretrained convolution weights
(``initial_values=``) and ``freeze("conv1", "conv2")``, so that only the new last layer learns, on
top of features the network learnt from other digits. It is compared with the same network trained
from scratch on the same 25 images, over several draws of the labeled images; accuracy is measured
on all the other images of 5-9. A picture of the labeled images and the accuracies goes to
docs/images/transfer_learning.png.

    .venv/bin/python examples/transfer_learning.py
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import numpy as np
from digits_cnn import build_cnn
from sklearn.datasets import load_digits
from threadpoolctl import threadpool_limits

import graphengine as ge

IMAGES = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "docs", "images")
FEATURE_LAYERS = ("conv1", "conv2")


def split_digits() -> tuple[dict, dict]:
    """Digits 0-4 (the source task) and 5-9 relabeled 0-4 (the target task), NCHW in [0, 1]."""
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    low = y < 5
    return {"x": X[low], "y": y[low]}, {"x": X[~low], "y": y[~low] - 5}


def few_labels(task: dict, per_class: int, draw: int) -> tuple[dict, dict]:
    """``per_class`` labeled images of each class, and all the others as the test set."""
    rng = np.random.default_rng(draw)
    chosen = np.concatenate([rng.choice(np.flatnonzero(task["y"] == c), per_class, replace=False)
                             for c in range(5)])
    rest = np.setdiff1d(np.arange(len(task["y"])), chosen)
    return {k: v[chosen] for k, v in task.items()}, {k: v[rest] for k, v in task.items()}


def compile_cnn(initial_values: dict | None = None, seed: int = 0) -> ge.Model:
    g, loss = build_cnn(classes=5)
    return g.compile(loss, optimizer=ge.optimizer("adam", lr=3e-3), seed=seed,
                     initial_values=initial_values)


def pretrain(source: dict, epochs: int = 15) -> dict[str, np.ndarray]:
    """The feature layers' weights after learning digits 0-4 (host arrays by name)."""
    model = compile_cnn()
    model.fit(source, epochs=epochs, batch_size=32, verbose=0)
    to_host = model.backend.to_numpy
    return {name: to_host(value) for name, value in model.parameters().items()
            if name.split("/")[0] in FEATURE_LAYERS}


def compare(features: dict[str, np.ndarray], train: dict, test: dict, epochs: int = 100) -> dict[str, float]:
    """Test accuracy of four ways to use ``train`` alone (the same network each time):

    - ``transfer``: the pretrained feature layers, frozen, and a new last layer;
    - ``random features``: the same with the feature layers frozen at their random initial
      values, the control that says what the pretraining itself adds;
    - ``fine-tuned``: the pretrained feature layers as the starting point, every layer trained;
    - ``scratch``: every layer from random initial values, every layer trained."""
    models = {"transfer": compile_cnn(initial_values=features, seed=1),
              "random features": compile_cnn(seed=1),
              "fine-tuned": compile_cnn(initial_values=features, seed=1),
              "scratch": compile_cnn(seed=1)}
    models["transfer"].freeze(*FEATURE_LAYERS)
    models["random features"].freeze(*FEATURE_LAYERS)
    accuracy = {}
    for name, model in models.items():
        model.fit(train, epochs=epochs, batch_size=len(train["y"]), verbose=0, monitor=False)
        accuracy[name] = model.evaluate(test)["accuracy"]
    return accuracy


def save_picture(train: dict, rows: Sequence[dict[str, float]], per_class: int, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=(9, 3.2))
    grid = fig.add_gridspec(per_class, 5 + 6, wspace=0.1, hspace=0.1)
    for i, (image, label) in enumerate(zip(train["x"], train["y"])):
        ax = fig.add_subplot(grid[i % per_class, int(label)])
        ax.imshow(image[0], cmap="gray_r", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        if i % per_class == 0:
            ax.set_title(str(int(label) + 5), fontsize=9)
    ax = fig.add_subplot(grid[:, 6:])
    draws = np.arange(len(rows))
    width = 0.8 / len(rows[0])
    for i, name in enumerate(rows[0]):
        ax.bar(draws + (i - (len(rows[0]) - 1) / 2) * width, [r[name] for r in rows], width, label=name)
    ax.set_xticks(draws)
    ax.set_xticklabels([f"draw {d}" for d in draws], fontsize=8)
    ax.set_ylim(0.5, 1.1)
    ax.set_yticks([0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    ax.set_ylabel("test accuracy on digits 5-9")
    ax.legend(fontsize=7, loc="upper center", ncol=2)
    fig.suptitle(f"left: the {5 * per_class} labeled images of draw 0", fontsize=9)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def main(per_class: int = 5, draws: int = 5, pretrain_epochs: int = 15, epochs: int = 100,
         images: str | None = IMAGES) -> dict:
    source, target = split_digits()
    start = time.perf_counter()
    # matrices this small keep one core busy: a second BLAS thread only spins against the first
    with threadpool_limits(limits=1, user_api="blas"):
        features = pretrain(source, epochs=pretrain_epochs)
        rows, first = [], None
        for draw in range(draws):
            train, test = few_labels(target, per_class, draw)
            first = first or train
            rows.append(compare(features, train, test, epochs=epochs))
            print(f"draw {draw}: {len(train['y'])} labeled images of 5-9, {len(test['y'])} to test: "
                  + ", ".join(f"{name} {value:.3f}" for name, value in rows[-1].items()))
    result = {name: float(np.mean([r[name] for r in rows])) for name in rows[0]}
    print(f"mean test accuracy on 5-9, {per_class} labels per class, {draws} draws "
          f"({time.perf_counter() - start:.1f} s, pretraining on {len(source['y'])} images of 0-4 "
          f"included):")
    for name, value in result.items():
        wins = sum(r[name] > r["scratch"] for r in rows)
        print(f"  {name:>16} {value:.3f}" + (f"   ahead of scratch on {wins} of {draws} draws"
                                               if name != "scratch" else ""))
    if images:
        os.makedirs(images, exist_ok=True)
        save_picture(first, rows, per_class, os.path.join(images, "transfer_learning.png"))
    return {**result, "rows": rows}


if __name__ == "__main__":
    main()
