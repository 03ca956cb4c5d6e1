"""Model: a compiled graph with numbers. Runs plans forward and backward, owns parameters,
gradients and optimizer state."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .backend import Backend
from .base import LossOp, Optimizer
from .compile import Plan, build_plan
from .errors import BackendError, CompileError, FeedError, GraphEngineError
from .operators import Parameter
from .plugins import get_plugin_manager

if TYPE_CHECKING:
    from .graph import Graph, Tensor
    from .training import History

Feeds = Mapping[str, Any]


def get_backend(backend: str | Backend) -> Backend:
    if isinstance(backend, Backend):
        return backend
    return get_plugin_manager().backends.get(backend)()


def optimizer(name: str, **hyper: Any) -> Optimizer:
    """An optimizer by registered name: ``ge.optimizer("adam", lr=1e-3)``."""
    entry = get_plugin_manager().optimizers.entry(name)
    try:
        return entry.obj(**hyper)
    except TypeError as exc:
        raise GraphEngineError(f"optimizer {name!r} from {entry.origin()} rejected {hyper}: "
                               f"{exc}") from None


def initial_value(node_name: str, op: Parameter, seed: int) -> np.ndarray:
    """A parameter's first value, from a generator seeded by the model seed and the parameter's
    name, so adding a layer does not change the initial values of the others."""
    from .base import fans
    init = op.init if isinstance(op.init, dict) else {"name": op.init}
    config = {k: v for k, v in init.items() if k != "name"}
    initializer = get_plugin_manager().initializers.get(init["name"])(**config)
    rng = np.random.default_rng([seed, zlib.crc32(node_name.encode())])
    shape = tuple(op.spec.shape)
    value = np.asarray(initializer(rng, shape, *fans(shape)), dtype=op.spec.dtype)
    if value.shape != shape:
        raise GraphEngineError(f"initializer {init['name']!r} returned shape {value.shape} for "
                               f"parameter {node_name!r} of shape {shape}")
    return value


class Model:
    """A compiled graph: ``forward``/``backward``/``step`` by hand, or ``fit``/``predict``."""

    def __init__(self, graph: Graph, *, loss: Tensor | None = None,
                 outputs: Sequence[Tensor] | Tensor | None = None,
                 optimizer: Optimizer | str | None = None, backend: str | Backend = "numpy",
                 seed: int = 0, parameters: Mapping[str, Any] | None = None) -> None:
        self.graph = graph
        self.backend = get_backend(backend)
        self.xp = self.backend.xp
        self.seed = seed
        if loss is None and not outputs:
            raise CompileError("compile() needs a loss, outputs, or both")
        self.loss_name = _node_name(graph, loss, "loss") if loss is not None else None
        if isinstance(outputs, Iterable) and not isinstance(outputs, str):
            outputs = list(outputs)
        elif outputs is not None:
            outputs = [outputs]
        self.output_names = [_node_name(graph, t, "output") for t in outputs or []]
        self._link = None
        if not self.output_names:
            loss_node = graph.nodes[self.loss_name]
            if not isinstance(loss_node.op, LossOp):
                raise CompileError(f"the loss {self.loss_name!r} is built by hand: pass "
                                   f"outputs=[...] to compile() to say what predict() returns")
            self.output_names = [loss_node.inputs[0]]
            self._link = loss_node.op.loss
        if isinstance(optimizer, str):
            optimizer = globals()["optimizer"](optimizer)
        self.optimizer = optimizer
        self.training = True
        self.step_count = 0
        self.epoch = 0
        #: Called on the gradients before each update: ``fn(model, grads) -> None`` (in place).
        self.gradient_transforms: list[Callable[[Model, dict[str, Any]], None]] = []
        #: Called after each update: ``fn(model) -> None`` (max-norm constraints).
        self.constraints: list[Callable[[Model], None]] = []
        #: Observers see values and gradients during steps they ask for (statistics, debug).
        self.observers: list[Any] = []
        self.frozen: set[str] = set()
        self._plans: dict[Any, Plan] = {}
        self._values: list[Any] = []
        self._grads: list[Any] = []
        self._plan: Plan | None = None
        self.train_plan = self._get_plan("train") if self.loss_name else None
        self._init_parameters(parameters or {})
        self.optimizer_state: dict[str, dict[str, Any]] = {}
        stochastic = self.backend.make_rng(seed + 1)
        for node in graph.nodes.values():
            node.op.rng = stochastic
            node.op.training = True

    # -- parameters ------------------------------------------------------------------------

    def _init_parameters(self, shared: Mapping[str, Any]) -> None:
        self._params: dict[str, Any] = {}
        for name, node in self.graph.nodes.items():
            if not isinstance(node.op, Parameter):
                continue
            if name in shared:
                value = shared[name]
                self.backend.check_array(value, f"shared parameter {name!r}")
                if tuple(value.shape) != node.shape:
                    raise CompileError(f"shared parameter {name!r} has shape {value.shape}, "
                                       f"the graph needs {node.shape}")
            else:
                value = self.backend.asarray(initial_value(name, node.op, self.seed))
            self._params[name] = value
        self._constants = {name: self.backend.asarray(node.op.value)
                           for name, node in self.graph.nodes.items() if node.kind == "constant"}

    def parameters(self) -> dict[str, Any]:
        """Parameter name -> array (the model's own arrays: writing into them changes the model)."""
        return dict(self._params)

    def trainable_parameters(self) -> list[str]:
        return [n for n in self._params
                if self.graph.nodes[n].op.trainable and n not in self.frozen]

    def gradients(self) -> dict[str, Any]:
        """Parameter name -> gradient from the last backward (absent where none flowed)."""
        plan = self._plan
        if plan is None or not self._grads:
            return {}
        out = {}
        for name in self._params:
            slot = plan.slots.get(name)
            if slot is not None and self._grads[slot] is not None:
                out[name] = self._grads[slot]
        return out

    def input_gradient(self, name: str) -> Any:
        """The gradient of the loss with respect to input ``name`` (after ``backward(wrt=...)``)."""
        slot = self._plan.slots.get(name) if self._plan else None
        if slot is None or not self._grads or self._grads[slot] is None:
            raise GraphEngineError(f"no gradient for input {name!r}: call backward(wrt=[{name!r}]) "
                                   f"after forward()")
        return self._grads[slot]

    def freeze(self, *patterns: str) -> list[str]:
        """Stop training parameters whose names start with any pattern (``"fc1/"``, ``"fc1/W"``)."""
        names = [n for n in self._params if any(n == p or n.startswith(p.rstrip("/") + "/")
                                                for p in patterns)]
        if not names:
            raise GraphEngineError(f"no parameter matches {patterns}; parameters: {list(self._params)}")
        self.frozen.update(names)
        self._plans.clear()
        self.train_plan = self._get_plan("train")
        return names

    def unfreeze(self, *patterns: str) -> None:
        self.frozen = {n for n in self.frozen if not any(n.startswith(p) for p in patterns)}
        self._plans.clear()
        self.train_plan = self._get_plan("train")

    # -- plans ------------------------------------------------------------------------------

    def _get_plan(self, purpose: str, fetches: tuple[str, ...] = (), wrt: tuple[str, ...] = ()) -> Plan:
        key = (purpose, fetches, wrt)
        plan = self._plans.get(key)
        if plan is None:
            if purpose == "train":
                plan = build_plan(self.graph, (self.loss_name, *fetches), loss=self.loss_name,
                                  wrt=wrt, frozen=self.frozen)
            else:
                plan = build_plan(self.graph, fetches or tuple(self.output_names))
            self._plans[key] = plan
        return plan

    def _set_mode(self, training: bool) -> None:
        if training != self.training:
            self.training = training
            for node in self.graph.nodes.values():
                node.op.training = training

    def train(self) -> Model:
        self._set_mode(True)
        return self

    def eval(self) -> Model:
        self._set_mode(False)
        return self

    # -- feeds -------------------------------------------------------------------------------

    def _load_feeds(self, plan: Plan, feeds: Feeds, values: list[Any]) -> int | None:
        if not isinstance(feeds, Mapping):
            raise FeedError(f"feeds must be a dict of input name -> array, got {type(feeds).__name__}")
        missing = [n for n in plan.feeds if n not in feeds]
        if missing:
            raise FeedError(f"missing feed(s) {missing}: this computation needs inputs "
                            f"{list(plan.feeds)}")
        unknown = [n for n in feeds if n not in self.graph.nodes or self.graph.nodes[n].kind != "input"]
        if unknown:
            raise FeedError(f"unknown feed(s) {unknown}: graph {self.graph.name!r} has inputs "
                            f"{self.graph.inputs()}")
        batch = None
        for name in plan.feeds:
            value = feeds[name]
            spec = self.graph.nodes[name].spec
            if not self.backend.is_array(value):
                if any(t.__module__.split(".")[0] in ("cupy", "torch", "jax") for t in type(value).__mro__):
                    raise BackendError(f"feed {name!r} is a {type(value).__module__}."
                                       f"{type(value).__name__}, but the model runs on backend "
                                       f"{self.backend.name!r}; convert it explicitly first")
                value = np.asarray(value)
            kind = np.dtype(value.dtype).kind
            want = np.dtype(spec.dtype).kind
            if kind not in "biuf" or (want in "iub" and kind == "f"):
                raise FeedError(f"feed {name!r} has dtype {value.dtype}, input {name!r} is "
                                f"{spec.dtype}: convert it (floats are never truncated to ints)")
            if len(value.shape) != len(spec.shape) or any(
                    d is not None and d != v for d, v in zip(spec.shape, value.shape)):
                raise FeedError(f"feed {name!r} has shape {tuple(value.shape)}, input {name!r} "
                                f"expects {spec.shape} (None = any batch size)")
            for d, v in zip(spec.shape, value.shape):
                if d is None:
                    if batch is not None and v != batch:
                        raise FeedError(f"feeds disagree on the batch size: {name!r} has {v}, "
                                        f"an earlier feed has {batch}")
                    batch = v
            if self.backend.is_array(value):
                if value.dtype != spec.dtype:
                    value = value.astype(spec.dtype)
            else:
                value = self.backend.asarray(value, dtype=spec.dtype)
            values[plan.slots[name]] = value
        return batch

    def _prepare(self, plan: Plan, feeds: Feeds) -> list[Any]:
        values: list[Any] = [None] * len(plan.slots)
        self._load_feeds(plan, feeds, values)
        for name in plan.parameters:
            values[plan.slots[name]] = self._params[name]
        for name in plan.constants:
            values[plan.slots[name]] = self._constants[name]
        return values

    # -- running ---------------------------------------------------------------------------------

    def _run_forward(self, plan: Plan, values: list[Any], observers: Sequence[Any] = ()) -> None:
        xp = self.xp
        if not observers:
            for step in plan.steps:
                values[step.out] = step.op.forward(xp, *[values[a] for a in step.args])
                for slot in step.release:
                    values[slot] = None
            return
        for step in plan.steps:
            args = [values[a] for a in step.args]
            value = step.op.forward(xp, *args)
            for observer in observers:
                observer.on_forward(self, step, args, value)
            values[step.out] = value
            for slot in step.release:
                values[slot] = None

    def _run_backward(self, plan: Plan, values: list[Any], observers: Sequence[Any] = ()) -> list[Any]:
        xp = self.xp
        grads: list[Any] = [None] * len(values)
        loss_slot = plan.slots[plan.loss]
        grads[loss_slot] = xp.ones((), dtype=plan.specs[loss_slot].dtype)
        for bstep in plan.backward:
            step = bstep.step
            grad = grads[step.out]
            if grad is None:
                continue
            kept = tuple(values[s] if s >= 0 else None for s in bstep.kept_args)
            output = values[bstep.kept_out] if bstep.kept_out >= 0 else None
            input_grads = step.op.backward(xp, kept, output, grad)
            for observer in observers:
                observer.on_backward(self, step, grad, input_grads)
            for slot, g in zip(bstep.grad_to, input_grads):
                if slot < 0 or g is None:
                    continue
                previous = grads[slot]
                # A fan-out accumulates; never in place, since g may alias another gradient.
                grads[slot] = g if previous is None else previous + g
            if step.out != loss_slot:
                grads[step.out] = None
            for slot in bstep.release:
                values[slot] = None
        return grads

    def _observers(self) -> list[Any]:
        return [o for o in self.observers if o.wants(self)]

    def forward(self, feeds: Feeds, training: bool | None = None) -> Any:
        """Run the training plan forward; returns the loss as a float (or, for a model without
        a loss, the outputs as in :meth:`run`)."""
        if self.loss_name is None:
            return self.run(feeds)
        self._set_mode(self.training if training is None else training)
        plan = self.train_plan
        values = self._prepare(plan, feeds)
        self._run_forward(plan, values, self._observers())
        self._plan, self._values, self._grads = plan, values, []
        return float(self.backend.to_numpy(values[plan.slots[self.loss_name]]))

    def backward(self, wrt: Sequence[str] = ()) -> None:
        """Gradients of the loss for every trainable parameter, and for the inputs in ``wrt``."""
        if self._plan is None or not self._values:
            raise GraphEngineError("backward() needs a forward() first")
        if wrt:
            wrt = tuple(wrt)
            for name in wrt:
                if name not in self.graph.nodes or self.graph.nodes[name].kind != "input":
                    raise GraphEngineError(f"wrt names inputs of the graph; {name!r} is not one "
                                           f"(inputs: {self.graph.inputs()})")
            self._plan = self._get_plan("train", wrt=wrt)
        self._grads = self._run_backward(self._plan, self._values, self._observers())

    def step(self) -> None:
        """Update every trainable parameter from its gradient with the optimizer."""
        if self.optimizer is None:
            raise GraphEngineError("this model was compiled without an optimizer: pass "
                                   "optimizer=ge.optimizer('sgd', lr=0.1) to compile()")
        grads = self.gradients()
        for transform in self.gradient_transforms:
            transform(self, grads)
        self.step_count += 1
        xp = self.xp
        observers = self._observers()
        for name in self.trainable_parameters():
            grad = grads.get(name)
            if grad is None:
                continue
            param = self._params[name]
            state = self.optimizer_state.get(name)
            if state is None:
                state = self.optimizer_state[name] = self.optimizer.init_state(xp, param)
            before = param.copy() if observers else None
            self.optimizer.update(xp, param, grad, state, self.step_count)
            for observer in observers:
                observer.on_update(self, name, before, param)
        for constraint in self.constraints:
            constraint(self)

    def train_step(self, feeds: Feeds) -> float:
        """forward + backward + step; returns the loss."""
        loss = self.forward(feeds, training=True)
        self.backward()
        self.step()
        return loss

    def run(self, feeds: Feeds, fetches: Sequence[Tensor | str] | None = None,
            training: bool = False) -> dict[str, np.ndarray]:
        """Compute ``fetches`` (default: the outputs) and return them as host arrays by name."""
        names = tuple(_node_name(self.graph, f, "fetch") for f in fetches) if fetches else tuple(
            self.output_names)
        self._set_mode(training)
        plan = self._get_plan("infer", names)
        values = self._prepare(plan, feeds)
        self._run_forward(plan, values)
        return {n: self.backend.to_numpy(values[plan.slots[n]]) for n in names}

    def predict(self, feeds: Feeds, batch_size: int | None = None) -> Any:
        """Outputs in evaluation mode, as host arrays: one array for one output, else a dict.
        With a loss's default output, its link applies (softmax cross-entropy -> probabilities)."""
        from .training import batches, dataset_length
        was_training = self.training
        plan = self._get_plan("infer", tuple(self.output_names))
        feeds = {k: v for k, v in feeds.items() if k in plan.feeds} if isinstance(feeds, Mapping) else feeds
        try:
            self._set_mode(False)
            n = dataset_length(feeds)
            chunks: dict[str, list[np.ndarray]] = {name: [] for name in self.output_names}
            for batch in batches(feeds, n, batch_size or n, order=None):
                values = self._prepare(plan, batch)
                self._run_forward(plan, values)
                for name in self.output_names:
                    value = values[plan.slots[name]]
                    if self._link is not None:
                        value = self._link.predict(self.xp, value)
                    chunks[name].append(self.backend.to_numpy(value))
        finally:
            self._set_mode(was_training)
        out = {name: np.concatenate(parts) if parts[0].ndim else parts[0]
               for name, parts in chunks.items()}
        return out[self.output_names[0]] if len(out) == 1 else out

    def fit(self, data: Feeds, **kwargs: Any) -> History:
        """Train; see :func:`graphengine.training.fit` for the options."""
        from .training import fit
        return fit(self, data, **kwargs)

    def evaluate(self, data: Feeds, batch_size: int | None = None) -> dict[str, float]:
        """Mean loss (and accuracy where the loss defines it) over ``data`` in evaluation mode."""
        from .training import evaluate
        return evaluate(self, data, batch_size=batch_size)

    def __repr__(self) -> str:
        count = sum(int(np.prod(p.shape)) for p in self._params.values())
        return (f"<Model {self.graph.name!r} on {self.backend.name}: {len(self.graph.nodes)} nodes, "
                f"{count} parameters, optimizer {self.optimizer!r}>")


def _node_name(graph: Graph, t: Any, what: str) -> str:
    from .graph import Tensor
    if isinstance(t, Tensor):
        if t.graph is not graph:
            raise CompileError(f"{what} {t.name!r} belongs to graph {t.graph.name!r}, not {graph.name!r}")
        return t.name
    if isinstance(t, str) and t in graph.nodes:
        return t
    raise CompileError(f"{what} {t!r} is not a tensor or node name of graph {graph.name!r}")
