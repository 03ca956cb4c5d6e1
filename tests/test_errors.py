"""Bad input gets a clear error, and nothing is lost.

``CASES`` is the error table of the README: each row triggers one mistake and checks the
error's class (always a GraphEngineError), an excerpt of its message, and that the message says
what to do. ``test_the_error_table_documents_every_case`` keeps the documentation in step.
The tests after the table check that a failed call leaves the graph, the model and the plugin
registries working.
"""

from __future__ import annotations

import importlib.metadata
import math
import pickle
import re
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from payload import Payload

import graphengine as ge
from graphengine.hooks import PluginWarning
from graphengine.io import serialize
from graphengine.testing import isolated_plugin_manager

# NaN and Inf are these tests' subject: NumPy's warnings about them are expected.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

README = Path(__file__).resolve().parents[1] / "README.md"

X = np.linspace(-1, 1, 15, dtype=np.float32).reshape(5, 3)
Y = np.array([0, 1, 2, 3, 0])


def classifier(backend: str = "numpy") -> ge.Model:
    """x (None, 3) -> dense(4) 'fc' -> softmax cross-entropy against int labels y."""
    g = ge.Graph("clf")
    x = g.input("x", (None, 3))
    y = g.input("y", (None,), dtype="int64")
    loss = g.loss("softmax_cross_entropy", g.layer("dense", x, units=4, name="fc"), y)
    return g.compile(loss, optimizer=ge.optimizer("sgd", lr=0.1), backend=backend)


def sqrt_model() -> ge.Model:
    """mean(sqrt(x @ W)) with W = 0: a finite loss whose gradient is infinite."""
    g = ge.Graph("sqrt")
    x = g.input("x", (None, 3))
    h = x @ g.parameter("W", (3, 2), init="zeros")
    return g.compile(h.sqrt().mean(), outputs=[h], optimizer="sgd")


def plugin(name: str, **hooks: Callable) -> types.ModuleType:
    """A plugin module named ``name`` with the given hook functions."""
    module = types.ModuleType(name)
    for hook, function in hooks.items():
        setattr(module, hook, ge.hookimpl(function))
    return module


def activations(**named: type) -> Callable:
    def register_activations(register):
        for name, cls in named.items():
            register(name, cls)
    return register_activations


class Double(ge.Activation):
    keeps = ()

    def forward(self, xp, x):
        return 2 * x

    def backward(self, xp, x, y, dy):
        return 2 * dy


class Crashing(Double):
    """A plugin activation with a bug in forward."""

    def forward(self, xp, x):
        return xp.reshape(x, (7, 7))


def fake_entry_points(monkeypatch, **modules: types.ModuleType | None) -> None:
    """Entry points named after ``modules``; a None module fails to import."""
    points = []
    for name, module in modules.items():
        target = f"fake_graphengine_plugin_{name}"
        if module is not None:
            monkeypatch.setitem(sys.modules, target, module)
        points.append(importlib.metadata.EntryPoint(name, target, "graphengine"))
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: points)


# --------------------------------------------------------------------------- triggers

def wrong_feed_shape(mp):
    classifier().forward({"x": np.zeros((5, 4)), "y": Y})


def wrong_feed_dtype(mp):
    classifier().forward({"x": X, "y": Y.astype(np.float64)})


def non_numeric_feed(mp):
    classifier().forward({"x": np.full((5, 3), "a"), "y": Y})


def ragged_feed(mp):
    classifier().forward({"x": [[1.0, 2.0, 3.0], [1.0]], "y": [0, 1]})


def missing_feed(mp):
    classifier().forward({"x": X})


def extra_feed(mp):
    classifier().forward({"x": X, "y": Y, "z": X})


def batch_sizes_disagree(mp):
    classifier().forward({"x": X, "y": Y[:3]})


def feeds_not_a_dict(mp):
    classifier().forward([X, Y])


def predict_without_its_input(mp):
    classifier().predict({"y": Y})


def unknown_layer(mp):
    g = ge.Graph()
    g.layer("dens", g.input("x", (None, 3)), units=2)


def unknown_activation(mp):
    g = ge.Graph()
    g.activation("rleu", g.input("x", (None, 3)))


def unknown_loss(mp):
    g = ge.Graph()
    x = g.input("x", (None, 3))
    g.loss("cross_entropie", x, x)


def unknown_optimizer(mp):
    ge.optimizer("adamm", lr=0.1)


def unknown_backend(mp):
    classifier(backend="numpi")


def unknown_primitive(mp):
    g = ge.Graph()
    g.op("matmull", g.input("x", (None, 3)))


def unknown_dtype(mp):
    ge.Graph().input("x", (None, 3), dtype="bogus")


def array_as_an_activation_input(mp):
    ge.Graph().activation("relu", X)


def array_as_a_layer_input(mp):
    ge.Graph().layer("dense", X, units=2)


def string_as_a_loss_target(mp):
    g = ge.Graph()
    x = g.input("x", (None, 3))
    g.input("y", (None,), dtype="int64")
    g.loss("softmax_cross_entropy", g.layer("dense", x, units=4), "y")


def init_without_a_name(mp):
    ge.Graph().parameter("W", (3, 2), init={"std": 1})


def initializer_rejecting_its_arguments(mp):
    ge.Graph().parameter("W", (3, 2), init={"name": "normal", "sdt": 1})


def backend_not_a_name(mp):
    g = ge.Graph()
    g.compile(outputs=[g.input("x", (None, 3))], backend=3)


def bad_layer_arguments(mp):
    g = ge.Graph()
    g.layer("dense", g.input("x", (None, 3)), units=0)


def layer_given_two_inputs(mp):
    g = ge.Graph()
    x = g.input("x", (None, 3))
    g.layer("dense", x, x, units=2)


def shapes_do_not_fit(mp):
    g = ge.Graph()
    g.input("x", (None, 3)) + g.input("b", (4,))


def dtypes_differ(mp):
    g = ge.Graph()
    g.input("x", (None, 3)) * g.input("n", (None, 3), dtype="float64")


def duplicate_name(mp):
    g = ge.Graph()
    g.input("x", (None, 3))
    g.input("x", (None, 3))


def loss_not_a_scalar(mp):
    g = ge.Graph()
    x = g.input("x", (None, 3))
    g.compile(g.layer("dense", x, units=2), optimizer="sgd")


def nothing_to_train(mp):
    g = ge.Graph()
    x = g.input("x", (None, 3))
    g.compile(x.mean(), outputs=[x], optimizer="sgd")


def float_labels_for_classes(mp):
    g = ge.Graph()
    x = g.input("x", (None, 3))
    g.loss("softmax_cross_entropy", g.layer("dense", x, units=4), g.input("y", (None,)))


def labels_out_of_range(mp):
    classifier().fit({"x": X, "y": np.array([0, 1, 2, 9, 0])}, batch_size=5)


def empty_dataset(mp):
    classifier().fit({"x": X[:0], "y": Y[:0]})


def batch_larger_than_data(mp):
    classifier().fit({"x": X, "y": Y}, batch_size=64)


def batch_size_not_positive(mp):
    classifier().predict({"x": X}, batch_size=-1)


def dataset_lengths_differ(mp):
    classifier().fit({"x": X, "y": Y[:4]}, batch_size=2)


def strict_array_to_numpy_model(mp):
    strict = ge.get_backend("strict")
    classifier().forward({"x": strict.asarray(X), "y": strict.asarray(Y)})


class DeviceArray:
    """Stands for a CuPy array (no GPU here): graphengine recognizes it by its module."""

    __module__ = "cupy"
    shape, dtype = (5, 3), np.dtype("float32")


def cupy_array_to_numpy_model(mp):
    classifier().forward({"x": DeviceArray(), "y": Y})


def numpy_parameters_to_strict_model(mp):
    numpy_model = classifier()
    g = numpy_model.graph
    g.compile(g[numpy_model.loss_name], backend="strict", parameters=numpy_model.parameters())


def numpy_array_into_strict_parameter(mp):
    classifier("strict").parameters()["fc/W"][...] = np.zeros((3, 4), np.float32)


def conflicting_plugins(mp):
    first = plugin("first_plugin", graphengine_register_activations=activations(twice=Double))
    second = plugin("second_plugin", graphengine_register_activations=activations(twice=Double))
    with isolated_plugin_manager(first) as manager:
        manager.register(second)


def plugin_failing_to_register(mp):
    def register_activations(register):
        raise RuntimeError("boom")
    with isolated_plugin_manager(plugin("boom_plugin",
                                        graphengine_register_activations=register_activations)):
        pass


def plugin_with_misspelled_hook(mp):
    with isolated_plugin_manager(plugin("typo_plugin",
                                        graphengine_register_activation=activations(a=Double))):
        pass


def plugin_registering_a_non_class(mp):
    with isolated_plugin_manager(plugin("odd_plugin",
                                        graphengine_register_activations=activations(odd=42))):
        pass


def entry_point_failing_under_strict_plugins(mp):
    mp.setenv("GRAPHENGINE_STRICT_PLUGINS", "1")
    fake_entry_points(mp, broken=None)
    with isolated_plugin_manager(entry_points=True) as manager:
        manager.load()


def plugin_operator_crashing(mp):
    with isolated_plugin_manager(plugin("crash_plugin",
                                        graphengine_register_activations=activations(crash=Crashing)),
                                 entry_points=True):
        g = ge.Graph()
        y = g.activation("crash", g.input("x", (None, 3)))
        g.compile(outputs=[y]).run({"x": X})


def nan_loss_in_fit(mp):
    classifier().fit({"x": np.full((5, 3), np.nan, np.float32), "y": Y}, batch_size=5)


def infinite_gradient_in_fit(mp):
    sqrt_model().fit({"x": X}, batch_size=5)


def nan_in_debug_mode(mp):
    g = ge.Graph()
    x = g.input("x", (None, 3))
    model = g.compile(outputs=[x.log()])
    model.debug = True
    model.run({"x": X})


def truncated_model_file(mp, tmp_path):
    path = tmp_path / "model.ge"
    classifier().save(path)
    path.write_bytes(path.read_bytes()[:-100])
    ge.load(path)


def corrupted_model_file(mp, tmp_path):
    path = tmp_path / "model.ge"
    classifier().save(path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte inside the weights
    path.write_bytes(bytes(data))
    ge.load(path)


def model_file_from_a_newer_version(mp, tmp_path):
    path = tmp_path / "model.ge"
    with mp.context() as newer:
        newer.setattr(serialize, "FORMAT_VERSION", serialize.FORMAT_VERSION + 1)
        classifier().save(path)
    ge.load(path)


class Dropping(Double):
    """A plugin activation whose backward returns no gradient."""

    def backward(self, xp, x, y, dy):
        return None


def plugin_backward_returning_none(mp):
    with isolated_plugin_manager(plugin("drop_plugin",
                                        graphengine_register_activations=activations(drop=Dropping)),
                                 entry_points=True):
        g = ge.Graph()
        x = g.input("x", (None, 3))
        h = g.activation("drop", g.layer("dense", x, units=2, name="fc"))
        model = g.compile(h.mean(), outputs=[h], optimizer="sgd")
        model.forward({"x": X})
        model.backward()


def nan_hyperparameter(mp):
    ge.optimizer("adam", lr=float("nan"))


def non_finite_preprocessing_data(mp):
    g = ge.Graph()
    model = g.compile(outputs=[g.layer("zscore", g.input("x", (None, 3)), name="norm")])
    data = X.copy()
    data[2, 1] = np.nan
    model.fit_preprocessing({"x": data})


def checkpoint_with_a_bad_pattern(mp):
    ge.Checkpoint("run{1}/model.ge")


def model_file_that_is_a_fifo(mp, tmp_path):
    import os
    path = tmp_path / "model.ge"
    os.mkfifo(path)
    ge.load(path)


def saving_over_a_read_only_file(mp, tmp_path):
    path = tmp_path / "model.ge"
    path.write_bytes(b"precious")
    path.chmod(0o444)
    classifier().save(path)


def model_file_needing_a_missing_plugin(mp, tmp_path):
    path = tmp_path / "model.ge"
    with isolated_plugin_manager(entry_points=True) as manager:
        manager.register(plugin("double_plugin", graphengine_register_activations=activations(
            double=Double)), distribution="double-activation")
        g = ge.Graph()
        g.compile(outputs=[g.activation("double", g.input("x", (None, 3)))]).save(path)
    ge.load(path)


def resuming_with_state_that_does_not_fit(mp, tmp_path):
    path = tmp_path / "model.ge"
    model = classifier()
    model.fit({"x": X, "y": Y}, batch_size=5, verbose=0)
    model.optimizer_state["fc/W"]["stray"] = 1.5  # a scalar where the optimizer keeps nothing
    model.save(path)
    ge.load(path)


def model_file_carrying_a_pickle(mp, tmp_path):
    marker = tmp_path / "unpickled"
    path = tmp_path / "model.ge"
    path.write_bytes(pickle.dumps(Payload(str(marker))))
    try:
        ge.load(path)
    finally:
        assert not marker.exists(), "loading ran the pickle's code"


@dataclass
class Case:
    trigger: Callable
    error: type[ge.GraphEngineError]
    #: A literal part of the message: what went wrong, and what to do.
    excerpt: str
    todo: str

    @property
    def id(self) -> str:
        return self.trigger.__name__


CASES = [
    Case(wrong_feed_shape, ge.FeedError, "feed 'x' has shape (5, 4), input 'x' expects (None, 3)",
         "reshape the data"),
    Case(wrong_feed_dtype, ge.FeedError, "feed 'y' has dtype float64, input 'y' is int64",
         "convert it"),
    Case(non_numeric_feed, ge.FeedError, "feed 'x' has dtype <U1", "convert it"),
    Case(ragged_feed, ge.FeedError, "feed 'x' cannot become an array", "rectangular array"),
    Case(missing_feed, ge.FeedError, "missing feed(s) ['y']", "add an array for each"),
    Case(extra_feed, ge.FeedError, "unknown feed(s) ['z']: graph 'clf' has inputs ['x', 'y']",
         "check the spelling"),
    Case(batch_sizes_disagree, ge.FeedError, "feeds disagree on the batch size: 'y' has 3",
         "one row per example"),
    Case(feeds_not_a_dict, ge.FeedError, "feeds must be a dict of input name -> array, got list",
         "pass {'x': ..., 'y': ...}"),
    Case(predict_without_its_input, ge.FeedError, "missing feed(s) ['x']", "add an array for each"),
    Case(unknown_layer, ge.UnknownNameError, "unknown layer 'dens'. Did you mean 'dense'?",
         "graphengine plugins"),
    Case(unknown_activation, ge.UnknownNameError, "unknown activation 'rleu'. Did you mean 'relu'",
         "graphengine plugins"),
    Case(unknown_loss, ge.UnknownNameError, "unknown loss 'cross_entropie'. Did you mean 'cross_entropy'",
         "graphengine plugins"),
    Case(unknown_optimizer, ge.UnknownNameError, "unknown optimizer 'adamm'. Did you mean 'adam'",
         "graphengine plugins"),
    Case(unknown_backend, ge.UnknownNameError, "unknown backend 'numpi'. Did you mean 'numpy'",
         "graphengine plugins"),
    Case(unknown_primitive, ge.UnknownNameError, "unknown primitive operator 'matmull'. Did you mean "
         "'matmul'", "g.layer(...)"),
    Case(unknown_dtype, ge.GraphBuildError, "input 'x': unsupported dtype 'bogus'; use one of "
         "float16, float32, float64, int8, int16, int32, int64, uint8, bool", "use one of"),
    Case(array_as_an_activation_input, ge.GraphBuildError, "activation 'relu': input 1 of 1 is a "
         "numpy.ndarray of shape (5, 3), not a tensor of graph 'graph'", "g.constant(array)"),
    Case(array_as_a_layer_input, ge.GraphBuildError, "layer 'dense': input 1 of 1 is a numpy.ndarray "
         "of shape (5, 3), not a tensor of graph 'graph'", "g.constant(array)"),
    Case(string_as_a_loss_target, ge.GraphBuildError, "loss 'softmax_cross_entropy': input 2 of 2 is a "
         "str 'y' (the node of that name is g['y']), not a tensor of graph 'graph'",
         "pass a tensor this graph built"),
    Case(init_without_a_name, ge.GraphBuildError, "parameter 'W': init {'std': 1} names no initializer",
         "add its \"name\", e.g. init={'name': 'normal', 'std': 1}"),
    Case(initializer_rejecting_its_arguments, ge.GraphBuildError, "initializer 'normal' from plugin "
         "'initializers' (distribution graphengine) rejected its arguments {'sdt': 1}",
         "unexpected keyword argument 'sdt'"),
    Case(bad_layer_arguments, ge.GraphBuildError, "layer 'dense' from plugin 'layers'",
         "units must be a positive int"),
    Case(layer_given_two_inputs, ge.GraphBuildError, "layer 'dense' from plugin 'layers'",
         "check the inputs and arguments"),
    Case(shapes_do_not_fit, ge.ShapeError, "node 'add_0' (add): shapes (None, 3) and (4,) do not "
         "broadcast", "make that dimension equal, or 1 on one side"),
    Case(dtypes_differ, ge.ShapeError, "dtypes differ: float32 vs float64", "cast one side explicitly"),
    Case(duplicate_name, ge.GraphBuildError, "graph 'graph' already has a node named 'x'",
         "pass another name="),
    Case(loss_not_a_scalar, ge.CompileError, "must be a scalar, but its shape is (None, 2)",
         "reduce it with .mean() or .sum()"),
    Case(nothing_to_train, ge.CompileError, "no trainable parameter (or input asked for) influences "
         "the loss", "put a layer with parameters on the path"),
    Case(float_labels_for_classes, ge.ShapeError, "target must be int, got float32",
         "declare the target input with dtype='int64'"),
    Case(labels_out_of_range, ge.DataError, "labels must lie in [0, 4) for 4 classes; got labels from "
         "0 to 9", "encode the classes as 0..3"),
    Case(empty_dataset, ge.DataError, "the dataset is empty ({'x': 0, 'y': 0})",
         "pass at least one example"),
    Case(batch_larger_than_data, ge.DataError, "batch_size 64 is larger than the dataset (5 rows)",
         "use batch_size=5"),
    Case(batch_size_not_positive, ge.DataError, "batch_size must be a positive int, got -1",
         "must be a positive int"),
    Case(dataset_lengths_differ, ge.DataError, "the dataset's arrays differ in length: "
         "{'x': 5, 'y': 4}", "one row per example"),
    Case(strict_array_to_numpy_model, ge.BackendError,
         "feed 'x' is a graphengine.plugins.backends.StrictArray, but the model runs on backend "
         "'numpy'", "convert it explicitly"),
    Case(cupy_array_to_numpy_model, ge.BackendError, "feed 'x' is a cupy.DeviceArray, but the model "
         "runs on backend 'numpy'", "convert it explicitly"),
    Case(backend_not_a_name, ge.BackendError, "backend must be a registered backend name or a Backend "
         "instance, got int 3", "pass one of"),
    Case(numpy_parameters_to_strict_model, ge.BackendError, "shared parameter 'fc/W' is a "
         "numpy.ndarray, not an array of backend 'strict'", "convert it explicitly"),
    Case(numpy_array_into_strict_parameter, ge.BackendError, "a plain NumPy array of shape (3, 4) "
         "was mixed with strict-backend arrays", "create it with xp"),
    Case(conflicting_plugins, ge.PluginConflictError, "activation 'twice' is registered twice: by "
         "plugin 'first_plugin' and by plugin 'second_plugin'", "GRAPHENGINE_DISABLE_PLUGINS"),
    Case(plugin_failing_to_register, ge.PluginError, "plugin 'boom_plugin' failed while registering "
         "activations: RuntimeError: boom", "boom"),
    Case(plugin_with_misspelled_hook, ge.PluginError, "plugin 'typo_plugin' is not a valid plugin",
         "unknown hook 'graphengine_register_activation'"),
    Case(plugin_registering_a_non_class, ge.PluginError, "registered activation 'odd' as 42, which is "
         "not callable", "register the class"),
    Case(entry_point_failing_under_strict_plugins, ge.PluginError, "plugin 'broken' failed to import",
         "GRAPHENGINE_STRICT_PLUGINS=1"),
    Case(plugin_operator_crashing, ge.OperatorError, "node 'crash_0' (crash, built at", "set model.debug "
         "= True"),
    Case(nan_loss_in_fit, ge.NumericalError, "the loss became nan at epoch 1, batch 0",
         "set model.debug = True"),
    Case(infinite_gradient_in_fit, ge.NumericalError, "the gradients of ['W'] are not finite at epoch "
         "1, batch 0", "the update was skipped"),
    Case(nan_in_debug_mode, ge.NumericalError, "7 NaN and 1 Inf among 15 values in the forward pass at node "
         "'log_0' (log, built at", "keep its input positive"),
    Case(truncated_model_file, ge.SerializationError, "is truncated", "save the model again"),
    Case(corrupted_model_file, ge.SerializationError, "is corrupted: tensor", "save the model again"),
    Case(model_file_from_a_newer_version, ge.SerializationError, "has format version 3, written by a "
         "newer graphengine; this one reads versions up to 2", "upgrade (pip install -U graphengine)"),
    Case(model_file_carrying_a_pickle, ge.SerializationError, "is a pickle, not a graphengine model "
         "file; graphengine never unpickles (unpickling runs code from the file)",
         "np.load(..., allow_pickle=False)"),
    Case(model_file_that_is_a_fifo, ge.SerializationError, "is a FIFO (named pipe), not a model file",
         "a model file is a regular file"),
    Case(model_file_needing_a_missing_plugin, ge.SerializationError, "uses activation 'double', "
         "provided by plugin 'double_plugin'", "pip install double-activation"),
    Case(resuming_with_state_that_does_not_fit, ge.SerializationError, "the optimizer state of "
         "parameter 'fc/W' has 'stray' = 1.5, SGD keeps an array", "an array"),
    Case(saving_over_a_read_only_file, ge.SerializationError, "it is read-only", "chmod u+w"),
    Case(checkpoint_with_a_bad_pattern, ge.GraphEngineError, "Checkpoint path 'run{1}/model.ge' is "
         "not a valid pattern", "it may hold {epoch}"),
    Case(nan_hyperparameter, ge.GraphEngineError, "rejected {'lr': nan}: lr must be a non-negative "
         "number, got nan, which is not finite", "which is not finite"),
    Case(non_finite_preprocessing_data, ge.DataError, "ZScore layer cannot be fitted: column 1 of its "
         "input holds nan (first at row 2)", "drop or impute non-finite values"),
    Case(plugin_backward_returning_none, ge.OperatorError, "Dropping.backward returned None for the "
         "gradient of its input #0", "return an array (zeros where no gradient flows)"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_error(case, monkeypatch, tmp_path, recwarn):
    args = (monkeypatch, tmp_path) if "tmp_path" in case.trigger.__code__.co_varnames else (monkeypatch,)
    with pytest.raises(ge.GraphEngineError) as info:
        case.trigger(*args)
    message = str(info.value)
    assert type(info.value) is case.error, f"{type(info.value).__name__}: {message}"
    assert case.excerpt in message
    assert case.todo in message


def error_table() -> dict[str, list[str]]:
    """Case id -> the other cells of its row (error, message, what to do) in the README."""
    rows = {}
    for line in README.read_text().splitlines():
        match = re.fullmatch(r"\| `(\w+)` \| (.*) \|", line)
        cells = match[2].split(" | ") if match else []  # a pipe inside a cell is escaped: \|
        if len(cells) == 3:
            rows[match[1]] = cells
    return rows


def test_the_error_table_documents_every_case():
    table = error_table()
    assert sorted(table) == sorted(case.id for case in CASES)
    for case in CASES:
        error, message, _ = table[case.id]
        assert error == f"`{case.error.__name__}`", case.id
        assert case.excerpt.replace("|", "\\|") in message, case.id


def test_every_error_class_is_a_graphengine_error():
    errors = [value for value in vars(ge.errors).values()
              if isinstance(value, type) and issubclass(value, Exception)]
    assert len(errors) >= 12
    assert all(issubclass(error, ge.GraphEngineError) for error in errors)
    assert {case.error for case in CASES} >= {ge.FeedError, ge.UnknownNameError, ge.GraphBuildError,
                                              ge.ShapeError, ge.CompileError, ge.DataError, ge.BackendError,
                                              ge.PluginError, ge.PluginConflictError, ge.OperatorError,
                                              ge.NumericalError, ge.SerializationError}


def test_run_time_errors_name_the_node_they_come_from():
    with pytest.raises(ge.DataError) as info:
        labels_out_of_range(None)
    assert info.value.node == "softmax_cross_entropy_0"
    assert "in the forward pass (inputs (5, 4) float32, (5,) int64)" in str(info.value)
    assert f"test_errors.py:{classifier.__code__.co_firstlineno + 5}" in str(info.value)


# --------------------------------------------------------------------------- nothing lost

def snapshot(graph: ge.Graph) -> tuple:
    return list(graph.nodes), sorted(graph.dag.edges), len(graph.calls)


class HalfBuilt(ge.Layer):
    """Adds a parameter and an operator, then fails: the graph must drop both."""

    def build(self, g, x):
        h = x @ g.parameter("W", (x.shape[-1], 2))
        return h + g.parameter("b", (3,))  # (None, 2) + (3,) does not broadcast


class NotATensor(ge.Layer):
    def build(self, g, x):
        g.parameter("W", (3, 3))
        return "oops"


def test_a_failed_layer_leaves_no_half_built_nodes():
    layers = plugin("half_plugin", graphengine_register_layers=lambda register: [
        register("half", HalfBuilt), register("not_a_tensor", NotATensor)])
    with isolated_plugin_manager(layers, entry_points=True):
        g = ge.Graph("g")
        x = g.input("x", (None, 3))
        before = snapshot(g)
        with pytest.raises(ge.ShapeError, match=r"node 'half_0/add' \(add\)"):
            g.layer("half", x)
        assert snapshot(g) == before
        with pytest.raises(ge.GraphBuildError, match="returned str from build"):
            g.layer("not_a_tensor", x)
        assert snapshot(g) == before
        with pytest.raises(ge.GraphBuildError):
            g.layer("dense", x, x, units=2)
        assert snapshot(g) == before
        # The graph still builds, compiles and trains; the failed layer's name is free again.
        h = g.layer("dense", x, units=1, name="half_0")
        model = g.compile(h.mean(), outputs=[h], optimizer="sgd")
        assert sorted(model.parameters()) == ["half_0/W", "half_0/b"]
        before_loss = model.train_step({"x": X})
        assert model.forward({"x": X}) < before_loss


def test_a_failed_forward_leaves_the_model_working():
    model = classifier()
    expected = model.forward({"x": X, "y": Y})
    for bad in ({"x": X}, {"x": X[:, :2], "y": Y}, {"x": X, "y": Y + 10}):
        with pytest.raises(ge.GraphEngineError):
            model.forward(bad)
    assert model.forward({"x": X, "y": Y}) == expected
    model.backward()
    assert set(model.gradients()) == {"fc/W", "fc/b"}


def test_a_failed_fit_leaves_the_parameters_finite_and_unchanged_by_the_bad_step():
    model = sqrt_model()
    before = {k: v.copy() for k, v in model.parameters().items()}
    with pytest.raises(ge.NumericalError):
        model.fit({"x": X}, batch_size=5)
    for name, value in model.parameters().items():
        assert np.array_equal(value, before[name])
    assert model.step_count == 0


def test_a_fit_failing_midway_keeps_the_updates_before_it_and_stays_trainable():
    model = classifier()
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3, 0, 9])  # the last batch is broken
    data = {"x": np.tile(X, (2, 1)), "y": labels}
    with pytest.raises(ge.DataError, match="labels must lie"):
        model.fit(data, batch_size=2, shuffle=False)
    assert model.step_count == 4
    assert all(np.isfinite(v).all() for v in model.parameters().values())
    history = model.fit({"x": X, "y": Y}, epochs=3, batch_size=5)
    assert history["loss"][-1] < history["loss"][0]


def test_a_conflicting_plugin_registers_nothing():
    first = plugin("first_plugin", graphengine_register_activations=activations(twice=Double))

    def register_both(register):
        register("fresh", Double, aliases=("twice",))

    with isolated_plugin_manager(first) as manager:
        with pytest.raises(ge.PluginConflictError):
            manager.register(plugin("second_plugin", graphengine_register_activations=register_both))
        assert manager.activations.names() == ["twice"]
        assert manager.activations.entry("twice").plugin == "first_plugin"


def test_a_broken_entry_point_is_reported_and_the_others_keep_working(monkeypatch):
    good = plugin("good", graphengine_register_activations=activations(double=Double))
    fake_entry_points(monkeypatch, broken=None, good=good)
    with isolated_plugin_manager(entry_points=True) as manager:
        with pytest.warns(PluginWarning, match="plugin 'broken' failed to import"):
            assert manager.activations.names() == ["double"]
        assert "failed to import" in manager.records["broken"].error
        with pytest.raises(ge.UnknownNameError, match="plugin.s. broken failed to load and may provide it"):
            manager.activations.entry("triple")


def test_conflicting_entry_points_keep_the_first_and_name_both(monkeypatch):
    fake_entry_points(monkeypatch,
                      alpha=plugin("alpha", graphengine_register_activations=activations(same=Double)),
                      beta=plugin("beta", graphengine_register_activations=activations(same=Crashing)))
    with isolated_plugin_manager(entry_points=True) as manager:
        with pytest.warns(PluginWarning, match="registered twice: by plugin 'alpha' and by plugin 'beta'"):
            assert manager.activations.get("same") is Double


def test_nan_and_inf_stop_a_fit_before_they_reach_the_parameters():
    model = classifier()
    before = {k: v.copy() for k, v in model.parameters().items()}
    with pytest.raises(ge.NumericalError):
        nan_loss_in_fit(None)
    data = {"x": X.copy(), "y": Y}
    data["x"][2, 1] = np.inf
    with pytest.raises(ge.NumericalError, match="the loss became"):
        model.fit(data, batch_size=5)
    assert all(np.array_equal(v, before[k]) for k, v in model.parameters().items())
    assert math.isfinite(model.evaluate({"x": X, "y": Y})["loss"])


def test_numpy_feeds_are_host_data_that_every_backend_takes():
    """The other way round is no mistake: a model takes NumPy feeds onto its backend itself."""
    numpy_model, strict_model = classifier(), classifier("strict")
    assert strict_model.forward({"x": X, "y": Y}) == pytest.approx(numpy_model.forward({"x": X, "y": Y}))
    assert np.allclose(strict_model.predict({"x": X}), numpy_model.predict({"x": X}))
