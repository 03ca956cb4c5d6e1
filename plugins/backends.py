"""Array backends: NumPy (default), CuPy (GPU) and a strict NumPy backend for tests.

The strict backend wraps NumPy arrays so that, like CuPy's, they refuse implicit conversion to
NumPy (``np.asarray(a)``), refuse mixing with plain NumPy arrays, and refuse NumPy functions
called directly instead of through ``xp``. Running the operator suite on it proves that no NumPy
leaks into operator code, without a GPU.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from typing import Any

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

import graphengine as ge
from graphengine.errors import BackendError
from graphengine.runtime.backend import module_namespace


def _numpy_scatter_add(target, indices, values):
    """``target[indices] += values``, repeated indices adding up (``np.add.at``). Whole rows
    picked by one array of non-negative row numbers (an embedding's backward) are summed by
    sorting the row numbers and adding each run of equal ones in one ``reduceat``: 1.5-4.6x
    faster than ``np.add.at`` (which visits the rows one at a time). Anything else goes to
    ``np.add.at``."""
    if (isinstance(indices, np.ndarray) and indices.ndim == 1 and indices.dtype.kind in "iu"
            and indices.size and values.shape == indices.shape + target.shape[1:]
            and indices.min() >= 0):
        order = np.argsort(indices, kind="stable")
        rows = indices[order]
        starts = np.flatnonzero(np.concatenate(([True], rows[1:] != rows[:-1])))
        target[rows[starts]] += np.add.reduceat(values[order], starts, axis=0)
        return
    np.add.at(target, indices, values)


@contextlib.contextmanager
def _gpu_errstate(**_ignored: str) -> Iterator[None]:
    """``xp.errstate`` on CuPy: GPU kernels raise no floating-point warnings to silence."""
    yield


class NumpyBackend(ge.Backend):
    """NumPy on the CPU: the default."""

    name = "numpy"
    array_types = (np.ndarray,)

    def build_namespace(self):
        return module_namespace(np, scatter_add=_numpy_scatter_add)

    def asarray(self, data, dtype=None):
        if isinstance(data, StrictArray) or _is_foreign_array(data):
            raise BackendError(f"cannot take a {type(data).__name__} into backend 'numpy' "
                               f"implicitly; convert it with its own backend's to_numpy()")
        return np.asarray(data, dtype=dtype)

    def to_numpy(self, array):
        return np.asarray(array)

    def make_rng(self, seed):
        return np.random.default_rng(seed)


def _is_foreign_array(obj: Any) -> bool:
    return type(obj).__module__.split(".")[0] in ("cupy", "torch", "jax", "jaxlib")


class CupyBackend(ge.Backend):
    """CuPy on an NVIDIA GPU (``pip install graphengine[cuda12]``)."""

    name = "cupy"

    @classmethod
    def unavailable_reason(cls):
        if importlib.util.find_spec("cupy") is None:
            return "CuPy is not installed (pip install cupy-cuda12x)"
        try:
            import cupy
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # CUDA driver missing or broken: report, never crash
            return f"CuPy cannot reach a GPU: {type(exc).__name__}: {exc}"
        return None if count > 0 else "no CUDA GPU is visible"

    def build_namespace(self):
        import cupy
        import cupyx
        self.array_types = (cupy.ndarray,)
        return module_namespace(cupy, scatter_add=cupyx.scatter_add, errstate=_gpu_errstate)

    def asarray(self, data, dtype=None):
        import cupy
        return cupy.asarray(data, dtype=dtype)

    def to_numpy(self, array):
        import cupy
        return cupy.asnumpy(array)

    def make_rng(self, seed):
        import cupy
        return cupy.random.default_rng(seed)

    def synchronize(self):
        import cupy
        cupy.cuda.Device().synchronize()


# --------------------------------------------------------------------------- strict backend

def _unwrap(obj: Any) -> Any:
    if isinstance(obj, StrictArray):
        return obj._array
    if isinstance(obj, np.ndarray):
        raise BackendError(
            f"a plain NumPy array of shape {obj.shape} was mixed with strict-backend arrays; "
            f"on CuPy this fails too: create it with xp (xp.asarray, xp.zeros, ...)")
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unwrap(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _unwrap(v) for k, v in obj.items()}
    return obj


def _wrap(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return StrictArray(obj)
    if isinstance(obj, np.generic) and not isinstance(obj, (np.str_, np.bytes_)):
        return StrictArray(np.asarray(obj))  # CuPy reductions return 0-d arrays, not scalars
    if isinstance(obj, (list, tuple)) and any(isinstance(o, np.ndarray) for o in obj):
        return type(obj)(_wrap(o) for o in obj)
    return obj


def _strict_call(func):
    def call(*args, **kwargs):
        return _wrap(func(*_unwrap(args), **_unwrap(kwargs)))
    call.__name__ = getattr(func, "__name__", "call")
    return call


class StrictArray(NDArrayOperatorsMixin):
    """A NumPy array that behaves like a CuPy array towards NumPy: no implicit conversion."""

    __slots__ = ("_array",)

    def __init__(self, array: np.ndarray) -> None:
        self._array = array

    def __array__(self, dtype=None, copy=None):
        raise BackendError(
            "implicit conversion of a strict-backend array to NumPy (as np.asarray would do); "
            "CuPy refuses this too: use backend.to_numpy(array) where a host copy is meant")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        return _wrap(getattr(ufunc, method)(*_unwrap(inputs), **_unwrap(kwargs)))

    def __array_function__(self, func, types, args, kwargs):
        raise BackendError(f"numpy.{func.__name__} was called on a strict-backend array: operator "
                           f"code must call xp.{func.__name__}, never numpy directly")

    shape = property(lambda self: self._array.shape)
    dtype = property(lambda self: self._array.dtype)
    ndim = property(lambda self: self._array.ndim)
    size = property(lambda self: self._array.size)
    T = property(lambda self: StrictArray(self._array.T))

    def __getitem__(self, key):
        return _wrap(self._array[_unwrap(key)])

    def __setitem__(self, key, value):
        self._array[_unwrap(key)] = _unwrap(value)

    def __getattr__(self, name):
        if name.startswith("__"):  # __array_interface__ and friends would hand NumPy the buffer
            raise AttributeError(name)
        attr = getattr(self._array, name)
        return _strict_call(attr) if callable(attr) else _wrap(attr)

    def __len__(self):
        return len(self._array)

    def __iter__(self):
        return (_wrap(a) for a in self._array)

    def __float__(self):
        return float(self._array)

    def __int__(self):
        return int(self._array)

    def __index__(self):
        return self._array.__index__()

    def __bool__(self):
        return bool(self._array)

    def __repr__(self):
        return f"strict({self._array!r})"


class _StrictUfunc:
    def __init__(self, ufunc: np.ufunc) -> None:
        self._ufunc = ufunc

    def __call__(self, *args, **kwargs):
        return _wrap(self._ufunc(*_unwrap(args), **_unwrap(kwargs)))

    def __getattr__(self, name):
        return _strict_call(getattr(self._ufunc, name))


class _StrictNamespace:
    """numpy's namespace, refusing plain NumPy arrays in and wrapping arrays out."""

    # Host -> device transfers are explicit by nature, as cupy.asarray(numpy_array) is.
    _TRANSFERS = ("asarray", "array", "ascontiguousarray")

    def __init__(self, module: Any) -> None:
        self._module = module

    def __getattr__(self, name):
        obj = getattr(self._module, name)
        if isinstance(obj, type) or not callable(obj) and not hasattr(obj, "__dict__"):
            value = obj
        elif isinstance(obj, np.ufunc):
            value = _StrictUfunc(obj)
        elif callable(obj):
            value = _strict_transfer(obj) if name in self._TRANSFERS else _strict_call(obj)
        else:
            value = _StrictNamespace(obj)
        setattr(self, name, value)
        return value

    @staticmethod
    def scatter_add(target, indices, values):
        _numpy_scatter_add(_unwrap(target), _unwrap(indices), _unwrap(values))


def _strict_transfer(func):
    def call(data, *args, **kwargs):
        data = data._array if isinstance(data, StrictArray) else data
        return _wrap(func(data, *args, **kwargs))
    return call


class _StrictGenerator:
    def __init__(self, seed):
        self._rng = np.random.default_rng(seed)

    @property
    def bit_generator(self):
        """The state behind the numbers, as NumPy's (checkpoints save and restore it)."""
        return self._rng.bit_generator

    def random(self, shape, dtype=np.float64):
        return StrictArray(self._rng.random(shape, dtype=dtype))

    def standard_normal(self, shape, dtype=np.float64):
        return StrictArray(self._rng.standard_normal(shape, dtype=dtype))


class StrictBackend(ge.Backend):
    """NumPy behind CuPy's manners, for tests: see the module docstring."""

    name = "strict"
    array_types = (StrictArray,)

    def build_namespace(self):
        return _StrictNamespace(np)

    def asarray(self, data, dtype=None):
        if isinstance(data, StrictArray):
            return data if dtype is None or data.dtype == dtype else data.astype(dtype)
        return StrictArray(np.array(data, dtype=dtype))

    def to_numpy(self, array):
        self.check_array(array, "the array passed to to_numpy")
        return array._array.copy()

    def make_rng(self, seed):
        return _StrictGenerator(seed)


@ge.hookimpl
def graphengine_register_backends(register):
    register("numpy", NumpyBackend)
    register("cupy", CupyBackend, aliases=("cuda",))
    register("strict", StrictBackend)
