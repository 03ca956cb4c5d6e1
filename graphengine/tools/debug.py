"""Debug mode: find the node that made a NaN or an Inf.

``model.debug = True`` (one model) or ``with ge.debug():`` (every model, inside the block) checks
every value of the forward pass, every gradient of the backward pass and every parameter after
its update. The first NaN or Inf raises :class:`NumericalError` naming the node, its operator, the
shapes of its inputs, the pass, and the line of user code that built the node. The same checks
hold operators to their contract: a forward output shaped and typed as inferred at build time,
one gradient per input shaped and typed like that input (else a :class:`ShapeError` naming the
operator's implementation, usually a plugin's).

Debug mode is a model observer (see ``Model.observers``): while it is off the model runs its
steps without observers, so it costs nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import GraphEngineError, NumericalError, ShapeError
from ..runtime.executor import Observer, describe_node, implementation
from ..runtime.feeds import fits

if TYPE_CHECKING:
    from ..compiler.plan import BackwardStep, Step
    from ..ir.graph import Graph
    from ..model import Model
    from ..runtime.tape import Tape

_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("graphengine_debug", default=False)


@contextlib.contextmanager
def debug(enabled: bool = True) -> Iterator[None]:
    """Debug mode for every model inside the block: ``with ge.debug(): model.fit(data)``."""
    token = _ACTIVE.set(enabled)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def debug_active() -> bool:
    """Whether a ``ge.debug()`` block is open."""
    return _ACTIVE.get()


_OBSERVERS: weakref.WeakKeyDictionary[Model, DebugObserver] = weakref.WeakKeyDictionary()


def debug_observer(model: Model) -> DebugObserver:
    """The model's debug observer (it remembers forward shapes for the backward checks)."""
    observer = _OBSERVERS.get(model)
    if observer is None:
        observer = _OBSERVERS[model] = DebugObserver()
    return observer


#: What usually makes a non-finite value in an operator of this kind, and what to do about it.
_HINTS = {
    "log": "log of zero or of a negative number: keep its input positive (add a small epsilon, "
           "or clip it: x.clip(eps))",
    "div": "division by zero: add a small epsilon to the denominator",
    "sqrt": "sqrt of a negative number, or its gradient at 0: add a small epsilon inside",
    "pow": "a negative base with a fractional exponent, 0 to a negative power, or an overflow",
    "exp": "exp overflowed: subtract the maximum first (as log-softmax does), or lower the "
           "learning rate",
}
_DEFAULT_HINT = ("an overflow or an undefined value in this operator: check the magnitudes of its "
                 "inputs, lower the learning rate, or clip gradients")


def _shapes(arrays: Sequence[Any]) -> str:
    return ", ".join(f"{tuple(a.shape)} {a.dtype}" if hasattr(a, "shape") else type(a).__name__
                     for a in arrays)


def _is_float(array: Any) -> bool:
    return getattr(getattr(array, "dtype", None), "kind", None) == "f"


def _finite(xp: Any, array: Any) -> bool:
    return not _is_float(array) or bool(xp.all(xp.isfinite(array)))


def _census(xp: Any, array: Any) -> str:
    nan, inf = int(xp.isnan(array).sum()), int(xp.isinf(array).sum())
    parts = ([f"{nan} NaN"] if nan else []) + ([f"{inf} Inf"] if inf else [])
    return f"{' and '.join(parts)} among {array.size} values"


class DebugObserver(Observer):
    """The checks of debug mode, as an observer of the program that runs (fused steps
    included). Fails at the first bad value."""

    inference = True

    def __init__(self) -> None:
        #: Slot -> shape of its value in the last forward: what its gradient must match.
        self.shapes: dict[int, tuple[int, ...]] = {}
        #: The tape of the last training forward, and copies of the parameters it read: to
        #: catch in-place changes before its backward (the version counters see only changes
        #: made through the model).
        self.weights: tuple[Tape | None, dict[str, Any]] = (None, {})

    def on_run_start(self, model: Model, tape: Tape) -> None:
        if tape.plan.backward:
            self.weights = tape, {name: tape.values[tape.plan.slots[name]].copy()
                                  for name in tape.plan.parameters}

    # -- forward ------------------------------------------------------------------------------

    def on_forward(self, model: Model, tape: Tape, step: Step, args: Sequence[Any], value: Any) -> None:
        graph, xp = model.graph, model.xp
        node = graph.nodes[step.name]
        for slot, arg in zip(step.args, args):
            self.shapes[slot] = tuple(getattr(arg, "shape", ()))
        self.shapes[step.out] = tuple(getattr(value, "shape", ()))
        nodes = getattr(step.op, "nodes", ())
        if len(nodes) == 3:  # a fused dense chain: its hidden pre-activation is shaped like its output
            self.shapes[tape.plan.slots[nodes[1]]] = self.shapes[step.out]
        shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
        if shape is None or dtype is None or not fits(tuple(shape), node.shape) or dtype != node.dtype:
            got = f"{tuple(shape)} {dtype}" if shape is not None else f"a {type(value).__name__}"
            raise _at(ShapeError(
                f"{describe_node(graph, step.name)}: forward returned {got}, but shape inference "
                f"said {node.spec}; inputs: {_shapes(args)}. The operator's infer() and forward() "
                f"disagree: fix {implementation(step.op)} (or report it to its plugin's author)"),
                step.name)
        if _finite(xp, value):
            return
        # a fused step's inputs are read by the first node of its chain
        reader = getattr(step.op, "nodes", (step.name,))[0]
        for input_name, arg in zip(_input_names(tape, step), args):
            if not _finite(xp, arg):  # computed inputs were checked: this one is a source
                raise _at(NumericalError(_bad_source(graph, input_name, xp, arg, reader)),
                          input_name)
        hint = _HINTS.get(node.kind, _DEFAULT_HINT)
        raise _at(NumericalError(
            f"{_census(xp, value)} in the forward pass at {describe_node(graph, step.name)}, "
            f"from finite inputs of shapes {_shapes(args)}. Likely cause: {hint}"), step.name)

    # -- backward -----------------------------------------------------------------------------

    def on_backward(self, model: Model, tape: Tape, bstep: BackwardStep, grad: Any,
                    input_grads: Sequence[Any]) -> None:
        graph, xp = model.graph, model.xp
        step = bstep.step
        if self.weights[0] is tape:
            self._check_weights(model, tape)
        node = graph.nodes[step.name]
        inputs = _input_names(tape, step)
        described = describe_node(graph, step.name)
        if not _finite(xp, grad):
            consumers = ", ".join(repr(c) for c in graph.consumers(step.name))
            raise _at(NumericalError(
                f"{_census(xp, grad)} in the gradient reaching {described} in the backward pass: "
                f"the sum of its consumers' finite gradients ({consumers}) overflowed; use a "
                f"wider float dtype or scale the loss down"), step.name)
        input_grads = tuple(input_grads)
        if len(input_grads) != len(inputs):
            raise _at(ShapeError(
                f"{described}: backward returned {len(input_grads)} gradients for "
                f"{len(inputs)} inputs; fix {implementation(step.op)}: one gradient (or None) "
                f"per input"), step.name)
        shapes = [self.shapes.get(slot) for slot in step.args]
        for k, (input_name, g) in enumerate(zip(inputs, input_grads)):
            if g is None:
                continue
            spec = graph.nodes[input_name].spec
            expected = shapes[k]
            shape = tuple(getattr(g, "shape", ()))
            if (shape != expected if expected is not None else not fits(shape, spec.shape)) \
                    or getattr(g, "dtype", None) != spec.dtype:
                raise _at(ShapeError(
                    f"{described}: backward returned a gradient of {shape} "
                    f"{getattr(g, 'dtype', type(g).__name__)} for input {k} {input_name!r}, which "
                    f"is {expected or spec.shape} {spec.dtype}; every gradient must have its "
                    f"input's shape and dtype: fix {implementation(step.op)} (or report it to its "
                    f"plugin's author)"), step.name)
            if not _finite(xp, g):
                hint = _HINTS.get(node.kind, _DEFAULT_HINT)
                raise _at(NumericalError(
                    f"{_census(xp, g)} in the backward pass at {described}: the gradient it sends "
                    f"to input {k} {input_name!r} (shape {shape}), from a finite incoming gradient "
                    f"of shape {tuple(grad.shape)}; its inputs had shapes "
                    f"{', '.join(str(s) for s in shapes or ())}. Likely cause: {hint}"), step.name)

    def _check_weights(self, model: Model, tape: Tape) -> None:
        weights, self.weights = self.weights[1], (None, {})
        changed = [name for name, before in weights.items()
                   if not bool(model.xp.array_equal(before, tape.values[tape.plan.slots[name]]))]
        if changed:
            raise GraphEngineError(
                f"parameter(s) {changed} were changed in place between forward() and backward(): "
                f"the gradients would mix two sets of weights; change parameters after the "
                f"backward (or call forward() again)")

    # -- update -------------------------------------------------------------------------------

    def on_update(self, model: Model, name: str, before: Any, after: Any) -> None:
        if not _finite(model.xp, after):
            raise _at(NumericalError(
                f"{_census(model.xp, after)} in parameter {name!r} after optimizer update "
                f"{model.step_count} ({model.optimizer!r}); its value before and its gradient "
                f"were finite: lower the learning rate or clip gradients"), name)


def _bad_source(graph: Graph, name: str, xp: Any, array: Any, reader: str) -> str:
    kind = graph.nodes[name].kind
    census = _census(xp, array)
    if kind == "input":
        return (f"{census} in the value fed to input {name!r} (read by {describe_node(graph, reader)}): "
                f"clean the data (e.g. numpy.nan_to_num, or drop those rows) before feeding it")
    if kind == "parameter":
        return (f"{census} in parameter {name!r} (read by {describe_node(graph, reader)}): an earlier "
                f"update made it non-finite; turn debug mode on from the start of training to "
                f"catch that update, and lower the learning rate")
    return f"{census} in {kind} {name!r} (read by {describe_node(graph, reader)}): give it finite values"


def _input_names(tape: Tape, step: Step) -> list[str]:
    names = tape.plan.names
    return [names[a] for a in step.args]


def _at(error: Exception, node: str) -> Exception:
    error.node = node
    return error
