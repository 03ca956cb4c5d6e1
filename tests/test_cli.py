"""The ``graphengine`` command line: version, help, user errors without tracebacks, and what
``graphengine plugins`` shows (aliases, unavailable backends, load failures)."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import subprocess
import sys
import types

import pytest

import graphengine as ge
from graphengine.cli import build_parser, main, positive_int
from graphengine.hooks import PluginWarning
from graphengine.testing import isolated_plugin_manager


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def _command_plugin(name: str, run, configure=lambda parser: None) -> types.ModuleType:
    @ge.hookimpl
    def graphengine_register_commands(register):
        register(name, configure, run)

    return _module(f"{name}_plugin", graphengine_register_commands=graphengine_register_commands)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "graphengine.cli", *args], capture_output=True,
                          text=True)


# -- version and help ----------------------------------------------------------------------

def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"graphengine {ge.__version__}\n"
    assert ge.__version__ == importlib.metadata.version("graphengine")


def test_help_describes_the_program_and_lists_the_commands():
    parser = build_parser()
    assert "deep-learning engine on a static computation graph" in parser.description
    text = parser.format_help()
    for command in ("plugins", "render", "demo"):
        assert f"    {command} " in text, text


def _options(parser: argparse.ArgumentParser):
    """(command, option) for every option of the program and of each of its commands."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command, sub in action.choices.items():
                yield from ((f"{command} {where}".strip(), option) for where, option in _options(sub))
        else:
            yield "", action


def test_every_option_of_every_installed_command_has_help():
    undocumented = [f"graphengine {command} {'/'.join(action.option_strings) or action.dest}".strip()
                    for command, action in _options(build_parser())
                    if not action.help or action.help == argparse.SUPPRESS]
    assert undocumented == []


# -- user errors: one line on stderr, exit status 2 -----------------------------------------

@pytest.fixture
def saved_model(tmp_path):
    g = ge.Graph()
    x, y = g.input("x", shape=(None, 3)), g.input("y", shape=(None, 2))
    model = g.compile(g.loss("mse", g.layer("dense", x, units=2), y), optimizer="sgd")
    path = tmp_path / "model.gem"
    model.save(path)
    return path


def _one_line_error(done: subprocess.CompletedProcess, command: str) -> str:
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith(f"graphengine {command}: ") and done.stderr.count("\n") == 1, \
        done.stderr
    return done.stderr


def test_a_missing_data_file_is_one_line_without_traceback(saved_model, tmp_path):
    missing = tmp_path / "no_such_batch.npz"
    done = _cli("render", str(saved_model), "-o", str(tmp_path / "g.svg"), "--data", str(missing))
    assert str(missing) in _one_line_error(done, "render")


def test_a_malformed_model_file_is_one_line_without_traceback(tmp_path):
    bad = tmp_path / "model.gem"
    bad.write_bytes(b"not a model")
    done = _cli("render", str(bad), "-o", str(tmp_path / "g.svg"))
    assert str(bad) in _one_line_error(done, "render")


def test_a_file_a_command_cannot_open_is_a_usage_error(tmp_path, capsys):
    missing = tmp_path / "settings.toml"

    def run(args):
        return len(missing.read_text())

    with isolated_plugin_manager(_command_plugin("configure", run)):
        assert main(["configure"]) == 2
    assert capsys.readouterr().err == f"graphengine configure: {missing}: No such file or directory\n"


def test_a_graphengine_error_in_any_command_is_a_usage_error(capsys):
    def run(args):
        raise ge.SerializationError("model file 'm.gem' is truncated (5 bytes)\nsecond line")

    with isolated_plugin_manager(_command_plugin("load", run)):
        assert main(["load"]) == 2
    assert capsys.readouterr().err == "graphengine load: model file 'm.gem' is truncated (5 bytes)\n"


def test_a_bug_in_a_command_keeps_its_traceback():
    def run(args):
        raise ZeroDivisionError("a bug, not a user error")

    with isolated_plugin_manager(_command_plugin("buggy", run)):
        with pytest.raises(ZeroDivisionError):
            main(["buggy"])


def test_positive_int_refuses_zero_with_the_option_named(capsys):
    def configure(parser):
        parser.add_argument("--epochs", type=positive_int, default=3, help="epochs to train")

    with isolated_plugin_manager(_command_plugin("train", lambda args: args.epochs, configure)):
        assert main(["train", "--epochs", "4"]) == 4
        for bad in ("0", "-1", "two"):
            with pytest.raises(SystemExit) as exit_:
                main(["train", "--epochs", bad])
            assert exit_.value.code == 2
            assert (f"argument --epochs: must be a whole number of at least 1, got '{bad}'"
                    in capsys.readouterr().err)


# -- graphengine plugins -------------------------------------------------------------------

class _NoGpu(ge.Backend):
    name = "nogpu"

    @classmethod
    def unavailable_reason(cls):
        return "NoGpu is not installed"


class _BrokenCheck(ge.Backend):
    name = "broken"

    @classmethod
    def unavailable_reason(cls):
        raise OSError("driver exploded")


@ge.hookimpl
def _register_backends(register):
    register("nogpu", _NoGpu, aliases=("ng", "gpu0"))
    register("broken", _BrokenCheck)


def test_plugins_shows_aliases_and_why_a_backend_is_unavailable(capsys):
    with isolated_plugin_manager(_module("gpus", graphengine_register_backends=_register_backends)):
        assert main(["plugins"]) == 0
        assert capsys.readouterr().out.startswith(
            "gpus  (-)\n"
            "    backends: nogpu (alias ng, gpu0), broken\n"
            "    broken: unavailable: unavailable_reason() failed: OSError: driver exploded\n"
            "    nogpu: unavailable: NoGpu is not installed\n")
        assert main(["plugins", "--json"]) == 0
        gpus = {p["name"]: p for p in json.loads(capsys.readouterr().out)}["gpus"]
        assert gpus["aliases"] == {"backends": {"nogpu": ["ng", "gpu0"]}}
        assert gpus["unavailable"]["nogpu"] == "NoGpu is not installed"


def test_the_installed_plugins_show_their_aliases_and_unavailable_backends():
    done = _cli("plugins")
    assert done.returncode == 0, done.stderr
    assert "    backends: numpy, cupy (alias cuda), strict\n" in done.stdout
    reason = ge.get_plugin_manager().backends.get("cupy").unavailable_reason()
    assert (f"    cupy: unavailable: {reason}\n" in done.stdout) == (reason is not None)


def test_plugins_exits_1_when_a_plugin_failed_to_load(monkeypatch, capsys):
    points = [importlib.metadata.EntryPoint("ghost", "graphengine_no_such_plugin_module", "graphengine")]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None, **kw: points)
    with isolated_plugin_manager(entry_points=True):
        with pytest.warns(PluginWarning, match="ghost"):
            assert main(["plugins"]) == 1
        captured = capsys.readouterr()
        assert "ghost  (-) [ERROR]" in captured.out
        assert "graphengine plugins: 1 plugin(s) failed to load: ghost\n" == captured.err
        assert main(["plugins", "--json"]) == 1
        assert {p["name"]: p for p in json.loads(capsys.readouterr().out)}["ghost"]["error"]
