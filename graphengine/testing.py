"""Testing helpers for graphengine and its plugins.

:func:`check_backward` is a Chainer-style gradient check: it compares an operator's backward
with a central finite difference of its forward, in float64, along a random direction.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np

from .errors import PluginError
from .hooks import PluginManager, get_plugin_manager, set_plugin_manager
from .ir.contracts import Activation, ActivationOp, Loss, LossOp
from .ir.operators import Operator, TensorSpec
from .runtime.backend import Backend, get_backend
from .runtime.tape import Context


class GradientCheckError(AssertionError):
    """backward disagrees with the finite difference of forward."""


Checkable = Operator | Activation | Loss


def check_backward(op: Checkable | Callable[[], Checkable], inputs: Sequence[np.ndarray], *,
                   backend: str | Backend = "numpy", eps: float = 1e-6, atol: float = 1e-5,
                   rtol: float = 1e-4, seed: int = 0, grad_output: np.ndarray | None = None,
                   training: bool = True) -> None:
    """Check ``op.backward`` against a central difference of ``op.forward``.

    ``op`` is an operator, an activation or a loss plugin (an instance, a class, or any factory
    of them: ``lambda: Swish(beta=2.0)``); activations and losses are wrapped in the operators
    the core wraps them in, so ``inputs`` are ``[x]`` for an activation and ``[pred, target]``
    for a loss (the target gets no gradient). Each evaluation gets a fresh context (``ctx``), as
    each call in a run does; ``training`` is the mode it reports. Inputs are cast to float64
    (integer inputs stay as they are and are not checked). For a random direction ``d`` per
    input and a random output weight ``w``, it compares
    ``sum(w * (f(x + eps d) - f(x - eps d))) / 2 eps`` with ``sum(backward(w) * d)``. Raises
    :class:`GradientCheckError` with both numbers on mismatch.
    """
    be = get_backend(backend)
    xp = be.xp
    made = op if callable(op) and not isinstance(op, Checkable) else (lambda: op)

    def factory() -> Operator:
        return as_operator(made())

    rng = np.random.default_rng(seed)
    host = [np.asarray(a, dtype=np.float64) if np.asarray(a).dtype.kind == "f" else np.asarray(a)
            for a in inputs]
    differentiable = [a.dtype.kind == "f" for a in host]

    def run(arrays: list[np.ndarray]) -> tuple[Operator, Context, Any, tuple]:
        operator = factory()
        ctx = Context(SimpleNamespace(training=training, rng=_FixedRng(be, seed)))
        device = tuple(be.asarray(a) for a in arrays)
        return operator, ctx, operator.forward(ctx, xp, *device), device

    operator, ctx, output, device_inputs = run(host)
    out_host = be.to_numpy(output)
    if out_host.dtype != np.float64:
        raise GradientCheckError(f"{operator!r}: float64 inputs gave a {out_host.dtype} output; "
                                 f"operators must keep the input dtype")
    weight = rng.standard_normal(out_host.shape) if grad_output is None else np.asarray(grad_output)
    kept = tuple(d if i in operator.retain_inputs else None for i, d in enumerate(device_inputs))
    grads = operator.backward(ctx, xp, kept, output if operator.retain_output else None,
                              be.asarray(weight))
    if len(grads) != len(host):
        raise GradientCheckError(f"{operator!r}: backward returned {len(grads)} gradients for "
                                 f"{len(host)} inputs")
    directions = [rng.standard_normal(a.shape) if d else None for a, d in zip(host, differentiable)]
    analytic = 0.0
    for i, (g, d) in enumerate(zip(grads, directions)):
        if d is None or i in operator.nondifferentiable_inputs:
            continue
        if g is None:
            raise GradientCheckError(f"{operator!r}: backward returned no gradient for input {i}")
        g = be.to_numpy(g)
        if g.shape != host[i].shape:
            raise GradientCheckError(f"{operator!r}: gradient {i} has shape {g.shape}, input has "
                                     f"{host[i].shape}")
        analytic += float(np.sum(g * d))

    def shifted(sign: float) -> float:
        arrays = [a + sign * eps * d if d is not None and i not in operator.nondifferentiable_inputs
                  else a for i, (a, d) in enumerate(zip(host, directions))]
        return float(np.sum(be.to_numpy(run(arrays)[2]) * weight))

    numeric = (shifted(1.0) - shifted(-1.0)) / (2 * eps)
    if not np.isclose(analytic, numeric, atol=atol, rtol=rtol):
        raise GradientCheckError(
            f"{operator!r} on backend {be.name!r}: backward gives {analytic:.10g}, finite "
            f"difference gives {numeric:.10g} (|diff| {abs(analytic - numeric):.3g}, atol {atol}, "
            f"rtol {rtol}); input shapes {[a.shape for a in host]}")


def inferred(factory: Callable[[], Operator], inputs: Sequence[Any]) -> Callable[[], Operator]:
    """A factory of operators that have seen the specs of ``inputs`` (float inputs as float64,
    as :func:`check_backward` runs them), as a graph shows them before any run: operators that
    settle part of their configuration in ``infer`` (axes, shapes) need it."""
    def make() -> Operator:
        op = factory()
        op.infer(*[TensorSpec(tuple(np.shape(a)), "float64" if np.asarray(a).dtype.kind == "f"
                              else np.asarray(a).dtype.name) for a in inputs])
        return op
    return make


def as_operator(obj: Checkable) -> Operator:
    """``obj`` as the operator a graph runs: activations and losses in their adapters."""
    kind = getattr(obj, "name", None) or type(obj).__name__.lower()
    if isinstance(obj, Operator):
        return obj
    if isinstance(obj, Activation):
        return ActivationOp(kind, obj)
    if isinstance(obj, Loss):
        return LossOp(kind, obj)
    raise PluginError(f"check_backward takes an Operator, an Activation or a Loss (an instance, a "
                      f"class, or a factory of them), got {obj!r}")


class _FixedRng:
    """Replays the same random numbers on every forward, so stochastic operators (dropout)
    can be differentiated numerically."""

    def __init__(self, backend: Backend, seed: int) -> None:
        self.backend, self.seed = backend, seed

    def _rng(self):
        return self.backend.make_rng(self.seed)

    def random(self, shape, dtype=np.float64):
        return self._rng().random(shape, dtype)

    def standard_normal(self, shape, dtype=np.float64):
        return self._rng().standard_normal(shape, dtype)


@contextlib.contextmanager
def isolated_plugin_manager(*plugins: Any, entry_points: bool = False) -> Iterator[PluginManager]:
    """A fresh plugin manager for the duration of a ``with`` block, holding ``plugins`` (and the
    installed entry points if ``entry_points=True``); the process-wide one is restored after."""
    manager = PluginManager(load_entry_points=entry_points)
    previous = set_plugin_manager(manager)
    try:
        for plugin in plugins:
            manager.register(plugin)
        yield manager
    finally:
        set_plugin_manager(previous)


def available_backends(include_strict: bool = True) -> list[str]:
    """Names of the registered backends that can run here."""
    names = []
    for entry in get_plugin_manager().backends.entries():
        if entry.obj.unavailable_reason() is None and (include_strict or entry.name != "strict"):
            names.append(entry.name)
    return names


def make_context(training: bool = True, rng: Any = None) -> Context:
    """A context for calling an operator's ``forward`` and ``backward`` by hand, outside a model:
    ``ctx = make_context(); y = op.forward(ctx, np, x); op.backward(ctx, np, (x,), y, dy)``."""
    return Context(SimpleNamespace(training=training, rng=rng))
