"""Model files: a JSON graph spec plus weights, in one safetensors file. Never pickle.

Layout (one file, readable by any safetensors tool)::

    8 bytes    little-endian length N of the header
    N bytes    JSON header: each tensor's dtype, shape and offsets, and ``__metadata__`` with
               format        "graphengine-model"
               format_version  FORMAT_VERSION as a string
               document      JSON: the graph (its builder calls, replayed to rebuild it), the
                             model (loss, outputs, seed, optimizer by registered name and
                             hyper-parameters, frozen parameters, fitted preprocessing), the
                             training state (epoch, step, RNG states, optimizer state) and, for
                             every tensor, its dtype, shape and SHA-256
               checksum      SHA-256 of ``document``
    the rest   raw tensor bytes: parameters, constants, optimizer state

Loading parses JSON and raw little-endian arrays only: nothing in a file can run code. Layers and
operators are rebuilt from registered plugins by name, with JSON configuration. Writes are
atomic (temporary file, fsync, rename, fsync of the directory), so a crash mid-save leaves the
previous file as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import GraphEngineError, SerializationError
from ..hooks import get_plugin_manager
from ..ir.graph import Graph, in_scope
from ..train import regularization
from ..train.update import optimizer as make_optimizer

if TYPE_CHECKING:
    from ..ir.contracts import Optimizer
    from ..model import Model
    from ..runtime.backend import Backend

FORMAT = "graphengine-model"
#: Bumped whenever a file written by this version could not be read by an older one.
FORMAT_VERSION = 1
_HEADER_LIMIT = 100 * 2**20  # a larger header is not a model file (or a hostile one)


# --------------------------------------------------------------------------- writing

def save(model: Model, path: str | os.PathLike, *, training_state: bool = True) -> None:
    """Write ``model`` to ``path`` atomically: its graph, parameters (the non-trainable ones
    too, such as batch-norm running statistics and fitted preprocessing) and, with
    ``training_state``, what resuming training needs (optimizer state, epoch, step, and the
    states of the dropout and shuffling generators)."""
    tensors: dict[str, np.ndarray] = {}
    document = {
        "graph": _describe_graph(model.graph, tensors),
        "model": _describe_model(model),
        "parameters": {name: _put(tensors, f"param:{name}", model.backend.to_numpy(value))
                       for name, value in model.parameters().items()},
        "training": _describe_training(model, tensors) if training_state else None,
    }
    document["tensors"] = {key: _digest(array) for key, array in tensors.items()}
    try:
        atomic_write(path, _encode(document, tensors))
    except OSError as exc:
        raise SerializationError(f"cannot write model file {os.fspath(path)!r}: {exc}") from None


def _put(tensors: dict[str, np.ndarray], key: str, array: Any) -> str:
    tensors[key] = np.ascontiguousarray(array)
    return key


def _describe_graph(graph: Graph, tensors: dict[str, np.ndarray]) -> dict[str, Any]:
    calls = []
    for i, call in enumerate(graph.calls):
        if call["call"] == "constant":
            call = {**call, "value": _put(tensors, f"constant:{i}", call["value"])}
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
        if value.keys() == {"__tuple__"}:
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
    max-norm), as class name + attributes. Only classes of :mod:`graphengine.train.regularization`
    are saved, and only with plain-data attributes; anything else (a function, a custom
    schedule) is listed by ``repr`` so that ``load`` can say it must be attached again."""
    saved, unsaved = [], []
    for where in ("gradient_transforms", "constraints"):
        for hook in getattr(model, where):
            state = getattr(hook, "__dict__", None)
            if type(hook).__module__ == "graphengine.train.regularization" and _is_plain(state):
                saved.append({"where": where, "class": type(hook).__name__, "state": state})
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
    return {"epoch": model.epoch, "step": model.step_count, "optimizer_state": state,
            "rng": rng_state(model.rng), "data_rng": rng_state(model.data_rng)}


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
            "sha256": hashlib.sha256(array.tobytes()).hexdigest()}


def _is_plain(value: Any) -> bool:
    """Whether ``value`` is plain data that JSON keeps (numbers, strings, lists, dicts)."""
    try:
        json.dumps(value, default=_json_default)
    except TypeError:
        return False
    return value is not None


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} {value!r}")


def _encode(document: dict[str, Any], tensors: dict[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save as safetensors_save
    try:
        text = json.dumps(document, default=_json_default)
    except TypeError as exc:
        raise SerializationError(f"the model cannot be written as JSON: a layer, operator or "
                                 f"optimizer configuration holds {exc}; use plain numbers, "
                                 f"strings, lists and dicts in configurations") from None
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "document": text,
                "checksum": hashlib.sha256(text.encode()).hexdigest()}
    return safetensors_save(tensors, metadata=metadata)


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` by ``data`` all at once: readers (and a crash) see the old file or the new
    one, never a mixture. The data go to a temporary file in the same directory, are flushed to
    the disk (fsync), then renamed over ``path``; the directory is fsynced so the rename lasts."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                                     suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, os.stat(path).st_mode if os.path.exists(path) else 0o644)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    with contextlib.suppress(OSError):  # not every platform can open a directory
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# --------------------------------------------------------------------------- reading

@dataclass
class ModelFile:
    """A verified model file: its document and tensors (host arrays)."""

    path: str
    document: dict[str, Any]
    tensors: dict[str, np.ndarray]

    def parameters(self) -> dict[str, np.ndarray]:
        return {name: self.tensors[key] for name, key in self.document["parameters"].items()}


def read(path: str | os.PathLike) -> ModelFile:
    """Read and verify a model file: format, version, checksums. Raises SerializationError
    saying what is wrong (not a model file, a pickle, newer version, truncated, corrupted)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise SerializationError(f"cannot read model file {path!r}: {exc}") from None
    metadata = _read_metadata(path, data)
    from safetensors import SafetensorError
    from safetensors.numpy import load as safetensors_load
    try:
        tensors = safetensors_load(data)
    except SafetensorError as exc:
        raise SerializationError(f"model file {path!r} is truncated or corrupted ({exc}); "
                                 f"restore it from a backup or save the model again") from None
    document = _check_document(path, metadata["document"])
    _verify_tensors(path, document["tensors"], tensors)
    return ModelFile(path, document, tensors)


def _read_metadata(path: str, data: bytes) -> dict[str, str]:
    if data[:1] == b"\x80" or data[:4] == b"PK\x03\x04":
        what = "a pickle" if data[:1] == b"\x80" else "a zip archive (npz, or a pickled torch file)"
        raise SerializationError(
            f"{path!r} is {what}, not a graphengine model file; graphengine never unpickles "
            f"(unpickling runs code from the file): load the arrays with their own tool "
            f"(np.load(..., allow_pickle=False)) and model.set_parameters(...)")
    if len(data) < 8:
        raise SerializationError(f"model file {path!r} is truncated ({len(data)} bytes)")
    (length,) = struct.unpack("<Q", data[:8])
    if length > min(len(data) - 8, _HEADER_LIMIT):
        raise SerializationError(
            f"model file {path!r} is truncated or not a model file: its header claims {length} "
            f"bytes, the file has {len(data) - 8} after the length field; restore it from a "
            f"backup or save the model again")
    try:
        header = json.loads(data[8:8 + length])
        metadata = header.get("__metadata__") or {}
    except (ValueError, AttributeError):
        raise SerializationError(f"model file {path!r} is corrupted: its header is not valid "
                                 f"JSON") from None
    if metadata.get("format") != FORMAT:
        raise SerializationError(
            f"{path!r} is not a graphengine model file (no {FORMAT!r} metadata); a plain "
            f"safetensors file of weights loads with safetensors.numpy.load_file and "
            f"model.set_parameters(...)")
    try:
        version = int(metadata["format_version"])
    except (KeyError, ValueError):
        raise SerializationError(f"model file {path!r} is corrupted: bad format version "
                                 f"{metadata.get('format_version')!r}") from None
    if version > FORMAT_VERSION:
        raise SerializationError(
            f"model file {path!r} has format version {version}, written by a newer graphengine; "
            f"this one reads versions up to {FORMAT_VERSION}: upgrade (pip install -U graphengine)")
    text = metadata.get("document", "")
    if hashlib.sha256(text.encode()).hexdigest() != metadata.get("checksum"):
        raise SerializationError(f"model file {path!r} is corrupted: the checksum of its graph "
                                 f"and settings does not match")
    return metadata


#: The document's parts and their types; a file that passes its checksum but not this was
#: crafted or written by a broken writer, and is refused before anything uses it.
_DOCUMENT_SCHEMA: dict[str, Any] = {
    "graph": {"name": str, "calls": list, "nodes": list},
    "model": {"loss": (str, type(None)), "outputs": (list, type(None)), "seed": int,
              "optimizer": (dict, type(None)), "frozen": list, "fitted_layers": list,
              "hooks": list, "unsaved_hooks": list},
    "parameters": dict,
    "training": (dict, type(None)),
    "tensors": dict,
}


def _check_document(path: str, text: str) -> dict[str, Any]:
    try:
        document = json.loads(text)
    except ValueError:
        document = None
    problems = _schema_problems(document, _DOCUMENT_SCHEMA, "document")
    if problems:
        raise SerializationError(f"model file {path!r} is malformed: {problems[0]}")
    return document


def _schema_problems(value: Any, schema: Any, where: str) -> list[str]:
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return [f"{where} is not an object"]
        return [problem for key, part in schema.items()
                for problem in (_schema_problems(value[key], part, f"{where}.{key}")
                                if key in value else [f"{where}.{key} is missing"])]
    return [] if isinstance(value, schema) else [f"{where} has type {type(value).__name__}"]


def _verify_tensors(path: str, expected: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
    missing = sorted(expected.keys() - tensors.keys())
    if missing:
        raise SerializationError(f"model file {path!r} is corrupted: tensors {missing} are missing")
    for key, array in tensors.items():
        if key not in expected or _digest(array) != expected[key]:
            raise SerializationError(f"model file {path!r} is corrupted: tensor {key!r} does not "
                                     f"match its checksum, dtype or shape; restore it from a "
                                     f"backup or save the model again")


# --------------------------------------------------------------------------- loading

def load(path: str | os.PathLike, *, backend: str | Backend = "numpy",
         optimizer: Optimizer | None = None) -> Model:
    """Rebuild a saved model: graph, parameters, frozen set, fitted preprocessing and, if the
    file has it, the training state, so ``fit`` continues where the saved run stopped.

    The optimizer is rebuilt from its registered name and hyper-parameters; pass ``optimizer=``
    to use another (or where the file has none).
    """
    file = read(path)
    with _malformed(file.path):
        return _load(file, backend, optimizer)


@contextlib.contextmanager
def _malformed(path: str) -> Iterator[None]:
    """A file that passes its checksums yet does not hold what it should (crafted, or from a
    broken writer) raises a SerializationError, not a KeyError from deep inside."""
    try:
        yield
    except GraphEngineError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise SerializationError(f"model file {path!r} is malformed: {type(exc).__name__}: "
                                 f"{exc}") from exc


def _load(file: ModelFile, backend: str | Backend, optimizer: Optimizer | None) -> Model:
    graph = rebuild_graph(file)
    spec = file.document["model"]
    if optimizer is None and spec["optimizer"] is not None:
        try:
            optimizer = make_optimizer(spec["optimizer"]["name"],
                                       **spec["optimizer"]["hyperparameters"])
        except GraphEngineError as exc:
            raise SerializationError(f"model file {file.path!r}: cannot rebuild its optimizer "
                                     f"({exc}); pass optimizer=... to load()") from exc
    outputs = None if spec["outputs"] is None else [graph[n] for n in spec["outputs"]]
    model = graph.compile(loss=graph[spec["loss"]] if spec["loss"] else None, outputs=outputs,
                          optimizer=optimizer, backend=backend, seed=spec["seed"])
    load_weights(model, file, strict=True, training_state=file.document["training"] is not None)
    if spec["frozen"]:
        model.freeze(*spec["frozen"])
    _restore_hooks(model, file)
    return model


def _restore_hooks(model: Model, file: ModelFile) -> None:
    for entry in file.document["model"]["hooks"]:
        cls = getattr(regularization, entry["class"], None)
        if not isinstance(cls, type) or cls.__module__ != regularization.__name__ or entry[
                "where"] not in ("gradient_transforms", "constraints"):
            raise SerializationError(f"model file {file.path!r} names an unknown training hook "
                                     f"{entry['class']!r}; upgrade graphengine (pip install -U "
                                     f"graphengine)")
        hook = cls.__new__(cls)  # attributes as saved, not re-derived from constructor arguments
        hook.__dict__.update({k: _tuples(v) for k, v in entry["state"].items()})
        getattr(model, entry["where"]).append(hook)
    if file.document["model"]["unsaved_hooks"]:
        warnings.warn(f"model file {file.path!r} was compiled with training hooks that cannot be "
                      f"saved: {file.document['model']['unsaved_hooks']}; append them to "
                      f"model.gradient_transforms / model.constraints again before training",
                      stacklevel=3)


def _tuples(value: Any) -> Any:
    """JSON turned tuples (axes) into lists; hooks expect tuples."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def rebuild_graph(file: ModelFile) -> Graph:
    """Replay the saved builder calls; the nodes must come out named as they were saved."""
    spec = file.document["graph"]
    graph = Graph(spec["name"])
    for i, call in enumerate(spec["calls"]):
        try:
            _replay(graph, _unmark_tuples(call), file.tensors)
        except (GraphEngineError, KeyError, TypeError, ValueError) as exc:
            raise SerializationError(f"model file {file.path!r}: cannot rebuild builder call #{i} "
                                     f"({call.get('call')} {call.get('kind', call.get('name'))!r}): "
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
    elif kind == "op":
        graph.op(call["kind"], *inputs, name=name, **call["config"])
    elif kind == "layer":
        graph.layer(call["kind"], *inputs, name=name, **call["config"])
    elif kind == "activation":
        graph.activation(call["kind"], *inputs, name=name, **call["config"])
    elif kind == "loss":
        graph.loss(call["kind"], *inputs, name=name, **call["config"])
    else:
        raise SerializationError(f"unknown builder call {kind!r}: the file was written by another "
                                 f"graphengine; upgrade (pip install -U graphengine)")


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
    ``training_state=True`` also restores the optimizer state, epoch, step and RNG states, to
    resume training a model built by code.
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
    model.set_parameters({n: saved[n] for n in report.loaded})
    model.fitted_layers |= {scope for scope in file.document["model"]["fitted_layers"]
                            if any(in_scope(n, scope) for n in report.loaded)}
    if training_state:
        _restore_training(model, file)
    return report


def _restore_training(model: Model, file: ModelFile) -> None:
    state = file.document["training"]
    if state is None:
        raise SerializationError(f"{file.path!r} holds no training state (it was saved with "
                                 f"training_state=False)")
    backend = model.backend
    model.optimizer_state = {
        param: {key: backend.asarray(file.tensors[entry["tensor"]]) if "tensor" in entry
                else entry["value"] for key, entry in entries.items()}
        for param, entries in state["optimizer_state"].items()}
    model.epoch, model.step_count = state["epoch"], state["step"]
    set_rng_state(model.rng, state["rng"])
    set_rng_state(model.data_rng, state["data_rng"])
