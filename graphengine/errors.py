"""Every error graphengine raises is a GraphEngineError, and says what to do next."""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Iterable
from typing import Any


class GraphEngineError(Exception):
    """Base class of all graphengine errors."""

    #: The graph node the error is about, where one is known (set by the model at run time).
    node: str | None = None


class GraphBuildError(GraphEngineError, ValueError):
    """A graph cannot be built as asked (unknown input, duplicate name, cycle, ...)."""


class ShapeError(GraphBuildError):
    """Shapes or dtypes of a node's inputs do not fit together."""


class CompileError(GraphEngineError, ValueError):
    """The graph cannot be compiled into a plan (loss not scalar, nothing to train, ...)."""


class FeedError(GraphEngineError, ValueError):
    """The arrays fed to a model do not match its inputs."""


class BackendError(GraphEngineError, TypeError):
    """A backend is unavailable, or arrays of two backends were mixed."""


class PluginError(GraphEngineError):
    """A plugin failed to load or registered something invalid."""


class PluginConflictError(PluginError):
    """Two plugins registered the same name."""


class UnknownNameError(GraphEngineError, KeyError):
    """A layer, activation, loss, optimizer, initializer or backend name is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class NumericalError(GraphEngineError, FloatingPointError):
    """A NaN or Inf appeared in a forward or backward value (debug mode)."""


class OperatorError(GraphEngineError, RuntimeError):
    """An operator's code failed while running: a plugin bug, or sizes only known at run time
    (the batch) that do not fit together."""


class DataError(GraphEngineError, ValueError):
    """A dataset given to fit/evaluate cannot be used (empty, mismatched lengths, ...)."""


class SerializationError(GraphEngineError, ValueError):
    """A model file is corrupted, truncated, unsafe or from an unknown format version."""


def require_int(value: Any, what: str, minimum: int = 1,
                error: type[GraphEngineError] = GraphBuildError) -> int:
    """``value`` as an int of at least ``minimum``: any integral number, NumPy's included, but
    not a bool (``units=True`` is a mistake, not a size of 1); else ``error`` naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        bound = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise error(f"{what} must be {bound}, got {value!r}")
    return int(value)


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """A ' Did you mean ...?' suffix for an unknown name, or '' when nothing is close."""
    close = difflib.get_close_matches(name, sorted(choices), n=3, cutoff=0.6)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"
