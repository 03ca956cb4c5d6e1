"""Built-in losses, each the mean over the batch.

Regression: ``mse`` (L2), ``l1`` (MAE). Classification from raw scores (logits): ``binary_cross_entropy``
(two classes, one logit), ``softmax_cross_entropy`` (integer labels), ``hinge`` (binary or
multi-class SVM loss); from log-probabilities: ``nll``. Every classification loss defines
``accuracy``, which ``fit``/``evaluate`` report with the 0/1 error ``1 - accuracy``.
"""

from __future__ import annotations

from typing import Any

from graphengine.plugins.activations import log_softmax, sigmoid, softmax

import graphengine as ge
from graphengine.errors import ShapeError
from graphengine.ir.operators import TensorSpec


class MSE(ge.Loss):
    """Mean squared error: mean over all elements of (pred - target)^2."""

    def forward(self, xp, pred, target):
        diff = pred - target
        return (diff * diff).mean()

    def backward(self, xp, pred, target):
        return (pred - target) * (2.0 / pred.size)


class L1(ge.Loss):
    """Mean absolute error: mean over all elements of |pred - target|. Less swayed by outliers
    than MSE; its gradient has the same size for every wrong element."""

    def forward(self, xp, pred, target):
        return xp.abs(pred - target).mean()

    def backward(self, xp, pred, target):
        return xp.sign(pred - target) * (1.0 / pred.size)


def _check_binary(loss: str, pred: TensorSpec, target: TensorSpec) -> None:
    """One score per example: ``pred`` and ``target`` of equal shape, or (batch, 1) scores with
    (batch,) labels."""
    if pred.shape != target.shape and pred.shape != target.shape + (1,):
        raise ShapeError(f"{loss} takes one score per example and a target of the same shape "
                         f"(or scores (batch, 1) with labels (batch,)); got scores {pred.shape} "
                         f"and target {target.shape}")


class BinaryCrossEntropy(ge.Loss):
    """Logistic loss of sigmoid(logits) against targets in [0, 1] (float; soft labels allowed),
    computed from the logits as ``max(z, 0) - z t + log(1 + exp(-|z|))``, which neither
    overflows nor takes log(0) however large the logits.

    The network's last layer is linear (no sigmoid): ``predict`` returns the probabilities
    sigmoid(z); accuracy thresholds them at 0.5.
    """

    applies_activation = "sigmoid"

    def check(self, pred, target):
        _check_binary("binary_cross_entropy", pred, target)

    def forward(self, xp, pred, target):
        if target.size and (float(target.min()) < 0 or float(target.max()) > 1):
            raise ge.DataError(f"binary_cross_entropy targets must lie in [0, 1]; got values from "
                               f"{float(target.min())} to {float(target.max())}")
        t = target.reshape(pred.shape)
        return (xp.maximum(pred, 0) - pred * t + xp.log1p(xp.exp(-xp.abs(pred)))).mean()

    def backward(self, xp, pred, target):
        return (sigmoid(xp, pred) - target.reshape(pred.shape)) * (1.0 / pred.size)

    def predict(self, xp, pred):
        return sigmoid(xp, pred)

    def accuracy(self, xp, pred, target):
        return ((pred > 0) == (target.reshape(pred.shape) > 0.5)).mean()


class _ClassLabels(ge.Loss):
    """A loss on per-class scores (batch, classes) against integer labels (batch,)."""

    target_kind = "int"
    name = "loss"

    def check(self, pred, target):
        if pred.ndim != 2 or target.ndim != 1:
            raise ShapeError(f"{self.name} takes scores (batch, classes) and integer labels "
                             f"(batch,), got {pred.shape} and {target.shape}")

    def check_labels(self, target: Any, classes: int) -> None:
        if target.size and (int(target.min()) < 0 or int(target.max()) >= classes):
            raise ge.DataError(f"{self.name}: labels must lie in [0, {classes}) for {classes} "
                               f"classes; got labels from {int(target.min())} to "
                               f"{int(target.max())}: encode the classes as 0..{classes - 1}, or "
                               f"give the last layer as many units as there are classes")

    def accuracy(self, xp, pred, target):
        return (pred.argmax(axis=-1) == target).mean()


class SoftmaxCrossEntropy(_ClassLabels):
    """Cross-entropy of softmax(logits) against integer class labels, computed stably from logits.

    ``predict`` returns the softmax probabilities.
    """

    name = "softmax_cross_entropy"
    applies_activation = "softmax"

    def forward(self, xp, pred, target):
        self.check_labels(target, pred.shape[-1])
        logp = log_softmax(xp, pred)
        return logp[xp.arange(len(target)), target].sum() * (-1.0 / len(target))

    def backward(self, xp, pred, target):
        probs = softmax(xp, pred)
        probs[xp.arange(len(target)), target] -= 1
        probs *= 1.0 / len(target)
        return probs

    def predict(self, xp, pred):
        return softmax(xp, pred)


class NLL(_ClassLabels):
    """Negative log-likelihood: ``-mean(pred[i, label_i])`` where ``pred`` holds
    log-probabilities (the output of ``g.activation("log_softmax", logits)``); together they
    equal ``softmax_cross_entropy`` on the logits. ``predict`` returns the probabilities
    ``exp(pred)``."""

    name = "nll"

    def forward(self, xp, pred, target):
        self.check_labels(target, pred.shape[-1])
        return -pred[xp.arange(len(target)), target].mean()

    def backward(self, xp, pred, target):
        grad = xp.zeros_like(pred)
        grad[xp.arange(len(target)), target] = -1.0 / len(target)
        return grad

    def predict(self, xp, pred):
        return xp.exp(pred)


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

    def __init__(self, margin: float = 1.0) -> None:
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin <= 0:
            raise TypeError(f"margin must be a positive number, got {margin!r}")
        self.margin = float(margin)

    def config(self) -> dict[str, Any]:
        return {"margin": self.margin}

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
            return xp.maximum(self.margin - self._signs(xp, pred, target) * pred, 0).mean()
        return self._margins(xp, pred, target).sum(axis=-1).mean()

    def backward(self, xp, pred, target):
        if self._binary(pred, target):
            signs = self._signs(xp, pred, target)
            return -signs * (signs * pred < self.margin) * (1.0 / pred.size)
        violated = (self._margins(xp, pred, target) > 0).astype(pred.dtype)
        rows = xp.arange(len(target))
        violated[rows, target] = -violated.sum(axis=-1)
        return violated / len(target)

    def accuracy(self, xp, pred, target):
        if self._binary(pred, target):
            return ((pred > 0) == (target.reshape(pred.shape) > 0)).mean()
        return super().accuracy(xp, pred, target)


@ge.hookimpl
def graphengine_register_losses(register):
    register("mse", MSE, aliases=("l2",))
    register("l1", L1, aliases=("mae",))
    register("binary_cross_entropy", BinaryCrossEntropy, aliases=("bce", "logistic"))
    register("softmax_cross_entropy", SoftmaxCrossEntropy, aliases=("cross_entropy",))
    register("nll", NLL)
    register("hinge", Hinge)
