"""Kill a training process with SIGKILL and resume it from its last checkpoint: the weights come
out bit for bit those of an uninterrupted run (NumPy backend)."""

from __future__ import annotations

import numpy as np
import pytest
from killing import REPO, kill_when_ready

import graphengine as ge

EPOCHS, BATCH = 6, 16


def build():
    """Everything that draws random numbers or keeps state: shuffling, dropout, batch-norm
    running statistics, Adam's moments and step count, a schedule, fitted preprocessing."""
    g = ge.Graph("resume")
    x = g.input("x", (None, 6))
    y = g.input("y", (None,), dtype="int64")
    h = g.layer("zscore", x, name="scale")
    h = g.activation("relu", g.layer("dense", h, units=32, name="fc1"))
    h = g.layer("dropout", g.layer("batch_norm", h, name="bn"), rate=0.3)
    out = g.layer("dense", h, units=3, name="out")
    return g.compile(g.loss("softmax_cross_entropy", out, y),
                     optimizer=ge.optimizer("adam", lr=0.01), regularizer=ge.L2(1e-4),
                     schedule=ge.StepDecay(0.5, every=2), seed=4)


def dataset() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((200, 6)) * 3 + 1).astype(np.float32)
    return {"x": x, "y": np.digitize(x[:, 0] - x[:, 2], [-2.0, 2.0])}


CHILD = """
import sys, time
sys.path.insert(0, {tests!r})
import graphengine as ge
from test_resume import BATCH, EPOCHS, build, dataset

class KillMeMidEpoch(ge.Callback):
    def on_batch_end(self, model, batch, loss):
        if model.epoch == 3 and batch == 5:    # epoch 4 is under way; checkpoint 3 is on disk
            open({ready!r}, "w").close()
            time.sleep(60)

build().fit(dataset(), epochs=EPOCHS, batch_size=BATCH,
            callbacks=[ge.Checkpoint({path!r}), KillMeMidEpoch()])
"""


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """The checkpoint a training process left behind when SIGKILLed in its 4th epoch."""
    folder = tmp_path_factory.mktemp("resume")
    path, ready = folder / "checkpoint.safetensors", folder / "ready"
    kill_when_ready(CHILD.format(tests=str(REPO / "tests"), ready=str(ready), path=str(path)), ready)
    return path


@pytest.fixture(scope="module")
def uninterrupted():
    model = build()
    model.fit(dataset(), epochs=EPOCHS, batch_size=BATCH)
    return model


def assert_identical(resumed, reference):
    for name, value in reference.parameters().items():
        assert np.array_equal(resumed.parameters()[name], value), name
    for name, state in reference.optimizer_state.items():
        for key, value in state.items():
            assert np.array_equal(resumed.optimizer_state[name][key], value), (name, key)
    assert (resumed.epoch, resumed.step_count) == (reference.epoch, reference.step_count)
    assert resumed.optimizer.lr == reference.optimizer.lr
    assert resumed.rng.bit_generator.state == reference.rng.bit_generator.state
    assert resumed.data_rng.bit_generator.state == reference.data_rng.bit_generator.state


def test_resuming_a_killed_run_with_load_is_bit_identical(killed_run, uninterrupted):
    model = ge.load(killed_run)
    assert model.epoch == 3 and model.step_count == 3 * 13
    history = model.fit(dataset(), epochs=EPOCHS - model.epoch, batch_size=BATCH)
    assert history.epochs == [4, 5, 6]
    assert_identical(model, uninterrupted)


def test_resuming_into_a_model_built_by_code_is_bit_identical(killed_run, uninterrupted):
    model = build()
    report = model.load_weights(killed_run, training_state=True)
    assert not (report.missing or report.unexpected or report.mismatched)
    assert model.fitted_layers == {"scale"}  # not refitted on resume
    model.fit(dataset(), epochs=EPOCHS - model.epoch, batch_size=BATCH)
    assert_identical(model, uninterrupted)


def test_without_the_rng_states_the_resumed_run_differs(killed_run, uninterrupted):
    """The control: the checkpoint's RNG states are what makes the resumed run identical."""
    model = ge.load(killed_run)
    model.data_rng = np.random.default_rng(123)
    model.fit(dataset(), epochs=EPOCHS - model.epoch, batch_size=BATCH)
    assert not np.array_equal(model.parameters()["fc1/W"], uninterrupted.parameters()["fc1/W"])
