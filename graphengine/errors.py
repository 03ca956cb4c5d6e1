"""Every error graphengine raises is a GraphEngineError, and says what to do next."""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any


class GraphEngineError(Exception):
    """Base class of all graphengine errors."""

    #: The graph node the error is about, where one is known (set by the model at run time).
    node: str | None = None


class GraphBuildError(GraphEngineError, ValueError):
    """A graph cannot be built as asked (unknown input, duplicate name, a tensor of another graph, ...)."""


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
        bound = _number_bounds(minimum, maximum, exclusive_minimum, exclusive_maximum)
        infinite = isinstance(value, float) and not math.isfinite(value)
        raise error(f"{what} must be {bound}, got {value!r}" + (", which is not finite" if infinite else ""))
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


#: Spellings other libraries use for an option graphengine names otherwise; difflib would not
#: find them (``learning_rate`` is too far from ``lr``).
SYNONYMS = {"learning_rate": "lr", "learningrate": "lr", "clipnorm": "clip_norm",
            "clipvalue": "clip_value", "beta_1": "beta1", "beta_2": "beta2", "epsilon": "eps",
            "rho": "alpha", "nb_epoch": "epochs", "validation_data": "validation",
            "n_epochs": "epochs", "num_epochs": "epochs"}


def suggest(name: str, choices: Iterable[str]) -> str:
    """:func:`did_you_mean`, knowing the synonyms of :data:`SYNONYMS` too."""
    choices = list(choices)
    synonym = SYNONYMS.get(name.lower())
    if synonym in choices:
        return f" Did you mean {synonym!r}?"
    return did_you_mean(name, choices)


def unknown_keywords(given: Iterable[str], known: Iterable[str]) -> str | None:
    """For the keywords in ``given`` that are not in ``known``: a did-you-mean for each, then
    the known ones (`` Did you mean 'std'? Its options: mean, std.``); None if all are known."""
    known = list(dict.fromkeys(known))
    unknown = [k for k in given if k not in known]
    if not unknown:
        return None
    hints = "".join(suggest(k, known) for k in unknown)
    return f"{hints} Its options: {', '.join(known) or 'none'}."


def positional_hint(values: Sequence[Any], names: Sequence[str]) -> str:
    """``write units=10`` for values passed by position where keywords ``names`` were meant."""
    pairs = [f"{n}={v!r}" for n, v in zip(names, values)]
    return f"write {', '.join(pairs)}" if pairs else "pass options by keyword"


def checked_keywords(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` whose bad arguments (an unknown keyword, one positional argument too many)
    raise a GraphEngineError with a did-you-mean rather than Python's TypeError. The signature
    stays explicit, so ``help()`` and IDEs show every option."""
    signature = inspect.signature(function)
    parameters = list(signature.parameters.values())
    positional = [p.name for p in parameters
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    keyword_only = [p.name for p in parameters if p.kind == p.KEYWORD_ONLY]
    # the options a user sets: keyword-only ones and positional ones with a default
    options = [p.name for p in parameters if p.kind == p.KEYWORD_ONLY or (
        p.kind == p.POSITIONAL_OR_KEYWORD and p.default is not p.empty)]
    name = function.__qualname__.replace(".__init__", "") + "()"
    by_position = ", ".join(n for n in positional if n not in ("self", "model"))

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            signature.bind(*args, **kwargs)
        except TypeError as exc:
            unknown = [k for k in kwargs if k not in signature.parameters]
            message = None
            if unknown:
                message = (f"{name} has no option {', '.join(map(repr, unknown))}."
                           f"{unknown_keywords(unknown, options)}")
            if message is None and len(args) > len(positional):
                message = (f"{name} takes ({by_position}) by position; the other options are "
                           f"keywords: {positional_hint(args[len(positional):], keyword_only)}")
            raise GraphEngineError(message or f"{name}: {exc}") from None
        return function(*args, **kwargs)

    return wrapper


def unknown_options(factory: Callable[..., Any], config: Iterable[str]) -> str | None:
    """:func:`unknown_keywords` for the keywords in ``config`` that the class or function
    ``factory`` (a plugin's constructor) does not take; None if it takes them all or its
    signature cannot tell (it takes ``**options`` beside named ones)."""
    try:
        parameters = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature
        return None
    named = [p.name for p in parameters
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"]
    if named and any(p.kind == p.VAR_KEYWORD for p in parameters):
        return None
    return unknown_keywords(config, named)


def option_names(factory: Callable[..., Any], given: Iterable[str] = ()) -> list[str]:
    """The keyword options of ``factory`` in declared order, leaving out those ``given``."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return []
    given = set(given)
    return [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and p.name != "self" and p.name not in given]
