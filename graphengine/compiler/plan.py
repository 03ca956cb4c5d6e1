"""Graph -> Plan: validate, prune to what the targets need, order, and plan memory.

A Plan is a flat list of steps over numbered value slots. For each slot it knows the last step
that reads it in the forward pass, and whether a backward step reads it later (an operator's
``retain_inputs``/``retain_output``), so every intermediate is released right after its last use,
as Theano's VM does.

A training or inference plan also carries ``fast``: the same schedule with ``matmul -> add bias
-> activation`` chains fused into single steps (see :mod:`graphengine.compiler.fusion`). The model runs
``fast`` when no observer watches the step; observers always see one step per graph node.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace

from ..compiler.fusion import backward_parts, fuse_dense
from ..errors import CompileError
from ..ir.operators import Constant, Input, Operator, Parameter, TensorSpec


@dataclass(slots=True)
class Step:
    """One operator application: ``slots[out] = op.forward(xp, *slots[args])``."""

    name: str
    op: Operator
    out: int
    args: tuple[int, ...]
    #: Slots no later forward step reads and no backward step keeps: released after this step.
    release: tuple[int, ...] = ()


@dataclass(slots=True)
class BackwardStep:
    step: Step
    #: The forward step (index into ``Plan.steps``) whose context this backward reads.
    index: int
    #: For each argument: the slot whose value backward reads, or -1 (it gets None).
    kept_args: tuple[int, ...]
    kept_out: int
    #: For each argument: the slot its gradient accumulates into, or -1 (no gradient wanted).
    grad_to: tuple[int, ...]
    #: Retained values this step was the last backward reader of: released after it.
    release: tuple[int, ...] = ()

    @property
    def wanted(self) -> tuple[bool, ...]:
        """For each argument: whether the plan uses its gradient (``Context.grad_wanted``)."""
        return tuple(slot >= 0 for slot in self.grad_to)


@dataclass
class Plan:
    """An executable schedule for a set of target nodes."""

    targets: tuple[str, ...]
    slots: dict[str, int]
    specs: list[TensorSpec]
    feeds: tuple[str, ...]
    parameters: tuple[str, ...]
    constants: tuple[str, ...]
    steps: list[Step]
    retained: frozenset[int] = frozenset()
    backward: list[BackwardStep] = field(default_factory=list)
    loss: str | None = None
    #: The same computation with fused steps, for unobserved runs; None when nothing fuses.
    fast: Plan | None = None
    #: (name, type, dtype, shape) of the last feeds that passed the checks as they were: feeds
    #: that look the same skip the checks.
    feed_signature: tuple | None = None

    @property
    def names(self) -> list[str]:
        return list(self.slots)

    @property
    def parameter_slots(self) -> tuple[tuple[str, int], ...]:
        """(name, slot) of each parameter, for the gradients after every backward."""
        cached = self.__dict__.get("_parameter_slots")
        if cached is None:
            cached = self.__dict__["_parameter_slots"] = tuple((n, self.slots[n]) for n in self.parameters)
        return cached

    def programs(self) -> tuple[list[tuple], list[tuple]]:
        """The steps with their operators' methods bound once, for the step loops: forward
        ``(index, forward, out, args, release)``, backward ``(backward, index, out, kept_args,
        kept_out, grad_to, wanted, release, last)``, where ``last`` says that no later backward
        step reads the context of forward step ``index``, which can then be dropped. Cached
        outside the dataclass fields, so a ``replace``d copy of the plan (with other operators)
        builds its own."""
        cached = self.__dict__.get("_programs")
        if cached is None:
            with garbage_collection_paused():  # a few long-lived objects per step, as planning
                cached = self.__dict__["_programs"] = self._bind()
        return cached

    def _bind(self) -> tuple[list[tuple], list[tuple]]:
        return (
            [(k, s.op.forward, s.out, s.args, s.release) for k, s in enumerate(self.steps)],
            [(b.step.op.backward, b.index, b.step.out, b.kept_args, b.kept_out, b.grad_to,
              b.wanted, b.release, b.index != after.index)
             for b, after in zip(self.backward, [*self.backward[1:], _END])])


#: Stands after the last backward step: its index matches no forward step.
_END = SimpleNamespace(index=-1)


def check_loss(graph, loss: str) -> None:
    """A loss must be a floating-point scalar: the one value that backward differentiates."""
    spec = graph.nodes[loss].spec
    if spec.shape != ():
        raise CompileError(f"the loss {loss!r} must be a scalar, but its shape is {spec.shape}; "
                           f"reduce it with .mean() or .sum()")
    if not spec.dtype.startswith("float"):
        raise CompileError(f"the loss {loss!r} must be floating point, got {spec.dtype}; build it "
                           f"from float tensors")


@contextlib.contextmanager
def garbage_collection_paused() -> Iterator[None]:
    """Hold CPython's cyclic garbage collector off while a plan is built. Planning allocates a
    few objects per node, all of which outlive it and none of which form garbage cycles, so every
    collection that would start meanwhile is wasted: on a graph of 32k nodes the full ones it
    triggers (each traverses every object of the process) took a third of the compile time.
    The allocations still count toward the next collection, which runs once, after."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def build_plan(graph, targets: Iterable[str], *, loss: str | None = None,
               wrt: Iterable[str] = (), keep: Iterable[str] = (),
               frozen: Iterable[str] = (), fuse: bool = True) -> Plan:
    """Plan the nodes ``targets`` need.

    With ``loss``, also plan the backward pass from it to the trainable parameters (less those
    ``frozen``) and to the sources named in ``wrt``. ``keep`` names nodes whose values must
    survive the step besides the targets. With ``fuse``, ``plan.fast`` is the fused variant.
    """
    with garbage_collection_paused():
        return _build_plan(graph, tuple(targets), loss, tuple(wrt), tuple(keep), tuple(frozen), fuse)


def _build_plan(graph, targets: tuple[str, ...], loss: str | None, wrt: tuple[str, ...],
                keep: tuple[str, ...], frozen: tuple[str, ...], fuse: bool) -> Plan:
    targets = tuple(dict.fromkeys(targets))
    for t in targets:
        if t not in graph.nodes:
            raise CompileError(f"graph {graph.name!r} has no node {t!r}")
    needed = ancestors(graph, targets)
    # One pass over the nodes in the order they were added, a topological order (see
    # Graph.nodes): no sort needed. Its results serve the plan and its fused variant.
    slots: dict[str, int] = {}
    steps: list[Step] = []
    specs: list[TensorSpec] = []
    feeds: list[str] = []
    parameters: list[str] = []
    constants: list[str] = []
    for name, node in graph.nodes.items():
        if name not in needed:
            continue
        slot = slots[name] = len(specs)
        specs.append(node.spec)
        op = node.op
        if isinstance(op, Input):
            feeds.append(name)
        elif isinstance(op, Parameter):
            parameters.append(name)
        elif isinstance(op, Constant):
            constants.append(name)
        else:
            steps.append(Step(name, op, slot, tuple(map(slots.__getitem__, node.inputs))))
    nodes = graph.nodes
    flows = None
    if loss is not None:
        check_loss(graph, loss)
        trained = {slots[n] for n in parameters if nodes[n].op.trainable and n not in frozen}
        trained |= {slots[n] for n in wrt if n in slots}
        float_inputs = {slots[n] for n in feeds if nodes[n].dtype.startswith("float")}
        flows = _gradient_flows(steps, len(specs), slots[loss], trained, float_inputs)
        if not flows.reached[slots[loss]]:
            raise CompileError(
                f"no trainable parameter (or input asked for) influences the loss {loss!r}: "
                f"nothing to differentiate; put a layer with parameters on the path to the loss, "
                f"unfreeze one, or compile with outputs=[...] and no loss to only run the graph")

    def schedule(steps: list[Step]) -> Plan:
        plan = Plan(targets=targets, slots=slots, specs=list(specs), feeds=tuple(feeds),
                    parameters=tuple(parameters), constants=tuple(constants), steps=steps,
                    loss=loss)
        if flows is not None:
            _plan_backward(plan, flows)
        _plan_releases(plan, {slots[n] for n in (*targets, *keep) if n in slots})
        return plan

    plan = schedule(steps)
    if fuse:
        fused = fuse_dense(steps, specs, {slots[n] for n in (*targets, *keep) if n in slots})
        if len(fused) < len(steps):
            # Copies (releases differ), made directly: dataclasses.replace costs 4 us a step.
            plan.fast = schedule([Step(s.name, s.op, s.out, s.args) for s in fused])
    return plan


def ancestors(graph, targets: Iterable[str]) -> set[str]:
    """``targets`` and every node they depend on, in one walk over the nodes' inputs (a walk
    per target, as networkx's ``ancestors``, costs targets x nodes)."""
    nodes = graph.nodes
    found = set(targets)
    stack = list(found)
    while stack:
        for name in nodes[stack.pop()].inputs:
            if name not in found:
                found.add(name)
                stack.append(name)
    return found


@dataclass(slots=True)
class _Flows:
    """Where gradients flow, per slot of the unfused plan (fused steps read the same slots)."""

    #: Slots a gradient reaches from the trainable parameters and the inputs of ``wrt``.
    reached: list[bool]
    #: Slots a gradient would reach besides, from every float input (see ``_plan_backward``).
    inputs_only: list[bool]


def _gradient_flows(steps: list[Step], size: int, loss: int, trained: set[int],
                    inputs: set[int]) -> _Flows:
    """The slots a gradient reaches: downstream of a source, upstream of the loss. Over slot
    numbers in lists, two sweeps of the steps in order: no lookup by node name."""
    upstream = [False] * size
    upstream[loss] = True
    for step in reversed(steps):
        if upstream[step.out]:
            for a in step.args:
                upstream[a] = True

    def downstream(sources: set[int]) -> list[bool]:
        reached = [False] * size
        for s in sources:
            reached[s] = upstream[s]
        for step in steps:
            if upstream[step.out]:
                skip = step.op.nondifferentiable_inputs
                reached[step.out] = any(reached[a] for k, a in enumerate(step.args) if k not in skip)
        return reached

    reached = downstream(trained)
    with_inputs = downstream(trained | inputs)
    return _Flows(reached, [w and not r for w, r in zip(with_inputs, reached)])


def _plan_backward(plan: Plan, flows: _Flows) -> None:
    plan.backward = _backward_steps(plan, flows.reached)
    # The forward also keeps what a backward to the float inputs would read, so that
    # ``backward(wrt=[input])`` after a plain ``forward()`` finds it: beyond the parameters'
    # paths that is only what lies between an input and its first parameter (preprocessing).
    # What those steps keep does not depend on where gradients flow, so only the steps outside
    # ``flows.reached`` need planning again.
    with_inputs = _backward_steps(plan, flows.inputs_only) if any(flows.inputs_only) else []
    plan.retained = frozenset(s for bstep in (*plan.backward, *with_inputs)
                              for s in (*bstep.kept_args, bstep.kept_out) if s >= 0)
    # A retained value is released after the last backward step that reads it (the earliest
    # in forward order), unless it is a source (inputs and parameters outlive the step).
    slots = plan.slots
    seen: set[int] = {slots[n] for n in (*plan.feeds, *plan.parameters, *plan.constants)}
    for bstep in reversed(plan.backward):
        reads = {s for s in (*bstep.kept_args, bstep.kept_out) if s >= 0} - seen
        seen |= reads
        bstep.release = tuple(sorted(reads))


def _backward_steps(plan: Plan, flows: list[bool]) -> list[BackwardStep]:
    """The backward of every step that ``flows`` reaches, in reverse order; each refers to its
    forward step by index, whose context on the tape it reads."""
    backward = []
    for index in range(len(plan.steps) - 1, -1, -1):
        step = plan.steps[index]
        if not flows[step.out]:
            continue
        for part in backward_parts(step, plan.slots):
            op = part.op
            kept_args = tuple(a if k in op.retain_inputs else -1 for k, a in enumerate(part.args))
            kept_out = part.out if op.retain_output else -1
            grad_to = tuple(a if flows[a] and k not in op.nondifferentiable_inputs else -1
                            for k, a in enumerate(part.args))
            backward.append(BackwardStep(part, index, kept_args, kept_out, grad_to))
    return backward


def _plan_releases(plan: Plan, keep: set[int]) -> None:
    last_read = [-1] * len(plan.specs)
    for k, step in enumerate(plan.steps):
        for a in step.args:
            last_read[a] = k
    releases: list[list[int]] = [[] for _ in plan.steps]
    for k, step in enumerate(plan.steps):  # each slot is the output of one step
        slot = step.out
        if slot in keep or slot in plan.retained:
            continue
        # A value nobody reads is released right after it is made.
        releases[k if last_read[slot] < 0 else last_read[slot]].append(slot)
    for step, released in zip(plan.steps, releases):
        step.release = tuple(sorted(released))
