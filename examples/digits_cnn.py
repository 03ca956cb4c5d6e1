"""A CNN on scikit-learn's 8x8 digits against an MLP: parameter sharing buys accuracy per parameter.

    .venv/bin/python examples/digits_cnn.py

conv3x3(16)-ReLU-maxpool2-conv3x3(32)-ReLU-maxpool2-dense(10): a filter is a small pattern
detector used at every position of the image (parameter sharing), and pooling keeps what was
found while dropping exactly where. The MLP must learn each pattern at each position separately.
"""

from __future__ import annotations

import time

import numpy as np
from digits_mlp import build_mlp, digits_split
from threadpoolctl import threadpool_limits

import graphengine as ge


def build_cnn(filters: tuple[int, int] = (16, 32), classes: int = 10) -> tuple[ge.Graph, ge.Tensor]:
    g = ge.Graph("cnn")
    x = g.input("x", shape=(None, 1, 8, 8))  # NCHW
    y = g.input("y", shape=(None,), dtype="int64")
    h = g.activation("relu", g.layer("conv2d", x, filters=filters[0], kernel_size=3, padding="same",
                                     name="conv1"))
    h = g.layer("max_pool2d", h, kernel_size=2, name="pool1")  # 8x8 -> 4x4
    h = g.activation("relu", g.layer("conv2d", h, filters=filters[1], kernel_size=3, padding="same",
                                     name="conv2"))
    h = g.layer("max_pool2d", h, kernel_size=2, name="pool2")  # 4x4 -> 2x2
    logits = g.layer("dense", g.layer("flatten", h), units=classes, name="out")
    return g, g.loss("softmax_cross_entropy", logits, y)


def parameter_count(model: ge.Model) -> int:
    return sum(int(np.prod(p.shape)) for p in model.parameters().values())


def train(g: ge.Graph, loss: ge.Tensor, x_train, y_train, x_test, y_test, epochs: int,
          seed: int = 0) -> tuple[ge.Model, float, float]:
    model = g.compile(loss, optimizer=ge.optimizer("adam", lr=3e-3), seed=seed)
    start = time.perf_counter()
    # Matrices this small keep one core busy: a second BLAS thread only spins against the first
    # (on two cores shared with another job the CNN took 11 s instead of 1.3 s).
    with threadpool_limits(limits=1, user_api="blas"):
        model.fit({"x": x_train, "y": y_train}, epochs=epochs, batch_size=32)
    seconds = time.perf_counter() - start
    return model, model.evaluate({"x": x_test, "y": y_test})["accuracy"], seconds


def trained_cnn(epochs: int = 20, seed: int = 0) -> tuple[ge.Model, dict[str, np.ndarray]]:
    """The CNN trained on the digits split, and that split (for the other examples)."""
    x_train, x_test, y_train, y_test = digits_split()
    images = {"x_train": x_train.reshape(-1, 1, 8, 8), "x_test": x_test.reshape(-1, 1, 8, 8),
              "y_train": y_train, "y_test": y_test}
    model, _, _ = train(*build_cnn(), images["x_train"], y_train, images["x_test"], y_test, epochs, seed)
    return model, images


def main(epochs: int = 20, seeds: tuple[int, ...] = (0, 1, 2)) -> dict[str, dict[str, float]]:
    x_train, x_test, y_train, y_test = digits_split()
    images_train, images_test = x_train.reshape(-1, 1, 8, 8), x_test.reshape(-1, 1, 8, 8)
    rows = {}
    candidates = [("CNN 16-32 filters", build_cnn, images_train, images_test)]
    candidates += [(f"MLP 64-{hidden}-10", lambda hidden=hidden: build_mlp(hidden=hidden), x_train, x_test)
                   for hidden in (128, 512)]
    print(f"{'model':<18}{'parameters':>11}{'test accuracy (seeds ' + str(seeds) + ')':>34}{'mean':>8}"
          f"{'train s':>9}")
    for name, build, train_x, test_x in candidates:
        runs = [train(*build(), train_x, y_train, test_x, y_test, epochs, seed) for seed in seeds]
        accuracies = [acc for _, acc, _ in runs]
        count = parameter_count(runs[0][0])
        rows[name] = {"parameters": count, "accuracy": float(np.mean(accuracies)),
                      "min_accuracy": float(np.min(accuracies))}
        print(f"{name:<18}{count:>11}{'  '.join(f'{a:.4f}' for a in accuracies):>34}"
              f"{np.mean(accuracies):>8.4f}{np.mean([s for _, _, s in runs]):>9.2f}")
    return rows


if __name__ == "__main__":
    main()
