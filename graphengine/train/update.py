"""One optimizer step: gradient transforms (penalties, clipping, schedules), the update of every
trainable parameter (whole flat groups at once where the optimizer allows), then constraints."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import GraphEngineError, ShapeError, unknown_options
from ..hooks import get_plugin_manager
from ..ir.contracts import Optimizer

if TYPE_CHECKING:
    from ..model import Model


def optimizer(name: str, **hyper: Any) -> Optimizer:
    """An optimizer by registered name: ``ge.optimizer("adam", lr=1e-3)``; the keywords are
    the optimizer's own (``help(type(ge.optimizer("adam")))`` lists them)."""
    entry = get_plugin_manager().optimizers.entry(name)
    try:
        return entry.obj(**hyper)
    except TypeError as exc:
        hint = None if isinstance(exc, GraphEngineError) else unknown_options(entry.obj, hyper)
        raise GraphEngineError(f"optimizer {name!r} from {entry.origin()} rejected {hyper}: "
                               f"{exc}{'.' + hint if hint else ''}") from None


def apply_update(model: Model, grads: dict[str, Any], observers: Sequence[Any]) -> None:
    """Update ``model``'s trainable parameters from ``grads`` (name -> gradient, changed in
    place by the gradient transforms)."""
    for transform in model.gradient_transforms:
        transform(model, grads)
    params = model.store.arrays
    for name, grad in grads.items():  # all checked before any parameter changes
        if grad.shape != params[name].shape:
            raise ShapeError(f"the gradient of parameter {name!r} has shape {tuple(grad.shape)}, "
                             f"the parameter {tuple(params[name].shape)}: an operator's "
                             f"backward or a gradient transform returned a wrong shape; set "
                             f"model.debug = True to find the operator")
    model.step_count += 1
    xp = model.xp
    names = model.store.trainable()
    # Unobserved, elementwise optimizers update whole flat groups at once.
    done = model.flat.update(model, names, grads, observed=bool(observers))
    for name in names if len(done) < len(names) else ():
        grad = grads.get(name)
        if grad is None or name in done:
            continue
        param = params[name]
        state = model.optimizer_state.get(name)
        if state is None:
            state = model.optimizer_state[name] = model.optimizer.init_state(xp, param)
        before = param.copy() if observers else None
        model.optimizer.update(xp, param, grad, state, model.step_count)
        for observer in observers:
            observer.on_update(model, name, before, param)
    for constraint in model.constraints:
        constraint(model)
    model.store.touch(names)
