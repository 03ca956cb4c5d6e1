"""Building graphs: the Graph builder, symbolic Tensor handles and nodes.

Nodes live in a networkx DiGraph (edges run from an input to its consumer). Every node's shape
and dtype are inferred when it is added, so mistakes surface at build time, naming the node.
"""

from __future__ import annotations

import contextlib
import itertools
import numbers
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import networkx as nx
import numpy as np

from ..errors import (
    GraphBuildError,
    GraphEngineError,
    ShapeError,
    checked_keywords,
    option_names,
    positional_hint,
    unknown_options,
)
from ..hooks import get_plugin_manager
from ..ir.contracts import ActivationOp, LossOp
from ..ir.operators import (
    DTYPES,
    PRIMITIVES,
    Constant,
    Input,
    Operator,
    Parameter,
    Shape,
    Source,
    TensorSpec,
    encode_index,
)

if TYPE_CHECKING:
    from ..distributed import Communicator
    from ..ir.contracts import Optimizer
    from ..model import Model  # noqa: F401 (the type compile() returns)
    from ..runtime.backend import Backend
    from ..train.regularization import Schedule

class GraphBuildWarning(UserWarning):
    """A graph that builds but is probably not what was meant (softmax applied twice, ...)."""


#: What ``Graph.compile`` builds (the engine's ``Model``), set by ``graphengine.model`` when it is
#: imported: a graph is a description and does not import the runtime that runs it.
compiler: Callable[..., Model] | None = None



@dataclass(slots=True)  # no __dict__: one object fewer per node for the garbage collector
class Node:
    name: str
    op: Operator
    inputs: tuple[str, ...]
    spec: TensorSpec
    layer: str | None = None  # the name scope (layer) that built this node
    origin: str | None = None  # "file.py:12" of the user code that built it

    @property
    def kind(self) -> str:
        return self.op.kind

    @property
    def shape(self) -> Shape:
        return self.spec.shape

    @property
    def dtype(self) -> str:
        return self.spec.dtype


class Tensor:
    """A symbolic handle on a node's output. Arithmetic on tensors adds nodes to their graph."""

    __slots__ = ("graph", "name")
    # NumPy defers to our reflected operators: ``array - x`` is a node, not an object array of them.
    __array_ufunc__ = None

    def __init__(self, graph: Graph, name: str) -> None:
        self.graph = graph
        self.name = name

    @property
    def node(self) -> Node:
        return self.graph.nodes[self.name]

    @property
    def shape(self) -> Shape:
        return self.node.spec.shape

    @property
    def dtype(self) -> str:
        return self.node.spec.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:
        return f"<Tensor {self.name!r} {self.node.spec} from {self.node.kind}>"

    def _binary(self, kind: str, other: Any, reverse: bool = False) -> Tensor:
        with self.graph.atomic():  # no stray constant is left if the operator fails
            other = self.graph.as_tensor(other, like=self)
            a, b = (other, self) if reverse else (self, other)
            return self.graph.op(kind, a, b)

    def __add__(self, other): return self._binary("add", other)
    def __radd__(self, other): return self._binary("add", other, reverse=True)
    def __sub__(self, other): return self._binary("sub", other)
    def __rsub__(self, other): return self._binary("sub", other, reverse=True)
    def __mul__(self, other): return self._binary("mul", other)
    def __rmul__(self, other): return self._binary("mul", other, reverse=True)
    def __truediv__(self, other): return self._binary("div", other)
    def __rtruediv__(self, other): return self._binary("div", other, reverse=True)
    def __matmul__(self, other): return self._binary("matmul", other)
    def __rmatmul__(self, other): return self._binary("matmul", other, reverse=True)
    def __neg__(self): return self.graph.op("neg", self)

    def __pow__(self, exponent: float | Tensor) -> Tensor:
        if isinstance(exponent, numbers.Real):
            return self.graph.op("pow", self, exponent=exponent)
        return self._binary("power", exponent)

    def __rpow__(self, base: Any) -> Tensor:
        return self._binary("power", base, reverse=True)

    def __getitem__(self, key: Any) -> Tensor:
        key = key if isinstance(key, tuple) else (key,)
        return self.graph.op("index", self, key=[encode_index(k) for k in key])

    def exp(self) -> Tensor: return self.graph.op("exp", self)
    def log(self) -> Tensor: return self.graph.op("log", self)
    def sqrt(self) -> Tensor: return self.graph.op("sqrt", self)
    def abs(self) -> Tensor: return self.graph.op("abs", self)

    def sum(self, axis: int | tuple[int, ...] | None = None, keepdims: bool = False) -> Tensor:
        return self.graph.op("sum", self, axis=axis, keepdims=keepdims)

    def mean(self, axis: int | tuple[int, ...] | None = None, keepdims: bool = False) -> Tensor:
        return self.graph.op("mean", self, axis=axis, keepdims=keepdims)

    def max(self, axis: int | tuple[int, ...] | None = None, keepdims: bool = False) -> Tensor:
        """The largest element along ``axis``; tied elements share the gradient evenly."""
        return self.graph.op("max", self, axis=axis, keepdims=keepdims)

    def min(self, axis: int | tuple[int, ...] | None = None, keepdims: bool = False) -> Tensor:
        """The smallest element along ``axis``; tied elements share the gradient evenly."""
        return self.graph.op("min", self, axis=axis, keepdims=keepdims)

    def var(self, axis: int | tuple[int, ...] | None = None, keepdims: bool = False,
            ddof: int = 0) -> Tensor:
        """Variance along ``axis``, divided by ``N - ddof``: ``ddof=0`` is numpy's default and
        torch's ``correction=0``; ``ddof=1`` is torch's default."""
        return self.graph.op("var", self, axis=axis, keepdims=keepdims, ddof=ddof)

    def std(self, axis: int | tuple[int, ...] | None = None, keepdims: bool = False,
            ddof: int = 0) -> Tensor:
        """Standard deviation along ``axis``, the root of :meth:`var` (same ``ddof``)."""
        return self.graph.op("std", self, axis=axis, keepdims=keepdims, ddof=ddof)

    def clip(self, lo: float | None = None, hi: float | None = None) -> Tensor:
        """``x`` limited to ``[lo, hi]`` (None: that side open), as torch.clamp."""
        return self.graph.op("clip", self, lo=lo, hi=hi)

    def squeeze(self, axis: int | tuple[int, ...] | None = None) -> Tensor:
        """Remove axes of size 1 (``axis``, or all of known size 1)."""
        return self.graph.op("squeeze", self, axis=axis)

    def expand_dims(self, axis: int) -> Tensor:
        """Insert an axis of size 1 at ``axis`` (torch.unsqueeze)."""
        return self.graph.op("expand_dims", self, axis=axis)

    def astype(self, dtype: Any) -> Tensor:
        """The tensor cast to ``dtype`` (a name such as ``"float64"``, or a numpy dtype)."""
        if dtype is not None:  # np.dtype(None) would be float64
            with contextlib.suppress(TypeError, ValueError):  # the operator refuses a bad name
                dtype = np.dtype(dtype).name
        return self.graph.op("astype", self, dtype=str(dtype))

    def softmax(self, axis: int = -1) -> Tensor:
        """softmax along ``axis``."""
        return self.graph.op("softmax", self, axis=axis)

    def log_softmax(self, axis: int = -1) -> Tensor:
        """log(softmax) along ``axis``, computed without overflow."""
        return self.graph.op("log_softmax", self, axis=axis)

    def reshape(self, *shape: int | None) -> Tensor:
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return self.graph.op("reshape", self, shape=shape)

    def transpose(self, *axes: int) -> Tensor:
        return self.graph.op("transpose", self, axes=axes or None)

    @property
    def T(self) -> Tensor:
        return self.transpose()


class Graph:
    """A static computation graph under construction.

    >>> g = Graph("mlp")
    >>> x = g.input("x", shape=(None, 64))
    >>> h = g.activation("relu", g.layer("dense", x, units=32, name="fc1"))
    """

    def __init__(self, name: str = "graph") -> None:
        self.name = name
        #: The graph: each node names its inputs. Builder calls only take existing tensors, so
        #: the order nodes are added in is a topological order, and no cycle can arise.
        self.nodes: dict[str, Node] = {}
        #: Node -> the nodes that read it, in the order they were added: built when first asked
        #: for (drawing, an error message), dropped when a node is added or removed. Kept up to
        #: date on every added node, it cost a list per node; a networkx DiGraph kept beside
        #: ``nodes`` cost 2-3 dicts per node and building a graph of 32k nodes 25-30% more time,
        #: most of it garbage collection, which traverses every container a graph keeps.
        self._readers: dict[str, list[str]] | None = None
        #: Each distinct TensorSpec of the graph once (most nodes share a few), for the same
        #: reason: the garbage collector's traversals cost per object kept.
        self._specs: dict[TensorSpec, TensorSpec] = {}
        #: The top-level builder calls, in order: replaying them rebuilds the graph (saving).
        #: Their inputs are tuples of names, so that once a full collection has found nothing
        #: in a call to traverse (primitives' calls hold only strings) it stops tracking it.
        self.calls: list[dict[str, Any]] = []
        self._scopes: list[str] = []
        self._depth = 0
        self._counters: dict[str, int] = {}
        self._origin: str | None = None
        # Kept in step with ``nodes`` so that the checks of each added node cost O(1), not a
        # scan of the graph (which made building quadratic): ids of the nodes' operators, and
        # how many nodes lie under each scope (every "a" and "a/b" of a node "a/b/c").
        self._op_owners: dict[int, str] = {}  # id(operator) -> its node
        self._scope_nodes: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<Graph {self.name!r}: {len(self.nodes)} nodes>"

    def __contains__(self, name: str) -> bool:
        return name in self.nodes

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.nodes:
            raise GraphBuildError(f"graph {self.name!r} has no node {name!r}")
        return Tensor(self, name)

    # -- naming ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def name_scope(self, scope: str) -> Iterator[None]:
        """Nodes created inside are named ``scope/...`` and belong to layer ``scope``."""
        self._scopes.append(scope)
        try:
            yield
        finally:
            self._scopes.pop()

    def _full_name(self, name: str | None, kind: str) -> str:
        prefix = "/".join(self._scopes)
        if name is None:
            base = f"{prefix}/{kind}" if prefix else kind
            n = self._counters.get(base, 0)
            while True:
                candidate = base if n == 0 and prefix else f"{base}_{n}"
                n += 1
                if candidate not in self.nodes:
                    self._counters[base] = n
                    return candidate
        if not isinstance(name, str) or not name:
            raise GraphBuildError(f"node names must be non-empty strings, got {name!r}")
        full = f"{prefix}/{name}" if prefix else name
        if full in self.nodes:
            raise GraphBuildError(f"graph {self.name!r} already has a node named {full!r}; "
                                  f"pass another name=")
        return full

    # -- recording (saved graphs replay these calls) ---------------------------------------

    @contextlib.contextmanager
    def _recording(self, call: dict[str, Any]) -> Iterator[None]:
        """Wrap one builder call. A top-level call is logged once it succeeds; if it fails,
        the nodes it added are removed again, so a failed call leaves the graph as it was."""
        top = self._depth == 0
        if top:
            self._origin = _user_origin()
            before = len(self.nodes)
            if self._scopes:  # replayed inside the same name scope, it names its nodes alike
                call["scope"] = "/".join(self._scopes)
        self._depth += 1
        try:
            yield
        except BaseException:
            if top:
                self._remove_nodes_after(before)
            raise
        finally:
            self._depth -= 1
        if top:
            self.calls.append(call)

    @contextlib.contextmanager
    def atomic(self) -> Iterator[None]:
        """Builder calls that stand or fall together: if one fails, those before it in the block
        are undone too (``x + array`` adds a constant, then the operator using it)."""
        nodes, calls = len(self.nodes), len(self.calls)
        try:
            yield
        except BaseException:
            self._remove_nodes_after(nodes)
            del self.calls[calls:]
            raise

    def _remove_nodes_after(self, count: int) -> None:
        # From the end, so that undoing a failed call costs what it added, not the graph's size.
        for name in list(itertools.islice(reversed(self.nodes), len(self.nodes) - count)):
            node = self.nodes.pop(name)
            del self._op_owners[id(node.op)]
            for scope in _scopes_of(name):
                left = self._scope_nodes[scope] - 1
                if left:
                    self._scope_nodes[scope] = left
                else:
                    del self._scope_nodes[scope]
        self._readers = None

    # -- adding nodes ----------------------------------------------------------------------

    def _check_inputs(self, where: str, inputs: Sequence[Any]) -> None:
        """Refuse an input that is not a tensor of this graph before anything is added or
        recorded: a builder call refers to its inputs by node name, so nothing else can be one."""
        for position, value in enumerate(inputs, start=1):
            if isinstance(value, Tensor) and value.graph is self:
                continue
            if isinstance(value, Tensor):
                what = f"tensor {value.name!r}, which belongs to graph {value.graph.name!r}"
            elif isinstance(value, str):
                named = f" (the node of that name is g[{value!r}])" if value in self.nodes else ""
                what = f"a str {value!r}{named}"
            else:
                kind = type(value)
                module = "" if kind.__module__ == "builtins" else f"{kind.__module__}."
                shape = f" of shape {value.shape}" if hasattr(value, "shape") else ""
                what = f"a {module}{kind.__qualname__}{shape}"
            raise GraphBuildError(
                f"{where}: input {position} of {len(inputs)} is {what}, not a tensor of graph "
                f"{self.name!r}: pass a tensor this graph built (g.input, g.parameter, a layer's "
                f"output), or add a fixed array to it with g.constant(array)")

    def _add(self, op: Operator, inputs: Sequence[Tensor], name: str) -> Tensor:
        self._check_inputs(f"node {name!r} ({op.kind})", inputs)
        owner = self._op_owners.get(id(op))
        if owner is not None:
            raise GraphBuildError(f"node {name!r}: operator {op!r} already belongs to node "
                                  f"{owner!r}; create one operator instance per node")
        specs = [t.node.spec for t in inputs]
        try:
            spec = op.infer(*specs)
        except ShapeError as exc:
            shapes = ", ".join(f"{t.name} {t.node.spec}" for t in inputs)
            raise ShapeError(f"node {name!r} ({op.kind}): {exc} [inputs: {shapes}]") from None
        except GraphEngineError:
            raise
        except Exception as exc:  # wrong number of inputs, a nonsensical config, a plugin's bug
            shapes = ", ".join(f"{t.name} {t.node.spec}" for t in inputs)
            raise GraphBuildError(f"node {name!r} ({op.kind}) cannot infer its output from inputs "
                                  f"[{shapes}] and config {op.config()}: {type(exc).__name__}: "
                                  f"{exc}") from None
        if not isinstance(spec, TensorSpec) or 0 in spec.shape:
            shapes = ", ".join(f"{t.name} {t.node.spec}" for t in inputs)
            what = (f"would be empty, of shape {spec.shape}: check its slice or sizes"
                    if isinstance(spec, TensorSpec) else f"infer() returned {spec!r}, not a TensorSpec")
            raise ShapeError(f"node {name!r} ({op.kind}) {what} [inputs: {shapes}]")
        spec = self._specs.setdefault(spec, spec)
        node = Node(name, op, tuple(t.name for t in inputs), spec,
                    layer="/".join(self._scopes) or None, origin=self._origin)
        self.nodes[name] = node
        self._op_owners[id(op)] = name
        for scope in _scopes_of(name):
            self._scope_nodes[scope] = self._scope_nodes.get(scope, 0) + 1
        self._readers = None
        return Tensor(self, name)

    def input(self, name: str, shape: Sequence[int | None], dtype: str = "float32") -> Tensor:
        """A value fed at run time; ``None`` in ``shape`` marks the batch dimension."""
        shape = _check_shape(shape, f"input {name!r}")
        dtype = _check_dtype(dtype, f"input {name!r}")
        with self._recording({"call": "input", "name": name, "shape": list(shape), "dtype": dtype}):
            return self._add(Input(TensorSpec(shape, dtype)), [], self._full_name(name, "input"))

    def parameter(self, name: str, shape: Sequence[int], init: Any = "xavier",
                  trainable: bool = True, decay: bool | None = None,
                  dtype: str = "float32") -> Tensor:
        """A trainable array. ``init`` is an initializer name, or ``{"name": ..., **config}``.

        ``decay`` says whether weight penalties (L1/L2) apply; by default they apply to
        parameters of two or more dimensions (weights), not to biases.
        """
        shape = _check_shape(shape, f"parameter {name!r}")
        if None in shape:
            raise ShapeError(f"parameter {name!r}: shape {shape} must be fully known")
        dtype = _check_dtype(dtype, f"parameter {name!r}")
        initializer, config = split_init(init, f"parameter {name!r}")
        # Built once here so that a bad config fails at this line, not at compile time.
        _construct(get_plugin_manager().initializers.entry(initializer), "initializer",
                   initializer, config)
        call = {"call": "parameter", "name": name, "shape": list(shape), "init": init,
                "trainable": trainable, "decay": decay, "dtype": dtype}
        with self._recording(call):
            op = Parameter(TensorSpec(shape, dtype), init, trainable, decay)
            return self._add(op, [], self._full_name(name, "parameter"))

    def constant(self, value: Any, name: str | None = None, dtype: str | None = None) -> Tensor:
        """A fixed array, stored with the graph."""
        array = np.asarray(value)
        dtype = _check_dtype(dtype or ("float32" if array.dtype.kind == "f" else str(array.dtype)),
                             "constant")
        array = array.astype(dtype)
        with self._recording({"call": "constant", "name": name, "value": array, "dtype": dtype}):
            op = Constant(TensorSpec(array.shape, dtype), array)
            return self._add(op, [], self._full_name(name, "const"))

    def as_tensor(self, value: Any, like: Tensor) -> Tensor:
        """``value`` if it is a tensor, else a constant with ``like``'s dtype."""
        if isinstance(value, Tensor):
            return value
        return self.constant(value, dtype=like.dtype)

    def apply(self, op: Operator, *inputs: Tensor, name: str | None = None) -> Tensor:
        """Add a node computing ``op`` on ``inputs``: the way layers add their own operators."""
        if self._depth == 0:
            raise GraphBuildError(
                f"{op!r}: custom operators are added from inside a layer's build(); register the "
                f"layer as a plugin so graphs using it can be saved and rebuilt")
        return self._add(op, list(inputs), self._full_name(name, op.kind))

    def op(self, kind: str, *inputs: Tensor, name: str | None = None, **config: Any) -> Tensor:
        """A primitive operator by name: ``g.op("matmul", x, w)``."""
        if kind not in PRIMITIVES:
            from ..errors import UnknownNameError, did_you_mean
            raise UnknownNameError(f"unknown primitive operator {kind!r}."
                                   f"{did_you_mean(kind, PRIMITIVES)} Primitives: "
                                   f"{', '.join(sorted(PRIMITIVES))}; layers and activations are "
                                   f"built with g.layer(...) and g.activation(...)")
        self._check_inputs(f"operator {kind!r}", inputs)
        call = {"call": "op", "kind": kind, "inputs": tuple(t.name for t in inputs), "name": name,
                "config": config}
        try:
            op = PRIMITIVES[kind](**config)
        except (TypeError, ValueError) as exc:
            raise GraphBuildError(f"operator {kind!r} rejected its arguments {config}: {exc}") from None
        with self._recording(call):
            return self._add(op, inputs, self._full_name(name, kind))

    def layer(self, kind: str, *inputs: Tensor, name: str | None = None, **config: Any) -> Tensor:
        """Build a registered layer: ``g.layer("dense", x, units=128, name="fc1")``."""
        entry = get_plugin_manager().layers.entry(kind)
        count = len(inputs)
        while count and _looks_like_option(inputs[count - 1]):
            count -= 1
        if count < len(inputs):
            _positional_options(entry, "layer", kind, inputs[count:], config)
        self._check_inputs(f"layer {kind!r}", inputs)
        layer = _construct(entry, "layer", kind, config)
        scope = self._layer_scope(name, kind)
        call = {"call": "layer", "kind": kind, "inputs": tuple(t.name for t in inputs), "name": scope,
                "config": config}
        with self._recording(call), self.name_scope(scope):
            try:
                out = layer.build(self, *inputs)
            except GraphEngineError:
                raise
            except Exception as exc:  # a plugin's bug, or inputs its build() cannot take
                shapes = ", ".join(f"{t.name} {t.node.spec}" for t in inputs)
                raise GraphBuildError(f"layer {kind!r} from {entry.origin()} failed in build() on "
                                      f"inputs [{shapes}]: {type(exc).__name__}: {exc}; check the "
                                      f"inputs and arguments, else report it to the plugin's "
                                      f"author") from exc
            if not isinstance(out, Tensor):  # inside, so that its nodes are removed again
                raise GraphBuildError(f"layer {kind!r} from {entry.origin()} returned "
                                      f"{type(out).__name__} from build(), not a Tensor: fix its "
                                      f"build() (or report it to the plugin's author)")
        return out

    def _layer_scope(self, name: str | None, kind: str) -> str:
        prefix = "/".join(self._scopes)

        def taken(scope: str) -> bool:
            full = f"{prefix}/{scope}" if prefix else scope
            return full in self.nodes or full in self._scope_nodes

        if name is not None:
            if taken(name):
                raise GraphBuildError(f"graph {self.name!r} already has a layer or node named "
                                      f"{name!r}; pass another name=")
            return name
        n = self._counters.get(f"layer:{kind}", 0)
        while taken(f"{kind}_{n}"):
            n += 1
        self._counters[f"layer:{kind}"] = n + 1
        return f"{kind}_{n}"

    def activation(self, kind: str, x: Tensor, name: str | None = None, **config: Any) -> Tensor:
        """Apply a registered activation: ``g.activation("relu", h)``."""
        manager = get_plugin_manager()
        self._check_inputs(f"activation {kind!r}", [x])
        if kind not in manager.activations and kind in manager.layers:
            raise GraphBuildError(f"{kind!r} is a layer, not an activation (it learns parameters): "
                                  f"use g.layer({kind!r}, x, ...) on input {x.name!r}")
        entry = manager.activations.entry(kind)
        if name is not None and not isinstance(name, str):  # an option, given by position
            _positional_options(entry, "activation", kind, [name], config)
        activation = _construct(entry, "activation", kind, config)
        call = {"call": "activation", "kind": kind, "inputs": (x.name,), "name": name,
                "config": config}
        with self._recording(call):
            return self._add(ActivationOp(kind, activation), [x], self._full_name(name, kind))

    def loss(self, kind: str, pred: Tensor, target: Tensor, name: str | None = None,
             **config: Any) -> Tensor:
        """Apply a registered loss to a prediction and a target: a scalar tensor."""
        entry = get_plugin_manager().losses.entry(kind)
        if name is not None and not isinstance(name, str):  # an option, given by position
            _positional_options(entry, "loss", kind, [name], config)
        self._check_inputs(f"loss {kind!r}", [pred, target])
        loss = _construct(entry, "loss", kind, config)
        applied = getattr(loss, "applies_activation", None)
        op = pred.node.op
        if applied is not None and isinstance(op, ActivationOp) and op.kind == applied:
            warnings.warn(
                f"loss {kind!r} applies {applied} to its prediction itself, and its prediction "
                f"{pred.name!r} is the output of {applied} already: {applied} is applied twice, "
                f"which shrinks the gradients and slows training. Feed the loss the input of "
                f"{pred.name!r} (the logits); model.predict still returns probabilities",
                GraphBuildWarning, stacklevel=2)
        call = {"call": "loss", "kind": kind, "inputs": (pred.name, target.name), "name": name,
                "config": config}
        with self._recording(call):
            return self._add(LossOp(kind, loss), [pred, target], self._full_name(name, kind))

    # -- queries ---------------------------------------------------------------------------

    def layers(self) -> dict[str, dict[str, Any]]:
        """Each layer a builder call made (``g.layer``), by its full scope (``"gen/fc1"`` for
        layer ``fc1`` built inside ``name_scope("gen")``: the prefix of its nodes' names) ->
        that call."""
        return {f"{call['scope']}/{call['name']}" if "scope" in call else call["name"]: call
                for call in self.calls if call["call"] == "layer"}

    def enclosing_layer(self, scope: str | None, layers: Mapping[str, Any] | None = None) -> str | None:
        """The layer (a key of :meth:`layers`, passed as ``layers`` when asked for many scopes)
        that the name scope ``scope`` of a node lies in, or None."""
        if scope is None:
            return None
        layers = self.layers() if layers is None else layers
        return next((s for s in (*_scopes_of(scope), scope) if s in layers), None)

    def groups(self) -> dict[str, str]:
        """Node -> the group it is shown in (one row of ``Model.summary()``, one node of a
        collapsed diagram): the layer a builder call made around it (``"gen/fc1"``), else its
        top-level name scope where no builder call made a layer inside that scope (a layer
        written by hand from primitives). Nodes of no group (inputs, losses, activations
        between layers) are absent."""
        layers = self.layers()
        holding = {scope.split("/", 1)[0] for scope in layers if "/" in scope}
        groups: dict[str, str] = {}
        for name, node in self.nodes.items():
            if node.layer is None:
                continue
            layer = self.enclosing_layer(node.layer, layers)
            top = node.layer.split("/", 1)[0]
            if layer is not None:
                groups[name] = layer
            elif top not in holding:
                groups[name] = top
        return groups

    def inputs(self) -> list[str]:
        return [n for n, node in self.nodes.items() if isinstance(node.op, Input)]

    def parameters(self) -> list[str]:
        return [n for n, node in self.nodes.items() if isinstance(node.op, Parameter)]

    def consumers(self, name: str) -> list[str]:
        """The nodes that read node ``name``, in the order they were added."""
        if self._readers is None:
            readers: dict[str, list[str]] = {}
            for reader, node in self.nodes.items():
                for source in dict.fromkeys(node.inputs):
                    readers.setdefault(source, []).append(reader)
            self._readers = readers
        return list(self._readers.get(name, ()))

    @property
    def dag(self) -> nx.DiGraph:
        """The graph as a networkx DiGraph (an edge from each input to its reader), built on
        each access, for analysis and drawing; changing it does not change the graph."""
        dag = nx.DiGraph()
        dag.add_nodes_from(self.nodes)
        dag.add_edges_from((source, name) for name, node in self.nodes.items()
                           for source in node.inputs)
        return dag

    def is_source(self, name: str) -> bool:
        return isinstance(self.nodes[name].op, Source)

    # -- compiling -------------------------------------------------------------------------

    @checked_keywords
    def compile(self, loss: Tensor | None = None, *, outputs: Sequence[Tensor] | None = None,
                optimizer: Optimizer | str | None = None, backend: str | Backend = "numpy",
                seed: int = 0, parameters: dict[str, Any] | None = None,
                initial_values: Mapping[str, Any] | None = None,
                regularizer: Any = None, constraint: Any = None, clip_norm: float | None = None,
                clip_value: float | None = None, schedule: Schedule | None = None,
                metrics: Any = None, distributed: Communicator | None = None) -> Model:
        """Compile into a :class:`Model`: validate, prune to what ``loss`` and ``outputs``
        need, order, plan memory, initialize parameters.

        ``outputs`` are what ``predict`` returns; by default the loss's prediction (through the
        loss's link, e.g. softmax probabilities). ``parameters`` shares existing arrays by name
        (another model's, say) instead of initializing new ones; ``initial_values`` gives host
        arrays by name that the new model copies and owns instead of running initializers (what
        ``ge.load`` does). ``regularizer``, ``constraint``,
        ``clip_norm``, ``clip_value`` and ``schedule`` attach weight penalties, max-norm, gradient
        clipping and a learning-rate schedule (see :mod:`graphengine.train.regularization`).
        ``metrics`` are what ``fit`` and ``evaluate`` report beside the loss: ``"mae"``,
        ``"rmse"``, ``"r2"``, ``"top5_accuracy"``, or functions ``fn(pred, target) -> float``
        (see :mod:`graphengine.train.metrics`). ``distributed`` (the communicator of
        ``ge.distributed.init()``) trains data-parallel over the ranks of an MPI job (see
        :mod:`graphengine.distributed`).
        """
        if compiler is None:
            raise GraphEngineError("graphengine's runtime is not loaded: import graphengine")
        return compiler(self, loss=loss, outputs=outputs, optimizer=optimizer, backend=backend,
                        seed=seed, parameters=parameters, initial_values=initial_values,
                        regularizer=regularizer,
                        constraint=constraint, clip_norm=clip_norm, clip_value=clip_value,
                        schedule=schedule, metrics=metrics, distributed=distributed)


def _scopes_of(name: str) -> Iterator[str]:
    """The scopes that node ``name`` lies in: ``"a"`` and ``"a/b"`` for ``"a/b/c"``."""
    end = name.find("/")
    while end != -1:
        yield name[:end]
        end = name.find("/", end + 1)


def _construct(entry: Any, what: str, kind: str, config: dict[str, Any]) -> Any:
    try:
        return entry.obj(**config)
    except (GraphEngineError, TypeError, ValueError) as exc:
        # A misspelt option gets a did-you-mean and the options there are.
        hint = None
        if isinstance(exc, TypeError) and not isinstance(exc, GraphEngineError):
            hint = unknown_options(entry.obj, config)
        # The plugin's own error class is kept; the message gains which plugin and arguments.
        error = type(exc) if isinstance(exc, GraphEngineError) else GraphBuildError
        raise error(f"{what} {kind!r} from {entry.origin()} rejected its arguments {config}: "
                    f"{exc}{'.' + hint if hint else ''}") from None


def _looks_like_option(value: Any) -> bool:
    """Whether a value given where inputs go is an option given by position (``10`` for
    units) rather than a misplaced array or tensor."""
    return isinstance(value, (numbers.Number, tuple, list))


def _positional_options(entry: Any, what: str, kind: str, values: Sequence[Any],
                        config: Mapping[str, Any]) -> None:
    """Refuse options given by position, saying which keywords they were meant for."""
    names = option_names(entry.obj, config)
    shown = ", ".join(repr(v) for v in values)
    raise GraphBuildError(
        f"{what} {kind!r}: {shown} given by position, where {what} options are keywords: "
        f"{positional_hint(values, names)}"
        + (f" (options of {kind!r}: {', '.join(names)})" if names else ""))


def _check_shape(shape: Any, what: str) -> Shape:
    try:
        shape = tuple(shape)
    except TypeError:
        raise ShapeError(f"{what}: shape must be a tuple of ints (None for the batch), "
                         f"got {shape!r}") from None
    for d in shape:
        if d is not None and (not isinstance(d, (int, np.integer)) or d < 1):
            raise ShapeError(f"{what}: shape {shape} must hold positive ints or None (the batch)")
    return tuple(None if d is None else int(d) for d in shape)


def in_scope(name: str, pattern: str) -> bool:
    """Whether node ``name`` is ``pattern`` itself or lies in the layer scope ``pattern``
    (``"fc1"`` or ``"fc1/"`` holds ``"fc1/W"``, not ``"fc10/W"``)."""
    return name == pattern or name.startswith(pattern.rstrip("/") + "/")


def split_init(init: Any, what: str) -> tuple[str, dict[str, Any]]:
    """A parameter's ``init`` (an initializer name, or ``{"name": ..., **config}``) as the
    initializer's name and its config."""
    if isinstance(init, str):
        return init, {}
    if isinstance(init, Mapping) and isinstance(init.get("name"), str):
        return init["name"], {k: v for k, v in init.items() if k != "name"}
    names = ", ".join(get_plugin_manager().initializers.names())
    if isinstance(init, Mapping):
        example = {"name": "normal", **{k: v for k, v in init.items() if k != "name"}}
        raise GraphBuildError(f"{what}: init {dict(init)!r} names no initializer: add its \"name\", "
                              f"e.g. init={example!r}; initializers: {names}")
    raise GraphBuildError(f"{what}: init must be an initializer name or a dict "
                          f"{{'name': ..., **config}}, got {type(init).__name__} {init!r}; "
                          f"initializers: {names}")


def _check_dtype(dtype: Any, what: str) -> str:
    try:
        name = np.dtype(dtype).name if dtype is not None else None
    except (TypeError, ValueError):  # not a dtype at all ("bogus"): refused below like others
        name = None
    if name not in DTYPES:
        raise GraphBuildError(f"{what}: unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return name


#: graphengine's own folder: ``ge.where``, ``ge.concat`` and the like build from its __init__.py.
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _user_origin() -> str | None:
    """Where user code called the graph builder: the innermost frame outside graphengine.

    Recorded at build time so that errors at run time (NaN in debug mode) can point at the line
    that built the node; contextlib frames are skipped too.
    """
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith(_PACKAGE_DIR) and not filename.endswith("contextlib.py"):
            return f"{filename}:{frame.f_lineno}"
        frame = frame.f_back
    return None
