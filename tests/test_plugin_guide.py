"""docs/plugins.md, the plugin author's guide, taken at its word: its package is written from
the guide's code blocks alone, built, installed and found through its entry point, and every
contract example passes the gradient check or does what the guide says it does."""

from __future__ import annotations

import importlib.util
import inspect
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import graphengine as ge
from graphengine.cli import main
from graphengine.hooks import HookSpecs
from graphengine.testing import GradientCheckError, check_backward, isolated_plugin_manager

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "plugins.md"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```$", re.M | re.S)


def blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of every fenced block."""
    return [(m[1], m[2]) for m in BLOCK.finditer(text)]


def guide_files() -> dict[str, str]:
    """The package's files: the blocks whose first line is a comment naming a path."""
    files = {}
    for _, code in blocks(GUIDE.read_text()):
        first = code.splitlines()[0]
        if m := re.fullmatch(r"# ([\w./-]+\.(?:py|toml))", first):
            files[m[1]] = code
    return files


def guide_examples() -> dict[str, object]:
    """What the other Python blocks (the contract examples) define, run in one namespace."""
    namespace: dict[str, object] = {}
    files = set(guide_files().values())
    for language, code in blocks(GUIDE.read_text()):
        if language == "python" and code not in files:
            exec(compile(code, str(GUIDE), "exec"), namespace)
    return namespace


@pytest.fixture
def package(tmp_path) -> Path:
    root = tmp_path / "graphengine-snake"
    for path, code in guide_files().items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(code)
    return root


def _import(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_guide_holds_a_complete_package():
    assert set(guide_files()) == {"pyproject.toml", "graphengine_snake/__init__.py", "tests/test_snake.py"}


def test_the_guide_documents_every_hook():
    text = GUIDE.read_text()
    hooks = [name for name, _ in inspect.getmembers(HookSpecs, inspect.isfunction)]
    assert len(hooks) == 8
    for hook in hooks:
        assert f"### `{hook}(register)`" in text, hook


def test_the_guides_package_passes_its_own_test(package, monkeypatch):
    monkeypatch.syspath_prepend(str(package))
    monkeypatch.delitem(sys.modules, "graphengine_snake", raising=False)
    tests = _import(package / "tests" / "test_snake.py", "guide_test_snake")
    tests.test_snake_backward_matches_finite_differences()
    snake = sys.modules["graphengine_snake"]
    with isolated_plugin_manager(snake, entry_points=True):
        g = ge.Graph()
        x = g.input("x", shape=(None, 3))
        model = g.compile(outputs=[g.activation("snake", g.layer("dense", x, units=2))])
        assert model.predict({"x": np.ones((2, 3), np.float32)}).shape == (2, 2)


def test_a_wrong_backward_fails_the_guides_check(package, monkeypatch):
    """The check the guide tells authors to run is not vacuous: a sign slip fails it."""
    monkeypatch.syspath_prepend(str(package))
    monkeypatch.delitem(sys.modules, "graphengine_snake", raising=False)
    snake = _import(package / "graphengine_snake" / "__init__.py", "guide_snake_wrong")

    class Wrong(snake.Snake):
        def backward(self, xp, x, y, dy):
            return -super().backward(xp, x, y, dy)

    with pytest.raises(GradientCheckError, match="finite difference gives"):
        check_backward(Wrong, [np.random.default_rng(0).standard_normal((4, 5))])


def test_the_guides_package_installs_and_is_found_through_its_entry_point(package, tmp_path):
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("building the package offline needs setuptools in this environment")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--no-build-isolation", "--target", str(site), str(package)],
                   check=True, capture_output=True, text=True)
    listing = subprocess.run(
        [sys.executable, "-c", "import sys; from graphengine.cli import main; sys.exit(main())",
         "plugins"], capture_output=True, text=True, env={"PYTHONPATH": str(site),
                                                          "PATH": "/usr/bin:/bin"})
    assert listing.returncode == 0, listing.stderr
    assert "snake  (graphengine-snake 0.1.0)\n    activations: snake\n" in listing.stdout


# -- the contract examples ------------------------------------------------------------------

@pytest.fixture(scope="module")
def examples() -> dict[str, object]:
    return guide_examples()


def test_activation_example_passes_the_check_and_measures_its_health(examples, backend):
    hard_sigmoid = examples["HardSigmoid"]
    x = np.linspace(-1.9, 1.9, 12).reshape(3, 4)  # inside the slope: no kink to straddle
    check_backward(hard_sigmoid, [x], backend=backend)
    check_backward(lambda: hard_sigmoid(slope=0.1), [x], backend=backend)
    y = hard_sigmoid().forward(np, np.array([[-3.0, 0.0, 3.0, 1.0]]))
    assert float(hard_sigmoid().measure_health(np, y)) == 0.5


def test_loss_example_passes_the_check_and_keeps_the_defaults(examples, backend):
    huber = examples["Huber"]
    rng = np.random.default_rng(1)
    pred, target = rng.standard_normal((5, 3)) * 2, rng.standard_normal((5, 3))
    check_backward(lambda: huber(delta=0.5), [pred, target], backend=backend)
    assert huber().accuracy(np, pred, target) is None and huber().predict(np, pred) is pred
    with pytest.raises(ge.ShapeError, match=r"prediction .* and target .* differ"):
        huber().check(ge.TensorSpec((None, 3), "float32"), ge.TensorSpec((None, 1), "float32"))


def test_operator_and_layer_examples(examples, backend):
    rng = np.random.default_rng(2)
    check_backward(examples["ScaleOp"](), [rng.standard_normal((4, 3)), rng.standard_normal(3)],
                   backend=backend)
    with pytest.raises(ge.ShapeError, match="scale takes features"):
        examples["ScaleOp"]().infer(ge.TensorSpec((None, 3), "float32"), ge.TensorSpec((2,), "float32"))


def _plugin(**hooks):
    import types
    module = types.ModuleType("guide_examples")
    for hook, (name, obj) in hooks.items():
        def implementation(register, name=name, obj=obj):
            register(name, obj)
        implementation.__name__ = f"graphengine_register_{hook}"
        setattr(module, implementation.__name__, ge.hookimpl(implementation))
    return module


def test_layer_optimizer_and_initializer_examples_train_save_and_load(examples, tmp_path):
    plugin = _plugin(layers=("scale", examples["Scale"]), optimizers=("sign_momentum",
                     examples["SignMomentum"]), initializers=("lecun", examples["LeCun"]),
                     losses=("guide_huber", examples["Huber"]))  # "huber" is built in
    with isolated_plugin_manager(plugin, entry_points=True):
        g = ge.Graph()
        x, y = g.input("x", shape=(None, 4)), g.input("y", shape=(None, 2))
        h = g.layer("dense", x, units=2, init={"name": "lecun", "scale": 2.0}, name="fc")
        loss = g.loss("guide_huber", g.layer("scale", h, name="sc"), y, delta=0.5)
        model = g.compile(loss, optimizer=ge.optimizer("sign_momentum", lr=0.01, beta=0.5))
        before = {k: np.array(v) for k, v in model.parameters().items()}
        rng = np.random.default_rng(3)
        data = {"x": rng.standard_normal((16, 4)).astype(np.float32),
                "y": rng.standard_normal((16, 2)).astype(np.float32)}
        model.fit(data, epochs=2, batch_size=8)
        after = model.parameters()
        # every parameter moved by lr along a sign, at most 4 steps of 0.01
        for name, value in after.items():
            step = np.abs(np.asarray(value) - before[name])
            assert step.max() > 0 and step.max() <= 4 * 0.01 + 1e-6, name
        model.save(tmp_path / "m.gem")
        loaded = ge.load(tmp_path / "m.gem")
        assert type(loaded.optimizer).__name__ == "SignMomentum"
        assert loaded.optimizer.hyperparameters() == {"lr": 0.01, "beta": 0.5}


def test_backend_example_runs_the_check(examples):
    with isolated_plugin_manager(_plugin(backends=("host", examples["HostBackend"])),
                                 entry_points=True):
        check_backward(examples["HardSigmoid"], [np.linspace(-1, 1, 6).reshape(2, 3)], backend="host")
        assert ge.get_backend("host").to_numpy(ge.get_backend("host").asarray([1.0])).tolist() == [1.0]


def test_command_example_reports_a_bad_file_in_one_line(examples, tmp_path, capsys):
    module = _plugin()
    module.graphengine_register_commands = examples["graphengine_register_commands"]
    bad = tmp_path / "bad.gem"
    bad.write_bytes(b"junk")
    with isolated_plugin_manager(module, entry_points=True):
        assert main(["count", str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("graphengine count: ") and err.count("\n") == 1 and str(bad) in err
        with pytest.raises(SystemExit) as exit_:
            main(["count", str(bad), "--top", "0"])
        assert exit_.value.code == 2


# -- the README's "Writing a plugin" --------------------------------------------------------

def _readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Writing a plugin")
    return text[start:text.index("\n## ", start + 1)]


def test_readme_links_the_guide_and_quotes_the_complete_pyproject():
    section = _readme_section()
    assert "](docs/plugins.md)" in section
    (toml,) = [code for language, code in blocks(section) if language == "toml"]
    first, rest = toml.split("\n", 1)
    assert first == "# examples/plugin_package/pyproject.toml"
    assert rest == (ROOT / "examples" / "plugin_package" / "pyproject.toml").read_text()


def test_readme_check_backward_takes_the_plugin_class():
    swish = ge.get_plugin_manager().activations.get("swish_beta")
    check_backward(swish, [np.random.default_rng(4).standard_normal((3, 4))])
    check_backward(swish(beta=2.0), [np.random.default_rng(4).standard_normal((3, 4))], backend="strict")


def test_check_backward_names_what_it_cannot_check():
    with pytest.raises(ge.PluginError, match="takes an Operator, an Activation or a Loss.*got 3"):
        check_backward(lambda: 3, [np.ones((2, 2))])
