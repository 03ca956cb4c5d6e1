"""A Maxout network on scikit-learn digits, next to the other activations of the recipe.

Each network has two hidden layers of 64 units: a dense layer followed by an activation
(relu, leaky_relu, elu, softplus, sigmoid), a dense layer followed by a PReLU layer (learned slopes), or
a Maxout layer with 2 pieces per unit (twice the weights of a dense layer, and the max over
each pair of linear pieces is the activation). Same data, seed, optimizer (momentum SGD) and
mini-batches for all. Prints the training loss per epoch and the test accuracy.

    .venv/bin/python examples/maxout_digits.py
"""

from __future__ import annotations

import numpy as np
from digits_mlp import digits_split

import graphengine as ge

NETWORKS = ("maxout", "prelu", "relu", "leaky_relu", "elu", "softplus", "sigmoid")


def hidden(g: ge.Graph, h: ge.Tensor, kind: str, name: str, units: int = 64) -> ge.Tensor:
    if kind == "maxout":
        return g.layer("maxout", h, units=units, pieces=2, name=name)
    h = g.layer("dense", h, units=units, init="xavier" if kind == "sigmoid" else "he", name=name)
    if kind == "prelu":
        return g.layer("prelu", h, name=f"{name}_prelu")
    return g.activation(kind, h)


def network(kind: str) -> ge.Model:
    g = ge.Graph(f"{kind}_net")
    h = g.input("x", (None, 64))
    y = g.input("y", (None,), dtype="int64")
    for i in (1, 2):
        h = hidden(g, h, kind, f"h{i}")
    logits = g.layer("dense", h, units=10, name="out")
    return g.compile(g.loss("softmax_cross_entropy", logits, y),
                     optimizer=ge.optimizer("momentum", lr=0.02, momentum=0.9), seed=0)


def main(epochs: int = 20) -> dict[str, float]:
    X_train, X_test, y_train, y_test = digits_split()
    train, test = {"x": X_train, "y": y_train}, {"x": X_test, "y": y_test}
    losses, accuracy, sizes = {}, {}, {}
    for kind in NETWORKS:
        model = network(kind)
        losses[kind] = model.fit(train, epochs=epochs, batch_size=32, verbose=0)["loss"]
        accuracy[kind] = model.evaluate(test)["accuracy"]
        sizes[kind] = sum(int(np.prod(p.shape)) for p in model.parameters().values())
    print("training loss per epoch, 64 -> 64 -> 64 -> 10, momentum SGD lr 0.02, batch 32")
    print(f"{'epoch':>5} " + " ".join(f"{k:>10}" for k in NETWORKS))
    for e in range(epochs):
        if e < 5 or (e + 1) % 5 == 0:
            print(f"{e + 1:5d} " + " ".join(f"{losses[k][e]:10.4f}" for k in NETWORKS))
    print(f"{'test':>5} " + " ".join(f"{accuracy[k]:10.3f}" for k in NETWORKS) + "   <- test accuracy")
    print(f"{'param':>5} " + " ".join(f"{sizes[k]:10d}" for k in NETWORKS) + "   <- parameters")
    return accuracy


if __name__ == "__main__":
    main()
