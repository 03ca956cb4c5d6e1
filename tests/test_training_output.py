"""What a newcomer sees while training: fit's lines per epoch, the model summary, options with a
did-you-mean, the silent mistakes made loud, and the gradient statistics fit records by default."""

from __future__ import annotations

import inspect
import re
import warnings

import numpy as np
import pytest

import graphengine as ge
from graphengine.tools.monitor import GradientMonitor, find_monitor
from graphengine.train import loop

rng = np.random.default_rng(5)


def classifier(seed: int = 0, metrics=None) -> ge.Model:
    g = ge.Graph("clf")
    x = g.input("x", (None, 4))
    y = g.input("y", (None,), dtype="int64")
    h = g.activation("relu", g.layer("dense", x, units=8, name="fc1"))
    out = g.layer("dense", h, units=3, name="out")
    return g.compile(g.loss("softmax_cross_entropy", out, y), optimizer=ge.optimizer("sgd", lr=0.2),
                     seed=seed, metrics=metrics)


def classes(n: int) -> dict[str, np.ndarray]:
    x = rng.standard_normal((n, 4)).astype(np.float32)
    return {"x": x, "y": (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 1)}


# -- fit's lines -------------------------------------------------------------------------------


def test_fit_prints_one_line_per_epoch_to_stdout_in_a_pipe(capsys):
    model = classifier(metrics=["top2_accuracy"])
    history = model.fit(classes(40), epochs=3, batch_size=10, validation=classes(20))
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 3 and err == ""
    for epoch, line in enumerate(lines, start=1):
        assert line.startswith(f"epoch {epoch}/3  loss ")
        for key in ("loss", "accuracy", "top2_accuracy", "val_loss", "val_accuracy",
                    "val_top2_accuracy"):
            value = float(re.search(rf"(?<![\w]){key} (\S+)", line).group(1))
            assert value == pytest.approx(history[key][epoch - 1], rel=1e-3, abs=1e-4), key
        assert re.search(r"\(\d+\.\d\d s\)$", line)
        assert "error" not in line  # 1 - accuracy: in the History, not on the line


def test_the_lines_count_epochs_on_from_a_resumed_model(capsys):
    model = classifier()
    model.fit(classes(20), epochs=3, batch_size=10)
    capsys.readouterr()
    model.fit(classes(20), epochs=2, batch_size=10)
    assert [line.split("  ")[0] for line in capsys.readouterr().out.splitlines()] == [
        "epoch 4/5", "epoch 5/5"]


def test_verbose_0_prints_nothing_and_2_adds_a_tqdm_auto_bar(capsys, monkeypatch):
    model = classifier()
    model.fit(classes(20), epochs=2, batch_size=10, verbose=0)
    assert capsys.readouterr() == ("", "")
    bars = []

    class Bar:  # stands in for tqdm.auto.tqdm, which picks a notebook widget or text
        def __init__(self, **options):
            bars.append(options)
        def update(self, n): options["done"] = options.get("done", 0) + n
        def set_postfix(self, **_): pass
        def close(self): pass

    options: dict = {}
    monkeypatch.setattr("tqdm.auto.tqdm", Bar)
    model.fit(classes(20), epochs=2, batch_size=10, verbose=2)
    assert [bar["desc"] for bar in bars] == ["epoch 3", "epoch 4"]
    assert bars[0]["total"] == 2 and options["done"] == 4
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_a_verbose_level_out_of_range_is_refused():
    with pytest.raises(ge.GraphEngineError, match=r"verbose must be 0 \(silent\), 1"):
        classifier().fit(classes(10), verbose=3)


# -- fit takes batch dicts -----------------------------------------------------------------------


def test_fit_takes_a_list_of_batches_each_epoch_and_a_generator_with_steps_per_epoch(capsys):
    data = classes(30)
    parts = [{k: v[i:i + 10] for k, v in data.items()} for i in range(0, 30, 10)]
    by_list = classifier().fit(parts, epochs=2, verbose=0)
    by_dict = classifier().fit(data, epochs=2, batch_size=10, shuffle=False, verbose=0)
    np.testing.assert_allclose(by_list["loss"], by_dict["loss"], rtol=1e-6)

    def stream():
        while True:
            yield from parts

    model = classifier()
    history = model.fit(stream(), epochs=2, steps_per_epoch=3, verbose=0)
    np.testing.assert_allclose(history["loss"], by_dict["loss"], rtol=1e-6)
    assert model.step_count == 6


def test_a_generator_without_steps_per_epoch_serves_one_epoch_only():
    parts = ({"x": b["x"], "y": b["y"]} for b in [classes(10)])
    with pytest.raises(ge.DataError, match="used up after one pass.*steps_per_epoch"):
        classifier().fit(parts, epochs=2)
    history = classifier().fit(iter([classes(10)]), epochs=1, verbose=0)
    assert len(history["loss"]) == 1


def test_batches_that_are_not_dicts_or_run_out_are_data_errors():
    with pytest.raises(ge.DataError, match="batch 0 of epoch 1 is a tuple"):
        classifier().fit([(1, 2)], verbose=0)
    with pytest.raises(ge.DataError, match="ran out before epoch 2"):
        classifier().fit(iter([classes(10)]), epochs=2, steps_per_epoch=1, verbose=0)
    with pytest.raises(ge.DataError, match="dataset dict .* or an iterable of batch dicts"):
        classifier().fit(42)


def test_a_stream_of_batches_cannot_fit_a_preprocessing_layer():
    g = ge.Graph("pre")
    x = g.input("x", (None, 4))
    y = g.input("y", (None,), dtype="int64")
    out = g.layer("dense", g.layer("zscore", x, name="norm"), units=3)
    model = g.compile(g.loss("softmax_cross_entropy", out, y), optimizer="sgd")
    with pytest.raises(ge.DataError, match=r"\['norm'\] need the whole training set.*fit_preprocessing"):
        model.fit([classes(10)])
    model.fit_preprocessing(classes(50))
    assert len(model.fit([classes(10)], verbose=0)["loss"]) == 1


# -- summary -------------------------------------------------------------------------------------


def test_summary_is_a_table_of_layers_with_totals_returned_and_printed(capsys):
    model = classifier()
    model.freeze("fc1")
    text = model.summary()
    assert capsys.readouterr().out == text + "\n"
    lines = text.splitlines()
    assert lines[1].split() == ["layer", "kind", "output", "shape", "params", "training"]
    rows = {line.split()[0]: line.split() for line in lines[3:-2]}
    assert list(rows) == ["x", "y", "fc1", "relu_0", "out", "softmax_cross_entropy_0"]
    assert rows["fc1"][1:] == ["dense", "(N,", "8)", "40", "frozen"]
    assert rows["out"][1:] == ["dense", "(N,", "3)", "27", "trainable"]
    assert rows["y"][2:] == ["(N,)"]
    assert lines[-1] == "67 parameters: 27 trainable, 40 frozen, 0 not trained (running statistics)"
    assert sum(p.size for p in model.parameters().values()) == 67


def test_print_model_shows_the_summary_and_repr_stays_one_short_line(capsys):
    model = classifier()
    print(model)
    assert capsys.readouterr().out == model.summary() + "\n"
    capsys.readouterr()
    assert "\n" not in repr(model) and len(repr(model)) < 200
    assert repr(model).startswith("<Model 'clf'")


def test_summary_marks_parameters_no_optimizer_trains():
    g = ge.Graph("bn")
    x = g.input("x", (None, 4))
    y = g.input("y", (None,), dtype="int64")
    out = g.layer("dense", g.layer("batch_norm", x, name="bn"), units=3, name="out")
    model = g.compile(g.loss("softmax_cross_entropy", out, y), optimizer="sgd")
    text = str(model)
    assert re.search(r"^bn\s+batch_norm\s+\(N, 4\)\s+16\s+fixed \+ trainable$", text, re.M)
    assert text.endswith("31 parameters: 23 trainable, 0 frozen, 8 not trained (running statistics)")


# -- options are explicit, and a wrong one gets a did-you-mean ----------------------------------


def test_compile_fit_and_evaluate_show_their_options_to_help():
    for function, option in [(ge.Graph.compile, "clip_norm"), (ge.Model.fit, "verbose"),
                             (ge.Model.evaluate, "metrics"), (ge.Model.__init__, "metrics")]:
        parameters = inspect.signature(function).parameters
        assert option in parameters
        assert all(p.kind is not p.VAR_KEYWORD for p in parameters.values())


def build_dense_with(**config):
    g = ge.Graph()
    return g.layer("dense", g.input("x", (None, 4)), **config)


def positional_units():
    g = ge.Graph()
    return g.layer("dense", g.input("x", (None, 4)), 10)


def positional_slope():
    g = ge.Graph()
    return g.activation("leaky_relu", g.input("x", (None, 4)), 0.1)


def positional_margin():
    g = ge.Graph()
    x, y = g.input("x", (None, 3)), g.input("y", (None,), dtype="int64")
    return g.loss("hinge", x, y, 2.0)


def compile_with(**options):
    g = ge.Graph()
    x, y = g.input("x", (None, 4)), g.input("y", (None,), dtype="int64")
    return g.compile(g.loss("softmax_cross_entropy", g.layer("dense", x, units=3), y), **options)


@pytest.mark.parametrize("call, message", [
    (lambda: compile_with(optimizer="sgd", clipnorm=1.0),
     "Graph.compile() has no option 'clipnorm'. Did you mean 'clip_norm'? Its options: loss, "),
    (lambda: ge.optimizer("sgd", learning_rate=0.1),
     "got an unexpected keyword argument 'learning_rate'. Did you mean 'lr'? Its options: lr, weight_decay."),
    (lambda: ge.optimizer("adam", beta_1=0.8), "Did you mean 'beta1'? Its options: lr, beta1"),
    (lambda: build_dense_with(unit=3), "Did you mean 'units' or 'init'? Its options: units, init"),
    (positional_units, "layer 'dense': 10 given by position, where layer options are keywords: "
                       "write units=10"),
    (positional_slope, "activation 'leaky_relu': 0.1 given by position, where activation options "
                       "are keywords: write slope=0.1"),
    (positional_margin, "write margin=2.0"),
    (lambda: classifier().fit(classes(10), epoch=2), "fit() has no option 'epoch'. Did you mean "
                                                     "'epochs'?"),
    (lambda: classifier().fit(classes(10), learning_rate=2), "fit() has no option 'learning_rate'. "
                                                             "Its options: epochs, batch_size"),
    (lambda: classifier().fit(classes(10), 2), "fit() takes (data) by position; the other options "
                                               "are keywords: write epochs=2"),
    (lambda: classifier().evaluate(classes(10), metric=["mae"]), "Did you mean 'metrics'?"),
])
def test_a_wrong_option_is_a_graphengine_error_with_a_did_you_mean(call, message):
    with pytest.raises(ge.GraphEngineError) as info:
        call()
    assert message in str(info.value)


def test_an_unknown_option_of_an_option_free_activation_says_it_has_none():
    g = ge.Graph()
    with pytest.raises(ge.GraphBuildError, match=r"rejected its arguments \{'slope': 1\}.*Its "
                                                 r"options: none\."):
        g.activation("relu", g.input("x", (None, 4)), slope=1)


# -- silent mistakes -----------------------------------------------------------------------------


@pytest.mark.parametrize("activation, loss, target", [
    ("softmax", "softmax_cross_entropy", ("int64", (None,))),
    ("sigmoid", "binary_cross_entropy", ("float32", (None, 1))),
])
def test_a_loss_fed_the_activation_it_applies_itself_warns(activation, loss, target):
    g = ge.Graph()
    logits = g.layer("dense", g.input("x", (None, 4)), units=3 if activation == "softmax" else 1)
    y = g.input("y", target[1], dtype=target[0])
    with pytest.warns(ge.GraphBuildWarning, match=rf"{activation} is applied twice.*the logits") as caught:
        g.loss(loss, g.activation(activation, logits), y)
    assert caught[0].filename == __file__  # points at the line that built the loss
    with warnings.catch_warnings():
        warnings.simplefilter("error", ge.GraphBuildWarning)
        g.loss(loss, logits, y)  # from the logits: no warning


def test_step_needs_a_fresh_backward():
    model = classifier()
    model.forward(classes(10))
    with pytest.raises(ge.GraphEngineError, match=r"step\(\) needs gradients: call forward\(\) and "
                                                  r"backward\(\) first"):
        model.step()
    model.backward()
    model.step()
    with pytest.raises(ge.GraphEngineError, match=r"step\(\) already applied the gradients of the "
                                                  r"last backward\(\); call forward\(\) and "
                                                  r"backward\(\) again"):
        model.step()
    model.train_step(classes(10))  # the normal order works again


def test_fetching_a_layer_added_after_compile_says_to_compile_again():
    g = ge.Graph("g")
    x = g.input("x", (None, 4))
    y = g.input("y", (None,), dtype="int64")
    h = g.layer("dense", x, units=3, name="fc")
    model = g.compile(g.loss("softmax_cross_entropy", h, y), optimizer="sgd")
    late = g.layer("dense", h, units=2, name="late")
    with pytest.raises(ge.GraphEngineError, match=r"\['late/add'\] were added to graph 'g' after it "
                                                  r"was compiled.*compile again") as info:
        model.run({"x": np.zeros((2, 4), np.float32)}, fetches=[late])
    assert not isinstance(info.value, KeyError)
    again = g.compile(outputs=[late], parameters=model.parameters())
    assert again.run({"x": np.zeros((2, 4), np.float32)})[late.name].shape == (2, 2)


# -- gradient statistics by default --------------------------------------------------------------


def test_fit_attaches_a_monitor_that_records_and_stays_unless_told_not_to():
    model = classifier()
    model.fit(classes(20), epochs=2, batch_size=10, verbose=0)
    monitor = find_monitor(model)
    assert monitor is not None and monitor.every == loop.MONITOR_EVERY and monitor.automatic
    assert monitor.records and monitor.latest().node("fc1/W").grad_rms > 0
    model.fit(classes(20), epochs=1, batch_size=10, verbose=0)
    assert find_monitor(model) is monitor  # one monitor, not one per fit
    quiet = classifier()
    quiet.fit(classes(20), epochs=1, batch_size=10, verbose=0, monitor=False)
    assert find_monitor(quiet) is None


def test_the_default_monitor_changes_no_number_of_training():
    data = classes(40)
    watched = classifier().fit(data, epochs=3, batch_size=8, verbose=0)
    plain = classifier().fit(data, epochs=3, batch_size=8, verbose=0, monitor=False)
    assert watched["loss"] == plain["loss"]


def test_a_users_monitor_is_kept_and_one_attached_later_replaces_fits():
    model = classifier()
    mine = GradientMonitor(every=1).attach(model)
    model.fit(classes(20), epochs=1, batch_size=10, verbose=0)
    assert find_monitor(model) is mine and len(mine.records) == 2
    other = classifier()
    other.fit(classes(20), epochs=1, batch_size=10, verbose=0)
    later = GradientMonitor(every=1).attach(other)
    assert other.observers.count(later) == 1 and find_monitor(other) is later
    assert [o for o in other.observers if isinstance(o, GradientMonitor)] == [later]
    with pytest.raises(ge.GraphEngineError, match="already has a GradientMonitor"):
        GradientMonitor().attach(other)  # a user's monitor is not replaced silently
