"""Built-in losses.

Regression: ``mse`` (L2), ``l1`` (MAE), ``huber``. Classification from raw scores (logits):
``binary_cross_entropy`` (two classes, one logit; ``from_logits=False`` for probabilities),
``softmax_cross_entropy`` (integer labels, or one-hot / soft targets), ``kl_divergence`` (against
target distributions), ``hinge`` (binary or multi-class SVM loss); from log-probabilities: ``nll``.
Every classification loss defines ``accuracy``, which ``fit``/``evaluate`` report with the 0/1
error ``1 - accuracy``.

Every loss takes ``reduction="mean"`` (the default: the sum of its terms divided by their count,
as PyTorch's ``reduction="mean"`` divides) or ``reduction="sum"``. The class-label losses take
``weights=`` (one per class) and ``ignore_index=`` (a label whose rows count for nothing, such as
the padding of sequences), with PyTorch's weighted mean ``sum(w_i l_i) / sum(w_i)``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, ClassVar

from graphengine.plugins.activations import log_softmax, sigmoid, softmax

import graphengine as ge
from graphengine.errors import HyperparameterError, ShapeError, require_number
from graphengine.ir.operators import TensorSpec

REDUCTIONS = ("mean", "sum")
#: PyTorch's floors for binary cross-entropy on probabilities: ``log(p)`` is clamped to -100 so
#: that p = 0 costs 100 rather than infinity, and the gradient's denominator p (1 - p) to 1e-12.
LOG_FLOOR = -100.0
PROBABILITY_PRODUCT_FLOOR = 1e-12


class _Reduced(ge.Loss):
    """A built-in loss: a sum of terms, divided by their count for ``reduction="mean"``."""

    name: ClassVar[str] = "loss"

    def __init__(self, reduction: str = "mean") -> None:
        if reduction not in REDUCTIONS:
            raise HyperparameterError(f"{self.name}: reduction must be one of {REDUCTIONS}, got "
                                      f"{reduction!r}")
        self.reduction = reduction

    def config(self) -> dict[str, Any]:
        return {"reduction": self.reduction}

    def per_term(self, count: Any) -> Any:
        """What each of ``count`` terms weighs in the loss: 1/count for the mean, 1 for the sum."""
        return 1.0 / count if self.reduction == "mean" else 1.0


def _column(per_row: Any) -> Any:
    """Per-row numbers as a column that scales the rows of a (rows, classes) array; one number
    for every row stays as it is."""
    return per_row if isinstance(per_row, float) else per_row[:, None]


def _require_probabilities(loss: str, what: str, values: Any) -> None:
    if values.size and (float(values.min()) < 0 or float(values.max()) > 1):
        raise ge.DataError(f"{loss} {what} must lie in [0, 1]; got values from "
                           f"{float(values.min())} to {float(values.max())}")


def _require_same_shape(loss: str, pred: TensorSpec, target: TensorSpec, what: str) -> None:
    if pred.shape != target.shape:
        raise ShapeError(f"{loss} takes {what} of the prediction's shape; got prediction "
                         f"{pred.shape} and target {target.shape}")


def _soft_cross_entropy(xp: Any, scores: Any, coefficients: Any) -> Any:
    """``-sum a log softmax(z)`` over rows of scores ``z`` and coefficients ``a`` (targets,
    smoothed or weighted as a loss makes them) of the same shape."""
    return -(coefficients * log_softmax(xp, scores)).sum()


def _soft_cross_entropy_grad(xp: Any, scores: Any, coefficients: Any) -> Any:
    """Its gradient with respect to ``z``: ``softmax(z) sum_c a_c - a``, row by row."""
    return softmax(xp, scores) * coefficients.sum(axis=-1, keepdims=True) - coefficients


def _rows(scores: Any) -> int:
    """How many distributions a (..., classes) array holds: its rows once flattened."""
    return scores.size // scores.shape[-1]


# --------------------------------------------------------------------------- regression

class MSE(_Reduced):
    """Mean squared error: mean over all elements of (pred - target)^2."""

    name = "mse"

    def forward(self, xp, pred, target):
        diff = pred - target
        return (diff * diff).sum() * self.per_term(pred.size)

    def backward(self, xp, pred, target):
        return (pred - target) * (2.0 * self.per_term(pred.size))


class L1(_Reduced):
    """Mean absolute error: mean over all elements of |pred - target|. Less swayed by outliers
    than MSE; its gradient has the same size for every wrong element."""

    name = "l1"

    def forward(self, xp, pred, target):
        return xp.abs(pred - target).sum() * self.per_term(pred.size)

    def backward(self, xp, pred, target):
        return xp.sign(pred - target) * self.per_term(pred.size)


class Huber(_Reduced):
    """Squared error within ``delta`` of the target, absolute error beyond, joined smoothly:
    ``e^2 / 2`` for ``|e| <= delta``, else ``delta (|e| - delta / 2)`` (PyTorch's
    ``huber_loss``). Robust to outliers, yet smooth at 0 unlike L1."""

    name = "huber"

    def __init__(self, delta: float = 1.0, reduction: str = "mean") -> None:
        super().__init__(reduction)
        self.delta = require_number(delta, "huber: delta", minimum=0, exclusive_minimum=True,
                                    error=HyperparameterError)

    def config(self) -> dict[str, Any]:
        return {"delta": self.delta, **super().config()}

    def forward(self, xp, pred, target):
        error = xp.abs(pred - target)
        near = xp.minimum(error, self.delta)
        return (0.5 * near * near + self.delta * (error - near)).sum() * self.per_term(pred.size)

    def backward(self, xp, pred, target):
        return xp.clip(pred - target, -self.delta, self.delta) * self.per_term(pred.size)


# --------------------------------------------------------------------------- binary

def _check_binary(loss: str, pred: TensorSpec, target: TensorSpec) -> None:
    """One score per example: ``pred`` and ``target`` of equal shape, or (batch, 1) scores with
    (batch,) labels."""
    if pred.shape != target.shape and pred.shape != target.shape + (1,):
        raise ShapeError(f"{loss} takes one score per example and a target of the same shape "
                         f"(or scores (batch, 1) with labels (batch,)); got scores {pred.shape} "
                         f"and target {target.shape}")


class BinaryCrossEntropy(_Reduced):
    """Logistic loss against targets in [0, 1] (float; soft labels allowed).

    From logits (the default): of sigmoid(z), computed as ``max(z, 0) - z t + log(1 +
    exp(-|z|))``, which neither overflows nor takes log(0) however large the logits; the last
    layer is linear, ``predict`` returns sigmoid(z) and accuracy thresholds z at 0.
    ``from_logits=False``: the prediction holds probabilities (a sigmoid's output), and the
    loss is ``-(t log p + (1 - t) log(1 - p))`` with PyTorch's floors (``LOG_FLOOR``); accuracy
    thresholds p at 0.5. Logits are the better choice: near 0 and 1 a probability has lost the
    digits the gradient needs.
    """

    name = "binary_cross_entropy"

    def __init__(self, from_logits: bool = True, reduction: str = "mean") -> None:
        super().__init__(reduction)
        if not isinstance(from_logits, bool):
            raise HyperparameterError(f"binary_cross_entropy: from_logits must be True or False, "
                                      f"got {from_logits!r}")
        self.from_logits = from_logits

    @property
    def applies_activation(self) -> str | None:
        return "sigmoid" if self.from_logits else None

    def config(self) -> dict[str, Any]:
        return {"from_logits": self.from_logits, **super().config()}

    def check(self, pred, target):
        _check_binary(self.name, pred, target)

    def forward(self, xp, pred, target):
        _require_probabilities(self.name, "targets", target)
        t = target.reshape(pred.shape)
        if self.from_logits:
            terms = xp.maximum(pred, 0) - pred * t + xp.log1p(xp.exp(-xp.abs(pred)))
        else:
            _require_probabilities(self.name, "probabilities (from_logits=False)", pred)
            with xp.errstate(divide="ignore"):  # log(0) = -inf, floored just below
                log_p = xp.maximum(xp.log(pred), LOG_FLOOR)
                log_q = xp.maximum(xp.log(1 - pred), LOG_FLOOR)
            terms = -(t * log_p + (1 - t) * log_q)
        return terms.sum() * self.per_term(pred.size)

    def backward(self, xp, pred, target):
        t = target.reshape(pred.shape)
        if self.from_logits:
            grad = sigmoid(xp, pred) - t
        else:
            grad = (pred - t) / xp.maximum(pred * (1 - pred), PROBABILITY_PRODUCT_FLOOR)
        return grad * self.per_term(pred.size)

    def predict(self, xp, pred):
        return sigmoid(xp, pred) if self.from_logits else pred

    def accuracy(self, xp, pred, target):
        threshold = 0 if self.from_logits else 0.5
        return ((pred > threshold) == (target.reshape(pred.shape) > 0.5)).mean()


# --------------------------------------------------------------------------- class labels

class _ClassLabels(_Reduced):
    """A loss on per-class scores against integer labels; each subclass checks the shapes it
    takes."""

    target_kind = "int"

    def check_labels(self, labels: Any, classes: int) -> None:
        if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= classes):
            raise ge.DataError(f"{self.name}: labels must lie in [0, {classes}) for {classes} "
                               f"classes; got labels from {int(labels.min())} to "
                               f"{int(labels.max())}: encode the classes as 0..{classes - 1}, or "
                               f"give the last layer as many units as there are classes")

    def accuracy(self, xp, pred, target):
        return (pred.argmax(axis=-1) == target).mean()


def _class_weights(loss: str, weights: Any) -> tuple[float, ...]:
    """``weights=`` as a tuple of non-negative floats, one per class."""
    try:
        values = () if isinstance(weights, (str, bytes)) else tuple(weights)
    except TypeError:
        values = ()
    if not values:
        raise HyperparameterError(f"{loss}: weights must be a non-empty sequence of numbers, one "
                                  f"per class, got {weights!r}")
    return tuple(require_number(w, f"{loss}: weights[{i}]", minimum=0, error=HyperparameterError)
                 for i, w in enumerate(values))


class _WeightedLabels(_ClassLabels):
    """A loss on class scores (..., classes) against integer labels of the scores' shape without
    the class axis: (batch,) for (batch, classes), (batch, steps) for (batch, steps, classes).

    ``weights``: one per class; a row weighs the weight of its label, and the mean divides by
    the sum of the rows' weights (PyTorch's weighted mean). ``ignore_index``: rows with this
    label weigh 0, are left out of the mean and of the accuracy, and may hold a value outside
    [0, classes) (-100 as in PyTorch, or the padding id). A batch of ignored rows only has loss 0.
    """

    def __init__(self, weights: Sequence[float] | None = None, ignore_index: int | None = None,
                 reduction: str = "mean") -> None:
        super().__init__(reduction)
        self.weights = None if weights is None else _class_weights(self.name, weights)
        if ignore_index is not None and (isinstance(ignore_index, bool)
                                         or not isinstance(ignore_index, numbers.Integral)):
            raise HyperparameterError(f"{self.name}: ignore_index must be an int (a label to "
                                      f"leave out) or None, got {ignore_index!r}")
        self.ignore_index = None if ignore_index is None else int(ignore_index)

    def config(self) -> dict[str, Any]:
        weights = None if self.weights is None else list(self.weights)
        return {"weights": weights, "ignore_index": self.ignore_index, **super().config()}

    def check(self, pred, target):
        if target.dtype.startswith(("int", "uint")) and (pred.ndim < 2 or target.shape != pred.shape[:-1]):
            raise ShapeError(f"{self.name} takes scores (..., classes) and integer labels of the "
                             f"scores' shape without the class axis ((batch, classes) with "
                             f"(batch,), (batch, steps, classes) with (batch, steps)); got "
                             f"{pred.shape} and {target.shape}")
        classes = pred.shape[-1] if pred.ndim else None
        if self.weights is not None and classes is not None and len(self.weights) != classes:
            raise ShapeError(f"{self.name}: {len(self.weights)} class weights for scores "
                             f"{pred.shape} with {classes} classes; give one weight per class")

    def class_weights(self, xp: Any, dtype: Any) -> Any:
        return xp.asarray(self.weights, dtype=dtype)

    def label_rows(self, xp: Any, pred: Any, target: Any) -> tuple[Any, Any, Any, Any]:
        """The scores as rows (n, classes); the labels (n,), an ignored one replaced by class 0;
        the rows kept (1.0, or 0.0 for an ignored row); and each row's weight, its label's
        weight where kept, else 0. Without ``ignore_index`` and ``weights`` every row counts
        once, and both are the number 1.0 (no per-row arrays, no sums over them)."""
        classes = pred.shape[-1]
        labels = target.reshape(-1)
        if self.ignore_index is None:
            kept = 1.0
        else:
            ignored = labels == self.ignore_index
            kept = (~ignored).astype(pred.dtype)
            labels = xp.where(ignored, 0, labels)
        self.check_labels(labels, classes)
        weight = kept if self.weights is None else kept * self.class_weights(xp, pred.dtype)[labels]
        return pred.reshape(-1, classes), labels, kept, weight

    def per_weight(self, xp: Any, weight: Any, rows: int) -> Any:
        """What a unit of row weight weighs in the loss: 1 / the weights' sum for the mean."""
        if isinstance(weight, float):  # every one of the rows counts once
            return self.per_term(rows)
        total = weight.sum()
        return self.per_term(xp.where(total > 0, total, 1))  # all ignored: 0, not 0 / 0

    def accuracy(self, xp, pred, target):
        correct = pred.argmax(axis=-1) == target
        if self.ignore_index is None:
            return correct.mean()
        kept = target != self.ignore_index
        return (correct & kept).sum() / xp.maximum(kept.sum(), 1)


class SoftmaxCrossEntropy(_WeightedLabels):
    """Cross-entropy of softmax(logits), computed stably from the logits, against

    - integer class labels (...) for scores (..., classes), with ``weights`` and
      ``ignore_index`` (as for every class-label loss, see the module's docstring); or
    - float targets of the scores' shape: one-hot rows or any distributions (soft labels, a
      teacher's probabilities). The loss of a row is ``-sum_c w_c t_c log p_c``, and the mean
      divides by the number of rows, as PyTorch does for probability targets.

    ``label_smoothing`` = e in [0, 1) trains against ``(1 - e) t + e / classes``, PyTorch's
    definition (with weights and ignored rows as PyTorch weighs them). ``predict`` returns the
    softmax probabilities; accuracy compares the arg-max with the label (or the target's arg-max).
    """

    name = "softmax_cross_entropy"
    applies_activation = "softmax"
    target_kind = "any"

    def __init__(self, weights: Sequence[float] | None = None, ignore_index: int | None = None,
                 label_smoothing: float = 0.0, reduction: str = "mean") -> None:
        super().__init__(weights, ignore_index, reduction)
        self.label_smoothing = require_number(
            label_smoothing, "softmax_cross_entropy: label_smoothing", minimum=0, maximum=1,
            exclusive_maximum=True, error=HyperparameterError)

    def config(self) -> dict[str, Any]:
        return {"label_smoothing": self.label_smoothing, **super().config()}

    def check(self, pred, target):
        super().check(pred, target)
        if target.dtype.startswith(("int", "uint")):
            return
        if pred.ndim >= 2 and target.shape == pred.shape[:-1]:  # labels, declared as floats
            raise ShapeError(f"{self.name}: target must be int, got {target.dtype}: declare the "
                             f"target input with dtype='int64' for class labels {target.shape}; "
                             f"float targets are one-hot or probability rows of the scores' "
                             f"shape {pred.shape}")
        _require_same_shape(self.name, pred, target, "float targets (one-hot or probabilities)")
        if self.ignore_index is not None:
            raise ShapeError(f"{self.name}: ignore_index applies to integer labels; the targets "
                             f"here are {target.dtype} probabilities (give an ignored row all "
                             f"zeros instead)")

    @staticmethod
    def _has_labels(target: Any) -> bool:
        return target.dtype.kind in "iu"

    def _target_rows(self, xp: Any, pred: Any, target: Any) -> Any:
        """Float targets as each row's coefficients of ``-log p``: smoothed, then weighted."""
        _require_probabilities(self.name, "targets", target)
        rows = target.reshape(-1, pred.shape[-1])
        e = self.label_smoothing
        if e:
            rows = rows * (1 - e) + e / pred.shape[-1]
        return rows if self.weights is None else rows * self.class_weights(xp, pred.dtype)

    def forward(self, xp, pred, target):
        if not self._has_labels(target):
            coefficients = self._target_rows(xp, pred, target)
            total = _soft_cross_entropy(xp, pred.reshape(coefficients.shape), coefficients)
            return total * self.per_term(len(coefficients))
        scores, labels, kept, weight = self.label_rows(xp, pred, target)
        logp = log_softmax(xp, scores)
        total = -(weight * logp[xp.arange(len(labels)), labels]).sum()
        e = self.label_smoothing
        if e:  # the uniform part: every class's -log p, weighted by its class weight
            spread = logp.sum(axis=-1) if self.weights is None else logp @ self.class_weights(xp, pred.dtype)
            total = (1 - e) * total - (e / scores.shape[-1]) * (kept * spread).sum()
        return total * self.per_weight(xp, weight, len(labels))

    def backward(self, xp, pred, target):
        if not self._has_labels(target):
            coefficients = self._target_rows(xp, pred, target)
            grad = _soft_cross_entropy_grad(xp, pred.reshape(coefficients.shape), coefficients)
            return (grad * self.per_term(len(coefficients))).reshape(pred.shape)
        scores, labels, kept, weight = self.label_rows(xp, pred, target)
        # d(-log p_y)/dz = p - onehot(y), and the uniform part's d(-sum_c w_c log p_c)/dz
        # = p sum(w) - w: each row's p scaled by its total coefficient, minus the coefficients.
        # The reduction's factor goes into the per-row numbers: one pass over the scores.
        e, classes = self.label_smoothing, scores.shape[-1]
        scale = self.per_weight(xp, weight, len(labels))
        label_part = (1 - e) * scale * weight  # each row's coefficient of -log p_label
        grad = softmax(xp, scores)
        if e:
            uniform_part = (e / classes) * scale * kept  # times w_c: each class's coefficient
            class_weights = 1.0 if self.weights is None else self.class_weights(xp, pred.dtype)
            class_total = classes if self.weights is None else sum(self.weights)
            grad *= _column(label_part + class_total * uniform_part)
            grad -= _column(uniform_part) * class_weights
        else:
            grad *= _column(label_part)
        grad[xp.arange(len(labels)), labels] -= label_part
        return grad.reshape(pred.shape)

    def predict(self, xp, pred):
        return softmax(xp, pred)

    def accuracy(self, xp, pred, target):
        if self._has_labels(target):
            return super().accuracy(xp, pred, target)
        return (pred.argmax(axis=-1) == target.argmax(axis=-1)).mean()


class NLL(_WeightedLabels):
    """Negative log-likelihood: ``-mean(pred[i, label_i])`` where ``pred`` holds
    log-probabilities (the output of ``g.activation("log_softmax", logits)``); together they
    equal ``softmax_cross_entropy`` on the logits, with the same labels (sequences too),
    ``weights`` and ``ignore_index``. ``predict`` returns the probabilities ``exp(pred)``."""

    name = "nll"

    def forward(self, xp, pred, target):
        scores, labels, _, weight = self.label_rows(xp, pred, target)
        picked = scores[xp.arange(len(labels)), labels]
        return -(weight * picked).sum() * self.per_weight(xp, weight, len(labels))

    def backward(self, xp, pred, target):
        scores, labels, _, weight = self.label_rows(xp, pred, target)
        grad = xp.zeros_like(scores)
        grad[xp.arange(len(labels)), labels] = -weight * self.per_weight(xp, weight, len(labels))
        return grad.reshape(pred.shape)

    def predict(self, xp, pred):
        return xp.exp(pred)


# --------------------------------------------------------------------------- distributions

class KLDivergence(_Reduced):
    """``KL(target || softmax(logits)) = sum_c t_c (log t_c - log p_c)``, per row of scores
    (..., classes) against target distributions of the same shape (0 log 0 = 0), averaged over
    the rows: PyTorch's ``kl_div(log_softmax(z), t, reduction="batchmean")`` for (batch,
    classes). It differs from soft-target cross-entropy by the targets' entropy, a constant,
    so the gradients are the same; it is 0 when the prediction equals the target (distillation,
    matching a distribution). ``predict`` returns softmax(logits); accuracy compares arg-maxes.
    """

    name = "kl_divergence"
    applies_activation = "softmax"

    def check(self, pred, target):
        _require_same_shape(self.name, pred, target, "target distributions")
        if pred.ndim < 1:
            raise ShapeError(f"{self.name} takes scores (..., classes), got a scalar")

    def forward(self, xp, pred, target):
        _require_probabilities(self.name, "targets", target)
        # sum t log t, with 0 log 0 = 0: log(1) where t = 0 keeps log(0) out of it
        negative_entropy = (target * xp.log(xp.where(target > 0, target, 1))).sum()
        return (negative_entropy + _soft_cross_entropy(xp, pred, target)) * self.per_term(_rows(pred))

    def backward(self, xp, pred, target):
        return _soft_cross_entropy_grad(xp, pred, target) * self.per_term(_rows(pred))

    def predict(self, xp, pred):
        return softmax(xp, pred)

    def accuracy(self, xp, pred, target):
        return (pred.argmax(axis=-1) == target.argmax(axis=-1)).mean()


# --------------------------------------------------------------------------- margins

class Hinge(_ClassLabels):
    """The SVM hinge loss on raw scores, with integer labels.

    - Binary, one score per example (scores (batch,) or (batch, 1)): labels in {-1, +1} or in
      {0, 1} (0 counts as -1; mixing -1 and 0 is an error); loss ``mean(max(0, margin - t z))``;
      a score's sign is its class.
    - Multi-class, scores (batch, classes) with labels in [0, classes): the Weston-Watkins
      (CS231n) form ``mean_i sum_{j != y_i} max(0, z_ij - z_iy_i + margin)``; the arg-max is the
      class.

    ``predict`` returns the scores themselves (a hinge loss gives no probabilities).
    """

    name = "hinge"

    def __init__(self, margin: float = 1.0, reduction: str = "mean") -> None:
        super().__init__(reduction)
        self.margin = require_number(margin, "hinge: margin", minimum=0, exclusive_minimum=True,
                                     error=HyperparameterError)

    def config(self) -> dict[str, Any]:
        return {"margin": self.margin, **super().config()}

    def check(self, pred, target):
        if pred.shape == target.shape or pred.shape == target.shape + (1,):
            return
        if pred.ndim != 2 or target.ndim != 1:
            raise ShapeError(f"hinge takes binary scores (batch,) or (batch, 1), or multi-class "
                             f"scores (batch, classes), with labels (batch,); got scores "
                             f"{pred.shape} and labels {target.shape}")

    @staticmethod
    def _binary(pred: Any, target: Any) -> bool:
        return pred.ndim == target.ndim or pred.shape[-1] == 1

    def _signs(self, xp, pred, target):
        """Binary labels as -1/+1 of ``pred``'s shape and dtype."""
        if target.size:
            low, high = int(target.min()), int(target.max())
            if low < -1 or high > 1 or (low == -1 and bool((target == 0).any())):
                raise ge.DataError(f"binary hinge labels must be all in {{-1, +1}} or all in "
                                   f"{{0, 1}}; got labels from {low} to {high}")
        return xp.where(target.reshape(pred.shape) > 0, 1.0, -1.0).astype(pred.dtype)

    def _margins(self, xp, pred, target):
        """Multi-class: each wrong class's margin violation, zero at the true class."""
        self.check_labels(target, pred.shape[-1])
        rows = xp.arange(len(target))
        margins = xp.maximum(pred - pred[rows, target][:, None] + self.margin, 0)
        margins[rows, target] = 0
        return margins

    def forward(self, xp, pred, target):
        if self._binary(pred, target):
            terms = xp.maximum(self.margin - self._signs(xp, pred, target) * pred, 0)
            return terms.sum() * self.per_term(pred.size)
        return self._margins(xp, pred, target).sum() * self.per_term(len(target))

    def backward(self, xp, pred, target):
        if self._binary(pred, target):
            signs = self._signs(xp, pred, target)
            return -signs * (signs * pred < self.margin) * self.per_term(pred.size)
        violated = (self._margins(xp, pred, target) > 0).astype(pred.dtype)
        rows = xp.arange(len(target))
        violated[rows, target] = -violated.sum(axis=-1)
        return violated * self.per_term(len(target))

    def accuracy(self, xp, pred, target):
        if self._binary(pred, target):
            return ((pred > 0) == (target.reshape(pred.shape) > 0)).mean()
        return super().accuracy(xp, pred, target)


@ge.hookimpl
def graphengine_register_losses(register):
    register("mse", MSE, aliases=("l2",))
    register("l1", L1, aliases=("mae",))
    register("huber", Huber)
    register("binary_cross_entropy", BinaryCrossEntropy, aliases=("bce", "logistic"))
    register("softmax_cross_entropy", SoftmaxCrossEntropy, aliases=("cross_entropy",))
    register("nll", NLL)
    register("kl_divergence", KLDivergence, aliases=("kl_div",))
    register("hinge", Hinge)
