"""examples/vanishing_gradients.py: skip connections carry the gradient past vanishing sigmoids."""

from __future__ import annotations

from examples_loader import load_example


def test_residual_blocks_keep_the_gradient_flowing(tmp_path):
    results = load_example("vanishing_gradients").main(epochs=2, blocks=6, out=tmp_path)
    assert results["8 hidden sigmoid layers"] < 1e-3  # first layer vs the strongest: vanishing
    assert results["6 residual sigmoid blocks"] > 1e-2  # the same sigmoids with skips: not
    assert results["skip"] > 2 * results["branch"]
    assert results["residual_loss"] < results["plain_loss"]
