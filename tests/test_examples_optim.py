"""The optimizer, activation and penalty demonstrations, with their claims checked on short runs."""

from __future__ import annotations

import numpy as np
import pytest
from examples_loader import load_example


def test_optimizer_trajectories_all_reach_the_minimum():
    reached = load_example("optimizer_trajectories").main(image=False)
    assert all(steps is not None for steps in reached.values()), reached
    assert reached["momentum"] < reached["sgd"] and reached["adagrad"] < reached["sgd"]


@pytest.mark.slow
def test_adaptive_and_momentum_beat_sgd_on_a_deep_relu_mlp():
    losses = load_example("optimizers_digits").main(epochs=5, activations=("relu",),
                                                         learning_rates=(0.03, 0.01, 0.003))["relu"]
    sgd = np.mean(losses["sgd"])
    for name in ("momentum", "rmsprop", "adam"):
        assert np.mean(losses[name]) < sgd, (name, losses[name], losses["sgd"])


@pytest.mark.slow
def test_l2_shrinks_and_l1_sparsifies_digits_weights():
    results = load_example("regularization_digits").main(
        epochs=6, settings=("none", "L2 1e-2", "L1 5e-4", "max-norm 1"))
    assert results["L2 1e-2"]["norm"] < 0.8 * results["none"]["norm"]
    assert results["L1 5e-4"]["near_zero"] > 5 * results["none"]["near_zero"]
    assert results["max-norm 1"]["norm"] < results["none"]["norm"]


def test_maxout_network_learns_digits():
    accuracy = load_example("maxout_digits").main(epochs=8)
    assert accuracy["maxout"] > 0.93
