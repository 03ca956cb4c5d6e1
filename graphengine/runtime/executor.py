"""THE forward and backward loops. Every caller runs plans through an :class:`Executor`: ``fit``,
``evaluate``, ``predict``, ``run``, ``profile``, the gradient monitor and debug mode.

A forward pass makes a :class:`~graphengine.runtime.tape.Tape`: the values, one context per
step, and the run's mode and random generator. A backward pass reads a tape and consumes it.
Observers (:class:`Observer`) see each step of a run; an unobserved run is the tight loop.

OVERFLOW: operators run with floating-point overflow warnings off. Several stable formulas
overflow on purpose (``sigmoid = 1 / (1 + exp(-x))`` is exactly 0 where ``exp`` gives inf), and
one warning context per pass costs less than one per operator call. An overflow that matters
shows as inf or NaN in the loss or the gradients, which ``fit`` checks, and debug mode names the
node that made it; NumPy's warning would name no node.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import GraphEngineError, OperatorError
from .feeds import Feeds, load_feeds
from .tape import Context, Tape

if TYPE_CHECKING:
    from ..compiler.plan import BackwardStep, Plan, Step
    from ..ir.graph import Graph
    from .backend import Backend
    from .parameters import ParameterStore


class Observer:
    """Watches runs of a model's executor. Subclass it and override the events you need; each
    receives the model (or whatever owns the executor) and the run's tape.

    ``every_node``: True when the observer must see one step per graph node; the executor then
    runs the unfused plan (otherwise it runs the plan that normally runs, fused steps included).
    """

    every_node: bool = False

    def wants(self, owner: Any) -> bool:
        """Whether this observer watches the coming training step (an inference run is only
        watched by observers with ``inference = True``)."""
        return True

    #: Whether inference runs (run, predict, evaluate) are watched too.
    inference: bool = False

    def on_run_start(self, owner: Any, tape: Tape) -> None: ...

    def on_forward(self, owner: Any, tape: Tape, step: Step, args: Sequence[Any], value: Any) -> None: ...

    def on_backward(self, owner: Any, tape: Tape, bstep: BackwardStep, grad: Any,
                    input_grads: Sequence[Any]) -> None: ...

    def on_run_end(self, owner: Any, tape: Tape) -> None:
        """After the forward of an inference run, or after the backward of a training step."""

    def on_update(self, owner: Any, name: str, before: Any, after: Any) -> None:
        """After the optimizer changed parameter ``name`` (``before`` is a copy)."""


class Executor:
    """Runs plans of ``graph`` on ``backend`` over the parameters and constants of ``store``
    (a ParameterStore, whose version counters tell a backward that its weights changed)."""

    def __init__(self, owner: Any, graph: Graph, backend: Backend, store: ParameterStore) -> None:
        self.owner = owner
        self.graph = graph
        self.backend = backend
        self.xp = backend.xp
        self.store = store

    # -- forward ---------------------------------------------------------------------------

    def forward(self, plan: Plan, feeds: Feeds, *, training: bool, rng: Any,
                observers: Sequence[Observer] = ()) -> Tape:
        """Run ``plan`` forward on ``feeds``; returns the run's tape. Its fused variant runs
        unless an observer needs every node."""
        executed = plan if any(o.every_node for o in observers) or plan.fast is None else plan.fast
        # One spare slot at the end stays None: plan slot -1 ("not kept") reads it.
        values: list[Any] = [None] * (len(plan.slots) + 1)
        load_feeds(self.graph, self.backend, plan, feeds, values)
        slots = plan.slots
        store = self.store
        parameters, constants = store.arrays, store.constants
        for name in plan.parameters:
            values[slots[name]] = parameters[name]
        for name in plan.constants:
            values[slots[name]] = constants[name]
        tape = Tape(executed, values, training, rng, store.generation)
        tape.fused = executed is not plan
        for observer in observers:
            observer.on_run_start(self.owner, tape)
        xp = self.xp
        # An inference pass keeps no context: each goes with its step, and with it what the
        # operator saved for a backward that will not come (and no full garbage collection
        # has to traverse them while the pass runs).
        keep_contexts = bool(plan.backward)
        if not keep_contexts:
            tape.contexts = []
        contexts = tape.contexts
        step = None
        try:
            with xp.errstate(over="ignore"):  # see OVERFLOW in the module docstring
                if not observers:
                    get = values.__getitem__
                    # ``step`` names the node in the error report below
                    for step, (index, forward, out, args, release) in zip(  # noqa: B007
                            executed.steps, executed.programs()[0]):
                        ctx = Context(tape)
                        if keep_contexts:
                            contexts[index] = ctx
                        values[out] = forward(ctx, xp, *map(get, args))
                        for slot in release:
                            values[slot] = None
                else:
                    for index, step in enumerate(executed.steps):
                        args = [values[a] for a in step.args]
                        ctx = Context(tape)
                        if keep_contexts:
                            contexts[index] = ctx
                        value = step.op.forward(ctx, xp, *args)
                        for observer in observers:
                            observer.on_forward(self.owner, tape, step, args, value)
                        values[step.out] = value
                        for slot in step.release:
                            values[slot] = None
        except Exception as exc:
            if step is None:
                raise
            shapes = ", ".join(f"{tuple(v.shape)} {v.dtype}" if hasattr(v, "shape") else repr(v)
                               for v in (values[a] for a in step.args))
            error = self.step_error(exc, step, "forward", f"inputs {shapes}")
            if error is None:
                raise
            raise error from exc
        if not keep_contexts:
            for observer in observers:
                observer.on_run_end(self.owner, tape)
        return tape

    # -- backward --------------------------------------------------------------------------

    def backward(self, tape: Tape, plan: Plan | None = None, observers: Sequence[Observer] = ()) -> list[Any]:
        """Back-propagate through ``tape`` along ``plan``'s backward (by default the tape's
        own; a plan of the same graph and targets asking for more input gradients also works,
        since forward keeps what those read). Consumes the tape; returns gradients by slot."""
        if tape.consumed:
            raise GraphEngineError(
                "backward() already consumed the tape of the last forward(): a tape is "
                "back-propagated once, and its values are released on the way; call forward() "
                "again, then backward()")
        changed = self.store.changed_since(tape.generation, tape.plan.parameters)
        if changed:
            raise GraphEngineError(
                f"parameter(s) {changed} changed between forward() and backward() (an optimizer "
                f"step, set_parameters or a load): the gradients would mix two sets of weights; "
                f"call forward() again, then backward()")
        if plan is None:
            plan = tape.plan
        elif tape.fused and plan.fast is not None:
            plan = plan.fast
        tape.consumed = True
        tape.backward_plan = plan
        xp = self.xp
        values = tape.values
        contexts = tape.contexts
        grads: list[Any] = [None] * len(values)
        loss_slot = plan.slots[plan.loss]
        grads[loss_slot] = xp.ones((), dtype=plan.specs[loss_slot].dtype)
        # Sums this loop made itself: only those may be added to in place, since an operator's
        # gradient may alias another one (add passes the same array to both inputs).
        owned: set[int] = set()
        bstep = None
        get = values.__getitem__
        try:
            with xp.errstate(over="ignore"):  # see OVERFLOW in the module docstring
                for bstep, (backward, index, out, kept_args, kept_out, grad_to, wanted, release,
                            last) in zip(plan.backward, plan.programs()[1]):
                    grad = grads[out]
                    if grad is None:
                        continue
                    ctx = contexts[index]
                    ctx.wanted = wanted
                    # slot -1 reads the spare None at the end of ``values``
                    input_grads = backward(ctx, xp, tuple(map(get, kept_args)), values[kept_out], grad)
                    for observer in observers:
                        observer.on_backward(self.owner, tape, bstep, grad, input_grads)
                    for slot, g in zip(grad_to, input_grads, strict=True):
                        if slot < 0:
                            continue
                        if g is None:  # dropped silently, the layer below would never train
                            raise _missing_gradient(plan, bstep, grad_to, input_grads)
                        previous = grads[slot]
                        if previous is None:
                            grads[slot] = g
                        elif slot in owned:
                            previous += g
                        else:
                            grads[slot] = previous + g
                            owned.add(slot)
                    if out != loss_slot:
                        grads[out] = None
                    for slot in release:
                        values[slot] = None
                    if last:  # what the operator kept for this backward goes now, not at the end
                        contexts[index] = None
        except Exception as exc:
            if bstep is None:
                raise
            step = bstep.step
            shapes = ", ".join(str(plan.specs[a]) for a in step.args)
            error = self.step_error(exc, step, "backward", f"inputs {shapes}")
            if error is None:
                raise
            raise error from exc
        tape.contexts = []  # what the operators kept for this backward
        tape.grads = grads
        for observer in observers:
            observer.on_run_end(self.owner, tape)
        return grads

    # -- errors ----------------------------------------------------------------------------

    def step_error(self, exc: Exception, step: Step, phase: str, shapes: str) -> Exception | None:
        """What to raise for ``exc`` from ``step``: the error with its node named, or None to let
        it pass as it is (it names its node already, or is out of memory)."""
        if isinstance(exc, MemoryError) or getattr(exc, "node", None) is not None:
            return None
        where = f"{describe_node(self.graph, step.name)} in the {phase} pass ({shapes})"
        if isinstance(exc, GraphEngineError):
            try:
                error = type(exc)(f"{where}: {exc}")
            except Exception:  # a subclass with another constructor: keep it as it is
                return None
        else:
            error = OperatorError(
                f"{where} failed: {type(exc).__name__}: {exc}. Either sizes known only at run time "
                f"(the batch) do not fit together, or {implementation(step.op)} has a bug: set "
                f"model.debug = True to check every operator's outputs and gradients")
        error.node = step.name
        return error


def _missing_gradient(plan: Plan, bstep: BackwardStep, grad_to: Sequence[int],
                      input_grads: Sequence[Any]) -> OperatorError:
    """The error for a backward that returned None where the plan needs a gradient (the
    executor names the node when it re-raises it)."""
    position = next(k for k, (slot, g) in enumerate(zip(grad_to, input_grads))
                    if slot >= 0 and g is None)
    source = plan.names[bstep.step.args[position]]
    return OperatorError(
        f"{implementation(bstep.step.op)}.backward returned None for the gradient of its input "
        f"#{position} ({source!r}), which the plan needs: return an array (zeros where no "
        f"gradient flows); only an input for which ctx.grad_wanted(i) is False may get None")


def implementation(op: Any) -> str:
    """The class that implements an operator: the plugin's activation or loss class for those."""
    impl = getattr(op, "activation", None) or getattr(op, "loss", None) or op
    cls = type(impl)
    return f"{cls.__module__}.{cls.__qualname__}"


def describe_node(graph: Graph, name: str) -> str:
    """``node 'fc1/matmul' (matmul, in layer 'fc1', built at train.py:12)``."""
    node = graph.nodes[name]
    where = [node.kind]
    if node.layer:
        where.append(f"in layer {node.layer!r}")
    if node.origin:
        where.append(f"built at {node.origin}")
    return f"node {name!r} ({', '.join(where)})"
