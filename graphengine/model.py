"""Model: a compiled graph with numbers. Runs plans forward and backward, owns parameters,
gradients and optimizer state.

OVERFLOW: operators run with floating-point overflow warnings off. Several stable formulas
overflow on purpose (``sigmoid = 1 / (1 + exp(-x))`` is exactly 0 where ``exp`` gives inf), and
one warning context per pass costs less than one per operator call. An overflow that matters
shows as inf or NaN in the loss or the gradients, which ``fit`` checks, and debug mode names the
node that made it; NumPy's warning would name no node.
"""

from __future__ import annotations

import contextlib
import os
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .compiler.plan import Plan, Step, build_plan, check_acyclic, check_loss
from .errors import (
    BackendError,
    CompileError,
    FeedError,
    GraphEngineError,
    OperatorError,
    ShapeError,
)
from .ir.contracts import LossOp, Optimizer, fans
from .ir.graph import in_scope, split_init
from .ir.operators import Parameter
from .plugins import get_plugin_manager
from .runtime.backend import Backend
from .tools.debug import debug_active, debug_observer, describe_node, fits, implementation
from .train.flat import FlatParameters
from .train.regularization import Schedule, install

if TYPE_CHECKING:
    from .io.serialize import LoadReport
    from .ir.graph import Graph, Tensor
    from .tools.profile import Profile
    from .train.loop import History

Feeds = Mapping[str, Any]


def get_backend(backend: str | Backend) -> Backend:
    """A backend by registered name (``"numpy"``, ``"strict"``, ``"cupy"``), or ``backend``
    itself when it is a Backend instance already."""
    if isinstance(backend, Backend):
        return backend
    if not isinstance(backend, str):
        names = get_plugin_manager().backends.names()
        raise BackendError(f"backend must be a registered backend name or a Backend instance, got "
                           f"{type(backend).__name__} {backend!r}: pass one of "
                           f"{', '.join(map(repr, names))} (e.g. backend='numpy')")
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
    name, config = split_init(op.init, f"parameter {node_name!r}")
    initializer = get_plugin_manager().initializers.get(name)(**config)
    rng = np.random.default_rng([seed, zlib.crc32(node_name.encode())])
    shape = tuple(op.spec.shape)
    value = np.asarray(initializer(rng, shape, *fans(shape)), dtype=op.spec.dtype)
    if value.shape != shape:
        raise GraphEngineError(f"initializer {name!r} returned shape {value.shape} for "
                               f"parameter {node_name!r} of shape {shape}")
    return value


class Model:
    """A compiled graph: ``forward``/``backward``/``step`` by hand, or ``fit``/``predict``."""

    def __init__(self, graph: Graph, *, loss: Tensor | None = None,
                 outputs: Sequence[Tensor] | Tensor | None = None,
                 optimizer: Optimizer | str | None = None, backend: str | Backend = "numpy",
                 seed: int = 0, parameters: Mapping[str, Any] | None = None,
                 regularizer: Any = None, constraint: Any = None, clip_norm: float | None = None,
                 clip_value: float | None = None, schedule: Schedule | None = None) -> None:
        self.graph = graph
        self.backend = get_backend(backend)
        self.xp = self.backend.xp
        self.seed = seed
        if loss is None and not outputs:
            raise CompileError("compile() needs a loss, outputs, or both")
        self.loss_name = _node_name(graph, loss, "loss") if loss is not None else None
        check_acyclic(graph.dag)
        if self.loss_name is not None:
            check_loss(graph, self.loss_name)
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
        self._trainable_cache: tuple[frozenset[str] | None, tuple[str, ...]] = (None, ())
        self._plans: dict[Any, Plan] = {}
        self._flat: FlatParameters | None = None
        self._values: list[Any] = []
        self._grads: list[Any] = []
        self._plan: Plan | None = None
        #: Inference passes that dropped what operators kept for a backward: a backward() after
        #: one would read nothing (or, before, another batch's state).
        self._inference_passes = 0
        self._forward_passes_seen = 0
        self.train_plan = self._get_plan("train") if self.loss_name else None
        self._init_parameters(parameters or {})
        # Trainable parameters of the training plan share one buffer per dtype (shared ones
        # belong to another model and stay as they are); see graphengine.train.flat.
        packable = [n for n in (self.train_plan.parameters if self.train_plan else ())
                    if self.graph.nodes[n].op.trainable and n not in (parameters or {})]
        self._flat = FlatParameters(self.xp, self._params, packable)
        for plan in self._plans.values():
            self._flat.bind(plan)
        self.optimizer_state: dict[str, dict[str, Any]] = {}
        install(self, regularizer=regularizer, constraint=constraint, clip_norm=clip_norm,
                clip_value=clip_value, schedule=schedule)
        #: Random numbers of stochastic operators (dropout) and the shuffling order of fit: both
        #: go into checkpoints, so a resumed run draws what the uninterrupted one would have.
        self.rng = self.backend.make_rng(seed + 1)
        self.data_rng = np.random.default_rng(seed + 2)
        #: Data-fitted layers (preprocessing) already fitted: fit() leaves them alone.
        self.fitted_layers: set[str] = set()
        for node in graph.nodes.values():
            node.op.rng = self.rng
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

    def set_parameters(self, values: Mapping[str, Any]) -> None:
        """Copy host arrays into parameters by name, in place (cast to each parameter's dtype)."""
        for name, value in values.items():
            if name not in self._params:
                raise GraphEngineError(f"model {self.graph.name!r} has no parameter {name!r}")
            param = self._params[name]
            value = np.asarray(value)
            if value.shape != tuple(param.shape):
                raise GraphEngineError(f"parameter {name!r} has shape {tuple(param.shape)}, "
                                       f"the value given has {value.shape}")
            param[...] = self.backend.asarray(value, dtype=param.dtype)

    def trainable_parameters(self) -> list[str]:
        """Names of the parameters the optimizer updates: trainable and not frozen."""
        return list(self._trainable_names())

    def _trainable_names(self) -> tuple[str, ...]:
        # Cached while the frozen set stays the same: step() asks on every update.
        frozen = frozenset(self.frozen)
        if self._trainable_cache[0] != frozen:
            self._trainable_cache = frozen, tuple(
                n for n in self._params if self.graph.nodes[n].op.trainable and n not in frozen)
        return self._trainable_cache[1]

    def gradients(self) -> dict[str, Any]:
        """Parameter name -> gradient from the last backward (absent where none flowed)."""
        plan, grads = self._plan, self._grads
        if plan is None or not grads:
            return {}
        return {name: grads[slot] for name, slot in plan.parameter_slots if grads[slot] is not None}

    def input_gradient(self, name: str) -> Any:
        """The gradient of the loss with respect to input ``name`` (after ``backward(wrt=...)``)."""
        slot = self._plan.slots.get(name) if self._plan else None
        if slot is None or not self._grads or self._grads[slot] is None:
            raise GraphEngineError(f"no gradient for input {name!r}: call backward(wrt=[{name!r}]) "
                                   f"after forward()")
        return self._grads[slot]

    def freeze(self, *patterns: str) -> list[str]:
        """Stop training the parameters a pattern names: a parameter (``"fc1/W"``) or a layer
        (``"fc1"`` or ``"fc1/"``, not ``"fc10"``). Returns their names. A freeze that would
        leave nothing to train raises ``CompileError`` and changes nothing."""
        names = self._matching_parameters(patterns)
        self._set_frozen(self.frozen | set(names))
        return names

    def unfreeze(self, *patterns: str) -> list[str]:
        """Train again the parameters a pattern names (as in :meth:`freeze`); returns their names."""
        names = self._matching_parameters(patterns)
        self._set_frozen(self.frozen - set(names))
        return names

    def _matching_parameters(self, patterns: Sequence[str]) -> list[str]:
        names = [n for n in self._params if any(in_scope(n, p) for p in patterns)]
        if not names:
            raise GraphEngineError(f"no parameter matches {patterns}; name a parameter or a "
                                   f"layer: parameters are {list(self._params)}")
        return names

    def _set_frozen(self, frozen: set[str]) -> None:
        # The training plan for ``frozen`` is built before the model commits to it: if it
        # cannot be (nothing left to train), the model stays as it was.
        previous = self.frozen, self._plans, self.train_plan
        self.frozen, self._plans = frozen, {}
        try:
            self.train_plan = self._get_plan("train") if self.loss_name else None
        except BaseException:
            self.frozen, self._plans, self.train_plan = previous
            raise

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
            if self._flat is not None:
                self._flat.bind(plan)
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

    @contextlib.contextmanager
    def mode(self, training: bool) -> Iterator[Model]:
        """Training (``True``) or evaluation mode inside the block, the mode before it after it,
        even when the block fails: ``with model.mode(training=False): ...``."""
        was_training = self.training
        self._set_mode(training)
        try:
            yield self
        finally:
            self._set_mode(was_training)

    # -- feeds -------------------------------------------------------------------------------

    def _check_feed_names(self, plan: Plan, feeds: Feeds) -> None:
        if not isinstance(feeds, Mapping):
            raise FeedError(f"feeds must be a dict of input name -> array, got {type(feeds).__name__}: "
                            f"pass {{{', '.join(repr(n) + ': ...' for n in plan.feeds)}}}")
        missing = [n for n in plan.feeds if n not in feeds]
        if missing:
            raise FeedError(f"missing feed(s) {missing}: this computation needs inputs "
                            f"{list(plan.feeds)}; add an array for each to the feed dict")
        unknown = [n for n in feeds if n not in self.graph.nodes or self.graph.nodes[n].kind != "input"]
        if unknown:
            raise FeedError(f"unknown feed(s) {unknown}: graph {self.graph.name!r} has inputs "
                            f"{self.graph.inputs()}; check the spelling, or leave them out")

    def _feed_array(self, name: str, value: Any) -> Any:
        """``value`` if it is an array of this backend, else a host (NumPy) array of it; an array
        of another backend is refused, since backends only convert when asked to."""
        if self.backend.is_array(value):
            return value
        try:
            if type(value).__module__.split(".")[0] in ("cupy", "torch", "jax", "jaxlib"):
                raise TypeError("arrays of other libraries are not converted implicitly")
            return np.asarray(value)
        except TypeError as exc:  # CuPy and strict arrays refuse implicit conversion
            if not hasattr(value, "shape"):
                raise FeedError(f"feed {name!r} is a {type(value).__name__}, not an array: {exc}") from None
            raise BackendError(f"feed {name!r} is a {type(value).__module__}.{type(value).__name__}, "
                               f"but the model runs on backend {self.backend.name!r}: convert it "
                               f"explicitly (its backend's to_numpy(), then feed the NumPy array); "
                               f"graphengine never converts between backends silently") from None
        except ValueError as exc:
            raise FeedError(f"feed {name!r} cannot become an array ({exc}); feed a rectangular "
                            f"array of numbers") from None

    def _load_feeds(self, plan: Plan, feeds: Feeds, values: list[Any]) -> None:
        # Feeds of the same names, types, dtypes and shapes as the last ones that passed
        # unconverted pass again: fit() feeds batch after batch alike.
        signature = tuple((k, type(v), getattr(v, "dtype", None), getattr(v, "shape", None))
                          for k, v in feeds.items()) if isinstance(feeds, dict) else None
        if signature is not None and signature == plan.feed_signature:
            for name in plan.feeds:
                values[plan.slots[name]] = feeds[name]
            return
        self._check_feed_names(plan, feeds)
        batch = None
        for name in plan.feeds:
            value = self._feed_array(name, feeds[name])
            spec = self.graph.nodes[name].spec
            kind = np.dtype(value.dtype).kind
            want = np.dtype(spec.dtype).kind
            if kind not in "biuf" or (want in "iub" and kind == "f"):
                raise FeedError(f"feed {name!r} has dtype {value.dtype}, input {name!r} is "
                                f"{spec.dtype}: convert it (floats are never truncated to ints)")
            if not fits(tuple(value.shape), spec.shape):
                raise FeedError(f"feed {name!r} has shape {tuple(value.shape)}, input {name!r} "
                                f"expects {spec.shape} (None = any batch size): reshape the data, "
                                f"or declare the input with the data's shape")
            for d, v in zip(spec.shape, value.shape):
                if d is None:
                    if batch is not None and v != batch:
                        raise FeedError(f"feeds disagree on the batch size: {name!r} has {v}, "
                                        f"an earlier feed has {batch}; give every input one row "
                                        f"per example")
                    batch = v
            if self.backend.is_array(value):
                if value.dtype != spec.dtype:
                    value = value.astype(spec.dtype)
            else:
                value = self.backend.asarray(value, dtype=spec.dtype)
            values[plan.slots[name]] = value
        if all(values[plan.slots[name]] is feeds[name] for name in plan.feeds):
            plan.feed_signature = signature

    def _prepare(self, plan: Plan, feeds: Feeds) -> list[Any]:
        # One spare slot at the end stays None: plan slot -1 ("not kept") reads it.
        values: list[Any] = [None] * (len(plan.slots) + 1)
        self._load_feeds(plan, feeds, values)
        for name in plan.parameters:
            values[plan.slots[name]] = self._params[name]
        for name in plan.constants:
            values[plan.slots[name]] = self._constants[name]
        return values

    # -- running ---------------------------------------------------------------------------------

    def _run_forward(self, plan: Plan, values: list[Any], observers: Sequence[Any] = ()) -> None:
        """Run ``plan`` forward: its fused variant unless an observer needs one step per node."""
        xp = self.xp
        plan = _executed(plan, not observers)
        step = None
        try:
            with xp.errstate(over="ignore"):  # see OVERFLOW in the module docstring
                if not observers:
                    get = values.__getitem__
                    # ``step`` names the node in the error report below
                    for step, (forward, out, args, release) in zip(plan.steps, plan.programs()[0]):  # noqa: B007
                        values[out] = forward(xp, *map(get, args))
                        for slot in release:
                            values[slot] = None
                else:
                    for step in plan.steps:
                        args = [values[a] for a in step.args]
                        value = step.op.forward(xp, *args)
                        for observer in observers:
                            observer.on_forward(self, step, args, value)
                        values[step.out] = value
                        for slot in step.release:
                            values[slot] = None
        except Exception as exc:
            if step is None:
                raise
            shapes = ", ".join(f"{tuple(v.shape)} {v.dtype}" if hasattr(v, "shape") else repr(v)
                               for v in (values[a] for a in step.args))
            error = self._step_error(exc, step, "forward", f"inputs {shapes}")
            if error is None:
                raise
            raise error from exc
        if not plan.backward and plan.saved_state:  # no backward follows an inference pass
            plan.drop_saved_state()
            self._inference_passes += 1

    def _run_backward(self, plan: Plan, values: list[Any], observers: Sequence[Any] = ()) -> list[Any]:
        xp = self.xp
        grads: list[Any] = [None] * len(values)
        loss_slot = plan.slots[plan.loss]
        grads[loss_slot] = xp.ones((), dtype=plan.specs[loss_slot].dtype)
        # Sums this loop made itself: only those may be added to in place, since an operator's
        # gradient may alias another one (add passes the same array to both inputs).
        owned: set[int] = set()
        step = None
        get = values.__getitem__
        try:
            with xp.errstate(over="ignore"):  # see OVERFLOW in the module docstring
                for bstep, (op, backward, out, kept_args, kept_out, grad_to, wanted, release) in zip(
                        plan.backward, plan.programs()[1]):
                    grad = grads[out]
                    if grad is None:
                        continue
                    step = bstep.step
                    # Per call: an operator instance can serve several plans (with wrt= or not).
                    op.wanted = wanted
                    # slot -1 reads the spare None at the end of ``values`` (see _prepare)
                    input_grads = backward(xp, tuple(map(get, kept_args)), values[kept_out], grad)
                    for observer in observers:
                        observer.on_backward(self, step, grad, input_grads)
                    for slot, g in zip(grad_to, input_grads, strict=True):
                        if slot < 0 or g is None:
                            continue
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
        except Exception as exc:
            if step is None:
                raise
            shapes = ", ".join(str(plan.specs[a]) for a in step.args)
            error = self._step_error(exc, step, "backward", f"inputs {shapes}")
            if error is None:
                raise
            raise error from exc
        plan.drop_saved_state()
        return grads

    def _step_error(self, exc: Exception, step: Step, phase: str, shapes: str) -> Exception | None:
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

    def _observers(self, inference: bool = False) -> list[Any]:
        """Observers for this step; in inference only debug mode's checks (the others watch
        training)."""
        observers = [] if inference else [o for o in self.observers if o.wants(self)]
        return [debug_observer(self), *observers] if self.debug else observers

    def forward(self, feeds: Feeds, training: bool | None = None) -> Any:
        """Run the training plan forward; returns the loss as a float (or, for a model without
        a loss, the outputs as in :meth:`run`). ``training`` sets the model's mode, which stays:
        the backward of this forward runs in it too."""
        if self.loss_name is None:
            return self.run(feeds)
        self._set_mode(self.training if training is None else training)
        plan = self.train_plan
        values = self._prepare(plan, feeds)
        observers = self._observers()
        # Unobserved steps run the fused plan; backward then runs it too, since a fused step's
        # backward needs what its own forward did.
        self._fused = not observers
        self._run_forward(plan, values, observers)
        self._plan, self._values, self._grads = plan, values, []
        self._forward_passes_seen = self._inference_passes
        return float(self.backend.to_numpy(values[plan.slots[self.loss_name]]))

    def backward(self, wrt: Sequence[str] = ()) -> None:
        """Gradients of the loss for every trainable parameter, and for the inputs in ``wrt``."""
        if self._plan is None or not self._values:
            raise GraphEngineError("backward() needs a forward() first")
        if self._inference_passes != self._forward_passes_seen:
            raise GraphEngineError("backward() after run(), predict() or evaluate(): those "
                                   "passes released what forward() kept for it; call forward() "
                                   "again, then backward()")
        if wrt:
            wrt = tuple(wrt)
            for name in wrt:
                if name not in self.graph.nodes or self.graph.nodes[name].kind != "input":
                    raise GraphEngineError(f"wrt names inputs of the graph; {name!r} is not one "
                                           f"(inputs: {self.graph.inputs()})")
            self._plan = self._get_plan("train", wrt=wrt)
        # Observers that arrive after a fused forward cannot be shown nodes now.
        observers = [] if self._fused else self._observers()
        self._grads = self._run_backward(_executed(self._plan, self._fused), self._values, observers)

    def step(self) -> None:
        """Update every trainable parameter from its gradient with the optimizer."""
        if self.optimizer is None:
            raise GraphEngineError("this model was compiled without an optimizer: pass "
                                   "optimizer=ge.optimizer('sgd', lr=0.1) to compile()")
        grads = self.gradients()
        for transform in self.gradient_transforms:
            transform(self, grads)
        params = self._params
        for name, grad in grads.items():  # all checked before any parameter changes
            if grad.shape != params[name].shape:
                raise ShapeError(f"the gradient of parameter {name!r} has shape {tuple(grad.shape)}, "
                                 f"the parameter {tuple(params[name].shape)}: an operator's "
                                 f"backward or a gradient transform returned a wrong shape; set "
                                 f"model.debug = True to find the operator")
        self.step_count += 1
        xp = self.xp
        observers = self._observers()
        names = self._trainable_names()
        # Unobserved, elementwise optimizers update whole flat groups at once.
        done = self._flat.update(self, names, grads, observed=bool(observers))
        for name in names if len(done) < len(names) else ():
            grad = grads.get(name)
            if grad is None or name in done:
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
        """Compute ``fetches`` (default: the outputs) and return them as host arrays by name, in
        evaluation mode unless ``training``; the model's own mode is left as it was."""
        names = tuple(_node_name(self.graph, f, "fetch") for f in fetches) if fetches else tuple(
            self.output_names)
        plan = self._get_plan("infer", names)
        with self.mode(training):
            values = self._prepare(plan, feeds)
            self._run_forward(plan, values, self._observers(inference=True))
        return {n: self.backend.to_numpy(values[plan.slots[n]]) for n in names}

    def predict(self, feeds: Feeds, batch_size: int | None = None) -> Any:
        """Outputs in evaluation mode, as host arrays: one array for one output, else a dict.
        With a loss's default output, its link applies (softmax cross-entropy -> probabilities)."""
        from .train.loop import batches, dataset_length
        plan = self._get_plan("infer", tuple(self.output_names))
        if isinstance(feeds, Mapping):  # targets are not needed to predict: drop them
            inputs = set(self.graph.inputs())
            feeds = {k: v for k, v in feeds.items() if k in plan.feeds or k not in inputs}
        self._check_feed_names(plan, feeds)
        n = dataset_length(feeds)
        chunks: dict[str, list[np.ndarray]] = {name: [] for name in self.output_names}
        with self.mode(training=False):
            for batch in batches(feeds, n, n if batch_size is None else batch_size, order=None):
                values = self._prepare(plan, batch)
                self._run_forward(plan, values, self._observers(inference=True))
                for name in self.output_names:
                    value = values[plan.slots[name]]
                    if self._link is not None:
                        value = self._link.predict(self.xp, value)
                    chunks[name].append(self.backend.to_numpy(value))
        out = {name: np.concatenate(parts) if parts[0].ndim else parts[0]
               for name, parts in chunks.items()}
        return out[self.output_names[0]] if len(out) == 1 else out

    def profile(self, feeds: Feeds, **options: Any) -> Profile:
        """Per-node forward/backward time and memory of a training step, as a table
        (``print(model.profile(feeds))``); see :func:`graphengine.tools.profile.profile`."""
        from .tools.profile import profile
        return profile(self, feeds, **options)

    def fit(self, data: Feeds, **kwargs: Any) -> History:
        """Train; see :func:`graphengine.train.loop.fit` for the options."""
        from .train.loop import fit
        return fit(self, data, **kwargs)

    def fit_preprocessing(self, data: Feeds, refit: bool = False) -> list[str]:
        """Fit data-fitted layers (preprocessing) on ``data``; see
        :func:`graphengine.train.loop.fit_preprocessing`."""
        from .train.loop import fit_preprocessing
        return fit_preprocessing(self, data, refit=refit)

    def save(self, path: str | os.PathLike, *, training_state: bool = True) -> None:
        """Write graph, weights (and optimizer state, epoch, RNG states) to ``path``; see
        :func:`graphengine.io.serialize.save`."""
        from .io.serialize import save
        save(self, path, training_state=training_state)

    def load_weights(self, path: str | os.PathLike, *, strict: bool = True,
                     training_state: bool = False) -> LoadReport:
        """Load parameters from a model file by name; see :func:`graphengine.io.serialize.load_weights`."""
        from .io.serialize import load_weights
        return load_weights(self, path, strict=strict, training_state=training_state)

    def evaluate(self, data: Feeds, batch_size: int | None = None) -> dict[str, float]:
        """Mean loss (and accuracy where the loss defines it) over ``data`` in evaluation mode."""
        from .train.loop import evaluate
        return evaluate(self, data, batch_size=batch_size)

    def __repr__(self) -> str:
        count = sum(int(np.prod(p.shape)) for p in self._params.values())
        return (f"<Model {self.graph.name!r} on {self.backend.name}: {len(self.graph.nodes)} nodes, "
                f"{count} parameters, optimizer {self.optimizer!r}>")


def _executed(plan: Plan, fused: bool) -> Plan:
    """The variant of ``plan`` that runs: the fused one unless observers watch the step."""
    return plan.fast if fused and plan.fast is not None else plan


def _node_name(graph: Graph, t: Any, what: str) -> str:
    from .ir.graph import Tensor
    if isinstance(t, Tensor):
        if t.graph is not graph:
            raise CompileError(f"{what} {t.name!r} belongs to graph {t.graph.name!r}, not {graph.name!r}")
        return t.name
    if isinstance(t, str) and t in graph.nodes:
        return t
    raise CompileError(f"{what} {t!r} is not a tensor or node name of graph {graph.name!r}")
