"""Word vectors: "a word can be understood by its context" (the notes' prediction-based embeddings).

No text is downloaded: the example writes its own corpus from a small grammar whose structure it
knows. Ten countries, each with a capital, a language and a dish; colours and the things they
colour; sentences such as "paris is the capital of france", "people speak german in berlin",
"the red car", "we ate paella in madrid". Then it learns 32-number vectors for the words twice,
with negative sampling (each true pair against 5 words drawn from the unigram distribution
to the 3/4 power, scored by a dot product of an input and an output vector, binary cross-entropy):

- CBOW: the mean of the vectors of the 2 words on each side predicts the middle word;
- skip-gram: the middle word predicts each word within 2 places of it.

It reports each word's nearest neighbours (cosine similarity) and the analogy accuracy
(france : paris :: germany : ? -> the word nearest to paris - france + germany, the three question
words excluded) on every ordered pair of countries, for capitals, languages and dishes, against
random vectors. A PCA projection of countries, capitals, languages and colours goes to
docs/images/word_vectors_pca.png.

    .venv/bin/python examples/word_vectors.py
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import numpy as np
from threadpoolctl import threadpool_limits

import graphengine as ge

IMAGES = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "docs", "images")

# country, capital, language, dish
COUNTRIES = (
    ("france", "paris", "french", "croissant"),
    ("germany", "berlin", "german", "pretzel"),
    ("spain", "madrid", "spanish", "paella"),
    ("italy", "rome", "italian", "pizza"),
    ("japan", "tokyo", "japanese", "sushi"),
    ("china", "beijing", "chinese", "dumplings"),
    ("russia", "moscow", "russian", "borscht"),
    ("greece", "athens", "greek", "moussaka"),
    ("egypt", "cairo", "arabic", "koshari"),
    ("brazil", "brasilia", "portuguese", "feijoada"),
)
COLOURS = ("red", "green", "blue", "yellow", "black", "white")
THINGS = ("car", "house", "bird", "ball", "door", "shirt")
RELATIONS = {"capital": 1, "language": 2, "dish": 3}
WINDOW, NEGATIVES, DIM = 2, 5, 32


def sentence(rng: np.random.Generator) -> list[str]:
    """One sentence of the grammar: a country fact, a city fact, or a colour."""
    country, capital, language, dish = COUNTRIES[rng.integers(len(COUNTRIES))]
    place = capital if rng.random() < 0.5 else country
    kind = "city" if place == capital else "country"
    other = COUNTRIES[rng.integers(len(COUNTRIES))][0]
    colour, thing = COLOURS[rng.integers(len(COLOURS))], THINGS[rng.integers(len(THINGS))]
    templates = (
        f"{capital} is the capital of {country}",
        f"people speak {language} in {place}",
        f"we ate {dish} in {place}",
        f"{place} is a {kind}",
        f"the people of {place} love {dish}",
        f"{place} speaks {language}",
        f"she flew from {place} to {other}",
        f"the {thing} is {colour}",
        f"a {colour} {thing} in {place}",
        f"he painted the {thing} {colour}",
    )
    return templates[rng.integers(len(templates))].split()


def corpus(tokens: int = 300_000, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """About ``tokens`` word ids, sentences separated by ".", and the vocabulary."""
    rng = np.random.default_rng(seed)
    words: list[str] = []
    while len(words) < tokens:
        words += sentence(rng) + ["."]
    vocabulary = sorted(set(words))
    index = {w: i for i, w in enumerate(vocabulary)}
    return np.array([index[w] for w in words], dtype=np.int64), vocabulary


def subsample(ids: np.ndarray, rng: np.random.Generator, t: float = 1e-3) -> np.ndarray:
    """Drop frequent words ("the", "in", ".") with probability 1 - sqrt(t / frequency), as
    word2vec does: they say little about their neighbours and would dominate the pairs."""
    frequency = np.bincount(ids) / len(ids)
    keep = np.minimum(1.0, np.sqrt(t / frequency[ids]))
    return ids[rng.random(len(ids)) < keep]


def build(architecture: str, vocabulary_size: int, dim: int = DIM, lr: float = 0.02,
          seed: int = 0) -> ge.Model:
    """CBOW or skip-gram with negative sampling. ``candidates`` holds the word to predict first
    and NEGATIVES sampled words after it; ``label`` is 1 for the first, 0 for the others."""
    g = ge.Graph(architecture)
    if architecture == "cbow":
        context = g.input("context", (None, 2 * WINDOW), dtype="int64")
        query = g.layer("embedding", context, vocab_size=vocabulary_size, dim=dim, name="words").mean(axis=1)
    else:
        centre = g.input("centre", (None,), dtype="int64")
        query = g.layer("embedding", centre, vocab_size=vocabulary_size, dim=dim, name="words")
    candidates = g.input("candidates", (None, 1 + NEGATIVES), dtype="int64")
    outputs = g.layer("embedding", candidates, vocab_size=vocabulary_size, dim=dim, name="outputs")
    scores = (outputs * query.reshape(None, 1, dim)).sum(axis=2)
    loss = g.loss("binary_cross_entropy", scores, g.input("label", (None, 1 + NEGATIVES)))
    return g.compile(loss, optimizer=ge.optimizer("adam", lr=lr), seed=seed)


def examples(architecture: str, ids: np.ndarray, rng: np.random.Generator,
             noise: np.ndarray) -> dict[str, np.ndarray]:
    """One epoch of training examples from the (subsampled) stream ``ids``."""
    offsets = [o for o in range(-WINDOW, WINDOW + 1) if o != 0]
    positions = np.arange(WINDOW, len(ids) - WINDOW)
    if architecture == "cbow":
        feeds = {"context": np.stack([ids[positions + o] for o in offsets], axis=1)}
        targets = ids[positions]
    else:
        feeds = {"centre": np.repeat(ids[positions], len(offsets))}
        targets = np.stack([ids[positions + o] for o in offsets], axis=1).reshape(-1)
    negatives = rng.choice(len(noise), size=(len(targets), NEGATIVES), p=noise)
    feeds["candidates"] = np.concatenate([targets[:, None], negatives], axis=1)
    label = np.zeros((len(targets), 1 + NEGATIVES), dtype=np.float32)
    label[:, 0] = 1
    feeds["label"] = label
    return feeds


def train(architecture: str, ids: np.ndarray, vocabulary_size: int, epochs: int = 3,
          seed: int = 0) -> tuple[np.ndarray, list[float]]:
    """The learned input vectors (vocabulary, DIM) and the loss of each epoch."""
    rng = np.random.default_rng(seed)
    noise = np.bincount(ids, minlength=vocabulary_size) ** 0.75
    noise /= noise.sum()
    model = build(architecture, vocabulary_size, seed=seed)
    losses = []
    # matrices this small keep one core busy: a second BLAS thread only spins against the first
    with threadpool_limits(limits=1, user_api="blas"):
        for _ in range(epochs):  # new subsample and negatives each epoch
            history = model.fit(examples(architecture, subsample(ids, rng), rng, noise), epochs=1,
                                batch_size=1024, verbose=0, monitor=False)
            losses.append(history["loss"][-1])
    return model.backend.to_numpy(model.parameters()["words/W"]), losses


def unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def neighbours(vectors: np.ndarray, vocabulary: Sequence[str], word: str, k: int = 4) -> list[str]:
    v = unit(vectors)
    similarity = v @ v[vocabulary.index(word)]
    return [vocabulary[i] for i in np.argsort(-similarity) if vocabulary[i] != word][:k]


def analogy_accuracy(vectors: np.ndarray, vocabulary: Sequence[str], relation: str) -> float:
    """Share of a : b :: c : ? questions over ordered country pairs answered with d, where
    (a, b) and (c, d) are (country, its capital / language / dish)."""
    v = unit(vectors)
    column, index = RELATIONS[relation], {w: i for i, w in enumerate(vocabulary)}
    right = total = 0
    for first in COUNTRIES:
        for second in COUNTRIES:
            if first is second:
                continue
            a, b, c = index[first[0]], index[first[column]], index[second[0]]
            similarity = v @ unit((v[b] - v[a] + v[c])[None])[0]
            similarity[[a, b, c]] = -np.inf
            right += int(similarity.argmax() == index[second[column]])
            total += 1
    return right / total


def project(vectors: np.ndarray, vocabulary: Sequence[str], words: Sequence[str],
            direction: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The words' unit vectors on their own first two principal components, or on ``direction``
    and the first principal component of what is left."""
    v = unit(vectors)[[vocabulary.index(w) for w in words]]
    v = v - v.mean(axis=0)
    if direction is None:
        _, _, components = np.linalg.svd(v, full_matrices=False)
        return dict(zip(words, v @ components[:2].T))
    direction = direction / np.linalg.norm(direction)
    along = v @ direction
    _, _, components = np.linalg.svd(v - along[:, None] * direction, full_matrices=False)
    return dict(zip(words, np.stack([along, v @ components[0]], axis=1)))


def save_pca(vectors: np.ndarray, vocabulary: Sequence[str], name: str, path: str) -> None:
    """Left: countries, capitals, languages and colours; right: countries and capitals along the
    mean country -> capital offset, which the analogies rely on."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = {"country": [c[0] for c in COUNTRIES], "capital": [c[1] for c in COUNTRIES],
              "language": [c[2] for c in COUNTRIES], "colour": list(COLOURS)}
    colours = {"country": "#1f77b4", "capital": "#d62728", "language": "#2ca02c", "colour": "#9467bd"}
    v = unit(vectors)
    offset = np.mean([v[vocabulary.index(c[1])] - v[vocabulary.index(c[0])] for c in COUNTRIES], axis=0)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5))
    for ax, shown, direction in zip(axes, (list(groups), ["country", "capital"]), (None, offset)):
        xy = project(vectors, vocabulary, [w for g in shown for w in groups[g]], direction)
        for group in shown:
            points = np.array([xy[w] for w in groups[group]])
            ax.scatter(*points.T, c=colours[group], label=group, s=18)
            for w, (x, y) in zip(groups[group], points):
                ax.annotate(w, (x, y), fontsize=7, xytext=(2, 2), textcoords="offset points")
        for country, capital, *_ in COUNTRIES:
            ax.annotate("", xy=xy[capital], xytext=xy[country],
                        arrowprops={"arrowstyle": "->", "color": "#999999", "lw": 0.7})
        ax.legend(fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].set_title(f"{name} vectors, first two principal components (arrows: country -> capital)",
                      fontsize=9)
    axes[1].set_title("across: the mean country -> capital offset; up: the first principal component",
                      fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(tokens: int = 300_000, epochs: int = 3, images: str | None = IMAGES) -> dict:
    ids, vocabulary = corpus(tokens)
    print(f"corpus: {len(ids):,} tokens, {len(vocabulary)} words; vectors of {DIM}, window {WINDOW}, "
          f"{NEGATIVES} negative samples")
    vectors = {"random vectors": np.random.default_rng(0).standard_normal((len(vocabulary), DIM))}
    for architecture in ("cbow", "skip-gram"):
        start = time.perf_counter()
        vectors[architecture], losses = train(architecture, ids, len(vocabulary), epochs=epochs)
        print(f"{architecture}: loss per epoch {', '.join(f'{x:.3f}' for x in losses)} "
              f"({time.perf_counter() - start:.1f} s)")
    results = {}
    print(f"\nanalogy accuracy over {len(COUNTRIES) * (len(COUNTRIES) - 1)} ordered country pairs "
          f"(france : paris :: germany : ?)")
    print(f"{'':>15}" + "".join(f"{r:>10}" for r in RELATIONS))
    for name, v in vectors.items():
        results[name] = {r: analogy_accuracy(v, vocabulary, r) for r in RELATIONS}
        print(f"{name:>15}" + "".join(f"{results[name][r]:10.1%}" for r in RELATIONS))
    print("\nnearest neighbours (cosine)")
    for word in ("france", "paris", "german", "red", "sushi"):
        print(f"{word:>8}: " + "   ".join(f"{name} {', '.join(neighbours(v, vocabulary, word))}"
                                          for name, v in vectors.items() if name != "random vectors"))
    results["neighbours"] = {name: {w: neighbours(v, vocabulary, w) for w in ("france", "paris", "red")}
                             for name, v in vectors.items()}
    if images:
        os.makedirs(images, exist_ok=True)
        save_pca(vectors["skip-gram"], vocabulary, "skip-gram", os.path.join(images, "word_vectors_pca.png"))
    return results


if __name__ == "__main__":
    main()
