"""Built-in losses, each the mean over the batch."""

from __future__ import annotations

import graphengine as ge
from graphengine.errors import ShapeError


class MSE(ge.Loss):
    """Mean squared error: mean over all elements of (pred - target)^2."""

    def forward(self, xp, pred, target):
        diff = pred - target
        return (diff * diff).mean()

    def backward(self, xp, pred, target):
        return (pred - target) * (2.0 / pred.size)


def log_softmax(xp, logits):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))


class SoftmaxCrossEntropy(ge.Loss):
    """Cross-entropy of softmax(logits) against integer class labels, computed stably from logits.

    ``predict`` returns the softmax probabilities.
    """

    target_kind = "int"

    def check(self, pred, target):
        if pred.ndim != 2 or target.ndim != 1:
            raise ShapeError(f"softmax_cross_entropy takes logits (batch, classes) and labels "
                             f"(batch,), got {pred.shape} and {target.shape}")

    def forward(self, xp, pred, target):
        classes = pred.shape[-1]
        if target.size and (int(target.min()) < 0 or int(target.max()) >= classes):
            raise ge.DataError(f"labels must lie in [0, {classes}) for {classes} classes; got "
                               f"labels from {int(target.min())} to {int(target.max())}")
        logp = log_softmax(xp, pred)
        return -logp[xp.arange(len(target)), target].mean()

    def backward(self, xp, pred, target):
        probs = xp.exp(log_softmax(xp, pred))
        probs[xp.arange(len(target)), target] -= 1
        return probs / len(target)

    def predict(self, xp, pred):
        return xp.exp(log_softmax(xp, pred))

    def accuracy(self, xp, pred, target):
        return (pred.argmax(axis=-1) == target).mean()


@ge.hookimpl
def graphengine_register_losses(register):
    register("mse", MSE, aliases=("l2",))
    register("softmax_cross_entropy", SoftmaxCrossEntropy, aliases=("cross_entropy",))
