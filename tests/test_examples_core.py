"""The core issue's demonstrations, with their numbers checked."""

from __future__ import annotations

from examples_loader import load_example


def test_digits_mlp_reaches_95_percent():
    assert load_example("digits_mlp").main(epochs=30) >= 0.95


def test_xor_needs_a_hidden_layer():
    solved = load_example("xor").main()
    assert solved["single neuron"] == 0
    assert solved["2-2-1 network"] >= 3
