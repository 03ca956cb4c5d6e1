"""Dropout on an over-parameterized MLP: worse on the training set, better on the test set.

A 64-512-512-10 ReLU network (about 300,000 weights) learns from 5% of scikit-learn's digits
(89 images) and is tested on the other 95%, with and without dropout (rate 0.1 on the input
pixels, 0.5 after each hidden layer, as Srivastava et al. do), over several seeds. Dropout is
inverted: the masks scale the kept units by 1/(1-rate) in training, so evaluation runs the
full network unscaled. "train acc (fit)" is the accuracy fit reports while training (dropout
active); "train acc" and "train loss" are measured afterwards in evaluation mode.

    .venv/bin/python examples/dropout_digits.py
"""

from __future__ import annotations

import time

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import graphengine as ge


def small_digits_split(train_size: float = 0.05) -> tuple[dict, dict]:
    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(
        (X / 16.0).astype(np.float32), y, train_size=train_size, random_state=0, stratify=y)
    return {"x": X_train, "y": y_train}, {"x": X_test, "y": y_test}


def build(dropout: tuple[float, float], seed: int, hidden: int = 512) -> ge.Model:
    """``dropout``: the rates on the input and after each hidden layer (0: no dropout layer)."""
    g = ge.Graph("mlp")
    x = g.input("x", (None, 64))
    y = g.input("y", (None,), dtype="int64")
    h = g.layer("dropout", x, rate=dropout[0], name="drop0") if dropout[0] else x
    for i in (1, 2):
        h = g.activation("relu", g.layer("dense", h, units=hidden, init="he", name=f"fc{i}"))
        if dropout[1]:
            h = g.layer("dropout", h, rate=dropout[1], name=f"drop{i}")
    logits = g.layer("dense", h, units=10, name="out")
    return g.compile(g.loss("softmax_cross_entropy", logits, y),
                     optimizer=ge.optimizer("momentum", lr=0.05), seed=seed)


def run(dropout: tuple[float, float], seed: int, train: dict, test: dict, epochs: int) -> dict[str, float]:
    model = build(dropout, seed)
    history = model.fit(train, epochs=epochs, batch_size=32)
    on_train, on_test = model.evaluate(train), model.evaluate(test)  # evaluation mode
    return {"train acc (fit)": history["accuracy"][-1], "train loss": on_train["loss"],
            "train acc": on_train["accuracy"], "test loss": on_test["loss"],
            "test acc": on_test["accuracy"]}


def main(seeds: int = 4, epochs: int = 200) -> dict[str, dict[str, float]]:
    train, test = small_digits_split()
    print(f"{len(train['y'])} training images, {len(test['y'])} test images, {epochs} epochs")
    columns = ["train acc (fit)", "train acc", "train loss", "test acc", "test loss"]
    print(f"{'':16}{'seed':>5}" + "".join(f"{c:>16}" for c in columns))
    means = {}
    start = time.perf_counter()
    for label, rates in (("no dropout", (0.0, 0.0)), ("dropout", (0.1, 0.5))):
        rows = [run(rates, seed, train, test, epochs) for seed in range(seeds)]
        for seed, row in enumerate(rows):
            print(f"{label:16}{seed:5d}" + "".join(f"{row[c]:16.4f}" for c in columns))
        means[label] = {c: float(np.mean([row[c] for row in rows])) for c in columns}
        print(f"{label + ' mean':21}" + "".join(f"{means[label][c]:16.4f}" for c in columns))
    base, drop = means["no dropout"], means["dropout"]
    print(f"dropout: training accuracy as fit reports it {base['train acc (fit)']:.4f} -> "
          f"{drop['train acc (fit)']:.4f}, test accuracy {base['test acc']:.4f} -> "
          f"{drop['test acc']:.4f} ({time.perf_counter() - start:.0f} s)")
    return means


if __name__ == "__main__":
    main()
