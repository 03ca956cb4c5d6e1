"""Model files: a JSON graph spec plus weights, in one safetensors file. Never pickle.

The container (:mod:`graphengine.io.container`) holds the tensors, and in ``__metadata__``:

    format          "graphengine-model"
    format_version  FORMAT_VERSION as a string
    document        JSON: the graph (its builder calls, replayed to rebuild it), the model (loss,
                    outputs, seed, optimizer by registered name and hyper-parameters, frozen
                    parameters, fitted preprocessing, training hooks by constructor arguments),
                    the plugin and distribution that provided each kind it uses, the training
                    state (epoch, step, RNG states, optimizer state) and, for every tensor, its
                    dtype, shape and SHA-256
    checksum        SHA-256 of ``document``

Loading parses JSON and raw little-endian arrays only: nothing in a file can run code. A file is
checked whole before anything is built from it: its structure, every part of the document (types,
nesting, sizes), its tensors against their declared shapes and checksums, and its parameters
against the graph it describes. Layers and operators are rebuilt from registered plugins by name,
training hooks and the optimizer through their constructors, so a file gets exactly the checks
that code gets. Parameters are the file's own arrays: no initial values are made for them.
Whatever is wrong with a file raises SerializationError saying what.

Writes are atomic (see :func:`graphengine.io.container.atomic_write`), so a crash mid-save
leaves the previous file as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import GraphEngineError, SerializationError, require_int
from ..hooks import get_plugin_manager
from ..ir.contracts import ActivationOp, LossOp
from ..ir.graph import Graph, in_scope, split_init
from ..ir.operators import Parameter
from ..runtime.backend import get_backend
from ..train import regularization
from ..train.update import optimizer as make_optimizer
from . import container

if TYPE_CHECKING:
    from ..ir.contracts import Optimizer
    from ..model import Model
    from ..runtime.backend import Backend

FORMAT = "graphengine-model"
#: Bumped whenever a file written by this version could not be read by an older one.
#: 2: training hooks saved as constructor arguments; the plugins of each kind; the optimizer's
#: class with its state.
FORMAT_VERSION = 2
#: The oldest version this one reads.
OLDEST_VERSION = 1


# --------------------------------------------------------------------------- writing

def save(model: Model, path: str | os.PathLike, *, training_state: bool = True) -> None:
    """Write ``model`` to ``path`` atomically: its graph, parameters (the non-trainable ones
    too, such as batch-norm running statistics and fitted preprocessing) and, with
    ``training_state``, what resuming training needs (optimizer state, epoch, step, and the
    states of the dropout and shuffling generators).

    Through a symbolic link the link's target is written. A directory, FIFO or device at
    ``path``, or a read-only file, is refused with a SerializationError, never replaced; a new
    file gets the mode the umask allows."""
    tensors: dict[str, np.ndarray] = {}
    document = {
        "graph": _describe_graph(model.graph, tensors),
        "model": _describe_model(model),
        "plugins": _describe_plugins(model),
        "parameters": {name: _put(tensors, f"param:{name}", model.backend.to_numpy(value))
                       for name, value in model.parameters().items()},
        "training": _describe_training(model, tensors) if training_state else None,
    }
    document["tensors"] = {key: _digest(array) for key, array in tensors.items()}
    parts = _encode(document, tensors)
    try:
        container.atomic_write(path, parts)
    except OSError as exc:
        raise SerializationError(f"cannot write model file {os.fspath(path)!r}: {exc}") from None


def _put(tensors: dict[str, np.ndarray], key: str, array: Any) -> str:
    tensors[key] = np.asarray(array, order="C")  # not ascontiguousarray: it makes 0-d 1-d
    return key


def _describe_graph(graph: Graph, tensors: dict[str, np.ndarray]) -> dict[str, Any]:
    calls = []
    for i, call in enumerate(graph.calls):
        if call["call"] == "constant":
            call = {**call, "value": _put(tensors, f"constant:{i}", call["value"])}
        elif "inputs" in call:  # node names: a list in the file, whatever holds them in memory
            call = {**call, "inputs": list(call["inputs"])}
        calls.append(_mark_tuples(call))
    return {"name": graph.name, "calls": calls, "nodes": list(graph.nodes)}


def _mark_tuples(value: Any) -> Any:
    """JSON has no tuples; a layer may care (``kernel_size=(3, 3)`` vs a list), so builder
    calls are replayed with exactly the values they were made with: tuples are marked."""
    if isinstance(value, tuple):
        return {"__tuple__": [_mark_tuples(v) for v in value]}
    if isinstance(value, list):
        return [_mark_tuples(v) for v in value]
    if isinstance(value, dict):
        return {k: _mark_tuples(v) for k, v in value.items()}
    return value


def _unmark_tuples(value: Any) -> Any:
    if isinstance(value, dict):
        if value.keys() == {"__tuple__"} and isinstance(value["__tuple__"], list):
            return tuple(_unmark_tuples(v) for v in value["__tuple__"])
        return {k: _unmark_tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unmark_tuples(v) for v in value]
    return value


def _describe_model(model: Model) -> dict[str, Any]:
    return {
        "loss": model.loss_name,
        # None: the loss's prediction through its link (softmax probabilities), as compiled.
        "outputs": None if model.link is not None else list(model.output_names),
        "seed": model.seed,
        "optimizer": _describe_optimizer(model.optimizer),
        "frozen": sorted(model.frozen),
        "fitted_layers": sorted(model.fitted_layers),
        **_describe_hooks(model),
    }


def _describe_hooks(model: Model) -> dict[str, list[Any]]:
    """The compile options living in the model's hooks (penalties, clipping, schedules,
    max-norm), as class name + constructor arguments. Only the classes of
    :data:`graphengine.train.regularization.SAVEABLE` are saved, with plain-data arguments;
    anything else (a function, a custom schedule, a predicate) is listed by ``repr`` so that
    ``load`` can say it must be attached again."""
    saved, unsaved = [], []
    for where in ("gradient_transforms", "constraints"):
        for hook in getattr(model, where):
            known = regularization.SAVEABLE.get(type(hook).__name__)
            config = hook.config() if known is not None and known[0] is type(hook) else None
            if known is not None and known[1] == where and _is_plain(config):
                saved.append({"where": where, "class": type(hook).__name__,
                              "config": _mark_tuples(config)})
            else:
                unsaved.append(repr(hook))
    return {"hooks": saved, "unsaved_hooks": unsaved}


def _describe_optimizer(optimizer: Optimizer | None) -> dict[str, Any] | None:
    """The optimizer by registered name and hyper-parameters; None when it cannot be rebuilt
    from a name (not registered, or hyper-parameters that are not plain values): ``ge.load``
    then takes one from its ``optimizer=`` argument."""
    if optimizer is None:
        return None
    names = [e.name for e in get_plugin_manager().optimizers.entries() if e.obj is type(optimizer)]
    hyper = optimizer.hyperparameters()
    return {"name": names[0], "hyperparameters": hyper} if names and _is_plain(hyper) else None


def _describe_plugins(model: Model) -> dict[str, dict[str, dict[str, str | None]]]:
    """For each registered name the model uses (layers, activations, losses, initializers, its
    optimizer), the plugin and distribution that provided it: loading without them then says
    what to install."""
    used: dict[str, set[str]] = {"layers": set(), "activations": set(), "losses": set(),
                                 "initializers": set(), "optimizers": set()}
    for call in model.graph.calls:
        if call["call"] == "layer":
            used["layers"].add(call["kind"])
    for node in model.graph.nodes.values():
        if isinstance(node.op, ActivationOp):
            used["activations"].add(node.op.kind)
        elif isinstance(node.op, LossOp):
            used["losses"].add(node.op.kind)
        elif isinstance(node.op, Parameter):
            used["initializers"].add(split_init(node.op.init, node.name)[0])
    optimizer = _describe_optimizer(model.optimizer)
    if optimizer is not None:
        used["optimizers"].add(optimizer["name"])
    manager = get_plugin_manager()
    plugins: dict[str, dict[str, dict[str, str | None]]] = {}
    for kind, names in used.items():
        registry = getattr(manager, kind)
        for name in sorted(names):
            if name in registry:
                entry = registry.entry(name)
                plugins.setdefault(kind, {})[name] = {"plugin": entry.plugin,
                                                      "distribution": entry.distribution}
    return plugins


def _describe_training(model: Model, tensors: dict[str, np.ndarray]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for param, entries in model.optimizer_state.items():
        state[param] = {}
        for key, value in entries.items():
            if model.backend.is_array(value) or isinstance(value, (np.ndarray, np.generic)):
                host = model.backend.to_numpy(value) if model.backend.is_array(value) else value
                state[param][key] = {"tensor": _put(tensors, f"optimizer:{param}:{key}", host)}
            elif value is None or isinstance(value, (bool, int, float, str)):
                state[param][key] = {"value": value}
            else:
                raise SerializationError(
                    f"optimizer {type(model.optimizer).__name__} keeps {type(value).__name__} "
                    f"{key!r} for parameter {param!r}; a checkpoint holds arrays and plain numbers "
                    f"only: keep state as arrays, or save with training_state=False")
    return {"epoch": model.epoch, "step": model.step_count,
            "optimizer": _class_name(model.optimizer) if model.optimizer is not None else None,
            "optimizer_state": state, "rng": rng_state(model.rng),
            "data_rng": rng_state(model.data_rng)}


def _class_name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def rng_state(rng: Any) -> dict[str, Any] | None:
    """A generator's state as plain data (NumPy's ``bit_generator.state``), or None where the
    backend's generator does not expose one (CuPy): resuming is then not bit-identical."""
    state = getattr(getattr(rng, "bit_generator", None), "state", None)
    return state if isinstance(state, dict) else None


def set_rng_state(rng: Any, state: dict[str, Any] | None) -> None:
    if state is not None:
        rng.bit_generator.state = state


def _digest(array: np.ndarray) -> dict[str, Any]:
    return {"dtype": array.dtype.name, "shape": list(array.shape),
            "sha256": hashlib.sha256(np.ascontiguousarray(array).reshape(-1).view(np.uint8)).hexdigest()}


def _is_plain(value: Any) -> bool:
    """Whether ``value`` is plain data that JSON keeps (finite numbers, strings, lists, dicts)."""
    try:
        json.dumps(value, default=_json_default, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return value is not None


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} {value!r}")


def _encode(document: dict[str, Any], tensors: dict[str, np.ndarray]) -> list[bytes | memoryview]:
    try:
        text = json.dumps(document, default=_json_default, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise SerializationError(f"the model cannot be written as JSON: a layer, operator or "
                                 f"optimizer configuration holds {exc}; use plain finite "
                                 f"numbers, strings, lists and dicts in configurations") from None
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "document": text,
                "checksum": hashlib.sha256(text.encode()).hexdigest()}
    return container.encode(tensors, metadata)


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` by ``data`` all at once; see :func:`graphengine.io.container.atomic_write`."""
    container.atomic_write(path, data)


# --------------------------------------------------------------------------- reading

@dataclass
class ModelFile:
    """A verified model file: its document and tensors (host arrays)."""

    path: str
    document: dict[str, Any]
    tensors: dict[str, np.ndarray]
    version: int = FORMAT_VERSION

    def parameters(self) -> dict[str, np.ndarray]:
        return {name: self.tensors[key] for name, key in self.document["parameters"].items()}


def read(path: str | os.PathLike) -> ModelFile:
    """Read and verify a model file: its structure, format, version, document and checksums.
    Raises SerializationError saying what is wrong (not a model file, a pickle, not a regular
    file, a newer version, truncated, corrupted, malformed)."""
    path = os.fspath(path)
    found: dict[str, Any] = {}

    def check_metadata(metadata: dict[str, str]) -> None:  # before the tensors are read
        found["version"] = _check_metadata(path, metadata)
        found["document"] = _check_document(path, metadata["document"], found["version"])

    data = container.read(path, check_metadata)
    document = found["document"]
    _verify_tensors(path, document, data.tensors)
    return ModelFile(path, document, data.tensors, found["version"])


def _check_metadata(path: str, metadata: dict[str, str]) -> int:
    if metadata.get("format") != FORMAT:
        raise SerializationError(
            f"{path!r} is not a graphengine model file (no {FORMAT!r} metadata); a plain "
            f"safetensors file of weights loads with safetensors.numpy.load_file and "
            f"model.set_parameters(...)")
    text = metadata.get("format_version", "")
    if not (text.isascii() and text.isdigit() and len(text) <= 6):
        raise SerializationError(f"model file {path!r} is corrupted: bad format version {text!r}")
    version = int(text)
    if version > FORMAT_VERSION:
        raise SerializationError(
            f"model file {path!r} has format version {version}, written by a newer graphengine; "
            f"this one reads versions up to {FORMAT_VERSION}: upgrade (pip install -U graphengine)")
    if version < OLDEST_VERSION:
        raise SerializationError(f"model file {path!r} is corrupted: bad format version {version}")
    document = metadata.get("document")
    if document is None:
        raise SerializationError(f"model file {path!r} is malformed: it holds no document")
    if hashlib.sha256(document.encode("utf-8", "surrogatepass")).hexdigest() != metadata.get("checksum"):
        raise SerializationError(f"model file {path!r} is corrupted: the checksum of its graph "
                                 f"and settings does not match")
    return version


# -- the document's schema: checked whole before anything is built from it

class _Schema:
    def problem(self, value: Any, where: str) -> str | None:
        raise NotImplementedError


class _Type(_Schema):
    """One of ``types``; an int is not a bool here, nor a float an int."""

    def __init__(self, *types: type) -> None:
        self.types = types

    def problem(self, value: Any, where: str) -> str | None:
        if isinstance(value, bool) and bool not in self.types:
            return f"{where} is a bool"
        if isinstance(value, self.types):
            return None
        names = " or ".join("null" if t is type(None) else t.__name__ for t in self.types)
        return f"{where} should be {names}, not {type(value).__name__}"


class _List(_Schema):
    def __init__(self, item: Any) -> None:
        self.item = _schema(item)

    def problem(self, value: Any, where: str) -> str | None:
        if not isinstance(value, list):
            return f"{where} should be a list, not {type(value).__name__}"
        return next((p for i, v in enumerate(value) if (p := self.item.problem(v, f"{where}[{i}]"))),
                    None)


class _Map(_Schema):
    """An object of any string keys, each value of one schema."""

    def __init__(self, item: Any) -> None:
        self.item = _schema(item)

    def problem(self, value: Any, where: str) -> str | None:
        if not isinstance(value, dict):
            return f"{where} should be an object, not {type(value).__name__}"
        return next((p for k, v in value.items() if (p := self.item.problem(v, f"{where}[{k!r}]"))),
                    None)


class _Object(_Schema):
    """An object with these keys (``optional`` ones may be absent); others are ignored."""

    def __init__(self, fields: dict[str, Any], optional: tuple[str, ...] = ()) -> None:
        self.fields = {k: _schema(v) for k, v in fields.items()}
        self.optional = optional

    def problem(self, value: Any, where: str) -> str | None:
        if not isinstance(value, dict):
            return f"{where} should be an object, not {type(value).__name__}"
        for key, schema in self.fields.items():
            if key not in value:
                if key in self.optional:
                    continue
                return f"{where}.{key} is missing"
            problem = schema.problem(value[key], f"{where}.{key}")
            if problem:
                return problem
        return None


class _Either(_Schema):
    def __init__(self, *options: Any) -> None:
        self.options = [_schema(o) for o in options]

    def problem(self, value: Any, where: str) -> str | None:
        problems = [o.problem(value, where) for o in self.options]
        return None if None in problems else problems[0]


class _Calls(_Schema):
    """Builder calls: each checked against the schema of its ``call``."""

    def problem(self, value: Any, where: str) -> str | None:
        if not isinstance(value, list):
            return f"{where} should be a list, not {type(value).__name__}"
        for i, call in enumerate(value):
            here = f"{where}[{i}]"
            if not isinstance(call, dict) or not isinstance(call.get("call"), str):
                return f"{here} is not a builder call"
            schema = _CALLS.get(call["call"])
            if schema is None:
                return (f"{here} is an unknown builder call {call['call']!r}: the file was "
                        f"written by another graphengine; upgrade (pip install -U graphengine)")
            problem = schema.problem(call, here)
            if problem:
                return problem
        return None


def _schema(value: Any) -> _Schema:
    if isinstance(value, _Schema):
        return value
    if isinstance(value, dict):
        return _Object(value)
    return _Type(*value) if isinstance(value, tuple) else _Type(value)


NULL = type(None)
_NAMES = _List(str)
_SIZE = _Type(int)
_APPLIED = {"kind": str, "inputs": _NAMES, "name": (str, NULL), "config": dict}
_FIELDS: dict[str, dict[str, Any]] = {
    "input": {"name": str, "shape": _List((int, NULL)), "dtype": str},
    "parameter": {"name": str, "shape": _List(int), "init": (str, dict),
                  "trainable": bool, "decay": (bool, NULL), "dtype": str},
    "constant": {"name": (str, NULL), "value": str, "dtype": str},
    **{kind: _APPLIED for kind in ("op", "layer", "activation", "loss")},
}
#: Each call may also name the name scope it was made in (absent: none).
_CALLS: dict[str, _Schema] = {call: _Object({**fields, "scope": str}, optional=("scope",))
                              for call, fields in _FIELDS.items()}
_SCALAR = (bool, int, float, str, NULL)
_DOCUMENT = _Object({
    "graph": {"name": str, "calls": _Calls(), "nodes": _NAMES},
    "model": _Object({
        "loss": (str, NULL), "outputs": _Either(_NAMES, NULL), "seed": int,
        "optimizer": _Either(_Object({"name": str, "hyperparameters": dict}), NULL),
        "frozen": _NAMES, "fitted_layers": _NAMES,
        "hooks": _List(_Either(_Object({"where": str, "class": str, "config": dict}),
                               _Object({"where": str, "class": str, "state": dict}))),
        "unsaved_hooks": _NAMES}),
    "plugins": _Map(_Map(_Object({"plugin": str, "distribution": (str, NULL)}))),
    "parameters": _Map(str),
    "training": _Either(NULL, _Object({
        "epoch": _SIZE, "step": _SIZE, "optimizer": (str, NULL),
        "optimizer_state": _Map(_Map(_Either(_Object({"tensor": str}),
                                             _Object({"value": _SCALAR})))),
        "rng": (dict, NULL), "data_rng": (dict, NULL)}, optional=("optimizer",))),
    "tensors": _Map(_Object({"dtype": str, "shape": _List(int), "sha256": str})),
}, optional=("plugins",))


def _check_document(path: str, text: str, version: int) -> dict[str, Any]:
    document = container.parse_json(text, f"the document of model file {path!r}")
    problem = _DOCUMENT.problem(document, "document")
    if problem is None and document["training"] is not None:
        for what in ("epoch", "step"):
            if document["training"][what] < 0:
                problem = f"document.training.{what} is negative"
    if problem:
        raise SerializationError(f"model file {path!r} is malformed: {problem}")
    return document


def _verify_tensors(path: str, document: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
    """The container's tensors are those the document lists, with its dtypes, shapes and
    checksums; every tensor the document refers to exists."""
    expected = document["tensors"]
    missing = sorted(expected.keys() - tensors.keys())
    if missing:
        raise SerializationError(f"model file {path!r} is corrupted: tensors {missing[:5]} are "
                                 f"missing")
    for key, array in tensors.items():
        entry = expected.get(key)
        if entry is None or entry["dtype"] != array.dtype.name or entry["shape"] != list(array.shape):
            raise SerializationError(f"model file {path!r} is corrupted: tensor {key!r} does not "
                                     f"match its dtype or shape; restore it from a backup or save "
                                     f"the model again")
    for key, array in tensors.items():
        if _digest(array)["sha256"] != expected[key]["sha256"]:
            raise SerializationError(f"model file {path!r} is corrupted: tensor {key!r} does not "
                                     f"match its checksum; restore it from a backup or save the "
                                     f"model again")
    references = [*document["parameters"].values(),
                  *(c["value"] for c in document["graph"]["calls"] if c["call"] == "constant")]
    if document["training"] is not None:
        references += [entry["tensor"] for entries in document["training"]["optimizer_state"].values()
                       for entry in entries.values() if "tensor" in entry]
    dangling = sorted(set(references) - tensors.keys())
    if dangling:
        raise SerializationError(f"model file {path!r} is malformed: it refers to tensors "
                                 f"{dangling[:5]}, which it does not hold")


# --------------------------------------------------------------------------- loading

def load(path: str | os.PathLike, *, backend: str | Backend = "numpy",
         optimizer: Optimizer | None = None) -> Model:
    """Rebuild a saved model: graph, parameters, frozen set, fitted preprocessing, training
    hooks and, if the file has it, the training state, so ``fit`` continues where the saved run
    stopped.

    The optimizer is rebuilt from its registered name and hyper-parameters; pass ``optimizer=``
    to use another (or where the file has none). The optimizer state in the file belongs to the
    optimizer that made it: resuming with an optimizer of another class starts that optimizer's
    state fresh; with the same class, the state must fit it and the parameters, else loading
    fails here, not in ``fit``.
    """
    backend = get_backend(backend)  # the caller's mistake, not the file's: raised as it is
    file = read(path)
    with _malformed(file.path):
        return _load(file, backend, optimizer)


@contextlib.contextmanager
def _malformed(path: str) -> Iterator[None]:
    """A file that passes its checks yet does not hold what it should (crafted, or from a
    broken writer) raises a SerializationError, not a KeyError from deep inside."""
    try:
        yield
    except SerializationError:
        raise
    except GraphEngineError as exc:
        raise SerializationError(f"model file {path!r} cannot be loaded: {exc}") from exc
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError,
            RecursionError) as exc:
        raise SerializationError(f"model file {path!r} is malformed: {type(exc).__name__}: "
                                 f"{exc}") from exc


def _load(file: ModelFile, backend: Backend, optimizer: Optimizer | None) -> Model:
    _check_plugins(file)
    graph = rebuild_graph(file)
    parameters = _check_parameters(file, graph)
    spec = file.document["model"]
    if optimizer is None and spec["optimizer"] is not None:
        try:
            optimizer = make_optimizer(spec["optimizer"]["name"],
                                       **spec["optimizer"]["hyperparameters"])
        except GraphEngineError as exc:
            raise SerializationError(f"model file {file.path!r}: cannot rebuild its optimizer "
                                     f"({exc}); pass optimizer=... to load()") from exc
    training = file.document["training"]
    optimizer_state = (_check_optimizer_state(file, optimizer, parameters, training)
                       if training is not None else {})
    for name in (*spec["frozen"], *([] if spec["outputs"] is None else spec["outputs"]),
                 *([spec["loss"]] if spec["loss"] else [])):
        if name not in graph.nodes:
            raise SerializationError(f"model file {file.path!r} is malformed: it names node "
                                     f"{name!r}, which its graph does not have")
    outputs = None if spec["outputs"] is None else [graph[n] for n in spec["outputs"]]
    # The file's arrays become the parameters: no initial values are made for them.
    model = graph.compile(loss=graph[spec["loss"]] if spec["loss"] else None, outputs=outputs,
                          optimizer=optimizer, backend=backend, seed=spec["seed"],
                          initial_values=parameters)
    if spec["frozen"]:
        model.freeze(*spec["frozen"])
    _restore_state(model, file, list(parameters), optimizer_state)
    _restore_hooks(model, file)
    return model


def _check_plugins(file: ModelFile) -> None:
    """Every kind the file uses is registered; else name the distribution that provided it."""
    manager = get_plugin_manager()
    for kind, names in file.document.get("plugins", {}).items():
        registry = manager.registries.get(kind)
        if registry is None:
            continue
        for name, origin in names.items():
            if name in registry:
                continue
            singular = "loss" if kind == "losses" else kind[:-1]
            if origin["distribution"]:
                install = (f"install the distribution {origin['distribution']!r} "
                           f"(pip install {origin['distribution']})")
            else:
                install = "register the plugin that provides it"
            raise SerializationError(
                f"model file {file.path!r} uses {singular} {name!r}, provided by plugin "
                f"{origin['plugin']!r} when it was saved, and no installed plugin registers it: "
                f"{install}; `graphengine plugins` lists what is installed")


def rebuild_graph(file: ModelFile) -> Graph:
    """Replay the saved builder calls; the nodes must come out named as they were saved."""
    spec = file.document["graph"]
    graph = Graph(spec["name"])
    for i, call in enumerate(spec["calls"]):
        try:
            _replay(graph, _unmark_tuples(call), file.tensors)
        except Exception as exc:  # a plugin's build() may fail in any way on a crafted config
            raise SerializationError(f"model file {file.path!r}: cannot rebuild builder call #{i} "
                                     f"({call['call']} {call.get('kind', call.get('name'))!r}): "
                                     f"{exc}") from exc
    if list(graph.nodes) != spec["nodes"]:
        extra = [n for n in graph.nodes if n not in spec["nodes"]][:3]
        lost = [n for n in spec["nodes"] if n not in graph.nodes][:3]
        raise SerializationError(
            f"model file {file.path!r}: the rebuilt graph differs from the saved one (new nodes "
            f"{extra}, missing {lost}); a plugin now builds a layer differently: install the "
            f"plugin version the model was saved with")
    return graph


def _replay(graph: Graph, call: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
    if "scope" in call:
        with graph.name_scope(call["scope"]):
            _replay(graph, {k: v for k, v in call.items() if k != "scope"}, tensors)
        return
    kind = call["call"]
    inputs = [graph[name] for name in call.get("inputs", ())]
    name = call.get("name")
    if kind == "input":
        graph.input(name, call["shape"], call["dtype"])
    elif kind == "parameter":
        graph.parameter(name, call["shape"], init=call["init"], trainable=call["trainable"],
                        decay=call["decay"], dtype=call["dtype"])
    elif kind == "constant":
        graph.constant(tensors[call["value"]], name=name, dtype=call["dtype"])
    else:
        build: Callable[..., Any] = getattr(graph, kind)  # op, layer, activation, loss: checked
        build(call["kind"], *inputs, name=name, **call["config"])


def _check_parameters(file: ModelFile, graph: Graph) -> dict[str, np.ndarray]:
    """The file's arrays for the graph's parameters, after checking that it holds exactly those,
    with their shapes and dtypes: compared before any parameter memory is allocated."""
    saved = file.parameters()
    needed = {name: graph.nodes[name].spec for name in graph.parameters()}
    missing = [n for n in needed if n not in saved]
    unexpected = [n for n in saved if n not in needed]
    if missing or unexpected:
        raise SerializationError(f"model file {file.path!r} is malformed: its graph has "
                                 f"parameters it does not hold ({missing[:5]}) or it holds "
                                 f"parameters its graph does not have ({unexpected[:5]})")
    for name, spec in needed.items():
        array = saved[name]
        if tuple(array.shape) != tuple(spec.shape) or array.dtype.name != spec.dtype:
            raise SerializationError(f"model file {file.path!r} is malformed: parameter {name!r} "
                                     f"is {array.dtype.name} {tuple(array.shape)}, its graph "
                                     f"declares {spec.dtype} {tuple(spec.shape)}")
    return {name: saved[name] for name in needed}


def _check_optimizer_state(file: ModelFile, optimizer: Optimizer | None,
                           parameters: dict[str, np.ndarray],
                           training: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The file's optimizer state, as host values, for the parameters in ``parameters``.

    The state belongs to the optimizer class that made it: for another class (or none) it is
    dropped, and that optimizer starts fresh. For the same class, each parameter's state must
    have the entries ``optimizer.init_state`` makes, of the same kinds and shapes; further
    entries (made on the way, as RMSProp's) must be arrays shaped like the parameter."""
    saved_class = training.get("optimizer")
    if optimizer is None or (saved_class is not None and saved_class != _class_name(optimizer)):
        return {}
    state: dict[str, dict[str, Any]] = {}
    for name, entries in training["optimizer_state"].items():
        if name not in parameters:
            continue  # a parameter this model does not load (load_weights, strict=False)
        param = parameters[name]
        values = {key: file.tensors[e["tensor"]] if "tensor" in e else e["value"]
                  for key, e in entries.items()}
        expected = optimizer.init_state(np, param)
        where = f"the optimizer state of parameter {name!r}"
        lost = sorted(expected.keys() - values.keys())
        if lost and values:
            raise SerializationError(
                f"model file {file.path!r}: {where} lacks {lost} that {type(optimizer).__name__} "
                f"keeps; the file does not fit this optimizer: load with another optimizer= to "
                f"start its state fresh, or save the model again")
        for key, value in values.items():
            model = expected.get(key, param)
            if not _same_kind(value, model):
                raise SerializationError(f"model file {file.path!r}: {where} has {key!r} = "
                                         f"{_show(value)}, {type(optimizer).__name__} keeps "
                                         f"{_show(model)}")
        if values:
            state[name] = values
    return state


def _same_kind(value: Any, model: Any) -> bool:
    """Whether a saved state value can stand for ``model`` (what the optimizer makes): an array
    of its dtype and shape, or a number of its kind (an int for an int, a float for a float)."""
    if isinstance(model, np.ndarray) or isinstance(value, np.ndarray):
        return (isinstance(model, np.ndarray) and isinstance(value, np.ndarray)
                and value.shape == model.shape and value.dtype == model.dtype)
    if isinstance(model, bool) or isinstance(value, bool):
        return type(value) is type(model)
    if isinstance(model, int):
        return isinstance(value, int)
    if isinstance(model, float):
        return isinstance(value, (int, float)) and np.isfinite(value)
    return type(value) is type(model)


def _show(value: Any) -> str:
    return f"an array {value.dtype} {value.shape}" if isinstance(value, np.ndarray) else repr(value)


def _restore_hooks(model: Model, file: ModelFile) -> None:
    """The training hooks, made again through their constructors (which check their
    arguments), and their parameter selections checked against the model."""
    for entry in file.document["model"]["hooks"]:
        known = regularization.SAVEABLE.get(entry["class"])
        if known is None or known[1] != entry["where"]:
            raise SerializationError(f"model file {file.path!r} names an unknown training hook "
                                     f"{entry['class']!r} in {entry['where']!r}; upgrade "
                                     f"graphengine (pip install -U graphengine)")
        cls, where = known
        config = _unmark_tuples(entry["config"]) if "config" in entry else _legacy_config(cls, entry)
        try:
            hook = cls(**config)
            if getattr(hook, "params", None) is not None:
                regularization.select_parameters(model, hook.params, repr(hook))
            if isinstance(hook, regularization.Schedule) and model.optimizer is None:
                raise GraphEngineError("a schedule needs an optimizer whose lr it can change")
        except (GraphEngineError, TypeError) as exc:
            raise SerializationError(f"model file {file.path!r}: its training hook "
                                     f"{entry['class']} is invalid: {exc}") from exc
        getattr(model, where).append(hook)
    if file.document["model"]["unsaved_hooks"]:
        warnings.warn(f"model file {file.path!r} was compiled with training hooks that cannot be "
                      f"saved: {file.document['model']['unsaved_hooks']}; append them to "
                      f"model.gradient_transforms / model.constraints again before training",
                      stacklevel=3)


def _legacy_config(cls: type, entry: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments from a version-1 file, which saved a hook's attributes: its own
    ``config()`` reads them back, and the constructor then checks them."""
    hook = cls.__new__(cls)
    hook.__dict__.update({k: tuple(v) if isinstance(v, list) and k == "axis" else v
                          for k, v in entry["state"].items()})
    return hook.config()


@dataclass
class LoadReport:
    """What :func:`load_weights` did: parameters loaded, in the model but not the file
    (``missing``), in the file but not the model (``unexpected``), and of another shape."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    def __str__(self) -> str:
        parts = [f"loaded {len(self.loaded)}"]
        parts += [f"{what} {names}" for what, names in (("missing", self.missing),
                                                         ("unexpected", self.unexpected),
                                                         ("mismatched", self.mismatched)) if names]
        return "; ".join(parts)


def load_weights(model: Model, source: str | os.PathLike | ModelFile, *, strict: bool = True,
                 training_state: bool = False) -> LoadReport:
    """Copy parameters from a model file into ``model`` by name: to fine-tune a new graph that
    shares layers with a saved one, load with ``strict=False`` and read the report.

    ``strict=True`` requires the same parameter names and shapes (nothing is loaded otherwise).
    ``training_state=True`` also restores the optimizer state (of the parameters loaded, when
    the model's optimizer is of the class that made it; see :func:`load`), epoch, step and RNG
    states, to resume training a model built by code. Everything is checked before the model
    changes.
    """
    file = source if isinstance(source, ModelFile) else read(source)
    with _malformed(file.path):
        return _load_weights(model, file, strict, training_state)


def _load_weights(model: Model, file: ModelFile, strict: bool, training_state: bool) -> LoadReport:
    saved = file.parameters()
    own = model.parameters()
    report = LoadReport(missing=[n for n in own if n not in saved],
                        unexpected=[n for n in saved if n not in own])
    for name in own:
        if name in saved and tuple(saved[name].shape) != tuple(own[name].shape):
            report.mismatched[name] = (tuple(saved[name].shape), tuple(own[name].shape))
    if strict and (report.missing or report.unexpected or report.mismatched):
        raise SerializationError(f"{file.path!r} does not match model {model.graph.name!r}: "
                                 f"{report}; pass strict=False to load the parameters that match")
    report.loaded = [n for n in own if n in saved and n not in report.mismatched]
    optimizer_state: dict[str, dict[str, Any]] = {}
    if training_state:
        training = file.document["training"]
        if training is None:
            raise SerializationError(f"{file.path!r} holds no training state (it was saved with "
                                     f"training_state=False)")
        loaded = {n: saved[n].astype(model.parameters()[n].dtype, copy=False)
                  for n in report.loaded}
        optimizer_state = _check_optimizer_state(file, model.optimizer, loaded, training)
        _check_rng_states(model, file)
    model.set_parameters({n: saved[n] for n in report.loaded})
    _restore_state(model, file, report.loaded, optimizer_state if training_state else None)
    return report


def _check_rng_states(model: Model, file: ModelFile) -> None:
    """The saved generator states fit the model's generators: tried on fresh ones first."""
    for what, rng in (("rng", model.rng), ("data_rng", model.data_rng)):
        saved = file.document["training"][what]
        if saved is None or getattr(rng, "bit_generator", None) is None:
            continue
        try:
            set_rng_state(np.random.Generator(type(rng.bit_generator)()), saved)
        except (TypeError, ValueError, KeyError, OverflowError) as exc:
            raise SerializationError(f"model file {file.path!r}: its {what} state does not fit "
                                     f"the generator ({type(exc).__name__}: {exc})") from None


def _restore_state(model: Model, file: ModelFile, loaded: list[str],
                   optimizer_state: dict[str, dict[str, Any]] | None) -> None:
    """Fitted preprocessing of the layers loaded, and with ``optimizer_state`` (checked by
    :func:`_check_optimizer_state`) the training state."""
    model.fitted_layers |= {scope for scope in file.document["model"]["fitted_layers"]
                            if any(in_scope(n, scope) for n in loaded)}
    state = file.document["training"]
    if optimizer_state is None or state is None:
        return
    _check_rng_states(model, file)
    set_rng_state(model.rng, state["rng"])
    set_rng_state(model.data_rng, state["data_rng"])
    backend = model.backend
    model.optimizer_state = {
        param: {key: backend.asarray(value) if isinstance(value, np.ndarray) else value
                for key, value in entries.items()}
        for param, entries in optimizer_state.items()}
    model.epoch = require_int(state["epoch"], "epoch", 0, SerializationError)
    model.step_count = require_int(state["step"], "step", 0, SerializationError)
