"""Gradient statistics recorded while a model trains: the numbers behind the gradient-flow diagrams.

A :class:`GradientMonitor` is a model observer. Every ``every`` steps it records, for every node
that receives a gradient (parameters and intermediates alike), the RMS, L2 norm and max-abs of
that gradient; for activations, the fraction of dead ReLU units and of saturated sigmoid/tanh
outputs; for each trained parameter, the update-to-weight ratio of the step. Where a tensor fans
out (a residual connection), the gradient along each outgoing edge is recorded too, so a diagram
can show how much arrives through the skip path.

Reductions stay on the device; one transfer per recorded step brings them to the host. The
history is bounded: when it holds ``keep`` records, every other one is dropped and the interval
doubles, so it always spans the whole run.

    >>> monitor = GradientMonitor().attach(model)  # every 50 steps
    >>> model.fit(data, epochs=5)
    >>> monitor.latest().node("fc1/W").grad_rms
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import GraphEngineError, require_int
from ..runtime.executor import Observer

if TYPE_CHECKING:
    from ..compiler.plan import BackwardStep, Plan, Step
    from ..model import Model
    from ..runtime.tape import Tape

#: Columns of a record's table, one row per graph node. NaN: not measured.
FIELDS = ("grad_rms", "grad_norm", "grad_max", "dead_fraction", "saturation", "update_ratio")
_RMS, _NORM, _MAX, _DEAD, _SAT, _UPDATE = range(len(FIELDS))

#: An output counts as saturated where the activation's slope is below this share of its peak
#: (the definition an activation declaring ``health = "saturation"`` measures).
SATURATED_SLOPE = 0.05


@dataclass(frozen=True)
class NodeStats:
    """One node's numbers at one recorded step; None where not measured. A gradient holding
    NaN or Inf has ``grad_rms == inf``."""

    grad_rms: float | None = None
    grad_norm: float | None = None
    grad_max: float | None = None
    dead_fraction: float | None = None
    saturation: float | None = None
    update_ratio: float | None = None

    @property
    def nonfinite(self) -> bool:
        return self.grad_rms is not None and not math.isfinite(self.grad_rms)


class Record:
    """The statistics of one recorded step: a table of :data:`FIELDS` per node, plus the
    gradient along fanned-out edges (``edges[(source, consumer)] = (rms, norm)``)."""

    __slots__ = ("step", "epoch", "loss", "index", "table", "edges")

    def __init__(self, step: int, epoch: int, index: Mapping[str, int]) -> None:
        self.step = step
        #: The epoch in progress when recorded (``model.epoch + 1``).
        self.epoch = epoch
        self.loss: float | None = None
        self.index = index
        self.table = np.full((len(index), len(FIELDS)), np.nan)
        self.edges: dict[tuple[str, str], tuple[float, float]] = {}

    def value(self, name: str, field: str) -> float | None:
        row = self.index.get(name)
        if row is None:
            return None
        value = self.table[row, FIELDS.index(field)]
        return None if np.isnan(value) else float(value)

    def node(self, name: str) -> NodeStats | None:
        """The node's numbers, or None when nothing was measured on it."""
        row = self.index.get(name)
        if row is None or np.isnan(self.table[row]).all():
            return None
        return NodeStats(*(None if np.isnan(v) else float(v) for v in self.table[row]))

    def nodes(self) -> dict[str, NodeStats]:
        measured = ~np.isnan(self.table).all(axis=1)
        return {name: self.node(name) for name, row in self.index.items() if measured[row]}

    def __repr__(self) -> str:
        count = int((~np.isnan(self.table[:, _RMS])).sum())
        return f"<Record step {self.step} epoch {self.epoch} loss {self.loss}: {count} gradients>"


class _Recording:
    """A record being filled: device scalars wait here, by kind, with where each goes; one
    transfer brings them all to the host at flush time."""

    def __init__(self, record: Record) -> None:
        self.record = record
        self.phase = "forward"
        self.last_out = -1
        self.squares: list[Any] = []  # sum of squares of a gradient: gives its RMS and norm
        self.maxima: list[Any] = []  # max |gradient|
        self.rows: list[int] = []
        self.sizes: list[int] = []
        self.health: list[Any] = []  # dead or saturated fraction of an activation's output
        self.cells: list[tuple[int, int]] = []
        self.changes: list[Any] = []  # squared norms of an update, and of the weight before it
        self.weights: list[Any] = []
        self.updated: list[int] = []
        self.edge_squares: list[Any] = []
        self.edges: list[tuple[tuple[str, str], int]] = []
        self.losses: list[Any] = []
        #: Partial sums of gradients that arrive in several pieces, and how many pieces remain.
        self.partial: dict[Any, tuple[Any, int]] = {}

    def pending(self) -> list[Any]:
        return [*self.squares, *self.maxima, *self.health, *self.changes, *self.weights,
                *self.edge_squares, *self.losses]

    def write(self, values: np.ndarray) -> None:
        """Put the host ``values`` of :meth:`pending` into the record, and empty the queues."""
        table, record = self.record.table, self.record
        parts = np.split(values, np.cumsum([len(self.squares), len(self.maxima), len(self.health),
                                            len(self.changes), len(self.weights),
                                            len(self.edge_squares)]))
        squares, maxima, health, changes, weights, edge_squares, losses = parts
        if len(squares):
            rows, sizes = np.array(self.rows), np.maximum(np.array(self.sizes), 1)
            finite = np.isfinite(squares)
            table[rows, _RMS] = np.where(finite, np.sqrt(squares / sizes), np.inf)
            table[rows, _NORM] = np.where(finite, np.sqrt(squares), np.inf)
            table[rows, _MAX] = np.where(np.isfinite(maxima), maxima, np.inf)
        if len(health):
            rows, columns = zip(*self.cells)
            table[list(rows), list(columns)] = health
        # the update of a zero weight (a fresh bias) has no ratio
        moved = weights > 0
        if moved.any():
            table[np.array(self.updated)[moved], _UPDATE] = np.sqrt(changes[moved] / weights[moved])
        for (edge, size), square in zip(self.edges, edge_squares.tolist()):
            record.edges[edge] = _rms_norm(square, size)
        if len(losses):
            record.loss = float(losses[-1])
        for queue in (self.squares, self.maxima, self.rows, self.sizes, self.health, self.cells,
                      self.changes, self.weights, self.updated, self.edge_squares, self.edges,
                      self.losses):
            queue.clear()


@dataclass
class _PlanInfo:
    """What the monitor needs to know of a backward plan."""

    pieces: dict[Any, int]  # a source name, or a (source, consumer) edge -> gradient pieces
    fanned_out: frozenset[str]  # sources whose gradient flows back along several edges


class GradientMonitor(Observer):
    """Records gradient statistics every ``every`` steps into a history of at most ``keep``
    records. Attach it with :meth:`attach` (or append it to ``model.observers``).

    The default interval keeps the cost under 5% of training time even for a deep, narrow
    network whose steps are mostly per-operator overhead (``benchmarks/monitor_overhead.py``).
    ``edges=False`` skips the per-edge gradients of fanned-out tensors.
    """

    #: Gradients of every graph node: the executor runs the unfused plan on recorded steps.
    every_node = True

    def __init__(self, every: int = 50, keep: int = 500, edges: bool = True) -> None:
        self.every = require_int(every, "GradientMonitor(every=...)", 1, GraphEngineError)
        self.keep = require_int(keep, "GradientMonitor(keep=...)", 2, GraphEngineError)
        self.edges = edges
        #: How many intervals apart kept records are; doubles each time the history is thinned.
        self.stride = 1
        self._records: list[Record] = []
        self._open: _Recording | None = None
        self._force = False
        self._index: dict[str, int] = {}
        self._plan_info: tuple[Plan, _PlanInfo] | None = None
        self._backend: Any = None

    # -- attaching -------------------------------------------------------------------------

    #: Attached by ``fit`` rather than by the user: a monitor the user attaches replaces it.
    automatic = False

    def attach(self, model: Model) -> GradientMonitor:
        if self in model.observers:
            return self
        existing = find_monitor(model)
        if existing is not None and existing.automatic:
            existing.detach(model)
        elif existing is not None:
            raise GraphEngineError("this model already has a GradientMonitor; use find_monitor(model)")
        model.observers.append(self)
        return self

    def detach(self, model: Model) -> None:
        self._close()
        model.observers.remove(self)

    # -- the history -----------------------------------------------------------------------

    @property
    def records(self) -> list[Record]:
        """The recorded steps, oldest first (the one being filled included, as far as it got)."""
        self._flush()
        return list(self._records)

    def latest(self) -> Record | None:
        records = self.records
        return records[-1] if records else None

    def clear(self) -> None:
        self._open = None
        self._records.clear()
        self.stride = 1

    def capture(self, model: Model, feeds: Mapping[str, Any], wrt: Sequence[str] = ()) -> Record:
        """Record one forward and backward pass on ``feeds`` now, without updating the model
        (a diagnosis of an untrained model, or of a saved one on a batch of data)."""
        if self not in model.observers:
            self.attach(model)
        self._close()
        self._force = True
        try:
            model.forward(feeds, training=True)
            model.backward(wrt=wrt)
        finally:
            self._force = False
        record = self._open.record
        self._close()
        return record

    # -- the observer protocol (see Model.observers) ------------------------------------------

    def _due(self, model: Model) -> bool:
        return self._force or model.step_count % (self.every * self.stride) == 0

    def wants(self, model: Model) -> bool:
        # An open record stays wanted through the update that ends its step; the next pass
        # closes it (here once its updates are in, else in on_forward).
        if self._open is not None and self._open.phase == "update":
            self._close()
        return self._open is not None or self._due(model)

    def on_forward(self, model: Model, tape: Tape, step: Step, args: Sequence[Any], value: Any) -> None:
        recording = self._open
        if recording is not None and (recording.phase != "forward" or step.out <= recording.last_out):
            self._close()
            recording = None
        if recording is None:
            if not self._due(model):
                return
            recording = self._begin(model)
        recording.last_out = step.out
        xp = model.xp
        if step.name == model.loss_name:
            recording.losses.append(value)
        # an activation plugin declares its health measure (see graphengine.Activation)
        activation = getattr(step.op, "activation", None)
        health = getattr(activation, "health", None)
        if health is not None and value.ndim >= 1:
            recording.health.append(activation.measure_health(xp, value))
            recording.cells.append((self._index[step.name], FIELDS.index(health)))

    def on_backward(self, model: Model, tape: Tape, bstep: BackwardStep, grad: Any,
                    input_grads: Sequence[Any]) -> None:
        recording = self._open
        if recording is None:
            return
        recording.phase = "backward"
        xp = model.xp
        step = bstep.step
        self._measure(xp, recording, step.name, grad)
        info = self._info(model, tape.backward_plan)
        inputs = model.graph.nodes[step.name].inputs
        for k, (slot, g) in enumerate(zip(bstep.grad_to, input_grads)):
            if slot < 0 or g is None:
                continue
            source = inputs[k]
            if self.edges and source in info.fanned_out:
                edge = (source, step.name)
                whole = self._gather(recording, edge, g, info.pieces[edge])
                if whole is not None:
                    recording.edge_squares.append(xp.vdot(whole, whole))
                    recording.edges.append((edge, whole.size))
            if source in info.pieces:
                whole = self._gather(recording, source, g, info.pieces[source])
                if whole is not None:
                    self._measure(xp, recording, source, whole)

    def on_update(self, model: Model, name: str, before: Any, after: Any) -> None:
        recording = self._open
        if recording is None:
            return
        recording.phase = "update"
        xp = model.xp
        change = after - before
        recording.changes.append(xp.vdot(change, change))
        recording.weights.append(xp.vdot(before, before))
        recording.updated.append(self._index[name])

    # -- internals --------------------------------------------------------------------------

    def _begin(self, model: Model) -> _Recording:
        if len(self._index) != len(model.graph.nodes):
            self._index = {name: row for row, name in enumerate(model.graph.nodes)}
        self._backend = model.backend
        record = Record(model.step_count, model.epoch + 1, self._index)
        self._records.append(record)
        self._open = _Recording(record)
        return self._open

    def _measure(self, xp: Any, recording: _Recording, name: str, grad: Any) -> None:
        recording.squares.append(xp.vdot(grad, grad))
        recording.maxima.append(xp.abs(grad).max())
        recording.rows.append(self._index[name])
        recording.sizes.append(grad.size)

    @staticmethod
    def _gather(recording: _Recording, key: Any, grad: Any, pieces: int) -> Any:
        """The whole gradient for ``key`` once all its pieces arrived, else None."""
        if pieces == 1:
            return grad
        total, remaining = recording.partial.get(key, (None, pieces))
        total = grad if total is None else total + grad
        if remaining == 1:
            del recording.partial[key]
            return total
        recording.partial[key] = (total, remaining - 1)
        return None

    def _info(self, model: Model, plan: Plan) -> _PlanInfo:
        if self._plan_info is None or self._plan_info[0] is not plan:
            self._plan_info = (plan, _plan_info(model, plan))
        return self._plan_info[1]

    def _flush(self) -> None:
        """Bring the open record's pending device scalars to the host, in one transfer."""
        recording = self._open
        if recording is None:
            return
        pending = recording.pending()
        if not pending:
            return
        if all(isinstance(v, np.generic) for v in pending):  # NumPy's reductions: already host scalars
            values = np.array(pending, dtype=np.float64)
        else:
            values = self._backend.to_numpy(self._backend.xp.stack(pending)).astype(np.float64)
        recording.write(values)

    def _close(self) -> None:
        self._flush()
        self._open = None
        if len(self._records) > self.keep:
            self.stride *= 2
            spacing = self.every * self.stride
            last = self._records[-1]
            self._records = [r for r in self._records[:-1] if r.step % spacing == 0] + [last]

    def __repr__(self) -> str:
        return (f"<GradientMonitor every {self.every * self.stride} steps, "
                f"{len(self._records)}/{self.keep} records>")


def _rms_norm(square_sum: float, size: int) -> tuple[float, float]:
    if not math.isfinite(square_sum):
        return math.inf, math.inf
    return math.sqrt(square_sum / max(size, 1)), math.sqrt(square_sum)


def _plan_info(model: Model, plan: Plan) -> _PlanInfo:
    graph = model.graph
    pieces: dict[Any, int] = {}
    consumers: dict[str, set[str]] = {}
    for bstep in plan.backward:
        step = bstep.step
        for k, slot in enumerate(bstep.grad_to):
            if slot < 0:
                continue
            source = graph.nodes[step.name].inputs[k]
            consumers.setdefault(source, set()).add(step.name)
            pieces[(source, step.name)] = pieces.get((source, step.name), 0) + 1
            if graph.is_source(source):
                pieces[source] = pieces.get(source, 0) + 1
    fanned_out = frozenset(s for s, users in consumers.items() if len(users) > 1)
    return _PlanInfo(pieces, fanned_out)


def find_monitor(model: Model) -> GradientMonitor | None:
    """The model's GradientMonitor, if one is attached."""
    return next((o for o in model.observers if isinstance(o, GradientMonitor)), None)
