"""Every error graphengine raises is a GraphEngineError, and says what to do next."""

from __future__ import annotations

import difflib
import math
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


class HyperparameterError(GraphEngineError, TypeError):
    """A plugin's constructor rejected a setting (NaN, infinite, out of range, not a number).
    A TypeError, as Python's own for bad call arguments, so that ``ge.optimizer(...)`` reports
    it with the plugin that rejected it."""


def require_int(value: Any, what: str, minimum: int = 1,
                error: type[GraphEngineError] = GraphBuildError) -> int:
    """``value`` as an int of at least ``minimum``: any integral number, NumPy's included, but
    not a bool (``units=True`` is a mistake, not a size of 1); else ``error`` naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        bound = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise error(f"{what} must be {bound}, got {value!r}")
    return int(value)


def require_number(value: Any, what: str, minimum: float | None = None,
                   maximum: float | None = None, *, exclusive_minimum: bool = False,
                   exclusive_maximum: bool = False,
                   error: type[GraphEngineError] = GraphBuildError) -> float:
    """``value`` as a finite float within the bounds given (inclusive unless ``exclusive_*``):
    any real number, NumPy's included, but not a bool, NaN or an infinity. Comparisons with NaN
    are all False, so a bounds check alone lets ``lr=nan`` through; else ``error`` naming ``what``."""
    number = math.nan
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            number = float(value)
        except (OverflowError, ValueError):  # an int beyond float's range is not a setting
            pass
    low_ok = minimum is None or (number > minimum if exclusive_minimum else number >= minimum)
    high_ok = maximum is None or (number < maximum if exclusive_maximum else number <= maximum)
    if not (math.isfinite(number) and low_ok and high_ok):
        raise error(f"{what} must be {_number_bounds(minimum, maximum, exclusive_minimum, exclusive_maximum)}, "
                    f"got {value!r}" + (", which is not finite" if isinstance(value, float) and
                                        not math.isfinite(value) else ""))
    return number


def _number_bounds(minimum: float | None, maximum: float | None, exclusive_minimum: bool,
                   exclusive_maximum: bool) -> str:
    if minimum == 0 and maximum is None:
        return "a positive number" if exclusive_minimum else "a non-negative number"
    bounds = []
    if minimum is not None:
        bounds.append(f"{'>' if exclusive_minimum else '>='} {minimum}")
    if maximum is not None:
        bounds.append(f"{'<' if exclusive_maximum else '<='} {maximum}")
    return f"a number {' and '.join(bounds)}" if bounds else "a finite number"


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """A ' Did you mean ...?' suffix for an unknown name, or '' when nothing is close."""
    close = difflib.get_close_matches(name, sorted(choices), n=3, cutoff=0.6)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"
