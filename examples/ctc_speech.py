"""CTC: read a label sequence off frames of noisy "speech", with no frame-level alignment.

    .venv/bin/python examples/ctc_speech.py

Speech recognition's output is shorter than its input, and nobody marks which frames say which
character. Here each utterance is 2 to 6 labels out of 6 (A..F, standing for the notes' 好 and
棒), each lasting 2 to 4 frames of a noisy 16-number feature vector (its prototype, times a
syllable-like rise and fall, plus noise), with 0 to 2 silent frames between labels and at least
one between a label and its repeat (two 棒 in a row are two syllables, not one long one), 40 frames
in all. The training targets are the label sequences alone: ``ABBC``, never which frames.

A bidirectional GRU scores every frame over the 6 labels and the blank (the notes' null symbol
phi), and the ``ctc`` loss sums the probability of every frame-by-frame path that reads as the
target. Greedy (best-path) decoding takes each frame's most likely symbol, merges repeats and
drops blanks: ``AA-BB--B`` reads ``ABB``. Reported: the label error rate (edit distance over
reference length) before and after training, also on utterances with a repeated label, and the
exact-sequence accuracy. Draws one utterance's frames and its best path to
docs/images/ctc_best_path.png.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from graphengine.plugins.ctc import greedy_decode
from threadpoolctl import threadpool_limits

import graphengine as ge

IMAGES = Path(__file__).resolve().parent.parent / "docs" / "images"
LETTERS = "ABCDEF"
BLANK = 0  # class 0 is the blank; label i is class i + 1
SYMBOLS = "-" + LETTERS  # what each class prints as; "-" is the blank
FRAMES, FEATURES, MAX_LABELS = 40, 16, 6
NOISE = 1.0


def utterances(n: int, seed: int) -> dict[str, np.ndarray]:
    """``x`` (n, FRAMES, FEATURES) float32 and ``labels`` (n, MAX_LABELS) int64 padded with -1.

    The label prototypes are the same for every seed (they are the "language"); the utterances
    and their noise are drawn from ``seed``."""
    prototypes = np.random.default_rng(1234).standard_normal((len(LETTERS), FEATURES)) * 1.2
    gen = np.random.default_rng(seed)
    x = gen.standard_normal((n, FRAMES, FEATURES)).astype(np.float32) * NOISE
    labels = np.full((n, MAX_LABELS), -1, np.int64)
    for row in range(n):
        count = gen.integers(2, MAX_LABELS + 1)
        # About one label in three repeats the one before it: "好好棒棒棒" has such pairs.
        sequence = [gen.integers(len(LETTERS))]
        while len(sequence) < count:
            sequence.append(sequence[-1] if gen.random() < 0.3 else gen.integers(len(LETTERS)))
        t = gen.integers(0, 3)
        for k, label in enumerate(sequence):
            if k and label == sequence[k - 1]:
                t += 1 + gen.integers(0, 2)
            elif k:
                t += gen.integers(0, 3)
            length = gen.integers(2, 5)
            envelope = np.sin(np.pi * (np.arange(length) + 0.5) / length)[:, None]
            x[row, t:t + length] += envelope * prototypes[label]
            t += length
        labels[row, :count] = np.array(sequence) + 1
    return {"x": x, "labels": labels}


def build(units: int = 32) -> tuple[ge.Graph, ge.Tensor, ge.Tensor]:
    """Frames -> bidirectional GRU -> a score per frame for each symbol; the CTC loss."""
    g = ge.Graph("ctc_speech")
    x = g.input("x", (None, FRAMES, FEATURES))
    labels = g.input("labels", (None, MAX_LABELS), dtype="int64")
    h = g.layer("bidirectional", x, layer="gru", units=units, return_sequences=True, name="rnn")
    scores = g.layer("dense", h, units=len(SYMBOLS), name="scores")  # (batch, frames, symbols)
    return g, g.loss("ctc", scores, labels, blank=BLANK), scores


def edit_distance(a: list[int], b: list[int]) -> int:
    """Levenshtein distance: the fewest insertions, deletions and substitutions from a to b."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        diagonal, row[0] = row[0], i
        for j, y in enumerate(b, start=1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (x != y))
    return row[-1]


def as_lists(labels: np.ndarray) -> list[list[int]]:
    return [[int(v) for v in row if v >= 0] for row in labels]


def label_error_rate(decoded: np.ndarray, labels: np.ndarray) -> float:
    """Edit distance summed over utterances, over the number of reference labels."""
    references = as_lists(labels)
    errors = sum(edit_distance(d, r) for d, r in zip(as_lists(decoded), references))
    return errors / sum(len(r) for r in references)


def decode(model: ge.Model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame probabilities (n, FRAMES, symbols) and the greedy decoding (n, FRAMES)."""
    probs = model.predict({"x": x})
    return probs, greedy_decode(np, probs, BLANK)


def scores_of(model: ge.Model, data: dict[str, np.ndarray]) -> dict[str, float]:
    _, decoded = decode(model, data["x"])
    repeats = (data["labels"][:, 1:] == data["labels"][:, :-1]).any(axis=1)
    return {"ler": label_error_rate(decoded, data["labels"]),
            "ler_repeats": label_error_rate(decoded[repeats], data["labels"][repeats]),
            "exact": float(np.mean([d == r for d, r in zip(as_lists(decoded),
                                                          as_lists(data["labels"]))]))}


def text(labels: np.ndarray) -> str:
    """A row of labels (padded with -1) as letters."""
    return "".join(SYMBOLS[v] for v in labels if v >= 0)


def draw_best_path(x: np.ndarray, probs: np.ndarray, labels: np.ndarray, path: Path) -> None:
    """Frames (features over time) above each symbol's probability per frame, the best path
    marked, and what it reads as."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    best = probs.argmax(axis=-1)
    decoded = greedy_decode(np, probs[None], BLANK)[0]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 4.6), sharex=True,
                                      gridspec_kw={"height_ratios": [1, 1.1]})
    top.imshow(x.T, aspect="auto", cmap="RdBu_r", vmin=-3, vmax=3, interpolation="nearest")
    top.set(ylabel="feature", title=f"input frames (target {text(labels)})")
    bottom.imshow(probs.T, aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    bottom.plot(np.arange(FRAMES), best, "o", color="#d95f02", markersize=4, label="best path")
    for t, symbol in enumerate(best):
        bottom.annotate(SYMBOLS[symbol], (t, -0.9), ha="center", fontsize=8,
                        color="#d95f02" if symbol != BLANK else "grey", annotation_clip=False)
    bottom.set(yticks=range(len(SYMBOLS)), yticklabels=["blank", *LETTERS], xlabel="frame",
               ylabel="P(symbol | frame)", ylim=(len(SYMBOLS) - 0.5, -1.5),
               title=f"best path: merge repeats, drop blanks -> {text(decoded)}")
    bottom.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(epochs: int, train_size: int, units: int = 32, seed: int = 0
          ) -> tuple[ge.Model, dict[str, float], list[float]]:
    """A trained model, the test scores of the untrained one, and the training loss per epoch."""
    g, loss, _ = build(units)
    model = g.compile(loss, optimizer=ge.optimizer("adam", lr=5e-3), clip_norm=5.0, seed=seed)
    untrained = scores_of(model, utterances(300, seed=1))
    # Matrices this small keep one core busy: a second BLAS thread only spins against the first.
    with threadpool_limits(limits=1, user_api="blas"):
        history = model.fit(utterances(train_size, seed=0), epochs=epochs, batch_size=32, verbose=0)
    return model, untrained, history["loss"]


def main(epochs: int = 12, train_size: int = 2000, image: Path | None = IMAGES / "ctc_best_path.png"
         ) -> dict[str, float]:
    start = time.perf_counter()
    model, untrained, losses = train(epochs, train_size)
    seconds = time.perf_counter() - start
    test = utterances(300, seed=1)
    trained = scores_of(model, test)
    print(f"{len(LETTERS)} labels + blank, {FRAMES} frames of {FEATURES} features (noise {NOISE}), "
          f"2-{MAX_LABELS} labels per utterance; bidirectional GRU 2x32, {train_size} utterances, "
          f"{epochs} epochs in {seconds:.1f} s")
    print("CTC loss per epoch: " + " ".join(f"{v:.2f}" for v in losses))
    print(f"{'':<12}{'label error rate':>18}{'  with a repeat':>16}{'exact sequences':>17}")
    for name, s in (("untrained", untrained), ("trained", trained)):
        print(f"{name:<12}{s['ler']:>18.3f}{s['ler_repeats']:>16.3f}{s['exact']:>17.3f}")
    probs, decoded = decode(model, test["x"])
    row = next(i for i, labels in enumerate(test["labels"])
               if (labels[1:] == labels[:-1]).any() and (decoded[i] >= 0).sum() == (labels >= 0).sum())
    print(f"utterance {row}: best path {''.join(SYMBOLS[s] for s in probs[row].argmax(-1))} -> "
          f"{text(decoded[row])} (target {text(test['labels'][row])})")
    if image is not None:
        draw_best_path(test["x"][row], probs[row], test["labels"][row], image)
        print(f"picture: {image}")
    return {"untrained": untrained["ler"], **{f"trained_{k}": v for k, v in trained.items()},
            "seconds": seconds}


if __name__ == "__main__":
    main()
