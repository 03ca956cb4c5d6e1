"""The three steps on scikit-learn's digits: define a network, a loss, and train by gradient descent.

    .venv/bin/python examples/digits_mlp.py
"""

from __future__ import annotations

import time

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import graphengine as ge


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """8x8 digits scaled to [0, 1], split 75/25 with random_state=0."""
    X, y = load_digits(return_X_y=True)
    return train_test_split((X / 16.0).astype(np.float32), y, test_size=0.25, random_state=0)


def build_mlp(features: int = 64, hidden: int = 128, classes: int = 10) -> tuple[ge.Graph, ge.Tensor]:
    g = ge.Graph("mlp")
    x = g.input("x", shape=(None, features))
    y = g.input("y", shape=(None,), dtype="int64")
    h = g.layer("dense", x, units=hidden, init="he", name="fc1")
    h = g.activation("relu", h)
    logits = g.layer("dense", h, units=classes, name="out")
    return g, g.loss("softmax_cross_entropy", logits, y)


def main(epochs: int = 30) -> float:
    X_train, X_test, y_train, y_test = digits_split()
    g, loss = build_mlp()
    model = g.compile(loss, optimizer=ge.optimizer("sgd", lr=0.1), backend="numpy")
    start = time.perf_counter()
    history = model.fit({"x": X_train, "y": y_train}, epochs=epochs, batch_size=32,
                        validation={"x": X_test, "y": y_test})
    seconds = time.perf_counter() - start
    probs = model.predict({"x": X_test})
    accuracy = float((probs.argmax(axis=1) == y_test).mean())
    print(f"{'epoch':>5} {'train loss':>10} {'train acc':>9} {'test loss':>9} {'test acc':>8}")
    for i in range(0, epochs, max(1, epochs // 10)):
        print(f"{history.epochs[i]:5d} {history['loss'][i]:10.4f} {history['accuracy'][i]:9.4f} "
              f"{history['val_loss'][i]:9.4f} {history['val_accuracy'][i]:8.4f}")
    print(f"test accuracy {accuracy:.4f} after {epochs} epochs in {seconds:.2f} s")
    return accuracy


if __name__ == "__main__":
    main()
