"""The CNN/RNN examples' claims, checked on shortened runs."""

from __future__ import annotations

import numpy as np
import pytest
from examples_loader import load_example


@pytest.mark.slow
def test_input_gradients_fool_the_cnn_and_climb_class_scores():
    example = load_example("cnn_input_gradients")
    model, data = load_example("digits_cnn").trained_cnn(epochs=8)
    x, y = data["x_test"], data["y_test"]
    clean = example.accuracy(model, x, y)
    assert clean >= 0.95
    attacked = example.fgsm(model, x, y, eps=0.1)
    assert np.abs(attacked - x).max() <= 0.1 + 1e-6 and attacked.min() >= 0 and attacked.max() <= 1
    assert example.accuracy(model, attacked, y) < clean - 0.25
    noise = np.sign(np.random.default_rng(0).standard_normal(x.shape)).astype(np.float32)
    assert example.accuracy(model, np.clip(x + 0.1 * noise, 0, 1), y) > clean - 0.05
    images, probs = example.maximize_classes(example.class_score_model(model), steps=60)
    assert (probs.argmax(axis=1) == np.arange(10)).all()  # each image is read as its class


@pytest.mark.slow
def test_bidirectional_tags_what_left_to_right_cannot():
    results = load_example("bidirectional_tagging").main(epochs=5, train_size=600)
    assert results["bidirectional"]["undecided"] >= 0.95
    assert results["left-to-right"]["undecided"] <= 0.8
    assert results["bidirectional"]["words"] > results["left-to-right"]["words"]
