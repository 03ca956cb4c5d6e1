"""The plugin system: entry points, the example third-party package, collisions, failures."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import types
from collections.abc import Iterator

import numpy as np
import pytest

import graphengine as ge
from graphengine.hooks import PluginManager, PluginWarning
from graphengine.testing import check_backward, isolated_plugin_manager


def fake_entry_points(monkeypatch, extra: dict[str, types.ModuleType]):
    """Install fake modules and entry points beside the real ones."""
    real = importlib.metadata.entry_points(group="graphengine")
    fakes = []
    for name, module in extra.items():
        monkeypatch.setitem(sys.modules, module.__name__, module)
        fakes.append(importlib.metadata.EntryPoint(name, module.__name__, "graphengine"))

    def entry_points(**kwargs):
        assert kwargs == {"group": "graphengine"}
        return list(real) + fakes

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)


def test_builtins_come_through_entry_points():
    manager = PluginManager()
    assert {"numpy", "strict", "cupy"} <= set(manager.backends.names())
    assert {"dense", "flatten"} <= set(manager.layers.names())
    assert manager.layers.entry("dense").distribution == "graphengine"


def test_example_third_party_plugin_is_found_and_works():
    manager = ge.get_plugin_manager()
    entry = manager.activations.entry("swish_beta")
    assert entry.plugin == "swish" and entry.distribution == "graphengine-swish"
    g = ge.Graph()
    x = g.input("x", shape=(None, 4))
    h = g.layer("residual_dense", x)
    out = g.activation("swish_beta", h, beta=2.0)
    model = g.compile(outputs=[out])
    assert model.predict({"x": np.ones((3, 4))}).shape == (3, 4)


def test_example_plugin_activation_gradient(backend):
    from graphengine.ir.contracts import ActivationOp
    swish = ge.get_plugin_manager().activations.get("swish_beta")
    check_backward(lambda: ActivationOp("swish_beta", swish(beta=1.5)),
                   [np.random.default_rng(0).standard_normal((3, 4))], backend=backend)


def test_plugins_command_lists_the_example_package_as_json():
    out = subprocess.run([sys.executable, "-m", "graphengine.cli", "plugins", "--json"],
                         capture_output=True, text=True, check=True).stdout
    plugins = {p["name"]: p for p in json.loads(out)}
    assert plugins["swish"]["distribution"] == "graphengine-swish"
    assert plugins["swish"]["registered"] == {"activations": ["swish_beta"], "layers": ["residual_dense"]}
    assert "dense" in plugins["layers"]["registered"]["layers"]


def test_plugins_command_piped_into_a_reader_that_leaves_early_is_no_error():
    command = subprocess.Popen([sys.executable, "-m", "graphengine.cli", "plugins"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    command.stdout.close()  # the reader is gone before the listing is written, as after `| head`
    stderr = command.stderr.read().decode()
    assert command.wait() == 0 and "BrokenPipeError" not in stderr, stderr


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


class Relu2(ge.Activation):
    def forward(self, xp, x):
        return xp.maximum(x, 0)

    def backward(self, xp, x, y, dy):
        return dy * (x > 0)


@ge.hookimpl
def _register_relu(register):
    register("relu", Relu2)


def test_collision_names_both_plugins(monkeypatch):
    rogue = _module("rogue_plugin", graphengine_register_activations=_register_relu)
    fake_entry_points(monkeypatch, {"rogue": rogue})
    manager = PluginManager()
    with pytest.warns(PluginWarning) as caught:
        manager.load()
    message = next(str(w.message) for w in caught if "relu" in str(w.message))
    assert "'relu' is registered twice" in message and "'activations'" in message and "'rogue'" in message
    assert manager.activations.entry("relu").plugin == "activations"  # the first one stays
    record = {r["name"]: r for r in manager.report()}["rogue"]
    assert "registered twice" in record["error"]


def test_override_replaces_deliberately():
    @ge.hookimpl
    def graphengine_register_activations(register):
        register("relu", Relu2, override=True)

    with isolated_plugin_manager(entry_points=True) as manager:
        plugin = _module("better_relu", graphengine_register_activations=graphengine_register_activations)
        manager.register(plugin)
        assert manager.activations.get("relu") is Relu2


def test_collision_is_fatal_when_registered_by_hand():
    with isolated_plugin_manager(entry_points=True) as manager:
        with pytest.raises(ge.PluginConflictError, match="registered twice"):
            manager.register(_module("dup", graphengine_register_activations=_register_relu))


def test_broken_plugin_is_reported_and_others_keep_working(monkeypatch):
    broken = importlib.metadata.EntryPoint("broken", "no_such_module_xyz", "graphengine")
    real = importlib.metadata.entry_points(group="graphengine")
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: list(real) + [broken])
    manager = PluginManager()
    with pytest.warns(PluginWarning, match="'broken' failed to import"):
        assert "dense" in manager.layers
    record = {r["name"]: r for r in manager.report()}["broken"]
    assert "ModuleNotFoundError" in record["error"]


def test_strict_plugins_makes_failures_fatal(monkeypatch):
    broken = importlib.metadata.EntryPoint("broken", "no_such_module_xyz", "graphengine")
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: [broken])
    monkeypatch.setenv("GRAPHENGINE_STRICT_PLUGINS", "1")
    with pytest.raises(ge.PluginError, match="GRAPHENGINE_STRICT_PLUGINS"):
        PluginManager().load()


PLUGIN_MODULES = ("tripwire_plugin", "harmless_plugin")


@pytest.fixture
def import_log(tmp_path, monkeypatch) -> Iterator[list[str]]:
    """Plugin modules on disk (``PLUGIN_MODULES``) that append their name to the yielded list
    when imported."""
    log: list[str] = []
    monkeypatch.setitem(sys.modules, "plugin_import_log", _module("plugin_import_log", imported=log))
    for name in PLUGIN_MODULES:
        (tmp_path / f"{name}.py").write_text(
            "import graphengine as ge\n"
            "import plugin_import_log\n"
            "plugin_import_log.imported.append(__name__)\n\n\n"
            "@ge.hookimpl\n"
            "def graphengine_register_initializers(register):\n"
            "    register(__name__.replace('_plugin', '_init'), lambda rng, shape, fan_in, fan_out: 0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield log
    for name in PLUGIN_MODULES:
        sys.modules.pop(name, None)


def test_disabled_plugin_is_never_imported(monkeypatch, import_log):
    points = [importlib.metadata.EntryPoint(name, f"{name}_plugin", "graphengine")
              for name in ("tripwire", "harmless")]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: points)
    monkeypatch.setenv("GRAPHENGINE_DISABLE_PLUGINS", "tripwire, other")
    manager = PluginManager()
    manager.load()
    # the enabled one proves the log works: it was imported and registered
    assert import_log == ["harmless_plugin"]
    assert "tripwire_plugin" not in sys.modules
    assert manager.initializers.names() == ["harmless_init"]
    assert {r["name"]: r for r in manager.report()}["tripwire"] == {
        "name": "tripwire", "distribution": None, "version": None, "module": "tripwire_plugin",
        "registered": {}, "error": None, "disabled": True, "aliases": {}, "unavailable": {}}


def test_misspelled_hook_is_caught():
    @ge.hookimpl
    def graphengine_register_activation(register):  # missing "s"
        pass

    with isolated_plugin_manager() as manager:
        with pytest.raises(ge.PluginError, match="graphengine_register_activation"):
            manager.register(_module("typo", graphengine_register_activation=graphengine_register_activation))


def test_plugin_that_raises_while_registering_is_reported(monkeypatch):
    @ge.hookimpl
    def graphengine_register_layers(register):
        raise RuntimeError("boom")

    explodes = _module("explodes", graphengine_register_layers=graphengine_register_layers)
    fake_entry_points(monkeypatch, {"explodes": explodes})
    manager = PluginManager()
    with pytest.warns(PluginWarning, match="boom"):
        manager.load()
    assert "dense" in manager.layers


def test_entry_points_load_lazily_once(monkeypatch):
    calls = []
    real = importlib.metadata.entry_points

    def counting(**kw):
        calls.append(kw)
        return real(**kw)

    monkeypatch.setattr(importlib.metadata, "entry_points", counting)
    manager = PluginManager()
    assert calls == []
    manager.layers.names()
    manager.losses.names()
    assert len(calls) == 1


def test_isolated_manager_serves_graph_building():
    class Double(ge.Layer):
        def build(self, g, x):
            return x * 2.0

    @ge.hookimpl
    def graphengine_register_layers(register):
        register("double", Double)

    with isolated_plugin_manager(_module("mine", graphengine_register_layers=graphengine_register_layers)):
        g = ge.Graph()
        x = g.input("x", shape=(None, 2))
        assert g.layer("double", x).shape == (None, 2)
        with pytest.raises(ge.UnknownNameError):
            g.layer("dense", x, units=2)
    assert "dense" in ge.get_plugin_manager().layers
