"""Profile mode: where a training step spends its time and memory, node by node.

    >>> report = model.profile({"x": x, "y": y})     # or ge.profile(model, feeds)
    >>> print(report)                                 # a table, slowest first
    >>> report.rows                                   # the numbers

It runs the plan the model really runs: by default the fused one, where a
``fc1/matmul+add+relu`` row is one fused step; ``fused=False`` runs one step per graph node.
Each operator call is timed on its own; what the engine spends between them (gathering
arguments, adding up gradients, releasing values) is its own row, so the engine's overhead is
shown, not hidden. Memory: the bytes an operator call allocated at its peak (temporaries
included), as NumPy reports them to ``tracemalloc``, in a separate pass so that tracing does not
slow the timings. GPU memory is invisible to tracemalloc: there the output size is shown.
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ..compiler.fusion import FusedDense
from ..errors import GraphEngineError

if TYPE_CHECKING:
    from ..compiler.plan import Plan
    from ..model import Model


@dataclass
class Row:
    """One step of the plan: a node, or a chain of nodes fused into one step."""

    name: str
    kind: str
    shape: tuple[int | None, ...]
    forward_ms: float = 0.0
    backward_ms: float = 0.0
    forward_bytes: int = 0
    backward_bytes: int = 0
    output_bytes: int = 0

    @property
    def total_ms(self) -> float:
        return self.forward_ms + self.backward_ms


@dataclass
class Profile:
    rows: list[Row]
    #: Milliseconds per step outside the operators.
    feeds_ms: float
    engine_ms: float
    update_ms: float
    steps: int
    fused: bool
    traced: bool

    @property
    def total_ms(self) -> float:
        return self.feeds_ms + self.engine_ms + self.update_ms + sum(r.total_ms for r in self.rows)

    def table(self, sort: str = "time", limit: int | None = None) -> str:
        """The rows as text, ``sort="time"`` (slowest first) or ``"order"`` (execution order)."""
        rows = sorted(self.rows, key=lambda r: -r.total_ms) if sort == "time" else list(self.rows)
        rows = rows[:limit] if limit else rows
        total = self.total_ms or 1.0
        mem = "alloc" if self.traced else "output"
        width = max([len(r.name) for r in rows] + [26])
        head = (f"{'node':<{width}}  {'op':<16}{'shape':<14}{'fwd ms':>9}{'bwd ms':>9}{'%':>6}"
                f"{f'fwd {mem}':>12}{'bwd alloc' if self.traced else '':>12}")
        lines = [head, "-" * len(head)]
        for r in rows:
            fwd_mem = _size(r.forward_bytes if self.traced else r.output_bytes)
            bwd_mem = _size(r.backward_bytes) if self.traced else ""
            lines.append(f"{r.name:<{width}}  {r.kind[:15]:<16}{str(r.shape)[:13]:<14}"
                         f"{r.forward_ms:>9.3f}{r.backward_ms:>9.3f}{100 * r.total_ms / total:>6.1f}"
                         f"{fwd_mem:>12}{bwd_mem:>12}")
        for label, ms in (("(feeding inputs)", self.feeds_ms),
                          ("(engine, between operators)", self.engine_ms),
                          ("(optimizer update)", self.update_ms)):
            lines.append(f"{label:<{width}}  {'':<30}{ms:>9.3f}{'':>9}{100 * ms / total:>6.1f}")
        lines.append(f"{'total per step':<{width}}  {'':<30}{self.total_ms:>9.3f}  (median of "
                     f"{self.steps} steps, {'fused plan' if self.fused else 'one step per node'})")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _size(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    if n < 2**20:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 2**20:.1f} MiB"


class _Measured:
    """Stands in for an operator in a copy of the plan and measures its calls."""

    def __init__(self, op: Any, index: int, sink: dict[tuple[int, str], float], traced: bool) -> None:
        self.op, self.index, self.sink, self.traced = op, index, sink, traced
        self.kind = op.kind

    def _call(self, phase: str, method: Any, *args: Any) -> Any:
        key = (self.index, phase)
        if self.traced:
            tracemalloc.reset_peak()
            start = tracemalloc.get_traced_memory()[0]
            result = method(*args)
            self.sink[key] = max(self.sink.get(key, 0), tracemalloc.get_traced_memory()[1] - start)
            return result
        begin = time.perf_counter()
        result = method(*args)
        self.sink[key] = self.sink.get(key, 0.0) + time.perf_counter() - begin
        return result

    def forward(self, ctx: Any, xp: Any, *inputs: Any) -> Any:
        value = self._call("forward", self.op.forward, ctx, xp, *inputs)
        self.sink[(self.index, "output")] = int(getattr(value, "nbytes", 0))
        return value

    def backward(self, ctx: Any, xp: Any, inputs: tuple, output: Any, grad: Any) -> tuple:
        return self._call("backward", self.op.backward, ctx, xp, inputs, output, grad)


def _instrumented(plan: Plan, sink: dict, traced: bool) -> Plan:
    """A copy of ``plan`` whose operator calls are measured into ``sink[(step index, phase)]``;
    the backward parts of a fused step count as that step."""
    steps = [replace(s, op=_Measured(s.op, k, sink, traced)) for k, s in enumerate(plan.steps)]
    owner = {n: k for k, s in enumerate(plan.steps) for n in getattr(s.op, "nodes", (s.name,))}
    backward = [replace(b, step=replace(b.step, op=_Measured(b.step.op, owner[b.step.name], sink,
                                                             traced)))
                for b in plan.backward]
    return replace(plan, steps=steps, backward=backward, fast=None)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def profile(model: Model, feeds: Mapping[str, Any], *, steps: int = 10, fused: bool = True,
            update: bool = False, memory: bool = True) -> Profile:
    """Profile ``steps`` training steps of ``model`` on ``feeds``, after one untimed step.

    With ``update=True`` the optimizer runs too and is timed (the model then trains for those
    steps); otherwise the parameters are left as they are. ``memory`` adds one traced pass for
    the allocation columns.
    """
    if model.loss_name is None:
        raise GraphEngineError("profile() times training steps: compile the model with a loss")
    if update and model.optimizer is None:
        raise GraphEngineError("profile(update=True) needs a model compiled with an optimizer")
    if steps < 1:
        raise GraphEngineError(f"profile() needs steps >= 1, got {steps}")
    plan = model.train_plan
    executed = plan.fast if fused and plan.fast is not None else plan
    samples: list[dict[tuple[int, str], float]] = []
    overhead: dict[str, list[float]] = {"feeds": [], "engine": [], "update": []}

    executor = model.executor
    feed_plan = replace(plan, steps=[], backward=[], fast=None)  # only loads the feeds

    def one_step(measured: Plan, sink: dict) -> None:
        start = time.perf_counter()
        executor.forward(feed_plan, feeds, training=True, rng=model.rng)
        overhead["feeds"].append(time.perf_counter() - start)
        start = time.perf_counter()
        model.tape = executor.forward(measured, feeds, training=True, rng=model.rng)
        model.backward()
        wall = time.perf_counter() - start - overhead["feeds"][-1]
        overhead["engine"].append(wall - sum(v for (_, phase), v in sink.items() if phase != "output"))
        if update:
            start = time.perf_counter()
            model.step()
            overhead["update"].append(time.perf_counter() - start)

    timing: dict[tuple[int, str], float] = {}
    measured = _instrumented(executed, timing, traced=False)
    one_step(measured, timing)  # warm-up
    for series in overhead.values():
        series.clear()
    for _ in range(steps):
        timing.clear()
        one_step(measured, timing)
        samples.append(dict(timing))
    traced = memory and model.backend.name != "cupy"
    allocated: dict[tuple[int, str], float] = {}
    if traced:
        traced_plan = _instrumented(executed, allocated, traced=True)
        started = not tracemalloc.is_tracing()
        if started:
            tracemalloc.start()
        try:
            one_step(traced_plan, allocated)
        finally:
            if started:
                tracemalloc.stop()
        for series in overhead.values():
            if series:
                series.pop()  # the traced step's times are not the step's times
    return Profile(_rows(model, executed, samples, allocated),
                   1e3 * _median(overhead["feeds"]), 1e3 * _median(overhead["engine"]),
                   1e3 * _median(overhead["update"]) if update else 0.0, steps, fused, traced)


def _rows(model: Model, plan: Plan, samples: list[dict], allocated: dict) -> list[Row]:
    batch = _batch_size(model, plan)
    rows = []
    for key, step in enumerate(plan.steps):
        nodes = getattr(step.op, "nodes", (step.name,))
        name = nodes[0] + "".join("+" + n.rsplit("/", 1)[-1] for n in nodes[1:])
        kind = step.op.kind
        if isinstance(step.op, FusedDense) and step.op.activation is not None:
            kind = f"dense+{model.graph.nodes[nodes[-1]].kind}"
        rows.append(Row(
            name, kind, tuple(batch if d is None else d for d in plan.specs[step.out].shape),
            forward_ms=1e3 * _median([s.get((key, "forward"), 0.0) for s in samples]),
            backward_ms=1e3 * _median([s.get((key, "backward"), 0.0) for s in samples]),
            forward_bytes=int(allocated.get((key, "forward"), 0)),
            backward_bytes=int(allocated.get((key, "backward"), 0)),
            output_bytes=int(samples[-1].get((key, "output"), 0))))
    return rows


def _batch_size(model: Model, plan: Plan) -> int | None:
    """The batch size of the last run (None for a plan without batched inputs)."""
    for name in plan.feeds:
        shape = plan.specs[plan.slots[name]].shape
        if None in shape:
            return model.tape.value(name).shape[shape.index(None)]
    return None
