"""Many-to-many: tag every word of a travel request (toy slot filling), one direction or both.

    .venv/bin/python examples/bidirectional_tagging.py

Each word gets a tag: FROM (departure city), TO (arrival city), DAY, or O. In "from boston to
paris" the word *before* a city decides its tag; in "boston is where i leave" and "boston is where
i land" it is decided four words *after* it. A left-to-right RNN has to tag "boston" before it
has read those words, so on such cities it can only guess; a bidirectional RNN's output at each
step has read the whole sentence, both sides of the word. Same task, same size of hidden state
(a GRU of 48 units against two of 24), accuracies compared.
"""

from __future__ import annotations

import numpy as np

import graphengine as ge

CITIES = ["boston", "denver", "paris", "tokyo", "lima", "cairo", "oslo", "rome"]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
TAGS = ["O", "FROM", "TO", "DAY"]
# {A}: departure, {B}: arrival, {D}: day. The starred templates open with a city whose tag only
# the words after it decide.
TEMPLATES = [
    ("from {A} to {B} on {D}", False),
    ("to {B} from {A} on {D}", False),
    ("on {D} i leave {A} and land in {B}", False),
    ("{A} is where i leave and {B} is where i land", True),
    ("{B} is where i land and {A} is where i leave", True),
    ("{A} to {B} on {D} please", True),
    ("{B} from {A} on {D} please", True),
]
PAD = "<pad>"


def vocabulary() -> list[str]:
    words = {w for template, _ in TEMPLATES for w in template.split() if not w.startswith("{")}
    return [PAD, *sorted(words), *CITIES, *DAYS]


def sentences(n: int, seed: int) -> dict[str, np.ndarray]:
    """``ids`` and ``tags`` (n, length) padded with <pad>/O; ``real`` marks real words,
    ``undecided`` the cities whose tag the words before them cannot tell."""
    gen = np.random.default_rng(seed)
    vocab = {w: i for i, w in enumerate(vocabulary())}
    length = max(len(t.split()) for t, _ in TEMPLATES)
    data = {k: np.zeros((n, length), np.int64) for k in ("ids", "tags")}
    data["real"] = np.zeros((n, length), bool)
    data["undecided"] = np.zeros((n, length), bool)
    for row in range(n):
        template, starred = TEMPLATES[gen.integers(len(TEMPLATES))]
        a, b = gen.choice(CITIES, 2, replace=False)
        slots = {"{A}": (a, "FROM"), "{B}": (b, "TO"), "{D}": (gen.choice(DAYS), "DAY")}
        for position, word in enumerate(template.split()):
            word, tag = slots.get(word, (word, "O"))
            data["ids"][row, position] = vocab[word]
            data["tags"][row, position] = TAGS.index(tag)
            data["real"][row, position] = True
        data["undecided"][row, 0] = starred
    return data


def build(bidirectional: bool, vocab_size: int, length: int) -> tuple[ge.Graph, ge.Tensor]:
    g = ge.Graph("bidirectional" if bidirectional else "left_to_right")
    ids = g.input("ids", (None, length), dtype="int64")
    tags = g.input("tags", (None, length), dtype="int64")
    h = g.layer("embedding", ids, vocab_size=vocab_size, dim=16)
    if bidirectional:
        h = g.layer("bidirectional", h, layer="gru", units=24, return_sequences=True, name="rnn")
    else:
        h = g.layer("gru", h, units=48, return_sequences=True, name="rnn")
    logits = g.layer("dense", h, units=len(TAGS), name="tagger")  # (batch, time, tags)
    # many-to-many: every (sentence, step) is one classification
    loss = g.loss("softmax_cross_entropy", logits.reshape(-1, len(TAGS)), tags.reshape(-1))
    return g, loss


def main(epochs: int = 12, train_size: int = 2000) -> dict[str, dict[str, float]]:
    train, test = sentences(train_size, seed=0), sentences(500, seed=1)
    vocab = vocabulary()
    length = train["ids"].shape[1]
    results = {}
    predictions = {}
    print(f"{'model':<16}{'parameters':>11}{'word acc':>10}{'city acc':>10}"
          f"{'cities decided later':>22}{'sentences all right':>21}")
    for bidirectional in (False, True):
        g, loss = build(bidirectional, len(vocab), length)
        model = g.compile(loss, optimizer=ge.optimizer("adam", lr=1e-2), seed=0)
        model.fit({"ids": train["ids"], "tags": train["tags"]}, epochs=epochs, batch_size=32)
        logits = model.run({"ids": test["ids"]}, fetches=["tagger/add"])["tagger/add"]
        predicted = logits.argmax(axis=-1)
        right = predicted == test["tags"]
        cities = test["real"] & np.isin(test["tags"], [TAGS.index("FROM"), TAGS.index("TO")])
        name = "bidirectional" if bidirectional else "left-to-right"
        results[name] = {
            "words": float(right[test["real"]].mean()),
            "cities": float(right[cities].mean()),
            "undecided": float(right[test["undecided"]].mean()),
            "sentences": float((right | ~test["real"]).all(axis=1).mean()),
        }
        predictions[name] = predicted
        count = sum(int(np.prod(p.shape)) for p in model.parameters().values())
        r = results[name]
        print(f"{name:<16}{count:>11}{r['words']:>10.3f}{r['cities']:>10.3f}{r['undecided']:>22.3f}"
              f"{r['sentences']:>21.3f}")
    row = int(np.flatnonzero(test["undecided"][:, 0])[0])
    words = [vocab[i] for i, real in zip(test["ids"][row], test["real"][row]) if real]
    print("\nexample:", " ".join(words))
    for name, predicted in [("true tags", test["tags"]), *predictions.items()]:
        print(f"{name:>14}: " + " ".join(f"{TAGS[t]:<{len(w)}}" for t, w in zip(predicted[row], words)))
    return results


if __name__ == "__main__":
    main()
