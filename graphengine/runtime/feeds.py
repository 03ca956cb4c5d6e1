"""Feeds: the arrays a run's inputs get, checked against the graph and brought to the backend."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import BackendError, FeedError

if TYPE_CHECKING:
    from ..compiler.plan import Plan
    from ..ir.graph import Graph
    from .backend import Backend

Feeds = Mapping[str, Any]


def rows(value: Any) -> int | None:
    """The length of a value's first (batch) dimension, or None for a scalar."""
    shape = getattr(value, "shape", None)
    if shape is not None:
        return int(shape[0]) if len(shape) else None
    return len(value) if hasattr(value, "__len__") and not isinstance(value, (str, bytes)) else None


def batch_rows(feeds: Feeds) -> int | None:
    """The rows of a batch: the first dimension of its first value that has one."""
    return next((n for n in map(rows, feeds.values()) if n is not None), None)


def fits(shape: tuple, spec_shape: tuple) -> bool:
    """Whether an array's ``shape`` is one that ``spec_shape`` (None: any size) allows."""
    return len(shape) == len(spec_shape) and all(d is None or d == s for d, s in zip(spec_shape, shape))


def check_feed_names(graph: Graph, plan: Plan, feeds: Feeds) -> None:
    """Every input ``plan`` reads is fed, and nothing else but inputs of ``graph``."""
    if not isinstance(feeds, Mapping):
        raise FeedError(f"feeds must be a dict of input name -> array, got {type(feeds).__name__}: "
                        f"pass {{{', '.join(repr(n) + ': ...' for n in plan.feeds)}}}")
    missing = [n for n in plan.feeds if n not in feeds]
    if missing:
        raise FeedError(f"missing feed(s) {missing}: this computation needs inputs "
                        f"{list(plan.feeds)}; add an array for each to the feed dict")
    unknown = [n for n in feeds if n not in graph.nodes or graph.nodes[n].kind != "input"]
    if unknown:
        raise FeedError(f"unknown feed(s) {unknown}: graph {graph.name!r} has inputs "
                        f"{graph.inputs()}; check the spelling, or leave them out")


def feed_array(backend: Backend, name: str, value: Any) -> Any:
    """``value`` if it is an array of ``backend``, else a host (NumPy) array of it; an array
    of another backend is refused, since backends only convert when asked to."""
    if backend.is_array(value):
        return value
    try:
        if type(value).__module__.split(".")[0] in ("cupy", "torch", "jax", "jaxlib"):
            raise TypeError("arrays of other libraries are not converted implicitly")
        return np.asarray(value)
    except TypeError as exc:  # CuPy and strict arrays refuse implicit conversion
        if not hasattr(value, "shape"):
            raise FeedError(f"feed {name!r} is a {type(value).__name__}, not an array: {exc}") from None
        raise BackendError(f"feed {name!r} is a {type(value).__module__}.{type(value).__name__}, "
                           f"but the model runs on backend {backend.name!r}: convert it "
                           f"explicitly (its backend's to_numpy(), then feed the NumPy array); "
                           f"graphengine never converts between backends silently") from None
    except ValueError as exc:
        raise FeedError(f"feed {name!r} cannot become an array ({exc}); feed a rectangular "
                        f"array of numbers") from None


def load_feeds(graph: Graph, backend: Backend, plan: Plan, feeds: Feeds, values: list[Any]) -> None:
    """Put the checked feeds of ``plan``'s inputs into their slots of ``values``."""
    # Feeds of the same names, types, dtypes and shapes as the last ones that passed
    # unconverted pass again: fit() feeds batch after batch alike.
    signature = tuple((k, type(v), getattr(v, "dtype", None), getattr(v, "shape", None))
                      for k, v in feeds.items()) if isinstance(feeds, dict) else None
    if signature is not None and signature == plan.feed_signature:
        for name in plan.feeds:
            values[plan.slots[name]] = feeds[name]
        return
    check_feed_names(graph, plan, feeds)
    batch = None
    for name in plan.feeds:
        value = feed_array(backend, name, feeds[name])
        spec = graph.nodes[name].spec
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
        if backend.is_array(value):
            if value.dtype != spec.dtype:
                value = value.astype(spec.dtype)
        else:
            value = backend.asarray(value, dtype=spec.dtype)
        values[plan.slots[name]] = value
    if all(values[plan.slots[name]] is feeds[name] for name in plan.feeds):
        plan.feed_signature = signature
