"""Save a model, load it back (identical predictions), and fine-tune it on a new task with its
early layers frozen.

1. A network with z-score preprocessing, two hidden layers and batch normalization learns the
   ten digits on half of scikit-learn's digits, and is saved: graph, weights, batch-norm running
   statistics and fitted z-score statistics in one file.
2. ``ge.load`` rebuilds it: predictions are identical to the last bit.
3. Transfer to a new question, "is the digit even or odd?", with 5 labeled images per digit from
   the other half: a new graph reuses the layers ``scale``, ``fc1``, ``bn`` and ``fc2`` by name
   (``load_weights(strict=False)`` reports what did not match), freezes ``fc1`` and trains the
   rest; compared with the same network trained from scratch on the same 50 images (3 draws).

    .venv/bin/python examples/save_load_finetune.py
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import graphengine as ge


def halves() -> tuple[dict, dict]:
    X, y = load_digits(return_X_y=True)
    X_a, X_b, y_a, y_b = train_test_split(X.astype(np.float32), y, train_size=0.5,
                                          random_state=0, stratify=y)
    return {"x": X_a, "y": y_a}, {"x": X_b, "y": y_b}


def build(head: str, classes: int, seed: int = 0) -> ge.Model:
    g = ge.Graph("digits")
    x = g.input("x", (None, 64))
    y = g.input("y", (None,), dtype="int64")
    h = g.layer("zscore", x, name="scale")
    h = g.activation("relu", g.layer("dense", h, units=64, init="he", name="fc1"))
    h = g.layer("batch_norm", h, name="bn")
    h = g.activation("relu", g.layer("dense", h, units=32, init="he", name="fc2"))
    logits = g.layer("dense", h, units=classes, name=head)
    return g.compile(g.loss("softmax_cross_entropy", logits, y),
                     optimizer=ge.optimizer("adam", lr=0.003), seed=seed)


def parity_task(half: dict, per_digit: int, draw: int) -> tuple[dict, dict]:
    X_train, X_test, y_train, y_test = train_test_split(
        half["x"], half["y"], train_size=10 * per_digit, random_state=draw, stratify=half["y"])
    return {"x": X_train, "y": y_train % 2}, {"x": X_test, "y": y_test % 2}


def main(folder: str | None = None, draws: int = 3, per_digit: int = 5) -> dict[str, float]:
    folder = folder or tempfile.mkdtemp(prefix="graphengine-")
    path = os.path.join(folder, "digits.safetensors")
    half_a, half_b = halves()

    base = build(head="digit", classes=10)
    base.fit(half_a, epochs=20, batch_size=32)
    base.save(path)
    print(f"1. ten digits: accuracy {base.evaluate(half_b)['accuracy']:.4f} on the other half; "
          f"saved {os.path.getsize(path)} bytes to {path}")

    loaded = ge.load(path)
    difference = float(np.abs(loaded.predict(half_b) - base.predict(half_b)).max())
    print(f"2. loaded: largest prediction difference {difference}; epoch {loaded.epoch}, "
          f"optimizer {loaded.optimizer}")

    tuned_scores, scratch_scores, moved = [], [], 0.0
    for draw in range(draws):
        train, test = parity_task(half_b, per_digit, draw)
        tuned = build(head="parity", classes=2, seed=1)
        report = tuned.load_weights(path, strict=False)
        frozen = tuned.freeze("fc1/")
        before = {name: tuned.parameters()[name].copy() for name in frozen}
        tuned.fit(train, epochs=60, batch_size=10)
        moved = max([moved] + [float(np.abs(tuned.parameters()[n] - v).max()) for n, v in before.items()])
        scratch = build(head="parity", classes=2, seed=1)
        scratch.fit(train, epochs=60, batch_size=10)
        tuned_scores.append(tuned.evaluate(test)["accuracy"])
        scratch_scores.append(scratch.evaluate(test)["accuracy"])
        if draw == 0:
            print(f"3. even or odd, {len(train['y'])} labeled images; load_weights: {report}; "
                  f"frozen {frozen}")
        print(f"   draw {draw}: accuracy on {len(test['y'])} images: fine-tuned "
              f"{tuned_scores[-1]:.4f}, from scratch {scratch_scores[-1]:.4f}")
    results = {"prediction_difference": difference, "frozen_change": moved,
               "finetuned_accuracy": float(np.mean(tuned_scores)),
               "scratch_accuracy": float(np.mean(scratch_scores))}
    print(f"   mean: fine-tuned {results['finetuned_accuracy']:.4f}, from scratch "
          f"{results['scratch_accuracy']:.4f}; the frozen fc1 moved by {moved}")
    return results


if __name__ == "__main__":
    main()
