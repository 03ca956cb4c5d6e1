"""Commands come from plugins through a hook; activations declare their own health measure."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

import graphengine as ge
from graphengine.cli import main
from graphengine.hooks import PluginWarning
from graphengine.testing import isolated_plugin_manager
from graphengine.tools.monitor import FIELDS, GradientMonitor


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def _by_name(manager) -> dict[str, dict]:
    return {r["name"]: r for r in manager.report()}


# -- commands ------------------------------------------------------------------------------

def _greet_options(parser):
    parser.add_argument("who")
    parser.add_argument("--times", type=int, default=1)


def _greet(args) -> int:
    """Greet someone, a few times."""
    print(" ".join([f"hello {args.who}"] * args.times))
    return 3


@ge.hookimpl
def _register_greet(register):
    register("greet", _greet_options, _greet)


def greeter(name: str = "greeter") -> types.ModuleType:
    return _module(name, graphengine_register_commands=_register_greet)


def test_a_plugin_command_runs_through_the_command_line(capsys):
    with isolated_plugin_manager(greeter()) as manager:
        assert main(["greet", "world", "--times", "2"]) == 3
        assert capsys.readouterr().out == "hello world hello world\n"
        assert manager.commands.names() == ["greet", "plugins"]
        assert manager.commands.entry("greet").plugin == "greeter"
        assert _by_name(manager)["greeter"]["registered"] == {"commands": ["greet"]}


def test_command_help_defaults_to_the_first_line_of_its_docstring(capsys):
    @ge.hookimpl
    def graphengine_register_commands(register):
        register("quiet", lambda parser: None, lambda args: 0, help="does nothing, quietly")

    with isolated_plugin_manager(greeter(), _module("quiet", graphengine_register_commands=
                                                    graphengine_register_commands)):
        with pytest.raises(SystemExit) as exit_:
            main(["--help"])
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        assert "Greet someone, a few times." in out and "does nothing, quietly" in out
        assert main(["quiet"]) == 0


def test_the_core_plugins_command_lists_commands(capsys):
    with isolated_plugin_manager(greeter()):
        assert main(["plugins", "--json"]) == 0
        report = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
        assert report["greeter"]["registered"] == {"commands": ["greet"]}
        assert report["graphengine"]["registered"] == {"commands": ["plugins"]}
        assert main(["plugins"]) == 0
        assert "greeter  (-)\n    commands: greet\n" in capsys.readouterr().out


def test_a_command_registered_twice_names_both_plugins():
    with isolated_plugin_manager(greeter("first")) as manager:
        with pytest.raises(ge.PluginConflictError,
                           match=r"command 'greet' is registered twice: by plugin 'first' and by "
                                 r"plugin 'second'"):
            manager.register(greeter("second"))
        assert manager.commands.entry("greet").plugin == "first"


def test_the_core_command_cannot_be_taken_silently():
    @ge.hookimpl
    def graphengine_register_commands(register):
        register("plugins", lambda parser: None, lambda args: 0)

    with isolated_plugin_manager() as manager:
        with pytest.raises(ge.PluginConflictError, match="by plugin 'graphengine'.*by plugin 'mine'"):
            manager.register(_module("mine", graphengine_register_commands=graphengine_register_commands))


@pytest.mark.parametrize("name, configure, run, message", [
    ("two words", None, None, "invalid name"),
    ("-x", None, None, "invalid name"),
    ("ok", "not callable", None, "configure='not callable'"),
    ("ok", None, 42, "run=42"),
])
def test_a_malformed_command_is_refused(name, configure, run, message):
    @ge.hookimpl
    def graphengine_register_commands(register):
        register(name, configure or _greet_options, run or _greet)

    with isolated_plugin_manager() as manager:
        with pytest.raises(ge.PluginError, match=message):
            manager.register(_module("bad", graphengine_register_commands=graphengine_register_commands))


def test_a_command_whose_options_fail_does_not_take_the_others_down(capsys):
    def configure(parser):
        raise RuntimeError("boom")

    @ge.hookimpl
    def graphengine_register_commands(register):
        register("fragile", configure, _greet)

    with isolated_plugin_manager(greeter(), _module("fragile", graphengine_register_commands=
                                                    graphengine_register_commands)):
        with pytest.warns(PluginWarning, match="command 'fragile' from plugin 'fragile'.*boom"):
            assert main(["greet", "you"]) == 3
        with pytest.warns(PluginWarning):
            assert main(["fragile"]) == 1
        assert "RuntimeError: boom" in capsys.readouterr().err


def test_the_visualizer_commands_come_through_its_entry_point(capsys):
    with isolated_plugin_manager(entry_points=True) as manager:
        entry = manager.commands.entry("render")
        assert (entry.plugin, entry.distribution) == ("viz", "graphengine")
        assert _by_name(manager)["viz"]["registered"] == {"commands": ["render", "demo"]}
        for command, option in (("render", "--rankdir"), ("demo", "--epochs")):
            with pytest.raises(SystemExit) as exit_:
                main([command, "--help"])
            assert exit_.value.code == 0 and option in capsys.readouterr().out


def test_a_disabled_plugin_has_no_commands(monkeypatch, capsys):
    monkeypatch.setenv("GRAPHENGINE_DISABLE_PLUGINS", "viz")
    with isolated_plugin_manager(entry_points=True) as manager:
        assert "render" not in manager.commands and "demo" not in manager.commands
        assert _by_name(manager)["viz"]["disabled"]
        with pytest.raises(SystemExit) as exit_:
            main(["render", "--help"])
        assert exit_.value.code == 2
        assert "invalid choice: 'render'" in capsys.readouterr().err
        assert main(["plugins"]) == 0
        assert "viz  (graphengine 0.1.0) [disabled]" in capsys.readouterr().out


# -- activation health ---------------------------------------------------------------------

class HardSigmoid(ge.Activation):
    """``clip(x / 4 + 1/2, 0, 1)``: flat, with no gradient at all, outside (-2, 2)."""

    keeps = ("y",)
    health = "saturation"

    def forward(self, xp, x):
        return xp.clip(0.25 * x + 0.5, 0, 1)

    def backward(self, xp, x, y, dy):
        return dy * 0.25 * ((y > 0) & (y < 1))

    def measure_health(self, xp, y):
        return xp.mean((y <= 0) | (y >= 1))


class PlainHardSigmoid(HardSigmoid):
    health = None


class Floor(ge.Activation):
    """Declares the other measure: units at or below zero for the whole batch are dead."""

    keeps = ()
    health = "dead_fraction"

    def forward(self, xp, x):
        return xp.maximum(x, 0)

    def backward(self, xp, x, y, dy):
        return dy

    def measure_health(self, xp, y):
        return xp.mean(xp.all(y <= 0, axis=0))


@ge.hookimpl
def _register_custom_activations(register):
    register("quarter_hard_sigmoid", HardSigmoid)  # "hard_sigmoid" is built in
    register("plain_hard_sigmoid", PlainHardSigmoid)
    register("floor", Floor)


def _capture(activation: str):
    """x (3) -> fc (4, biases pinning units 1 and 2 far out) -> activation -> out (2), one
    recorded pass; the record and the activation's output."""
    g = ge.Graph("custom")
    x = g.input("x", shape=(None, 3))
    t = g.input("t", shape=(None, 2))
    a = g.activation(activation, g.layer("dense", x, units=4, name="fc"))
    y = g.layer("dense", a, units=2, name="out")
    model = g.compile(g.loss("mse", y, t), optimizer="sgd")
    model.parameters()["fc/b"][:] = [100, -100, 0, 0]
    rng = np.random.default_rng(0)
    data = {"x": rng.random((8, 3), dtype=np.float32), "t": rng.random((8, 2), dtype=np.float32)}
    record = GradientMonitor().capture(model, data)
    return record.node(a.name), model.run(data, fetches=[a.name])[a.name]


def test_an_activation_declaring_saturation_fills_that_column():
    with isolated_plugin_manager(_module("custom", graphengine_register_activations=
                                         _register_custom_activations), entry_points=True):
        stats, out = _capture("quarter_hard_sigmoid")
        expected = float(np.mean((out <= 0) | (out >= 1)))
        assert expected >= 0.5  # the two pinned units, at least
        assert stats.saturation == pytest.approx(expected)
        assert stats.dead_fraction is None and stats.grad_rms is not None


def test_an_activation_declaring_dead_fraction_fills_that_column():
    with isolated_plugin_manager(_module("custom", graphengine_register_activations=
                                         _register_custom_activations), entry_points=True):
        stats, out = _capture("floor")
        assert stats.dead_fraction == pytest.approx(float(np.mean(np.all(out <= 0, axis=0))))
        assert stats.dead_fraction >= 0.25 and stats.saturation is None


def test_an_activation_without_health_gets_none():
    with isolated_plugin_manager(_module("custom", graphengine_register_activations=
                                         _register_custom_activations), entry_points=True):
        stats, _ = _capture("plain_hard_sigmoid")
        assert stats.grad_rms is not None  # recorded, but no health measure
        assert stats.saturation is None and stats.dead_fraction is None


@pytest.mark.parametrize("kind, measure", [("relu", "dead_fraction"), ("sigmoid", "saturation"),
                                           ("logistic", "saturation"), ("tanh", "saturation"),
                                           ("leaky_relu", None), ("identity", None)])
def test_builtin_activations_declare_their_health(kind, measure):
    activation = ge.get_plugin_manager().activations.get(kind)
    assert activation.health == measure
    stats, _ = _capture(kind)
    for field in ge.Activation.HEALTH_MEASURES:
        assert (getattr(stats, field) is not None) == (field == measure)


def test_health_measures_are_monitor_columns():
    assert set(ge.Activation.HEALTH_MEASURES) <= set(FIELDS)


def test_a_wrong_health_declaration_fails_when_the_class_is_defined():
    with pytest.raises(TypeError, match="'saturated'.*must be one of 'dead_fraction', 'saturation'"):
        class Misspelled(ge.Activation):
            health = "saturated"

    with pytest.raises(TypeError, match="does not define measure_health"):
        class Unmeasured(ge.Activation):
            health = "saturation"
