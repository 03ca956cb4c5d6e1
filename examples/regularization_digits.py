"""Weight penalties on scikit-learn digits: L2 shrinks the weights, L1 makes them sparse.

The same MLP (64 -> 128 ReLU -> 128 ReLU -> 10), the same initial weights and mini-batches,
trained with momentum SGD under no penalty, L2 (weight decay), L1, L1+L2 and a max-norm
constraint. Penalties act on the weight matrices only, not on the biases (the default).
Prints the norm of all weights, the fraction of weights near zero (|w| < 1e-3), and the
train and test accuracy.

    .venv/bin/python examples/regularization_digits.py
"""

from __future__ import annotations

import numpy as np
from digits_mlp import digits_split

import graphengine as ge

SETTINGS = {
    "none": {},
    "L2 1e-3": {"regularizer": ge.L2(1e-3)},
    "L2 1e-2": {"regularizer": ge.L2(1e-2)},
    "L1 1e-4": {"regularizer": ge.L1(1e-4)},
    "L1 5e-4": {"regularizer": ge.L1(5e-4)},
    "L1+L2": {"regularizer": ge.L1L2(l1=1e-4, l2=1e-3)},
    "max-norm 1": {"constraint": ge.MaxNorm(1.0)},
}


def mlp(**options) -> ge.Model:
    g = ge.Graph("mlp")
    h = g.input("x", (None, 64))
    y = g.input("y", (None,), dtype="int64")
    for i in (1, 2):
        h = g.activation("relu", g.layer("dense", h, units=128, init="he", name=f"fc{i}"))
    logits = g.layer("dense", h, units=10, name="out")
    return g.compile(g.loss("softmax_cross_entropy", logits, y),
                     optimizer=ge.optimizer("momentum", lr=0.02, momentum=0.9), seed=0, **options)


def weights(model: ge.Model) -> np.ndarray:
    """All entries of the weight matrices (not biases), flattened."""
    return np.concatenate([model.backend.to_numpy(v).ravel() for name, v in model.parameters().items()
                           if model.graph.nodes[name].op.decay])


def main(epochs: int = 20, settings: tuple[str, ...] = tuple(SETTINGS)) -> dict[str, dict[str, float]]:
    X_train, X_test, y_train, y_test = digits_split()
    train, test = {"x": X_train, "y": y_train}, {"x": X_test, "y": y_test}
    results = {}
    for label in settings:
        model = mlp(**SETTINGS[label])
        history = model.fit(train, epochs=epochs, batch_size=32, verbose=0)
        w = weights(model)
        results[label] = {"norm": float(np.linalg.norm(w)), "near_zero": float(np.mean(np.abs(w) < 1e-3)),
                          "train_acc": history["accuracy"][-1], "test_acc": model.evaluate(test)["accuracy"],
                          "loss": history["loss"][-1]}
    print(f"64 -> 128 -> 128 -> 10 ReLU, momentum SGD lr 0.02, {epochs} epochs, batch 32; "
          f"{weights(mlp()).size} weights")
    print(f"{'penalty':>11} {'||W||':>8} {'|w|<1e-3':>9} {'train loss':>10} {'train acc':>9} {'test acc':>8}")
    for label, r in results.items():
        print(f"{label:>11} {r['norm']:8.2f} {r['near_zero']:9.1%} {r['loss']:10.4f} "
              f"{r['train_acc']:9.3f} {r['test_acc']:8.3f}")
    return results


if __name__ == "__main__":
    main()
