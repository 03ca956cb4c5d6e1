"""fit's callbacks (early stopping, checkpoints, custom), progress bar, History, evaluate."""

from __future__ import annotations

import re

import numpy as np
import pytest

import graphengine as ge

rng = np.random.default_rng(11)


def regression_data(n: int, noise: float = 0.5) -> dict[str, np.ndarray]:
    x = rng.uniform(-2, 2, (n, 1)).astype(np.float32)
    return {"x": x, "y": (np.sin(2 * x) + noise * rng.standard_normal((n, 1))).astype(np.float32)}


def overfitting_model(seed: int = 0):
    g = ge.Graph("wide")
    x = g.input("x", (None, 1))
    y = g.input("y", (None, 1))
    h = g.activation("tanh", g.layer("dense", x, units=64, name="fc1"))
    h = g.activation("tanh", g.layer("dense", h, units=64, name="fc2"))
    out = g.layer("dense", h, units=1, name="out")
    return g.compile(g.loss("mse", out, y), optimizer=ge.optimizer("momentum", lr=0.05), seed=seed)


def classifier(seed: int = 0):
    g = ge.Graph("clf")
    x = g.input("x", (None, 4))
    y = g.input("y", (None,), dtype="int64")
    out = g.layer("dense", g.activation("relu", g.layer("dense", x, units=8)), units=3)
    return g.compile(g.loss("softmax_cross_entropy", out, y),
                     optimizer=ge.optimizer("sgd", lr=0.2), seed=seed)


def classes(n: int) -> dict[str, np.ndarray]:
    x = rng.standard_normal((n, 4)).astype(np.float32)
    return {"x": x, "y": (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 1).astype(np.int64)}


def test_early_stopping_restores_the_epoch_with_the_best_validation_loss():
    train, validation = regression_data(12), regression_data(200, noise=0.0)
    model = overfitting_model()
    stopper = ge.EarlyStopping(patience=5)
    history = model.fit(train, epochs=300, batch_size=12, validation=validation,
                        callbacks=[stopper])
    val_loss = history["val_loss"]
    assert stopper.stopped_epoch is not None, "the wide network should overfit 12 noisy points"
    assert stopper.best_epoch == history.epochs[int(np.argmin(val_loss))]
    assert stopper.stopped_epoch == stopper.best_epoch + 5 == history.epochs[-1]
    assert min(val_loss) < val_loss[-1]
    assert model.evaluate(validation)["loss"] == pytest.approx(min(val_loss), rel=1e-6)


def test_early_stopping_unit_behaviour_with_given_logs():
    model = classifier()
    stopper = ge.EarlyStopping(monitor="val_accuracy", patience=2)  # auto: higher is better
    stopper.on_train_begin(model, ge.History())
    snapshots = {}
    for epoch, accuracy in enumerate([0.5, 0.7, 0.6, 0.7, 0.65], start=1):
        for array in model.parameters().values():
            array += 1.0  # each epoch "trains": every weight moves
        snapshots[epoch] = {n: a.copy() for n, a in model.parameters().items()}
        stopper.on_epoch_end(model, epoch, {"val_accuracy": accuracy})
        if getattr(model, "stop_training", False):
            break
    assert (stopper.best_epoch, stopper.best, stopper.stopped_epoch) == (2, 0.7, 4)
    stopper.on_train_end(model, ge.History())
    for name, value in model.parameters().items():
        assert np.array_equal(value, snapshots[2][name])


def test_early_stopping_without_restore_keeps_the_last_weights():
    model = classifier()
    stopper = ge.EarlyStopping(monitor="loss", patience=0, restore_best=False)
    stopper.on_train_begin(model, ge.History())
    stopper.on_epoch_end(model, 1, {"loss": 1.0})
    model.parameters()["dense_0/W"][...] = 5.0
    stopper.on_epoch_end(model, 2, {"loss": 2.0})
    stopper.on_train_end(model, ge.History())
    assert model.stop_training and np.all(model.parameters()["dense_0/W"] == 5.0)


def test_early_stopping_names_a_missing_metric_and_bad_settings():
    model = classifier()
    with pytest.raises(ge.GraphEngineError, match="val_loss.*pass validation= to fit"):
        model.fit(classes(20), epochs=2, batch_size=10, callbacks=[ge.EarlyStopping()])
    with pytest.raises(ge.GraphEngineError, match="mode"):
        ge.EarlyStopping(mode="lowest")
    with pytest.raises(ge.GraphEngineError, match="patience"):
        ge.EarlyStopping(patience=-1)


def test_checkpoint_every_n_epochs_and_after_the_last(tmp_path):
    model = classifier()
    checkpoint = ge.Checkpoint(tmp_path / "ckpt-{epoch}.safetensors", every=2)
    model.fit(classes(30), epochs=5, batch_size=10, callbacks=[checkpoint])
    assert [p.rsplit("-", 1)[1] for p in checkpoint.saved] == ["2.safetensors", "4.safetensors",
                                                                "5.safetensors"]
    assert [ge.load(p).epoch for p in checkpoint.saved] == [2, 4, 5]
    with pytest.raises(ge.GraphEngineError, match="every"):
        ge.Checkpoint(tmp_path / "x", every=0)


def test_custom_callback_sees_every_event_and_can_stop_training():
    events = []

    class Recorder(ge.Callback):
        def on_train_begin(self, model, history):
            events.append("train_begin")

        def on_epoch_begin(self, model, epoch):
            events.append(f"epoch_begin {epoch}")

        def on_batch_end(self, model, batch, loss):
            events.append(f"batch {batch}")

        def on_epoch_end(self, model, epoch, logs):
            events.append(f"epoch_end {epoch} {sorted(logs)}")
            model.stop_training = epoch == 2

        def on_train_end(self, model, history):
            events.append(f"train_end {len(history.epochs)}")

    classifier().fit(classes(20), epochs=10, batch_size=10, callbacks=[Recorder()])
    logs = "['accuracy', 'error', 'loss']"
    assert events == ["train_begin", "epoch_begin 1", "batch 0", "batch 1", f"epoch_end 1 {logs}",
                      "epoch_begin 2", "batch 0", "batch 1", f"epoch_end 2 {logs}", "train_end 2"]


def test_history_records_train_and_validation_metrics_per_epoch():
    model = classifier()
    train, validation = classes(40), classes(20)
    history = model.fit(train, epochs=3, batch_size=8, validation=validation)
    assert history.epochs == [1, 2, 3]
    for key in ("loss", "accuracy", "error", "val_loss", "val_accuracy", "val_error"):
        assert len(history[key]) == 3
    assert history["error"][-1] == pytest.approx(1 - history["accuracy"][-1])
    assert history["val_loss"][-1] == pytest.approx(model.evaluate(validation)["loss"], rel=1e-6)
    assert history.as_dict()["epochs"] == [1, 2, 3]
    more = model.fit(train, epochs=2, batch_size=8)
    assert more.epochs == [4, 5]  # epochs count on from the model's


def test_evaluate_matches_the_loss_computed_by_hand():
    model = classifier()
    data = classes(25)
    probabilities = model.predict(data)
    expected = -np.mean(np.log(probabilities[np.arange(25), data["y"]]))
    result = model.evaluate(data, batch_size=7)
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["accuracy"] == pytest.approx(np.mean(probabilities.argmax(1) == data["y"]))


def test_the_progress_bar_comes_with_verbose_2(capsys):
    model = classifier()
    model.fit(classes(20), epochs=1, batch_size=10)  # verbose=1: lines on stdout, no bar
    assert "epoch 1" not in capsys.readouterr().err
    model.fit(classes(20), epochs=1, batch_size=10, verbose=2)
    assert "epoch 2" in capsys.readouterr().err
    model.fit(classes(20), epochs=1, batch_size=10, verbose=0)
    assert capsys.readouterr() == ("", "")


def test_any_integral_batch_size_is_taken():
    data = classes(12)
    by_int = classifier().fit(data, epochs=2, batch_size=4, shuffle=False)
    by_numpy_int = classifier().fit(data, epochs=2, batch_size=np.int64(4), shuffle=False)
    assert by_numpy_int["loss"] == by_int["loss"]
    model = classifier()
    assert model.evaluate(data, batch_size=np.int32(5)) == pytest.approx(model.evaluate(data))
    np.testing.assert_allclose(model.predict(data, batch_size=np.uint8(5)), model.predict(data))


@pytest.mark.parametrize("batch_size", [True, np.bool_(True), 0, -2, np.int64(0), 2.0, "4"])
def test_a_batch_size_that_is_no_positive_int_is_refused_everywhere(batch_size):
    model, data = classifier(), classes(12)
    message = re.escape(f"batch_size must be a positive int, got {batch_size!r}")
    for call in (model.fit, model.evaluate, model.predict):
        with pytest.raises(ge.DataError, match=message):
            call(data, batch_size=batch_size)
    assert model.step_count == 0


def test_counts_of_epochs_patience_and_intervals_take_numpy_integers_and_refuse_the_rest(tmp_path):
    model, data = classifier(), classes(12)
    checkpoint = ge.Checkpoint(tmp_path / "model.gem", every=np.int64(5))
    model.fit(data, epochs=np.int64(2), batch_size=6,
              callbacks=[ge.EarlyStopping("loss", patience=np.int32(3)), checkpoint])
    assert model.epoch == 2 and checkpoint.saved == [str(tmp_path / "model.gem")]
    assert model.fit(data, epochs=0, batch_size=6).epochs == []
    with pytest.raises(ge.DataError, match=re.escape("epochs must be an int >= 0, got 2.0")):
        model.fit(data, epochs=2.0, batch_size=6)
    with pytest.raises(ge.GraphEngineError, match="patience must be an int >= 0, got True"):
        ge.EarlyStopping(patience=True)
    with pytest.raises(ge.GraphEngineError, match="every must be a positive int, got 0"):
        ge.Checkpoint("unused.gem", every=0)
