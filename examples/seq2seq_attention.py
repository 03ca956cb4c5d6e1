"""Sequence to sequence with attention: reverse digit strings of 4 to 20 digits.

    .venv/bin/python examples/seq2seq_attention.py

The notes' "attentional sequence to sequence model" (machine translation), on a task whose
answer is known: the output is the input's digits in reverse order, followed by an end symbol.
The output is as long as the input, so the decoder must learn when to stop (the notes' "don't
know when to stop": it emits ``<end>``), and the first digit it writes is the last one it read.

- Encoder: embedding, then a bidirectional GRU over the padded digits (a mask skips the padding).
- Decoder: a GRU started from the encoder's summary, reading the previous output token (teacher
  forcing: the true previous token while training) and the summary again at every step. With
  attention, each decoder state asks for the encoder states that matter now
  (``g.layer("attention", query, states, states, mask)``), and the output reads the state and
  that context. Without, everything the decoder knows about the
  input passes through the summary vector, 64 numbers for up to 20 digits.
- Inference: the encoder runs as a second plan of the training model (``model.run(fetches=...)``
  computes the encoder alone), and greedy decoding runs a one-step decoder model compiled over the
  training model's parameters (``compile(parameters=model.parameters())``), feeding each output
  token and state back in until every sequence has said ``<end>``.

Reported: exact-sequence accuracy of greedy decoding on held-out strings, with and without
attention, by input length. Draws the attention weights of one string (darker: more attention,
as in the notes' figure) with the accuracies, docs/images/seq2seq_attention.png, and the trained
attention model's graph with its gradient flow, docs/images/seq2seq_graph.svg.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

import graphengine as ge

IMAGES = Path(__file__).resolve().parent.parent / "docs" / "images"
PAD, BOS, EOS = 0, 11, 12  # digit d is token d + 1
VOCAB = 13
MIN_DIGITS, MAX_DIGITS = 4, 20
OUT_STEPS = MAX_DIGITS + 1  # the digits and <end>
UNITS, EMBED = 32, 16  # per encoder direction; the decoder has 2 * UNITS
BUCKETS = ((4, 7), (8, 11), (12, 15), (16, 20))


def strings(n: int, seed: int) -> dict[str, np.ndarray]:
    """Padded digit strings and their reversals: ``src`` and ``mask`` (n, MAX_DIGITS), the
    decoder's input ``tgt_in`` (<start> and the reversed digits) and target ``tgt_out`` (the
    reversed digits and <end>), (n, OUT_STEPS), PAD after the end; ``length`` (n,)."""
    gen = np.random.default_rng(seed)
    length = gen.integers(MIN_DIGITS, MAX_DIGITS + 1, n)
    data = {"src": np.full((n, MAX_DIGITS), PAD, np.int64),
            "tgt_in": np.full((n, OUT_STEPS), PAD, np.int64),
            "tgt_out": np.full((n, OUT_STEPS), PAD, np.int64)}
    for row, k in enumerate(length):
        tokens = gen.integers(0, 10, k) + 1
        data["src"][row, :k] = tokens
        data["tgt_in"][row, :k + 1] = [BOS, *tokens[::-1]]
        data["tgt_out"][row, :k + 1] = [*tokens[::-1], EOS]
    data["mask"] = data["src"] != PAD
    data["length"] = length
    return data


# -- the model: an encoder, and a decoder that two graphs build alike -------------------------

def encoder(g: ge.Graph, src: ge.Tensor, mask: ge.Tensor) -> tuple[ge.Tensor, ge.Tensor]:
    """The encoder states (batch, MAX_DIGITS, 2 UNITS) and the decoder's first state."""
    x = g.layer("embedding", src, vocab_size=VOCAB, dim=EMBED, name="src_embed")
    states = g.layer("bidirectional", x, mask, layer="gru", units=UNITS, return_sequences=True,
                     name="encoder")
    with g.name_scope("last_backward_state"):  # scopes name what the diagram draws as one node
        # The backward direction's output at the first step has read the whole string.
        summary = states[:, 0, UNITS:]
    return states, g.activation("tanh", g.layer("dense", summary, units=2 * UNITS, name="bridge"))


def decoder(g: ge.Graph, tokens: ge.Tensor, state: ge.Tensor, summary: ge.Tensor, states: ge.Tensor,
            mask: ge.Tensor, attention: bool) -> tuple[ge.Tensor, ge.Tensor]:
    """Scores over the vocabulary for each step of ``tokens`` (batch, steps), and the decoder's
    states, from the state before the first step, the encoder's summary and its states. The
    training graph and the one-step graph both build it, with the same layer names, so that
    their parameters have the same names and one model can use the other's."""
    y = g.layer("embedding", tokens, vocab_size=VOCAB, dim=EMBED, name="tgt_embed")
    # Every step reads the encoder's summary beside its token (Cho et al. 2014): a short path back
    # to the encoder for the model without attention. (batch, 1, n) times ones (1, steps, 1).
    with g.name_scope("token_and_summary"):
        summary = summary.reshape(None, 1, 2 * UNITS) * np.ones((1, tokens.shape[1], 1), np.float32)
        y = ge.concat([y, summary], axis=-1)
    h = g.layer("gru", y, state, units=2 * UNITS, return_sequences=True, name="decoder")
    features = h
    if attention:
        query = g.layer("dense", h, units=2 * UNITS, name="query")
        keys_allowed = g.op("reshape", mask, shape=(None, 1, MAX_DIGITS), name="keys_allowed")
        context = g.layer("attention", query, states, states, keys_allowed, name="attn")
        features = ge.concat([h, context], axis=-1, name="state_and_context")
    hidden = g.activation("tanh", g.layer("dense", features, units=64, name="combine"))
    return g.layer("dense", hidden, units=VOCAB, name="out"), h


class Translator:
    """A trained sequence-to-sequence model and the one-step decoder that shares its parameters."""

    def __init__(self, attention: bool, seed: int = 0) -> None:
        self.attention = attention
        g = ge.Graph("seq2seq_attention" if attention else "seq2seq")
        src = g.input("src", (None, MAX_DIGITS), dtype="int64")
        mask = g.input("mask", (None, MAX_DIGITS), dtype="bool")
        tgt_in = g.input("tgt_in", (None, OUT_STEPS), dtype="int64")
        tgt_out = g.input("tgt_out", (None, OUT_STEPS), dtype="int64")
        states, first_state = encoder(g, src, mask)
        scores, _ = decoder(g, tgt_in, first_state, first_state, states, mask, attention)
        loss = g.loss("softmax_cross_entropy", scores, tgt_out, ignore_index=PAD)
        self.model = g.compile(loss, optimizer=ge.optimizer("adam", lr=1e-2), clip_norm=1.0,
                               seed=seed)
        self.encoder_outputs = (states.name, first_state.name)
        self.step = self._step_model()

    def _step_model(self) -> ge.Model:
        """One decoder step: the previous token and state in, scores and the new state out."""
        g = ge.Graph("decoder_step")
        token = g.input("token", (None, 1), dtype="int64")
        state = g.input("state", (None, 2 * UNITS))
        summary = g.input("summary", (None, 2 * UNITS))
        states = g.input("states", (None, MAX_DIGITS, 2 * UNITS))
        mask = g.input("mask", (None, MAX_DIGITS), dtype="bool")
        scores, h = decoder(g, token, state, summary, states, mask, self.attention)
        outputs = [scores, h]
        if self.attention:
            outputs.append(g["attn/weights"])
        # Shared, not copied: the step model reads the arrays the training model updates.
        return g.compile(outputs=outputs, parameters=self.model.parameters())

    def fit(self, data: dict[str, np.ndarray], epochs: int) -> list[float]:
        feeds = {k: data[k] for k in ("src", "mask", "tgt_in", "tgt_out")}
        # Matrices this small keep one core busy: a second BLAS thread only spins against the first.
        with threadpool_limits(limits=1, user_api="blas"):
            return self.model.fit(feeds, epochs=epochs, batch_size=64, verbose=0)["loss"]

    def translate(self, src: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Greedy decoding: tokens (n, OUT_STEPS), PAD after each <end>, and the attention weights
        (n, OUT_STEPS, MAX_DIGITS) with attention."""
        states_name, first_name = self.encoder_outputs
        encoded = self.model.run({"src": src, "mask": mask}, fetches=[states_name, first_name])
        n = len(src)
        token, state = np.full((n, 1), BOS, np.int64), encoded[first_name]
        out = np.full((n, OUT_STEPS), PAD, np.int64)
        weights = np.zeros((n, OUT_STEPS, MAX_DIGITS), np.float32) if self.attention else None
        done = np.zeros(n, bool)
        names = self.step.output_names
        for t in range(OUT_STEPS):
            step = self.step.run({"token": token, "state": state, "summary": encoded[first_name],
                                  "states": encoded[states_name], "mask": mask})
            token = step[names[0]][:, 0].argmax(axis=-1)[:, None]
            state = step[names[1]][:, 0]
            out[:, t] = np.where(done, PAD, token[:, 0])
            if self.attention:
                weights[:, t] = step[names[2]][:, 0]
            done |= token[:, 0] == EOS
            if done.all():
                break
        return out, weights


def exact(decoded: np.ndarray, data: dict[str, np.ndarray]) -> np.ndarray:
    """Per string: the whole reversal and then <end>, nothing more, nothing less."""
    return (decoded == data["tgt_out"]).all(axis=1)


def accuracy_by_length(right: np.ndarray, length: np.ndarray) -> dict[str, float]:
    return {f"{lo}-{hi}": float(right[(length >= lo) & (length <= hi)].mean()) for lo, hi in BUCKETS}


# -- pictures ------------------------------------------------------------------------------------

def draw(weights: np.ndarray, row: dict[str, np.ndarray], decoded: np.ndarray,
         accuracies: dict[str, dict[str, float]], path: Path) -> None:
    """The attention weights of one string (darker: more) beside accuracy by input length."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    length = int(row["length"])
    shown = int(np.flatnonzero(decoded == EOS)[0]) + 1 if (decoded == EOS).any() else OUT_STEPS
    read = [str(t - 1) for t in row["src"][:length]]
    written = ["<end>" if t == EOS else str(t - 1) for t in decoded[:shown]]
    fig, (heat, curve) = plt.subplots(1, 2, figsize=(10, 4.4), gridspec_kw={"width_ratios": [1.1, 1]})
    image = heat.imshow(weights[:shown, :length], cmap="Greys", vmin=0, vmax=1)
    heat.set_xticks(range(length), read)
    heat.set_yticks(range(shown), written)
    heat.set(xlabel="input digit (encoder)", ylabel="output token (decoder)",
             title="attention weights: each output looks at\nthe digit it copies (darker: more)")
    fig.colorbar(image, ax=heat, fraction=0.04)
    centres = [(lo + hi) / 2 for lo, hi in BUCKETS]
    for (name, by_length), style in zip(accuracies.items(), ("-o", "--s")):
        curve.plot(centres, list(by_length.values()), style, label=name, linewidth=2)
    curve.set_xticks(centres, [f"{lo}-{hi}" for lo, hi in BUCKETS])
    curve.set(xlabel="input length (digits)", ylabel="exact-sequence accuracy", ylim=(-0.03, 1.03),
              title="greedy decoding of held-out strings")
    curve.legend(loc="center right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def draw_graph(translator: Translator, data: dict[str, np.ndarray], path: Path) -> None:
    """The training graph, one node per layer, coloured by the gradient of one batch; as PNG and
    as SVG (whose tooltips hold each node's numbers)."""
    from graphengine.viz.render import GraphvizMissingError, render
    batch = {k: data[k][:64] for k in ("src", "mask", "tgt_in", "tgt_out")}
    try:
        for suffix in (".png", ".svg"):
            render(translator.model, path.with_suffix(suffix), data=batch, collapse=True)
        print(f"graph: {path.with_suffix('.png')} and .svg")
    except GraphvizMissingError as exc:
        print(exc, file=sys.stderr)


def main(epochs: int = 8, train_size: int = 3000, images: Path | None = IMAGES) -> dict:
    train, test = strings(train_size, seed=0), strings(1000, seed=1)
    accuracies, results, translators = {}, {}, {}
    for attention in (True, False):
        name = "with attention" if attention else "without attention"
        start = time.perf_counter()
        translator = Translator(attention)
        losses = translator.fit(train, epochs)
        decoded, weights = translator.translate(test["src"], test["mask"])
        right = exact(decoded, test)
        accuracies[name] = accuracy_by_length(right, test["length"])
        results[name] = {"accuracy": float(right.mean()), "by_length": accuracies[name],
                         "loss": losses, "seconds": time.perf_counter() - start}
        translators[name] = (translator, decoded, weights)
    print(f"reverse {MIN_DIGITS}-{MAX_DIGITS} digits; {train_size} training strings, {epochs} epochs; "
          f"bidirectional GRU encoder 2x{UNITS}, GRU decoder {2 * UNITS}, greedy decoding until <end>")
    print(f"exact-sequence accuracy on {len(test['length'])} held-out strings, by input length:")
    print(f"{'model':<20}" + "".join(f"{b:>8}" for b in accuracies["with attention"]) + f"{'all':>8}"
          + f"{'final loss':>12}{'time':>8}")
    for name, r in results.items():
        print(f"{name:<20}" + "".join(f"{v:>8.3f}" for v in r["by_length"].values())
              + f"{r['accuracy']:>8.3f}{r['loss'][-1]:>12.4f}{r['seconds']:>7.1f}s")
    translator, decoded, weights = translators["with attention"]
    row = int(np.flatnonzero(test["length"] == 12)[0])
    print("example: " + "".join(str(t - 1) for t in test["src"][row, :test["length"][row]]) + " -> "
          + "".join("<end>" if t == EOS else str(t - 1) for t in decoded[row] if t != PAD))
    if images is not None:
        example = {k: v[row] for k, v in test.items()}
        draw(weights[row], example, decoded[row], accuracies, images / "seq2seq_attention.png")
        print(f"picture: {images / 'seq2seq_attention.png'}")
        draw_graph(translator, train, images / "seq2seq_graph.png")
    return results


if __name__ == "__main__":
    main()
