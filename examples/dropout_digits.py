"""Dropout on an over-parameterized MLP: what it does to training and test accuracy, measured.

A 64-256-256-10 ReLU network (about 85,000 weights) learns from 5% of scikit-learn's digits
(89 images), with and without dropout (rate 0.1 on the input pixels, 0.5 after each hidden
layer, close to Srivastava et al.'s 0.2 / 0.5), over several seeds. The other 95% are split in
halves: a validation set, on which the network width and the number of epochs were chosen, and
a test set, used only for the final numbers (docs/training_recipe_regularize.md says how).

Dropout is inverted: the masks scale the kept units by 1/(1-rate) in training, so evaluation
runs the full network unscaled. "train acc (fit)" is the accuracy fit reports while training
(dropout active); "train acc" and "train loss" are measured afterwards in evaluation mode.

    .venv/bin/python examples/dropout_digits.py
"""

from __future__ import annotations

import time

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from threadpoolctl import threadpool_limits

import graphengine as ge

#: (label, (rate on the input, rate after each hidden layer)); a rate of 0 adds no dropout layer.
SETTINGS = (("no dropout", (0.0, 0.0)), ("dropout", (0.1, 0.5)))
COLUMNS = ("train acc (fit)", "train acc", "train loss", "val acc", "test acc", "test loss")


def digits_splits(train_size: float = 0.05) -> tuple[dict, dict, dict]:
    """Train (``train_size`` of the digits), validation and test (halves of the rest), each
    stratified by class."""
    X, y = load_digits(return_X_y=True)
    X_train, X_rest, y_train, y_rest = train_test_split(
        (X / 16.0).astype(np.float32), y, train_size=train_size, random_state=0, stratify=y)
    X_val, X_test, y_val, y_test = train_test_split(X_rest, y_rest, train_size=0.5, random_state=0,
                                                    stratify=y_rest)
    return {"x": X_train, "y": y_train}, {"x": X_val, "y": y_val}, {"x": X_test, "y": y_test}


def build(dropout: tuple[float, float], seed: int, hidden: int = 256) -> ge.Model:
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


def run(dropout: tuple[float, float], seed: int, splits: tuple[dict, dict, dict],
        epochs: int) -> dict[str, float]:
    train, val, test = splits
    model = build(dropout, seed)
    # Matrices this small keep one core busy: a second BLAS thread only spins against the first
    # (all seeds took 14 s instead of 4 s on two cores).
    with threadpool_limits(limits=1, user_api="blas"):
        history = model.fit(train, epochs=epochs, batch_size=32, verbose=0)
    on_train, on_test = model.evaluate(train), model.evaluate(test)  # evaluation mode
    return {"train acc (fit)": history["accuracy"][-1], "train acc": on_train["accuracy"],
            "train loss": on_train["loss"], "val acc": model.evaluate(val)["accuracy"],
            "test acc": on_test["accuracy"], "test loss": on_test["loss"]}


def main(seeds: int = 8, epochs: int = 100) -> dict[str, dict[str, float | list[float]]]:
    """Per setting: the mean of each column over the seeds, and ``per seed`` test accuracies."""
    splits = digits_splits()
    print(f"{len(splits[0]['y'])} training, {len(splits[1]['y'])} validation, "
          f"{len(splits[2]['y'])} test images; {epochs} epochs, seeds 0-{seeds - 1}")
    print(f"{'':16}{'seed':>5}" + "".join(f"{c:>16}" for c in COLUMNS))
    results: dict[str, dict[str, float | list[float]]] = {}
    start = time.perf_counter()
    for label, rates in SETTINGS:
        rows = [run(rates, seed, splits, epochs) for seed in range(seeds)]
        for seed, row in enumerate(rows):
            print(f"{label:16}{seed:5d}" + "".join(f"{row[c]:16.4f}" for c in COLUMNS))
        results[label] = {c: float(np.mean([row[c] for row in rows])) for c in COLUMNS}
        results[label]["per seed"] = [row["test acc"] for row in rows]
        print(f"{label + ' mean':21}" + "".join(f"{results[label][c]:16.4f}" for c in COLUMNS))
    base, drop = results["no dropout"], results["dropout"]
    wins = sum(d > b for b, d in zip(base["per seed"], drop["per seed"]))
    print(f"dropout: training accuracy as fit reports it {base['train acc (fit)']:.4f} -> "
          f"{drop['train acc (fit)']:.4f}, in evaluation mode {base['train acc']:.4f} -> "
          f"{drop['train acc']:.4f} (loss {base['train loss']:.4f} -> {drop['train loss']:.4f}); "
          f"test accuracy {base['test acc']:.4f} -> {drop['test acc']:.4f}, higher on {wins} of "
          f"{seeds} seeds ({time.perf_counter() - start:.0f} s)")
    return results


if __name__ == "__main__":
    main()
