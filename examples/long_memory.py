"""Long-range memory: recall a symbol seen 40 to 50 steps earlier. A plain (tanh) RNN against an LSTM.

    .venv/bin/python examples/long_memory.py

Every sequence is 50 random symbols out of 4, and one of the first ten is marked (it comes as a
different input id). At the last step the network must say which symbol was marked; the 40+
symbols after it are noise to ignore. A plain RNN has to carry the symbol through 40+ products
with its recurrent matrix and tanh derivatives, and the error signal that should teach it to do
so vanishes on the way back: it stays near chance (25%). The LSTM's cell state carries the symbol
along the forget gate's path (``c_t = f * c_{t-1} + i * g``, no squashing, no matrix), and its
input gate learns to open on the marked step, once the error signal reaches that step: with the
common forget-gate bias of 1 the cell keeps sigmoid(1) = 73% per step at the start, 0.73^40 ~ 3e-6
over the delay, so that LSTM is stuck too; started at a bias of 3 (95% per step) it learns the
task in a few epochs. All train with Adam and gradient clipping (``clip_norm``) against the rough
error surface of recurrent networks. Writes docs/images/long_memory_rnn_vs_lstm.png.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

import graphengine as ge

IMAGES = Path(__file__).resolve().parent.parent / "docs" / "images"
STEPS, SYMBOLS, UNITS, MARKED_WITHIN = 50, 4, 32, 10
#: name -> (layer, extra layer arguments, label in the table and chart)
MODELS = {
    "rnn": ("rnn", {}, "plain RNN (tanh)"),
    "lstm_bias1": ("lstm", {}, "LSTM, forget bias 1"),
    "lstm_bias3": ("lstm", {"bias_init": {"name": "forget_bias", "value": 3.0}}, "LSTM, forget bias 3"),
}


def marked_symbol_task(n: int, seed: int) -> dict[str, np.ndarray]:
    """ids 0..3 are symbols, 4..7 the same symbols marked; the label is the marked symbol."""
    gen = np.random.default_rng(seed)
    ids = gen.integers(0, SYMBOLS, (n, STEPS))
    rows, marked = np.arange(n), gen.integers(0, MARKED_WITHIN, n)
    labels = ids[rows, marked].copy()
    ids[rows, marked] += SYMBOLS
    return {"ids": ids, "y": labels}


def build(name: str) -> tuple[ge.Graph, ge.Tensor]:
    layer, config, _ = MODELS[name]
    g = ge.Graph(name)
    ids = g.input("ids", (None, STEPS), dtype="int64")
    y = g.input("y", (None,), dtype="int64")
    inputs = g.layer("one_hot", ids, depth=2 * SYMBOLS)
    h = g.layer(layer, inputs, units=UNITS, name="recurrent", **config)  # the last step's state
    return g, g.loss("softmax_cross_entropy", g.layer("dense", h, units=SYMBOLS, name="out"), y)


class TestAccuracy(ge.Callback):
    """Accuracy on the held-out sequences after every epoch."""

    def __init__(self, data: dict[str, np.ndarray]) -> None:
        self.data, self.accuracy = data, []

    def on_epoch_end(self, model, epoch, logs):
        self.accuracy.append(model.evaluate(self.data)["accuracy"])


def train(name: str, train_data, test_data, epochs: int) -> tuple[list[float], list[float], float]:
    g, loss = build(name)
    model = g.compile(loss, optimizer=ge.optimizer("adam", lr=1e-2), clip_norm=1.0, seed=0)
    tracker = TestAccuracy(test_data)
    start = time.perf_counter()
    # Matrices this small keep one core busy: a second BLAS thread only spins against the first.
    with threadpool_limits(limits=1, user_api="blas"):
        history = model.fit(train_data, epochs=epochs, batch_size=32, callbacks=[tracker])
    return history["loss"], tracker.accuracy, time.perf_counter() - start


def plot(curves: dict[str, tuple[list[float], list[float]]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.4))
    styles = {"rnn": ("#d95f02", "--"), "lstm_bias1": ("#7570b3", ":"), "lstm_bias3": ("#1b9e77", "-")}
    for name, (loss, accuracy) in curves.items():
        color, line = styles[name]
        label = MODELS[name][2]
        epochs = range(1, len(loss) + 1)
        ax_loss.plot(epochs, loss, line, color=color, label=label, linewidth=2)
        ax_acc.plot(epochs, accuracy, line, color=color, label=label, linewidth=2, marker="o", markersize=3)
    ax_acc.axhline(1 / SYMBOLS, color="grey", linewidth=1, linestyle=":")
    ax_acc.annotate("chance", (1, 1 / SYMBOLS - 0.07), color="grey")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy", ylim=(0, 1.05),
               title=f"recall the marked symbol after {STEPS} steps")
    ax_acc.legend(loc="center right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(epochs: int = 12, train_size: int = 2000,
         image: Path | None = IMAGES / "long_memory_rnn_vs_lstm.png") -> dict[str, float]:
    train_data, test_data = marked_symbol_task(train_size, seed=0), marked_symbol_task(500, seed=1)
    curves, seconds = {}, {}
    for name in MODELS:
        loss, accuracy, seconds[name] = train(name, train_data, test_data, epochs)
        curves[name] = (loss, accuracy)
    print(f"recall the marked symbol (one of the first {MARKED_WITHIN}) at step {STEPS}; {SYMBOLS} "
          f"symbols, chance {1 / SYMBOLS:.2f}; {train_size} training sequences, {UNITS} units")
    print("test accuracy after each epoch (training loss in brackets)")
    print(f"{'epoch':>5}" + "".join(f"{MODELS[name][2]:>24}" for name in MODELS))
    for e in range(epochs):
        print(f"{e + 1:>5}" + "".join(f"{curves[n][1][e]:>15.3f} ({curves[n][0][e]:.3f})" for n in MODELS))
    print("training time: " + ", ".join(f"{MODELS[n][2]} {seconds[n]:.1f} s" for n in MODELS))
    if image is not None:
        plot(curves, image)
        print(f"chart: {image}")
    return {name: curves[name][1][-1] for name in curves}


if __name__ == "__main__":
    main()
