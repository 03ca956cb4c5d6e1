"""The part III sequence examples' claims (CTC speech, sequence to sequence with attention), on
shortened runs of the examples' own functions."""

from __future__ import annotations

import numpy as np
import pytest
from examples_loader import load_example


@pytest.fixture(scope="module")
def ctc():
    return load_example("ctc_speech")


@pytest.fixture(scope="module")
def seq2seq():
    return load_example("seq2seq_attention")


def test_utterances_hold_repeats_and_fit_their_frames(ctc):
    data = ctc.utterances(200, seed=3)
    labels = data["labels"]
    assert data["x"].shape == (200, ctc.FRAMES, ctc.FEATURES) and labels.shape == (200, ctc.MAX_LABELS)
    assert (labels != ctc.BLANK).all() and ((labels == -1) | (labels >= 1)).all()
    repeats = ((labels[:, 1:] == labels[:, :-1]) & (labels[:, 1:] >= 0)).any(axis=1)
    assert 0.3 < repeats.mean() < 0.9  # "好好棒棒棒": many utterances repeat a label


def test_label_error_rate_counts_edits_over_reference_labels(ctc):
    reference = np.array([[1, 2, 2, 3], [4, 4, -1, -1]])
    decoded = np.array([[1, 2, 3, -1], [4, 4, -1, -1]])  # one deletion in 6 labels
    assert ctc.label_error_rate(decoded, reference) == pytest.approx(1 / 6)
    assert ctc.edit_distance([1, 2, 3], [2, 3, 4]) == 2 and ctc.edit_distance([], [1, 1]) == 2


@pytest.mark.slow
def test_ctc_training_reads_the_labels_off_the_frames(ctc, tmp_path):
    # 5 of the example's 12 epochs on 800 of its 2000 utterances
    model, untrained, losses = ctc.train(epochs=5, train_size=800)
    trained = ctc.scores_of(model, ctc.utterances(300, seed=1))
    assert untrained["ler"] > 1.0  # an untrained network inserts labels everywhere
    assert trained["ler"] < 0.15 and trained["ler_repeats"] < 0.15  # repeats survive the merging
    assert trained["exact"] > 0.5 and losses[-1] < losses[0] / 10
    test = ctc.utterances(3, seed=1)
    probs, _ = ctc.decode(model, test["x"])
    ctc.draw_best_path(test["x"][0], probs[0], test["labels"][0], tmp_path / "path.png")
    assert (tmp_path / "path.png").stat().st_size > 10_000


def test_the_step_model_shares_the_training_models_parameters(seq2seq):
    data = seq2seq.strings(64, seed=2)
    translator = seq2seq.Translator(attention=True)
    translator.fit(data, epochs=1)  # the step model must see the trained values, not copies
    step, model = translator.step, translator.model
    assert all(step.parameters()[name] is model.parameters()[name] for name in step.parameters())
    # Decoding the true tokens one step at a time gives the scores of the teacher-forced graph.
    states_name, first_name = translator.encoder_outputs
    feeds = {k: data[k] for k in ("src", "mask", "tgt_in")}
    run = model.run(feeds, fetches=[states_name, first_name, "out/add"])
    state = run[first_name]
    for t in range(seq2seq.OUT_STEPS):
        out = step.run({"token": data["tgt_in"][:, t:t + 1], "state": state, "summary": run[first_name],
                        "states": run[states_name], "mask": data["mask"]})
        scores, h = (out[name] for name in step.output_names[:2])
        np.testing.assert_allclose(scores[:, 0], run["out/add"][:, t], rtol=1e-4, atol=1e-5)
        state = h[:, 0]


@pytest.mark.slow
def test_attention_translates_long_strings_that_the_summary_alone_cannot(seq2seq):
    # the example's 8 epochs on 2000 of its 3000 strings (at 6 epochs the attention model is
    # still finding the alignment, and whether it has found it by then depends on float rounding)
    train, test = seq2seq.strings(2000, seed=0), seq2seq.strings(300, seed=1)
    accuracy = {}
    for attention in (True, False):
        translator = seq2seq.Translator(attention)
        translator.fit(train, epochs=8)
        decoded, weights = translator.translate(test["src"], test["mask"])
        accuracy[attention] = seq2seq.accuracy_by_length(seq2seq.exact(decoded, test), test["length"])
        # greedy decoding stops: nothing after an <end>, and with attention nearly every string
        # gets one (the summary alone loses its place in long strings and may run on)
        ended = (decoded == seq2seq.EOS).sum(axis=1)
        assert (ended <= 1).all()
        if attention:
            assert ended.mean() > 0.9, ended.mean()
            # output t of an 8-digit string copies input digit 7 - t: the weights gather on that
            # anti-diagonal, and almost all of them within one digit of it
            rows, steps = np.flatnonzero(test["length"] == 8), np.arange(8)
            distance = np.abs(np.arange(seq2seq.MAX_DIGITS)[None, :] - (7 - steps)[:, None])
            on_copied = weights[rows[:, None], steps, 7 - steps].mean()
            near_copied = (weights[rows, :8] * (distance <= 1)).sum(axis=-1).mean()
            assert on_copied > 3 / 8 and near_copied > 0.8, (on_copied, near_copied)
    with_attention, without = accuracy[True], accuracy[False]
    assert with_attention["4-7"] > 0.85
    for bucket in ("12-15", "16-20"):
        assert with_attention[bucket] > without[bucket] + 0.2, accuracy
        assert without[bucket] < 0.05
