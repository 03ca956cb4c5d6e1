"""Which operation produced the NaN? Debug mode names the node, the operator, the shapes and the
line of this file that built it.

A hand-written binary cross-entropy, -mean(y log p + (1 - y) log(1 - p)), trains fine until the
sigmoid saturates: p rounds to exactly 0 or 1 in float32, log(p) or log(1 - p) is -inf, and
the loss is NaN.
Plain fit() can only say at which batch the loss broke; with ``model.debug = True`` the first
non-finite value is caught where it is made.

Run: .venv/bin/python examples/debug_nan.py
"""

from __future__ import annotations

import numpy as np

import graphengine as ge


def build() -> ge.Model:
    g = ge.Graph("logistic")
    x = g.input("x", (None, 2))
    y = g.input("y", (None, 1))
    p = g.activation("sigmoid", g.layer("dense", x, units=1, name="fc"))
    loss = -(y * p.log() + (1.0 - y) * (1.0 - p).log()).mean()
    return g.compile(loss, outputs=[p], optimizer=ge.optimizer("sgd", lr=50.0), seed=1)


def main() -> tuple[ge.NumericalError, ge.NumericalError]:
    """Train twice, without and with debug mode; return the two errors."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 2)).astype(np.float32) * 3
    data = {"x": x, "y": (x[:, :1] + x[:, 1:] > 0).astype(np.float32)}

    errors = []
    for debug in (False, True):
        model = build()
        model.debug = debug  # or, for every model: with ge.debug(): model.fit(...)
        try:
            model.fit(data, epochs=20, batch_size=16)
        except ge.NumericalError as error:
            print(f"model.debug = {debug}: {type(error).__name__} (node {error.node!r})\n  {error}\n")
            errors.append(error)
    return errors[0], errors[1]


if __name__ == "__main__":
    main()
