"""An autoencoder compresses 8x8 digits (64 numbers) through a code of 8 numbers and back.

Encoder 64-48-8, decoder 8-48-64 with a sigmoid output (pixels lie in [0, 1]), trained with
mean squared error to reproduce its input. The reconstruction error on unseen digits is
compared with two baselines: predicting the mean image, and PCA with as many components as the
code has numbers (the best *linear* 8-number code). A picture of test inputs above their
reconstructions (autoencoder, then PCA) goes to docs/images/autoencoder_digits.png.

    .venv/bin/python examples/autoencoder_digits.py
"""

from __future__ import annotations

import os
import time

import numpy as np
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from sklearn.model_selection import train_test_split

import graphengine as ge

IMAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "docs", "images",
                     "autoencoder_digits.png")


def build(code: int = 8, hidden: int = 48, seed: int = 0) -> ge.Model:
    g = ge.Graph("autoencoder")
    x = g.input("x", (None, 64))
    h = g.activation("relu", g.layer("dense", x, units=hidden, init="he", name="enc1"))
    z = g.layer("dense", h, units=code, name="code")
    h = g.activation("relu", g.layer("dense", z, units=hidden, init="he", name="dec1"))
    out = g.activation("sigmoid", g.layer("dense", h, units=64, name="dec2"), name="reconstruction")
    # the input is its own target: the loss compares the reconstruction with x
    return g.compile(g.loss("mse", out, x), outputs=[out, z], seed=seed,
                     optimizer=ge.optimizer("adam", lr=0.003))


def save_picture(rows: dict[str, np.ndarray], path: str) -> None:
    """One row of 8x8 images per entry of ``rows``, labeled with its key."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    count = len(next(iter(rows.values())))
    fig, axes = plt.subplots(len(rows), count, figsize=(count * 0.8, len(rows) * 0.9 + 0.1))
    for row, (label, images) in enumerate(rows.items()):
        for i in range(count):
            axes[row, i].imshow(images[i].reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
            axes[row, i].set_xticks([])
            axes[row, i].set_yticks([])
        axes[row, 0].set_ylabel(label, fontsize=7)
    fig.tight_layout(pad=0.2)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(epochs: int = 150, code: int = 8, picture: str | None = IMAGE) -> dict[str, float]:
    X, y = load_digits(return_X_y=True)
    X_train, X_test, _, y_test = train_test_split((X / 16.0).astype(np.float32), y,
                                                  test_size=0.25, random_state=0)
    model = build(code=code)
    start = time.perf_counter()
    history = model.fit({"x": X_train}, epochs=epochs, batch_size=64,
                        validation={"x": X_test})
    seconds = time.perf_counter() - start
    print(f"{'epoch':>5} {'train mse':>10} {'test mse':>9}")
    for i in range(0, epochs, max(1, epochs // 6)):
        print(f"{history.epochs[i]:5d} {history['loss'][i]:10.5f} {history['val_loss'][i]:9.5f}")
    outputs = model.predict({"x": X_test})
    reconstruction, codes = outputs["reconstruction"], outputs[model.output_names[1]]
    pca = PCA(code).fit(X_train)
    results = {
        "autoencoder": float(np.mean((reconstruction - X_test) ** 2)),
        "mean image": float(np.mean((X_train.mean(axis=0) - X_test) ** 2)),
        f"PCA {code}": float(np.mean((pca.inverse_transform(pca.transform(X_test)) - X_test) ** 2)),
    }
    print(f"test reconstruction error (mean squared, pixels in [0, 1]), {code}-number code, "
          f"{epochs} epochs in {seconds:.1f} s:")
    for name, value in results.items():
        print(f"  {name:12} {value:.5f}")
    print(f"code of the first test image ({y_test[0]}): {np.round(codes[0], 2)}")
    if picture:
        order = [int(np.flatnonzero(y_test == d)[0]) for d in range(10)]
        save_picture({"input": X_test[order], "autoencoder": reconstruction[order],
                      f"PCA {code}": np.clip(pca.inverse_transform(pca.transform(X_test[order])), 0, 1)},
                     picture)
        print(f"picture: {os.path.relpath(picture)}")
    return results


if __name__ == "__main__":
    main()
