"""Adaptive learning rates and momentum against plain SGD on deep MLPs (scikit-learn digits).

Two networks, 64 inputs -> 6 hidden layers of 64 -> 10 classes: one with ReLU (He init), one
with sigmoid (Xavier init), the deep sigmoid net of the course notes whose first layers get
vanishing gradients. For a fair race every optimizer gets its best learning rate from the same
grid (lowest training loss after 5 epochs), starts from the same weights (seed 0) and sees the
same mini-batches of 32. Prints the training loss per epoch side by side, then test accuracy.

    .venv/bin/python examples/optimizers_digits.py
"""

from __future__ import annotations

import time

from digits_mlp import digits_split

import graphengine as ge

OPTIMIZERS = {
    "sgd": {},
    "momentum": {"momentum": 0.9},
    "nesterov": {"momentum": 0.9},
    "adagrad": {},
    "rmsprop": {"alpha": 0.9},
    "adam": {},
}
LEARNING_RATES = (0.3, 0.1, 0.03, 0.01, 0.003, 0.001)


def deep_mlp(activation: str, depth: int = 6, width: int = 64) -> tuple[ge.Graph, ge.Tensor]:
    g = ge.Graph(f"deep_{activation}_mlp")
    h = g.input("x", (None, 64))
    y = g.input("y", (None,), dtype="int64")
    init = "he" if activation == "relu" else "xavier"
    for i in range(depth):
        h = g.activation(activation, g.layer("dense", h, units=width, init=init, name=f"fc{i + 1}"))
    return g, g.loss("softmax_cross_entropy", g.layer("dense", h, units=10, name="out"), y)


def train(activation: str, name: str, lr: float, data: dict, epochs: int) -> tuple[ge.Model, list[float]]:
    g, loss = deep_mlp(activation)
    model = g.compile(loss, optimizer=ge.optimizer(name, lr=lr, **OPTIMIZERS[name]), seed=0)
    history = model.fit(data, epochs=epochs, batch_size=32, verbose=0)
    return model, history["loss"]


def race(activation: str, train_data: dict, test_data: dict, epochs: int,
         learning_rates: tuple[float, ...], tuning_epochs: int = 5) -> dict[str, list[float]]:
    losses, accuracy, best_lr = {}, {}, {}
    for name in OPTIMIZERS:
        tried = {}
        for lr in learning_rates:
            try:
                tried[lr] = train(activation, name, lr, train_data, tuning_epochs)[1][-1]
            except ge.GraphEngineError:  # fit stops when the loss becomes inf or NaN
                tried[lr] = float("inf")
        best_lr[name] = min(tried, key=tried.get)
        model, losses[name] = train(activation, name, best_lr[name], train_data, epochs)
        accuracy[name] = model.evaluate(test_data)["accuracy"]
    names = list(OPTIMIZERS)
    print(f"\n{activation}: training loss per epoch (64 -> 6 x 64 {activation} -> 10)")
    print(f"{'epoch':>5} " + " ".join(f"{n:>9}" for n in names))
    for e in range(epochs):
        print(f"{e + 1:5d} " + " ".join(f"{losses[n][e]:9.4f}" for n in names))
    print(f"{'test':>5} " + " ".join(f"{accuracy[n]:9.3f}" for n in names) + "   <- test accuracy")
    print(f"{'lr':>5} " + " ".join(f"{best_lr[n]:9g}" for n in names) + "   <- best lr on the grid")
    return losses


def main(epochs: int = 15, activations: tuple[str, ...] = ("relu", "sigmoid"),
         learning_rates: tuple[float, ...] = LEARNING_RATES) -> dict[str, dict[str, list[float]]]:
    X_train, X_test, y_train, y_test = digits_split()
    train_data, test_data = {"x": X_train, "y": y_train}, {"x": X_test, "y": y_test}
    start = time.perf_counter()
    results = {act: race(act, train_data, test_data, epochs, learning_rates) for act in activations}
    print(f"\nlearning-rate grid {learning_rates}; {time.perf_counter() - start:.1f} s in all")
    return results


if __name__ == "__main__":
    main()
