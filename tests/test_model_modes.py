"""Training and evaluation mode: calls that need one mode for a while (run, predict, evaluate,
fit) leave the model in the mode it was in, even when they fail."""

from __future__ import annotations

import numpy as np
import pytest

import graphengine as ge

rng = np.random.default_rng(3)
X = rng.standard_normal((8, 4)).astype(np.float32)
Y = rng.standard_normal((8, 4)).astype(np.float32)
DATA = {"x": X, "y": Y}


def dropout_model() -> ge.Model:
    """x -> dropout(0.5) -> batch_norm -> dense -> mse: both mode-dependent layers."""
    g = ge.Graph("modes")
    x = g.input("x", (None, 4))
    y = g.input("y", (None, 4))
    h = g.layer("batch_norm", g.layer("dropout", x, rate=0.5, name="drop"), name="bn")
    return g.compile(g.loss("mse", g.layer("dense", h, units=4, name="out"), y),
                     optimizer=ge.optimizer("sgd", lr=0.1))


def operator_modes(model: ge.Model) -> set[bool]:
    """The mode forward() runs in; operators hold none of their own (it is the run's)."""
    assert not any(hasattr(node.op, "training") for node in model.graph.nodes.values())
    return {model.training}


CALLS = {
    "run": lambda model, data: model.run(data),
    "run_training": lambda model, data: model.run(data, training=True),
    "predict": lambda model, data: model.predict(data),
    "evaluate": lambda model, data: model.evaluate(data),
    "fit": lambda model, data: model.fit(data, batch_size=4),
}


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
@pytest.mark.parametrize("training", [True, False], ids=["from_train", "from_eval"])
def test_a_call_leaves_the_mode_as_it_found_it(call, training):
    model = dropout_model().train() if training else dropout_model().eval()
    call(model, DATA)
    assert model.training is training
    assert operator_modes(model) == {training}


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
@pytest.mark.parametrize("training", [True, False], ids=["from_train", "from_eval"])
def test_a_failing_call_leaves_the_mode_as_it_found_it(call, training):
    model = dropout_model().train() if training else dropout_model().eval()
    with pytest.raises(ge.FeedError):
        call(model, {"x": X[:, :3], "y": Y})  # the wrong feed shape fails inside the call
    assert model.training is training
    assert operator_modes(model) == {training}


def test_forward_after_run_still_trains_with_dropout():
    model = dropout_model()
    evaluation_loss = model.evaluate(DATA)["loss"]
    model.run({"x": X})
    training_losses = {model.forward(DATA) for _ in range(3)}
    # Fresh dropout masks each time: losses differ from evaluation's and from each other.
    assert evaluation_loss not in training_losses
    assert len(training_losses) == 3


def test_fit_trains_in_training_mode_even_from_evaluation_mode():
    seen: list[bool] = []

    class Watch(ge.Callback):
        def on_batch_end(self, model, batch, loss):
            seen.append(model.training)

    model = dropout_model().eval()
    model.fit(DATA, epochs=2, batch_size=4, validation=DATA, callbacks=[Watch()])
    assert seen == [True] * 4
    assert not model.training


def test_mode_sets_the_mode_inside_the_block_and_restores_it_after_an_error():
    model = dropout_model()
    with pytest.raises(RuntimeError, match="inside"):
        with model.mode(training=False):
            assert not model.training
            assert operator_modes(model) == {False}
            with model.mode(training=True):
                assert operator_modes(model) == {True}
            assert operator_modes(model) == {False}
            raise RuntimeError("inside")
    assert model.training
    assert operator_modes(model) == {True}
