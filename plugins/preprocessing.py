"""Input preprocessing as graph nodes: mean subtraction, min-max and z-score normalization, PCA
and PCA whitening.

Each is a layer whose statistics are non-trainable parameters, so they travel with the model's
weights when it is saved. They are fitted on the host with NumPy from training data, by
``model.fit_preprocessing({"x": X_train})`` or automatically when ``model.fit`` starts (a layer
already fitted is left alone, so fine-tuning a loaded model keeps its preprocessing)::

    x = g.input("x", (None, 64))
    h = g.layer("zscore", x)                        # (x - mean) / std per feature
    h = g.layer("pca", h, components=16, whiten=True)

The contract the training loop relies on: a layer class with ``fit_data(self, x) -> dict`` maps
the layer's input (a host array holding the whole training set) to values for its parameters,
by local name. Before fitting, mean subtraction and the normalizations are the identity.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import graphengine as ge
from graphengine.errors import DataError, ShapeError, require_int


class Preprocessor(ge.Layer):
    """Base of data-fitted layers: ``build`` declares the statistics with :meth:`statistic`,
    ``fit_data`` computes them."""

    def statistic(self, g, name: str, shape: tuple[int, ...], init: str, dtype: str):
        return g.parameter(name, shape, init=init, trainable=False, decay=False, dtype=dtype)

    def fit_data(self, x: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError


def check_finite(layer: Preprocessor, x: np.ndarray, statistics: dict[str, Any] | None = None) -> None:
    """Refuse non-finite data (or statistics that overflowed), naming the layer and the first
    column holding one: fitted from it, the layer would keep NaN statistics for good. Raised
    before anything is set, so the layer stays unfitted."""
    kind = type(layer).__name__
    if statistics is None:
        bad = ~np.isfinite(x)
        if bad.any():
            row, *column = np.argwhere(bad)[0].tolist()
            where = f"column {column[0] if len(column) == 1 else tuple(column)}" if column else "the value"
            raise DataError(f"{kind} layer cannot be fitted: {where} of its input holds "
                            f"{x[(row, *column)]} (first at row {row}); drop or impute non-finite "
                            f"values before fitting (np.isfinite finds them)")
        return
    for name, value in statistics.items():
        if not np.all(np.isfinite(value)):
            raise DataError(f"{kind} layer cannot be fitted: its statistic {name!r} overflowed "
                            f"(the input's values are too large for float64); scale the data first")


class FeatureStatistics(Preprocessor):
    """A per-feature (or, with ``per_feature=False``, global) affine map ``(x - shift) * scale``
    whose shift and scale come from the training data's statistics along the batch axis."""

    #: Which statistics ``build`` declares: (name, initial value, identity before fitting).
    statistics: tuple[tuple[str, str], ...] = (("shift", "zeros"), ("scale", "ones"))

    def __init__(self, per_feature: bool = True) -> None:
        super().__init__(per_feature=per_feature)
        self.per_feature = per_feature

    def build(self, g, x):
        if x.dtype not in ("float32", "float64", "float16"):
            raise ShapeError(f"preprocessing needs a floating-point input, got {x.dtype}; cast it")
        if any(d is None for d in x.shape[1:]):
            raise ShapeError(f"preprocessing needs known non-batch dimensions, got {x.shape}")
        shape = tuple(x.shape[1:]) if self.per_feature else ()
        values = {name: self.statistic(g, name, shape, init, x.dtype)
                  for name, init in self.statistics}
        out = x - values["shift"]
        return out * values["scale"] if "scale" in values else out

    @property
    def axis(self) -> int | None:
        """Statistics run along the batch axis only, or over everything (``per_feature=False``)."""
        return 0 if self.per_feature else None

    def fit_data(self, x):
        if len(x) < 2:
            raise DataError(f"fitting {type(self).__name__} needs at least 2 rows, got {len(x)}")
        x = x.astype(np.float64)
        check_finite(self, x)
        statistics = self.fit_statistics(x)
        check_finite(self, x, statistics)
        return statistics

    def fit_statistics(self, x: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError


def _safe_inverse(spread: np.ndarray, eps: float) -> np.ndarray:
    """1 / spread, with constant features (spread ~ 0, like the blank border pixels of digits)
    mapped to 1 rather than to infinity."""
    return 1.0 / np.where(spread > eps, spread, 1.0)


class MeanSubtraction(FeatureStatistics):
    """``x - mean``: centers each feature (or, ``per_feature=False``, the whole input)."""

    statistics = (("shift", "zeros"),)

    def fit_statistics(self, x):
        return {"shift": np.asarray(x.mean(axis=self.axis))}


class MinMax(FeatureStatistics):
    """``(x - min) / (max - min)``: maps the training range of each feature to [0, 1]."""

    def fit_statistics(self, x):
        low = np.asarray(x.min(axis=self.axis))
        return {"shift": low, "scale": _safe_inverse(x.max(axis=self.axis) - low, 1e-12)}


class ZScore(FeatureStatistics):
    """``(x - mean) / std``: zero mean, unit variance per feature on the training data."""

    def fit_statistics(self, x):
        return {"shift": np.asarray(x.mean(axis=self.axis)),
                "scale": _safe_inverse(x.std(axis=self.axis), 1e-8)}


class PCA(Preprocessor):
    """``(x - mean) @ P``: projects (batch, d) inputs onto the ``components`` directions of
    largest variance of the training data. With ``whiten=True`` each projected feature is also
    divided by its standard deviation, so the outputs are uncorrelated with unit variance
    (``eps`` guards directions of near-zero variance). Before fitting, ``P`` is zero."""

    def __init__(self, components: int, whiten: bool = False, eps: float = 1e-5) -> None:
        components = require_int(components, "pca components")
        super().__init__(components=components, whiten=whiten, eps=eps)
        self.components, self.whiten, self.eps = components, whiten, eps

    def build(self, g, x):
        if x.ndim != 2 or x.shape[1] is None:
            raise ShapeError(f"pca takes (batch, features) inputs, got {x.shape}; flatten first")
        if self.components > x.shape[1]:
            raise ShapeError(f"pca cannot keep {self.components} components of {x.shape[1]} features")
        mean = self.statistic(g, "mean", (x.shape[1],), "zeros", x.dtype)
        projection = self.statistic(g, "projection", (x.shape[1], self.components), "zeros", x.dtype)
        return (x - mean) @ projection

    def fit_data(self, x: np.ndarray) -> dict[str, Any]:
        if len(x) < max(2, self.components):
            raise DataError(f"fitting pca with {self.components} components needs at least "
                            f"{max(2, self.components)} rows, got {len(x)}")
        x = x.astype(np.float64)
        check_finite(self, x)
        mean = x.mean(axis=0)
        try:
            _, singular, vt = np.linalg.svd(x - mean, full_matrices=False)
        except np.linalg.LinAlgError as exc:  # finite data so large that centering overflowed
            raise DataError(f"PCA layer cannot be fitted: {exc}; scale the data first") from None
        directions = vt[:self.components].T
        # Fix each direction's sign (largest entry positive) so refitting gives the same map.
        signs = np.sign(directions[np.abs(directions).argmax(axis=0), range(self.components)])
        directions = directions * signs
        if self.whiten:
            variance = singular[:self.components] ** 2 / (len(x) - 1)
            directions = directions / np.sqrt(variance + self.eps)
        statistics = {"mean": mean, "projection": directions}
        check_finite(self, x, statistics)
        return statistics


@ge.hookimpl
def graphengine_register_layers(register):
    register("mean_subtraction", MeanSubtraction, aliases=("center",))
    register("minmax", MinMax, aliases=("min_max",))
    register("zscore", ZScore, aliases=("standardize",))
    register("pca", PCA)
