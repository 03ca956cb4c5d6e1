"""Model: a compiled graph with numbers, as a thin facade over parts with one job each.

- :class:`~graphengine.runtime.parameters.ParameterStore`: the arrays, frozen set, versions;
- plans (:func:`~graphengine.compiler.plan.build_plan`), made once per purpose and cached here;
- :class:`~graphengine.runtime.executor.Executor`: runs plans forward and backward on tapes;
- :mod:`graphengine.train`: the optimizer step (``update``), ``fit``/``evaluate`` (``loop``);
- :mod:`graphengine.io`: files; :mod:`graphengine.tools`: debug mode, monitor, profile.

The model's own run state is the tape of its last ``forward()``, which ``backward()``
consumes; ``run``, ``predict`` and ``evaluate`` make tapes of their own and touch nothing else,
so they can run from several threads at once and between a ``forward`` and its ``backward``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from .compiler.plan import Plan, build_plan, check_loss, garbage_collection_paused
from .distributed import Communicator, DataParallel, attach, writes
from .errors import CompileError, GraphEngineError, checked_keywords
from .io import serialize
from .ir import graph as graph_module
from .ir.contracts import LossOp, Optimizer
from .ir.graph import Tensor
from .ir.operators import Parameter
from .runtime.backend import Backend, get_backend
from .runtime.executor import Executor, Observer
from .runtime.feeds import check_feed_names, feed_array
from .runtime.parameters import ParameterStore
from .runtime.tape import Tape
from .tools.debug import debug_active, debug_observer
from .tools.profile import Profile, profile
from .train import loop
from .train.flat import FlatParameters
from .train.metrics import get_metrics
from .train.regularization import Schedule, install
from .train.update import apply_update
from .train.update import optimizer as make_optimizer

if TYPE_CHECKING:
    from .ir.graph import Graph

Feeds = Mapping[str, Any]


class Model:
    """A compiled graph: ``forward``/``backward``/``step`` by hand, or ``fit``/``predict``."""

    @checked_keywords
    def __init__(self, graph: Graph, *, loss: Tensor | None = None,
                 outputs: Sequence[Tensor] | Tensor | None = None,
                 optimizer: Optimizer | str | None = None, backend: str | Backend = "numpy",
                 seed: int = 0, parameters: Mapping[str, Any] | None = None,
                 initial_values: Mapping[str, Any] | None = None,
                 regularizer: Any = None, constraint: Any = None, clip_norm: float | None = None,
                 clip_value: float | None = None, schedule: Schedule | None = None,
                 metrics: Any = None, distributed: Communicator | None = None) -> None:
        self.graph = graph
        #: The nodes the graph had when compiled: those added later are not in this model.
        self.compiled_nodes = frozenset(graph.nodes)
        #: What fit and evaluate report beside the loss (see graphengine.train.metrics).
        self.metrics = get_metrics(metrics)
        self.backend = get_backend(backend)
        self.xp = self.backend.xp
        self.seed = seed
        if loss is None and not outputs:
            raise CompileError("compile() needs a loss, outputs, or both")
        self.loss_name = _node_name(graph, loss, "loss") if loss is not None else None
        if self.loss_name is not None:
            check_loss(graph, self.loss_name)
        if isinstance(outputs, Iterable) and not isinstance(outputs, str):
            outputs = list(outputs)
        elif outputs is not None:
            outputs = [outputs]
        self.output_names = [_node_name(graph, t, "output") for t in outputs or []]
        #: The loss whose ``predict`` maps the default output (softmax cross-entropy ->
        #: probabilities), when ``outputs`` were not given.
        self.link = None
        if not self.output_names:
            loss_node = graph.nodes[self.loss_name]
            if not isinstance(loss_node.op, LossOp):
                raise CompileError(f"the loss {self.loss_name!r} is built by hand: pass "
                                   f"outputs=[...] to compile() to say what predict() returns")
            self.output_names = [loss_node.inputs[0]]
            self.link = loss_node.op.loss
        self.optimizer = make_optimizer(optimizer) if isinstance(optimizer, str) else optimizer
        #: The mode ``forward`` runs in (``train()`` / ``eval()``); other runs choose their own.
        self.training = True
        self.step_count = 0
        self.epoch = 0
        #: Called on the gradients before each update: ``fn(model, grads) -> None`` (in place).
        self.gradient_transforms: list[Callable[[Model, dict[str, Any]], None]] = []
        #: Called after each update: ``fn(model) -> None`` (max-norm constraints).
        self.constraints: list[Callable[[Model], None]] = []
        #: Observers of training steps (statistics, debug): see runtime.executor.Observer.
        self.observers: list[Observer] = []
        self.store = ParameterStore(graph, self.backend, seed, parameters, initial_values)
        self.executor = Executor(self, graph, self.backend, self.store)
        self._plans: dict[Any, Plan] = {}
        self.flat: FlatParameters | None = None
        self.train_plan = self.plan("train") if self.loss_name else None
        # Trainable parameters of the training plan share one buffer per dtype (shared ones
        # belong to another model and stay as they are); see graphengine.train.flat.
        packable = [n for n in (self.train_plan.parameters if self.train_plan else ())
                    if graph.nodes[n].op.trainable and n not in self.store.shared]
        self.flat = FlatParameters(self.xp, self.store.arrays, packable)
        for plan in self._plans.values():
            self.flat.bind(plan)
        self.optimizer_state: dict[str, dict[str, Any]] = {}
        install(self, regularizer=regularizer, constraint=constraint, clip_norm=clip_norm,
                clip_value=clip_value, schedule=schedule)
        #: Random numbers of stochastic operators (dropout) and the shuffling order of fit: both
        #: go into checkpoints, so a resumed run draws what the uninterrupted one would have.
        self.rng = self.backend.make_rng(seed + 1)
        self.data_rng = np.random.default_rng(seed + 2)
        #: Data-fitted layers (preprocessing) already fitted: fit() leaves them alone.
        self.fitted_layers: set[str] = set()
        #: The tape of the last forward(), which backward() consumes.
        self.tape: Tape | None = None
        self._grads: dict[str, Any] = {}
        self._stepped = False  # whether step() used the gradients of the last backward()
        #: Data parallelism over the ranks of an MPI job (see graphengine.distributed), or None.
        self.distributed: DataParallel | None = None
        if distributed is not None:
            attach(self, distributed)

    # -- parameters ------------------------------------------------------------------------

    def parameters(self) -> dict[str, Any]:
        """Parameter name -> array (the model's own arrays: writing into them changes the model)."""
        return dict(self.store.arrays)

    def set_parameters(self, values: Mapping[str, Any]) -> None:
        """Copy host arrays into parameters by name, in place (cast to each parameter's dtype)."""
        self.store.set(values)

    def trainable_parameters(self) -> list[str]:
        """Names of the parameters the optimizer updates: trainable and not frozen."""
        return list(self.store.trainable())

    @property
    def frozen(self) -> frozenset[str]:
        """The parameters ``freeze`` took out of training."""
        return self.store.frozen

    def gradients(self) -> dict[str, Any]:
        """Parameter name -> gradient from the last backward (absent where none flowed). The
        arrays are the model's gradient buffers, which the next backward overwrites in place
        (as PyTorch's ``.grad``): copy what you keep across steps."""
        return dict(self._grads)

    def input_gradient(self, name: str) -> Any:
        """The gradient of the loss with respect to input ``name`` (after ``backward(wrt=...)``)."""
        tape = self.tape
        grad = tape.gradient(name) if tape is not None else None
        if grad is None or self.graph.nodes[name].kind != "input":
            raise GraphEngineError(f"no gradient for input {name!r}: call backward(wrt=[{name!r}]) "
                                   f"after forward()")
        return grad

    def freeze(self, *patterns: str) -> list[str]:
        """Stop training the parameters a pattern names: a parameter (``"fc1/W"``) or a layer
        (``"fc1"`` or ``"fc1/"``, not ``"fc10"``). Returns their names. A freeze that would
        leave nothing to train raises ``CompileError`` and changes nothing."""
        names = self.store.matching(patterns)
        self._set_frozen(self.store.frozen | set(names))
        return names

    def unfreeze(self, *patterns: str) -> list[str]:
        """Train again the parameters a pattern names (as in :meth:`freeze`); returns their names."""
        names = self.store.matching(patterns)
        self._set_frozen(self.store.frozen - set(names))
        return names

    def _set_frozen(self, frozen: frozenset[str]) -> None:
        # The training plan for ``frozen`` is built before the model commits to it: if it
        # cannot be (nothing left to train), the model stays as it was.
        previous = self.store.frozen, self._plans, self.train_plan
        self.store.frozen, self._plans = frozenset(frozen), {}
        try:
            self.train_plan = self.plan("train") if self.loss_name else None
        except BaseException:
            self.store.frozen, self._plans, self.train_plan = previous
            raise

    # -- plans ------------------------------------------------------------------------------

    def plan(self, purpose: str, fetches: tuple[str, ...] = (), wrt: tuple[str, ...] = ()) -> Plan:
        """The plan for ``purpose``: ``"train"`` (the loss, its backward to the trainable
        parameters and the inputs ``wrt``, and the nodes ``fetches``) or ``"infer"`` (the nodes
        ``fetches``, by default the outputs). Built once, then cached."""
        key = (purpose, fetches, wrt)
        plan = self._plans.get(key)
        if plan is None:
            missing = [f for f in fetches if f not in self.graph.nodes]
            if missing:
                raise GraphEngineError(f"model of graph {self.graph.name!r} has no node {missing}")
            late = [f for f in fetches if f not in self.compiled_nodes]
            if late:
                raise GraphEngineError(
                    f"nodes {late} were added to graph {self.graph.name!r} after it was compiled "
                    f"into this model, which has neither them nor their parameters: compile "
                    f"again (graph.compile(...), with parameters=model.parameters() to keep "
                    f"the trained weights)")
            if purpose == "train":
                plan = build_plan(self.graph, (self.loss_name, *fetches), loss=self.loss_name,
                                  wrt=wrt, frozen=self.store.frozen)
            else:
                plan = build_plan(self.graph, fetches or tuple(self.output_names))
            self._plans[key] = plan
            if self.flat is not None:
                self.flat.bind(plan)
        return plan

    # -- modes -------------------------------------------------------------------------------

    def train(self) -> Model:
        """``forward`` runs in training mode (dropout on, batch statistics)."""
        self.training = True
        return self

    def eval(self) -> Model:
        """``forward`` runs in evaluation mode."""
        self.training = False
        return self

    @contextlib.contextmanager
    def mode(self, training: bool) -> Iterator[Model]:
        """Training (``True``) or evaluation mode inside the block, the mode before it after it,
        even when the block fails: ``with model.mode(training=False): ...``."""
        was_training = self.training
        self.training = training
        try:
            yield self
        finally:
            self.training = was_training

    # -- observers and debug mode --------------------------------------------------------------

    #: Debug mode of this model alone (see the ``debug`` property).
    _debug = False

    @property
    def debug(self) -> bool:
        """Debug mode: every forward value, gradient and updated parameter is checked for NaN/Inf
        and for the shapes the operators promise, naming the node that broke them (see
        :mod:`graphengine.tools.debug`). On for this model, or for all inside ``with ge.debug():``."""
        return self._debug or debug_active()

    @debug.setter
    def debug(self, enabled: bool) -> None:
        self._debug = bool(enabled)

    def active_observers(self, inference: bool = False) -> list[Observer]:
        """The observers of the coming run: debug mode's checks, and for a training step the
        observers that want it."""
        observers = [o for o in self.observers if (o.inference or not inference) and o.wants(self)]
        return [debug_observer(self), *observers] if self.debug else observers

    # -- running ---------------------------------------------------------------------------------

    def forward(self, feeds: Feeds, training: bool | None = None) -> Any:
        """Run the training plan forward; returns the loss as a float (or, for a model without
        a loss, the outputs as in :meth:`run`). ``training`` sets the model's mode, which stays:
        the backward of this forward runs in it too."""
        if self.loss_name is None:
            return self.run(feeds)
        if training is not None:
            self.training = training
        # The last step's tape and gradients go before this forward allocates its own.
        self.tape, self._grads = None, {}
        with (self.distributed.step(feeds) if self.distributed else contextlib.nullcontext()):
            self.tape = self.executor.forward(self.train_plan, feeds, training=self.training,
                                              rng=self.rng, observers=self.active_observers())
        return float(self.backend.to_numpy(self.tape.value(self.loss_name)))

    def backward(self, wrt: Sequence[str] = ()) -> None:
        """Gradients of the loss for every trainable parameter, and for the inputs in ``wrt``.
        Consumes the tape of the last ``forward()``."""
        tape = self.tape
        if tape is None:
            raise GraphEngineError("backward() needs a forward() first")
        plan = None
        if wrt:
            wrt = tuple(wrt)
            for name in wrt:
                if name not in self.graph.nodes or self.graph.nodes[name].kind != "input":
                    raise GraphEngineError(f"wrt names inputs of the graph; {name!r} is not one "
                                           f"(inputs: {self.graph.inputs()})")
            plan = self.plan("train", wrt=wrt)
        # Observers that arrive after a fused forward cannot be shown nodes now.
        observers = self.active_observers()
        if tape.fused:
            observers = [o for o in observers if not o.every_node]
        with (self.distributed.collective() if self.distributed else contextlib.nullcontext()):
            grads = self.executor.backward(tape, plan, observers)
        plan = tape.backward_plan
        self._grads = {name: grads[slot] for name, slot in plan.parameter_slots
                       if grads[slot] is not None}
        if self.distributed:
            self._grads = self.distributed.average(self, self._grads)
        self._stepped = False

    def idle_step(self) -> None:
        """A distributed model's part in a step whose share of the global batch is empty on
        this rank: it takes part in averaging the gradients with none of its own, and ``step()``
        then applies the other ranks' average."""
        if not self.distributed:
            raise GraphEngineError("idle_step() is for a distributed model: compile(..., "
                                   "distributed=ge.distributed.init())")
        self.tape = None
        self._grads = self.distributed.idle(self)
        self._stepped = False

    def step(self) -> None:
        """Update every trainable parameter from its gradient with the optimizer."""
        if self.optimizer is None:
            raise GraphEngineError("this model was compiled without an optimizer: pass "
                                   "optimizer=ge.optimizer('sgd', lr=0.1) to compile()")
        if not self._grads:
            raise GraphEngineError("step() needs gradients: call forward() and backward() first")
        if self._stepped:
            raise GraphEngineError("step() already applied the gradients of the last backward(); "
                                   "call forward() and backward() again before the next step()")
        apply_update(self, dict(self._grads), self.active_observers())
        self._stepped = True

    def train_step(self, feeds: Feeds) -> float:
        """forward + backward + step; returns the loss."""
        loss = self.forward(feeds, training=True)
        self.backward()
        self.step()
        return loss

    def run(self, feeds: Feeds, fetches: Sequence[Tensor | str] | None = None,
            training: bool = False) -> dict[str, np.ndarray]:
        """Compute ``fetches`` (default: the outputs) and return them as host arrays by name, in
        evaluation mode unless ``training``; the model's own mode is left as it was."""
        names = tuple(_node_name(self.graph, f, "fetch") for f in fetches) if fetches else tuple(
            self.output_names)
        tape = self.executor.forward(self.plan("infer", names), feeds, training=training,
                                     rng=self.rng, observers=self.active_observers(inference=True))
        return {n: self.backend.to_numpy(tape.value(n)) for n in names}

    def predict(self, feeds: Feeds, batch_size: int | None = None) -> Any:
        """Outputs in evaluation mode, as host arrays: one array for one output, else a dict.
        With a loss's default output, its link applies (softmax cross-entropy -> probabilities)."""
        plan = self.plan("infer", tuple(self.output_names))
        if isinstance(feeds, Mapping):  # targets are not needed to predict: drop them
            inputs = set(self.graph.inputs())
            feeds = {k: v for k, v in feeds.items() if k in plan.feeds or k not in inputs}
        check_feed_names(self.graph, plan, feeds)
        n = loop.dataset_length(feeds)
        chunks: dict[str, list[np.ndarray]] = {name: [] for name in self.output_names}
        observers = self.active_observers(inference=True)
        for batch in loop.batches(feeds, n, n if batch_size is None else batch_size, order=None):
            tape = self.executor.forward(plan, batch, training=False, rng=self.rng,
                                         observers=observers)
            for name in self.output_names:
                value = tape.value(name)
                if self.link is not None:
                    value = self.link.predict(self.xp, value)
                chunks[name].append(self.backend.to_numpy(value))
        out = {name: np.concatenate(parts) if parts[0].ndim else parts[0]
               for name, parts in chunks.items()}
        return out[self.output_names[0]] if len(out) == 1 else out

    def feed_array(self, name: str, value: Any) -> Any:
        """``value`` as an array this model can be fed (see runtime.feeds.feed_array)."""
        return feed_array(self.backend, name, value)

    # -- training, tools and files -----------------------------------------------------------------

    def profile(self, feeds: Feeds, **options: Any) -> Profile:
        """Per-node forward/backward time and memory of a training step, as a table
        (``print(model.profile(feeds))``); see :func:`graphengine.tools.profile.profile`."""
        return profile(self, feeds, **options)

    #: Train: ``model.fit(data, epochs=10, batch_size=32, validation=val, metrics=["mae"])``;
    #: the function itself, so that ``help(model.fit)`` shows every option.
    fit = loop.fit

    def fit_preprocessing(self, data: Feeds, refit: bool = False) -> list[str]:
        """Fit data-fitted layers (preprocessing) on ``data``; see
        :func:`graphengine.train.loop.fit_preprocessing`."""
        return loop.fit_preprocessing(self, data, refit=refit)

    #: Mean loss, accuracy where the loss defines it, and metrics, in evaluation mode.
    evaluate = loop.evaluate

    def save(self, path: str | os.PathLike, *, training_state: bool = True) -> None:
        """Write graph, weights (and optimizer state, epoch, RNG states) to ``path``; see
        :func:`graphengine.io.serialize.save`. In a distributed run only rank 0 writes."""
        if writes(self):
            serialize.save(self, path, training_state=training_state)

    def load_weights(self, path: str | os.PathLike, *, strict: bool = True,
                     training_state: bool = False) -> serialize.LoadReport:
        """Load parameters from a model file by name; see :func:`graphengine.io.serialize.load_weights`."""
        return serialize.load_weights(self, path, strict=strict, training_state=training_state)

    def summary(self, file: TextIO | None = None) -> str:
        """A table of the model's layers: name, kind, output shape, parameter count, and
        whether they train; then the totals. Prints it (to ``file``, default stdout) and
        returns it; ``print(model)`` prints it too, ``str(model)`` only returns it."""
        text = summary_table(self)
        print(text, file=file or sys.stdout)
        return text

    def __str__(self) -> str:
        return summary_table(self)

    def __repr__(self) -> str:
        count = sum(int(np.prod(p.shape)) for p in self.store.arrays.values())
        return (f"<Model {self.graph.name!r} on {self.backend.name}: {len(self.graph.nodes)} nodes, "
                f"{count} parameters, optimizer {self.optimizer!r}>")


def summary_table(model: Model) -> str:
    """The table of :meth:`Model.summary`. A row per group of nodes (``Graph.groups``: a layer,
    named by its full scope, or a top-level name scope written by hand) or per node outside
    one; constants are left out."""
    graph, store = model.graph, model.store
    layers, groups = graph.layers(), graph.groups()
    rows: dict[str, dict[str, Any]] = {}
    totals = {"trainable": 0, "frozen": 0, "fixed": 0}
    for name, node in graph.nodes.items():
        if name not in model.compiled_nodes or node.kind == "constant":
            continue
        key = groups.get(name, name)
        kind = layers[key]["kind"] if key in layers else node.kind
        row = rows.setdefault(key, {"kind": kind, "count": 0, "states": set()})
        row["shape"] = node.shape  # a layer's output is the last node it added
        if isinstance(node.op, Parameter):
            size = int(np.prod(node.shape))
            state = ("frozen" if name in store.frozen else
                     "trainable" if node.op.trainable else "fixed")
            row["count"] += size
            row["states"].add(state)
            totals[state] += size
    table = [("layer", "kind", "output shape", "params", "training")]
    for key, row in rows.items():
        dims = ["N" if d is None else str(d) for d in row["shape"]]
        shape = f"({dims[0]},)" if len(dims) == 1 else f"({', '.join(dims)})"
        table.append((key, row["kind"], shape, f"{row['count']:,}" if row["states"] else "",
                      " + ".join(sorted(row["states"]))))
    widths = [max(len(r[i]) for r in table) for i in range(5)]
    lines = [f"Model {graph.name!r} on {model.backend.name}, optimizer "
             f"{type(model.optimizer).__name__ if model.optimizer else 'none'}"]
    for i, r in enumerate(table):
        lines.append("  ".join(c.rjust(w) if i and j == 3 else c.ljust(w)
                               for j, (c, w) in enumerate(zip(r, widths))).rstrip())
        if i == 0:
            lines.append("-" * len(lines[-1]))
    total = sum(totals.values())
    lines.append("-" * len(lines[1]))
    lines.append(f"{total:,} parameters: {totals['trainable']:,} trainable, {totals['frozen']:,} "
                 f"frozen, {totals['fixed']:,} not trained (running statistics)")
    return "\n".join(lines)


def _node_name(graph: Graph, t: Any, what: str) -> str:
    if isinstance(t, Tensor):
        if t.graph is not graph:
            raise CompileError(f"{what} {t.name!r} belongs to graph {t.graph.name!r}, not {graph.name!r}")
        if t.name not in graph.nodes:
            raise CompileError(f"{what} {t.name!r} is no longer a node of graph {graph.name!r}")
        return t.name
    if isinstance(t, str) and t in graph.nodes:
        return t
    raise CompileError(f"{what} {t!r} is not a tensor or node name of graph {graph.name!r}")


def compile_model(graph: Graph, **options: Any) -> Model:
    """What ``Graph.compile`` calls. Compiling allocates a few long-lived objects per node
    (plans, parameters, their buffers), so it runs with the garbage collector held off, as
    planning does (see :func:`~graphengine.compiler.plan.garbage_collection_paused`)."""
    with garbage_collection_paused():
        return Model(graph, **options)


graph_module.compiler = compile_model
