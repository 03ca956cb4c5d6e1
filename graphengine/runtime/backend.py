"""The backend contract: where arrays live and which array module computes on them.

Operators never import numpy for array math; they receive ``xp``, the backend's array
namespace (numpy's or cupy's functions plus ``scatter_add(target, indices, values)`` and an
``errstate(**kwargs)`` context manager, as NumPy's), the way Chainer's ``get_array_module``
works. Concrete backends are plugins (see ``plugins/backends.py``).
"""

from __future__ import annotations

import types
from typing import Any, ClassVar

import numpy as np

from ..errors import BackendError
from ..hooks import get_plugin_manager


class Backend:
    """Base class of backends. Subclasses set ``name`` and ``array_types`` and build ``xp``.

    A backend converts between host (NumPy) arrays and its own explicitly, through
    :meth:`asarray` and :meth:`to_numpy`; nothing else may convert.
    """

    name: ClassVar[str] = "abstract"
    array_types: tuple[type, ...] = ()

    def __init__(self) -> None:
        reason = self.unavailable_reason()
        if reason:
            raise BackendError(f"backend {self.name!r} is unavailable: {reason}")
        self.xp = self.build_namespace()

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this backend cannot run here, or None when it can."""
        return None

    def build_namespace(self) -> Any:
        raise NotImplementedError

    def asarray(self, data: Any, dtype: Any = None) -> Any:
        """Host data -> an array of this backend (an explicit transfer)."""
        return self.xp.asarray(data, dtype=dtype)

    def to_numpy(self, array: Any) -> np.ndarray:
        """An array of this backend -> a host NumPy array (an explicit transfer)."""
        raise NotImplementedError

    def is_array(self, obj: Any) -> bool:
        return isinstance(obj, self.array_types)

    def make_rng(self, seed: int | None) -> Any:
        """A generator with ``random(shape, dtype)`` and ``standard_normal(shape, dtype)``
        producing arrays of this backend (used by dropout and other stochastic operators)."""
        raise NotImplementedError

    def synchronize(self) -> None:
        """Wait for queued device work (timing); a no-op on the CPU."""

    def check_array(self, array: Any, what: str) -> None:
        """Raise a BackendError naming ``what`` if ``array`` belongs to another backend."""
        if not self.is_array(array):
            raise BackendError(
                f"{what} is a {type(array).__module__}.{type(array).__name__}, not an array of "
                f"backend {self.name!r}; convert it explicitly with backend.asarray(...) or "
                f"backend.to_numpy(...): graphengine never converts between backends silently"
            )

    def __repr__(self) -> str:
        return f"<Backend {self.name}>"


def module_namespace(module: types.ModuleType, **extras: Any) -> types.SimpleNamespace:
    """A flat namespace holding an array module's attributes plus backend helpers.

    Plain attribute lookup on it is as fast as on the module, which matters in the step loop.
    """
    names = {name: getattr(module, name) for name in dir(module) if not name.startswith("__")}
    names.update(extras)
    return types.SimpleNamespace(**names)


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
