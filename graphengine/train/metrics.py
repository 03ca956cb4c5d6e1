"""Metrics that ``fit`` and ``evaluate`` report beside the loss: ``metrics=["mae", "rmse", "r2",
"top5_accuracy", my_function]`` in ``compile`` or ``fit``.

A metric sees the prediction as ``Model.predict`` returns it (through the loss's link: softmax
probabilities for softmax cross-entropy, sigmoid probabilities for binary cross-entropy) and the
target. Built-in metrics add up sums over the batches, on the device, so that the epoch's value
is exact whatever the batch size (an R^2 averaged over batches would not be the R^2 of the
set). A user's callable ``fn(pred, target) -> float`` receives host arrays of one batch, and its
value is averaged over the batches, weighted by their sizes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import GraphEngineError, did_you_mean


class Metric:
    """A metric as running sums: ``sums`` gives a batch's sums (device scalars), and
    ``result`` turns the sums over all batches into the value. Stateless, so one metric object
    serves training and validation at once."""

    name: str = "metric"
    #: Whether ``sums`` takes host (NumPy) arrays rather than the backend's.
    host: bool = False

    def sums(self, xp: Any, pred: Any, target: Any) -> Sequence[Any]:
        raise NotImplementedError

    def result(self, sums: np.ndarray) -> float:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<metric {self.name}>"


def _errors(metric: str, pred: Any, target: Any) -> Any:
    """pred - target, with (batch, 1) predictions of (batch,) targets lined up."""
    if pred.shape != target.shape:
        if pred.size != target.size:
            raise GraphEngineError(
                f"metric {metric!r} compares prediction and target element by element, but the "
                f"prediction has shape {tuple(pred.shape)} and the target {tuple(target.shape)}: "
                f"it is a regression metric (for class scores, use top{{k}}_accuracy)")
        target = target.reshape(pred.shape)
    return pred - target.astype(pred.dtype)


class MAE(Metric):
    """Mean absolute error over all elements."""

    name = "mae"

    def sums(self, xp, pred, target):
        return (xp.abs(_errors(self.name, pred, target)).sum(), pred.size)

    def result(self, sums):
        return float(sums[0] / sums[1])


class RMSE(Metric):
    """Root of the mean squared error over all elements."""

    name = "rmse"

    def sums(self, xp, pred, target):
        diff = _errors(self.name, pred, target)
        return ((diff * diff).sum(), pred.size)

    def result(self, sums):
        return math.sqrt(sums[0] / sums[1])


class R2(Metric):
    """Coefficient of determination, ``1 - SS_res / SS_tot`` over all elements (1 is a perfect
    fit, 0 is no better than predicting the mean; NaN for a constant target)."""

    name = "r2"

    def sums(self, xp, pred, target):
        diff = _errors(self.name, pred, target)
        t = target.astype(pred.dtype)
        return ((diff * diff).sum(), t.sum(), (t * t).sum(), t.size)

    def result(self, sums):
        residual, total, squares, count = sums
        spread = squares - total * total / count  # SS_tot from sums, so batches add up exactly
        return 1.0 - residual / spread if spread > 0 else math.nan


class TopKAccuracy(Metric):
    """Share of examples whose label is among the ``k`` highest scores; the labels are class
    indices (batch,) or one-hot rows (batch, classes)."""

    def __init__(self, k: int = 5) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise GraphEngineError(f"top-k accuracy needs a positive int k, got {k!r}")
        self.k = k
        self.name = f"top{k}_accuracy"

    def sums(self, xp, pred, target):
        if pred.ndim != 2:
            raise GraphEngineError(f"{self.name} needs class scores (batch, classes), got a "
                                   f"prediction of shape {tuple(pred.shape)}")
        if target.ndim == 2:
            target = target.argmax(axis=1)
        label_score = pred[xp.arange(len(target)), target.astype("int64")]
        # ranked above the label's score by fewer than k classes: ties count in the label's favour
        above = (pred > label_score[:, None]).sum(axis=1)
        return ((above < self.k).sum(), len(target))

    def result(self, sums):
        return float(sums[0] / sums[1])


class FunctionMetric(Metric):
    """A user's ``fn(pred, target) -> float`` on the host arrays of each batch, averaged over
    the batches weighted by their sizes."""

    host = True

    def __init__(self, function: Callable[[Any, Any], float], name: str | None = None) -> None:
        self.function = function
        self.name = name or getattr(function, "__name__", type(function).__name__)

    def sums(self, xp, pred, target):
        value = self.function(pred, target)
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise GraphEngineError(f"metric {self.name!r} returned {value!r}, not a number: a "
                                   f"metric is fn(pred, target) -> float") from None
        return (value * len(pred), len(pred))

    def result(self, sums):
        return float(sums[0] / sums[1])


#: Built-in metrics by name; ``topK_accuracy`` for any K is understood too.
METRICS: dict[str, Callable[[], Metric]] = {"mae": MAE, "rmse": RMSE, "r2": R2,
                                            "top5_accuracy": lambda: TopKAccuracy(5)}
_TOP_K = re.compile(r"top_?(\d+)_?acc(uracy)?$")


def get_metric(spec: Any) -> Metric:
    """A metric from a name (``"mae"``, ``"top3_accuracy"``), a :class:`Metric`, or a callable
    ``fn(pred, target) -> float``."""
    if isinstance(spec, Metric):
        return spec
    if isinstance(spec, str):
        if spec in METRICS:
            return METRICS[spec]()
        match = _TOP_K.match(spec)
        if match:
            return TopKAccuracy(int(match.group(1)))
        raise GraphEngineError(f"unknown metric {spec!r}.{did_you_mean(spec, METRICS)} Metrics: "
                               f"{', '.join(METRICS)}, topK_accuracy for any K, or a function "
                               f"fn(pred, target) -> float (accuracy and error are reported "
                               f"where the loss defines them)")
    if callable(spec):
        return FunctionMetric(spec)
    raise GraphEngineError(f"a metric is a name, a graphengine Metric or a function "
                           f"fn(pred, target) -> float; got {type(spec).__name__} {spec!r}")


def get_metrics(specs: Any) -> list[Metric]:
    """Metrics from a list of specs (see :func:`get_metric`) or a dict name -> spec; duplicate
    names are an error, since the reports are keyed by name."""
    if specs is None:
        return []
    if isinstance(specs, (str, Metric)) or callable(specs):
        specs = [specs]
    if isinstance(specs, Mapping):
        metrics = []
        for name, spec in specs.items():
            metric = get_metric(spec)
            if isinstance(metric, FunctionMetric):
                metric.name = name
            elif metric.name != name:
                raise GraphEngineError(f"metric {name!r}: a built-in metric keeps its name "
                                       f"({metric.name!r}); list it without a name")
            metrics.append(metric)
    else:
        metrics = [get_metric(spec) for spec in specs]
    names = [m.name for m in metrics]
    repeated = sorted({n for n in names if names.count(n) > 1})
    reserved = sorted(set(names) & {"loss", "accuracy", "error"})
    if repeated or reserved:
        raise GraphEngineError(f"metric names must be unique and not loss, accuracy or error "
                               f"(fit reports those itself): {repeated + reserved}")
    return metrics


class Meter:
    """Running sums of metrics over one pass (an epoch, an evaluation)."""

    def __init__(self, metrics: Sequence[Metric], backend: Any) -> None:
        self.metrics = list(metrics)
        self.backend = backend
        self.totals: list[list[Any] | None] = [None] * len(self.metrics)

    def update(self, xp: Any, pred: Any, target: Any) -> None:
        host = None
        for i, metric in enumerate(self.metrics):
            if metric.host:
                if host is None:
                    host = self.backend.to_numpy(pred), self.backend.to_numpy(target)
                sums = metric.sums(np, *host)
            else:
                sums = metric.sums(xp, pred, target)
            total = self.totals[i]
            self.totals[i] = list(sums) if total is None else [a + b for a, b in zip(total, sums)]

    def results(self) -> dict[str, float]:
        out = {}
        for metric, total in zip(self.metrics, self.totals):
            if total is None:
                continue
            host = np.array([float(self.backend.to_numpy(v)) if not isinstance(v, (int, float))
                             else float(v) for v in total], dtype=np.float64)
            out[metric.name] = metric.result(host)
        return out
