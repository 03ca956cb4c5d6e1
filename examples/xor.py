"""XOR needs more than one neuron: a 2-2-1 sigmoid network learns it, a single neuron cannot.

    .venv/bin/python examples/xor.py
"""

from __future__ import annotations

import numpy as np

import graphengine as ge

X = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)
Y = np.array([[0], [1], [1], [0]], dtype=np.float32)


def train(hidden: int | None, seed: int, epochs: int = 3000) -> tuple[float, np.ndarray]:
    """Full-batch gradient descent on MSE; returns the final loss and the outputs."""
    g = ge.Graph("xor")
    x = g.input("x", shape=(None, 2))
    y = g.input("y", shape=(None, 1))
    h = x
    if hidden:
        h = g.activation("sigmoid", g.layer("dense", x, units=hidden, init={"name": "normal", "std": 1.0}))
    out = g.activation("sigmoid", g.layer("dense", h, units=1, init={"name": "normal", "std": 1.0}))
    model = g.compile(g.loss("mse", out, y), outputs=[out], optimizer=ge.optimizer("sgd", lr=2.0),
                      seed=seed)
    history = model.fit({"x": X, "y": Y}, epochs=epochs, batch_size=4, shuffle=False, verbose=0)
    return history["loss"][-1], model.predict({"x": X})[:, 0]


def main(seeds: tuple[int, ...] = (0, 1, 2, 3, 4)) -> dict[str, int]:
    solved = {"2-2-1 network": 0, "single neuron": 0}
    for name, hidden in (("2-2-1 network", 2), ("single neuron", None)):
        for seed in seeds:
            loss, out = train(hidden, seed)
            ok = bool(np.all((out > 0.5) == Y[:, 0].astype(bool)))
            solved[name] += ok
            print(f"{name:14s} seed {seed}: loss {loss:.4f}  outputs {np.round(out, 2)}  "
                  f"{'solves XOR' if ok else 'fails'}")
    for name, count in solved.items():
        print(f"{name}: solved XOR in {count} of {len(seeds)} runs")
    return solved


if __name__ == "__main__":
    main()
