"""Weight penalties, a max-norm constraint, gradient clipping and learning-rate schedules.

They work with every optimizer because they act around the update, through the model's hooks:

- before each update (``model.gradient_transforms``, called as ``fn(model, grads)``):
  the penalties :class:`L1`, :class:`L2`, :class:`L1L2` add their gradient, then
  :class:`ClipNorm` / :class:`ClipValue` clip, then a :class:`Schedule` sets ``optimizer.lr``;
- after each update (``model.constraints``, called as ``fn(model)``): :class:`MaxNorm`.

The usual way in is ``compile``::

    model = g.compile(loss, optimizer=ge.optimizer("momentum", lr=0.05),
                      regularizer=ge.L2(1e-4), constraint=ge.MaxNorm(3.0), clip_norm=5.0,
                      schedule=ge.StepDecay(0.5, every=10))

Penalties and constraints apply to the parameters whose ``decay`` flag is set, which by default
means the weights (two or more dimensions) and not the biases, PReLU slopes or batch-norm
scales; ``g.parameter(..., decay=True)`` changes one parameter, and ``params=`` picks any set by
name (``["fc1/", "fc2/W"]``) or by a predicate. Several penalties can be stacked
(``regularizer=[ge.L2(1e-4), ge.L1(1e-3, params=["fc1/"])]``). The loss that ``fit`` reports is
the data loss only; ``penalty.value(model)`` gives the penalty term.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import GraphEngineError, require_int, require_number
from ..ir.graph import in_scope

if TYPE_CHECKING:
    from ..model import Model

#: Which parameters a penalty or constraint acts on: None (those with ``decay`` set), name
#: patterns (a full name, or a layer prefix such as ``"fc1/"``), or a predicate on the name.
ParameterSelection = Sequence[str] | Callable[[str], bool] | None

Grads = dict[str, Any]


def _number(value: Any, what: str, *, positive: bool = False) -> float:
    return require_number(value, what, 0, exclusive_minimum=positive, error=GraphEngineError)


def _selection(params: Any, what: str) -> ParameterSelection:
    """``params`` checked as a :data:`ParameterSelection`."""
    if params is None or callable(params) or isinstance(params, str) or (
            isinstance(params, (list, tuple)) and all(isinstance(p, str) for p in params)):
        return params
    raise GraphEngineError(f"{what}: params must be None, a name pattern, a list of them or a "
                           f"predicate on the parameter name, got {params!r}")


def _axis(axis: Any) -> int | tuple[int, ...]:
    if isinstance(axis, (list, tuple)) and axis:
        return tuple(require_int(a, "MaxNorm axis", -64, GraphEngineError) for a in axis)
    return require_int(axis, "MaxNorm axis", -64, GraphEngineError)


def select_parameters(model: Model, params: ParameterSelection, what: str) -> list[str]:
    """The trainable parameters of ``model`` that ``params`` selects (see :data:`ParameterSelection`);
    frozen ones are left out. A pattern that matches no parameter at all is an error naming
    ``what`` and the parameters there are."""
    trainable = model.trainable_parameters()
    if params is None:
        return [n for n in trainable if model.graph.nodes[n].op.decay]
    if callable(params):
        return [n for n in trainable if params(n)]
    patterns = [params] if isinstance(params, str) else list(params)
    for pattern in patterns:
        if not any(in_scope(n, pattern) for n in model.parameters()):
            raise GraphEngineError(f"{what}: no parameter matches {pattern!r}; parameters: "
                                   f"{list(model.parameters())}")
    return [n for n in trainable if any(in_scope(n, p) for p in patterns)]


#: hook -> (the model, weakly, its trainable names, the hook's selection among them). Kept off the
#: hooks themselves, whose attributes are saved with a model.
_selections: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def selected_parameters(hook: Any, model: Model) -> list[str]:
    """``select_parameters`` for a hook applied on every step: computed again (and checked)
    only when the model or its frozen set changes."""
    trainable = model.store.trainable()
    cached = _selections.get(hook)
    if cached is None or cached[0]() is not model or cached[1] is not trainable:
        # a weak reference: the model holds the hook, and must stay collectable
        cached = _selections[hook] = (weakref.ref(model), trainable,
                                      select_parameters(model, hook.params, repr(hook)))
    return cached[2]


# --------------------------------------------------------------------------- penalties

class L1L2:
    """The penalty ``l1 * sum|w| + l2 / 2 * sum w^2`` over the selected parameters.

    Its gradient ``l1 * sign(w) + l2 * w`` is added to theirs before each update, so with SGD
    the L2 part is weight decay, ``w <- (1 - lr l2) w - lr g`` (``l2`` means what PyTorch's
    ``weight_decay`` means), and the L1 part pulls every weight toward zero by a constant step,
    which drives the unneeded ones to (near) zero: sparsity.
    """

    def __init__(self, l1: float = 0.0, l2: float = 0.0, params: ParameterSelection = None) -> None:
        self.l1 = _number(l1, "l1")
        self.l2 = _number(l2, "l2")
        self.params = _selection(params, type(self).__name__)

    def config(self) -> dict[str, Any]:
        """The constructor's arguments that make this penalty again (how files save it)."""
        return {"l1": self.l1, "l2": self.l2, "params": self.params}

    def parameters(self, model: Model) -> list[str]:
        return selected_parameters(self, model)

    def value(self, model: Model) -> float:
        """The penalty term for the model's current weights (a host float)."""
        weights = model.parameters()
        total = 0.0
        for name in self.parameters(model):
            w = model.backend.to_numpy(weights[name]).astype("float64")
            total += self.l1 * float(abs(w).sum()) + 0.5 * self.l2 * float((w * w).sum())
        return total

    def __call__(self, model: Model, grads: Grads) -> None:
        xp = model.xp
        weights = model.parameters()
        for name in self.parameters(model):
            grad = grads.get(name)
            if grad is None:
                continue
            w = weights[name]
            if self.l1:
                grad = grad + self.l1 * xp.sign(w)
            if self.l2:
                grad = grad + self.l2 * w
            grads[name] = grad

    def __repr__(self) -> str:
        return f"L1L2(l1={self.l1}, l2={self.l2}{_params_repr(self.params)})"


class L1(L1L2):
    """``strength * sum|w|``: pushes unneeded weights to zero (sparse weights)."""

    def __init__(self, strength: float, params: ParameterSelection = None) -> None:
        super().__init__(l1=strength, params=params)

    def config(self) -> dict[str, Any]:
        return {"strength": self.l1, "params": self.params}

    def __repr__(self) -> str:
        return f"L1({self.l1}{_params_repr(self.params)})"


class L2(L1L2):
    """``strength / 2 * sum w^2``: weight decay, shrinking all weights in proportion."""

    def __init__(self, strength: float, params: ParameterSelection = None) -> None:
        super().__init__(l2=strength, params=params)

    def config(self) -> dict[str, Any]:
        return {"strength": self.l2, "params": self.params}

    def __repr__(self) -> str:
        return f"L2({self.l2}{_params_repr(self.params)})"


def _params_repr(params: ParameterSelection) -> str:
    return "" if params is None else f", params={params!r}"


# --------------------------------------------------------------------------- constraint

class MaxNorm:
    """After each update, rescale every unit's incoming weight vector whose L2 norm exceeds
    ``max_norm`` back to that norm (Srebro & Shraibman 2005; used with dropout by Srivastava et
    al. 2014). The norm is taken over ``axis``: 0, the default, is a column of a dense weight
    ``W`` (inputs, units); for a convolution kernel (out, in, kh, kw) pass ``axis=(1, 2, 3)``."""

    def __init__(self, max_norm: float = 3.0, axis: int | tuple[int, ...] = 0,
                 params: ParameterSelection = None) -> None:
        self.max_norm = _number(max_norm, "max_norm", positive=True)
        self.axis = _axis(axis)
        self.params = _selection(params, "MaxNorm")

    def config(self) -> dict[str, Any]:
        return {"max_norm": self.max_norm, "axis": self.axis, "params": self.params}

    def __call__(self, model: Model) -> None:
        xp = model.xp
        weights = model.parameters()
        for name in selected_parameters(self, model):
            w = weights[name]
            norms = xp.sqrt((w * w).sum(axis=self.axis, keepdims=True))
            w *= xp.minimum(1.0, self.max_norm / (norms + 1e-12)).astype(w.dtype)

    def __repr__(self) -> str:
        return f"MaxNorm({self.max_norm}, axis={self.axis}{_params_repr(self.params)})"


# --------------------------------------------------------------------------- clipping

class ClipNorm:
    """Scale all gradients together so that their global L2 norm (over every parameter) is at
    most ``max_norm``; the direction of the step is kept. Against exploding gradients (RNNs)."""

    def __init__(self, max_norm: float) -> None:
        self.max_norm = _number(max_norm, "clip_norm", positive=True)

    def config(self) -> dict[str, Any]:
        return {"max_norm": self.max_norm}

    def __call__(self, model: Model, grads: Grads) -> None:
        if not grads:
            return
        xp = model.xp
        # stays on the device: no host sync per step
        total = xp.sqrt(sum((g * g).sum() for g in grads.values()))
        scale = xp.minimum(1.0, self.max_norm / (total + 1e-12))
        for name, g in grads.items():
            grads[name] = g * scale.astype(g.dtype)

    def __repr__(self) -> str:
        return f"ClipNorm({self.max_norm})"


class ClipValue:
    """Clip every gradient element to ``[-limit, limit]`` (changes the step's direction)."""

    def __init__(self, limit: float) -> None:
        self.limit = _number(limit, "clip_value", positive=True)

    def config(self) -> dict[str, Any]:
        return {"limit": self.limit}

    def __call__(self, model: Model, grads: Grads) -> None:
        xp = model.xp
        for name, g in grads.items():
            grads[name] = xp.clip(g, -self.limit, self.limit)

    def __repr__(self) -> str:
        return f"ClipValue({self.limit})"


# --------------------------------------------------------------------------- schedules

class Schedule:
    """Sets ``optimizer.lr = initial_lr * factor(t)`` before each update, where ``t`` counts
    completed epochs or updates:

    - ``per="epoch"``: ``t`` is ``model.epoch``, which ``fit`` advances after each epoch; a
      hand-written loop advances it itself, ``model.epoch += 1`` at the end of each of its
      epochs (PyTorch's ``scheduler.step()`` once per epoch), or the schedule never moves;
    - ``per="step"``: ``t`` is ``model.step_count``, which every ``model.step()`` advances, in
      ``fit`` or in any loop.

    The first update runs at ``t = 0``. ``initial_lr`` defaults to the optimizer's lr when the
    first update runs; pass it when resuming from a checkpoint, whose optimizer already holds a
    decayed lr. Subclass it and define ``factor(t)`` for another schedule."""

    def __init__(self, per: str = "epoch", initial_lr: float | None = None) -> None:
        if per not in ("epoch", "step"):
            raise GraphEngineError(f"per must be 'epoch' or 'step', got {per!r}")
        self.per = per
        self.initial_lr = None if initial_lr is None else _number(initial_lr, "initial_lr")

    def factor(self, t: int) -> float:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """The constructor's arguments that make this schedule again: the attributes, whose
        names the built-in schedules' arguments share (``initial_lr`` once it is known)."""
        return dict(vars(self))

    def lr(self, t: int) -> float:
        """The learning rate at time ``t`` (needs ``initial_lr``)."""
        if self.initial_lr is None:
            raise GraphEngineError(f"{self!r} has no initial_lr yet: it takes the optimizer's "
                                   f"lr at the first update, or pass initial_lr=")
        return self.initial_lr * self.factor(t)

    def __call__(self, model: Model, grads: Grads) -> None:
        if self.initial_lr is None:
            self.initial_lr = model.optimizer.lr
        model.optimizer.lr = self.lr(model.epoch if self.per == "epoch" else model.step_count)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if v is not None)
        return f"{type(self).__name__}({args})"


class StepDecay(Schedule):
    """Multiply the learning rate by ``drop`` every ``every`` epochs (or steps)."""

    def __init__(self, drop: float = 0.5, every: int = 10, per: str = "epoch",
                 initial_lr: float | None = None) -> None:
        super().__init__(per, initial_lr)
        self.drop = _number(drop, "drop", positive=True)
        self.every = require_int(every, "every", 1, GraphEngineError)

    def factor(self, t: int) -> float:
        return self.drop ** (t // self.every)


class _RateSchedule(Schedule):
    def __init__(self, rate: float = 0.1, per: str = "epoch",
                 initial_lr: float | None = None) -> None:
        super().__init__(per, initial_lr)
        self.rate = _number(rate, "rate")


class ExponentialDecay(_RateSchedule):
    """``lr = initial_lr * exp(-rate * t)``."""

    def factor(self, t: int) -> float:
        return math.exp(-self.rate * t)


class InverseTimeDecay(_RateSchedule):
    """1/t decay: ``lr = initial_lr / (1 + rate * t)``."""

    def factor(self, t: int) -> float:
        return 1.0 / (1.0 + self.rate * t)


class CosineDecay(Schedule):
    """A linear warm-up over the first ``warmup`` epochs (or steps), then half a cosine from
    ``initial_lr`` down to ``floor * initial_lr`` at ``t = total``, where it stays:

    - ``t < warmup``: ``factor = (t + 1) / warmup``, reaching 1 at ``t = warmup - 1``;
    - ``warmup <= t <= total``: ``floor + (1 - floor) (1 + cos(pi (t - warmup) / (total -
      warmup))) / 2``;
    - ``t > total``: ``floor``.

    PyTorch: ``SequentialLR(opt, [LinearLR(opt, 1 / warmup, 1.0, warmup - 1),
    CosineAnnealingLR(opt, total - warmup, floor * lr)], [warmup])``, or without warm-up
    ``CosineAnnealingLR(opt, total, floor * lr)``, whose cosine climbs again after ``total``.
    """

    def __init__(self, total: int, warmup: int = 0, floor: float = 0.0, per: str = "epoch",
                 initial_lr: float | None = None) -> None:
        super().__init__(per, initial_lr)
        self.total = require_int(total, "CosineDecay total", 1, GraphEngineError)
        self.warmup = require_int(warmup, "CosineDecay warmup", 0, GraphEngineError)
        if self.warmup >= self.total:
            raise GraphEngineError(f"CosineDecay warmup ({self.warmup}) must be shorter than "
                                   f"total ({self.total}), the {per}s of the whole schedule")
        self.floor = require_number(floor, "CosineDecay floor", 0, 1, error=GraphEngineError)

    def factor(self, t: int) -> float:
        if t < self.warmup:
            return (t + 1) / self.warmup
        progress = min(t - self.warmup, self.total - self.warmup) / (self.total - self.warmup)
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------- installing

#: The hooks a model file can hold, by class name, and the list of the model they go to.
SAVEABLE: dict[str, tuple[type, str]] = {
    cls.__name__: (cls, "constraints" if cls is MaxNorm else "gradient_transforms")
    for cls in (L1L2, L1, L2, MaxNorm, ClipNorm, ClipValue, StepDecay, ExponentialDecay,
                InverseTimeDecay, CosineDecay)}


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def install(model: Model, *, regularizer: Any = None, constraint: Any = None,
            clip_norm: float | None = None, clip_value: float | None = None,
            schedule: Schedule | None = None) -> None:
    """Attach the ``compile`` options to ``model``'s hooks, in the order penalties, clipping,
    schedule (before the update) and constraints (after it). Parameter patterns are checked now,
    so a typo fails at compile time."""
    transforms: list[Any] = []
    for penalty in _as_list(regularizer):
        if not isinstance(penalty, L1L2):
            raise GraphEngineError(f"regularizer must be ge.L1, ge.L2 or ge.L1L2 (or a list of "
                                   f"them), got {penalty!r}")
        penalty.parameters(model)
        transforms.append(penalty)
    if clip_norm is not None:
        transforms.append(ClipNorm(clip_norm))
    if clip_value is not None:
        transforms.append(ClipValue(clip_value))
    if schedule is not None:
        if not isinstance(schedule, Schedule):
            raise GraphEngineError(f"schedule must be a ge.Schedule such as ge.StepDecay(0.5, "
                                   f"every=10), got {schedule!r}")
        if model.optimizer is None:
            raise GraphEngineError("schedule= needs an optimizer whose lr it can change")
        transforms.append(schedule)
    constraints = _as_list(constraint)
    for c in constraints:
        if not isinstance(c, MaxNorm):
            raise GraphEngineError(f"constraint must be ge.MaxNorm(...) (or a list), got {c!r}")
        select_parameters(model, c.params, repr(c))
    model.gradient_transforms.extend(transforms)
    model.constraints.extend(constraints)
