"""The CTC loss (connectionist temporal classification, Graves et al. 2006).

A recognizer reads T frames and must output a shorter label sequence, without knowing which
frames belong to which label. CTC adds a null symbol, the *blank* (the notes' phi): the network
scores every frame over the labels and the blank, and an alignment (one symbol per frame) reads as
a label sequence after merging repeated symbols and dropping blanks. ``好好好棒棒棒棒`` reads as
"好棒"; ``好ϕϕ棒ϕϕ棒`` as "好棒棒": the blank between two equal labels is what lets a label follow
itself. The loss is the negative log of the summed probability of every alignment that reads as
the target, summed by dynamic programming (the forward-backward recursion) in log space.

``g.loss("ctc", logits, labels, blank=0)``: ``logits`` (N, T, C) unnormalized scores (a
log-softmax over C is taken inside), ``labels`` (N, S) int64 padded at the end with -1. The value
is the mean over the batch of each sequence's negative log-likelihood (PyTorch's
``ctc_loss(..., reduction="sum") / N``). Every sequence uses all T frames.

A label sequence needs at least ``L + R`` frames (L labels, R of them repeats of the label before:
each repeat needs a blank between). A shorter T is *infeasible*: its likelihood is 0. By default
that is a :class:`~graphengine.errors.DataError` naming the sequences; with
``zero_infinity=True`` (PyTorch's option of that name) such sequences count 0 and get no
gradient, and the mean is still over all N.
"""

from __future__ import annotations

from typing import Any

from graphengine.plugins.activations import log_softmax, softmax

import graphengine as ge
from graphengine.errors import ShapeError
from graphengine.ir.operators import TensorSpec

#: log(0) as a finite number: ``-inf`` would make ``-inf - -inf = nan`` in the log-sum-exp of
#: unreachable states, and exp of it is still exactly 0 in float32 and float64.
LOG_ZERO = -1e30


def _logaddexp3(xp: Any, a: Any, b: Any, c: Any) -> Any:
    """log(exp(a) + exp(b) + exp(c)), elementwise, without overflow."""
    top = xp.maximum(xp.maximum(a, b), c)
    return top + xp.log(xp.exp(a - top) + xp.exp(b - top) + xp.exp(c - top))


def _shift(xp: Any, values: Any, by: int) -> Any:
    """``values`` (N, U) moved ``by`` positions along U (right for by > 0, left for by < 0),
    filled with LOG_ZERO: the neighbours each state of the recursion reads."""
    out = xp.full_like(values, LOG_ZERO)
    if by > 0:
        out[:, by:] = values[:, :-by]
    else:
        out[:, :by] = values[:, -by:]
    return out


class CTC(ge.Loss):
    """Connectionist temporal classification; see the module docstring.

    ``blank``: the class index of the null symbol. ``zero_infinity``: infeasible sequences (too
    few frames for their labels) count 0 instead of raising. ``predict`` gives the per-frame
    probabilities (N, T, C); ``accuracy`` the fraction of sequences whose greedy decoding
    (:func:`greedy_decode`) is exactly the target.
    """

    target_kind = "int"
    applies_activation = "softmax"
    uses_context = True  # the backward reads the forward's lattice and alpha from the call's context

    def __init__(self, blank: int = 0, zero_infinity: bool = False) -> None:
        if isinstance(blank, bool) or not isinstance(blank, int) or blank < 0:
            raise TypeError(f"blank must be a class index (an int >= 0), got {blank!r}")
        self.blank = blank
        self.zero_infinity = bool(zero_infinity)

    def config(self) -> dict[str, Any]:
        return {"blank": self.blank, "zero_infinity": self.zero_infinity}

    def check(self, pred: TensorSpec, target: TensorSpec) -> None:
        if pred.ndim != 3 or target.ndim != 2:
            raise ShapeError(f"ctc takes scores (batch, time, classes) and labels (batch, "
                             f"max_label_length) padded with -1; got {pred.shape} and {target.shape}")
        if pred.shape[-1] is not None and self.blank >= pred.shape[-1]:
            raise ShapeError(f"ctc: blank={self.blank} is not a class of scores {pred.shape} "
                             f"({pred.shape[-1]} classes)")

    # -- the lattice ---------------------------------------------------------------------------

    def _lattice(self, xp: Any, pred: Any, target: Any) -> dict[str, Any]:
        """What both recursions read: the label sequences with a blank before, between and after
        the labels (U = 2S + 1 states), each state's log-probability per frame (N, T, U), where
        a state may skip the blank before it, and which states may end a path."""
        batch, steps, classes = pred.shape
        lengths = self._check_labels(target, classes)
        states = 2 * target.shape[1] + 1
        extended = xp.full((batch, states), self.blank, dtype=target.dtype)
        extended[:, 1::2] = xp.where(target >= 0, target, self.blank)
        logp = log_softmax(xp, pred)
        emit = xp.take_along_axis(logp, xp.broadcast_to(extended[:, None, :], (batch, steps, states)),
                                  axis=2)
        # A label may follow the label two states back directly, unless it is the same label.
        skip = xp.zeros((batch, states), dtype=bool)
        skip[:, 3::2] = target[:, 1:] != target[:, :-1]
        position = xp.arange(states)[None, :]
        ends = (position == 2 * lengths[:, None]) | (position == 2 * lengths[:, None] - 1)
        return {"logp": logp, "extended": extended, "emit": emit, "skip": skip, "ends": ends,
                "feasible": self._feasible(xp, target, lengths, steps)}

    def _check_labels(self, target: Any, classes: int) -> Any:
        """Each sequence's label count; refuses labels out of range, the blank as a label, and
        padding (-1) before a label."""
        if target.size and (int(target.min()) < -1 or int(target.max()) >= classes):
            raise ge.DataError(f"ctc: labels must lie in [0, {classes}) (or be -1, padding) for "
                               f"{classes} classes; got labels from {int(target.min())} to "
                               f"{int(target.max())}")
        if bool((target == self.blank).any()):
            raise ge.DataError(f"ctc: label {self.blank} is the blank (blank={self.blank}); the "
                               f"labels must not use it: number the labels around it, or pass "
                               f"another blank=")
        real = target >= 0
        lengths = real.sum(axis=1)
        if bool((real[:, 1:] & ~real[:, :-1]).any()):
            raise ge.DataError("ctc: padding (-1) must come after a sequence's labels, not "
                               "between them")
        return lengths

    def _feasible(self, xp: Any, target: Any, lengths: Any, steps: int) -> Any:
        """Whether each sequence fits in ``steps`` frames: its labels and one blank per repeat."""
        repeats = ((target[:, 1:] == target[:, :-1]) & (target[:, 1:] >= 0)).sum(axis=1)
        needed = lengths + repeats
        feasible = needed <= steps
        if not self.zero_infinity and not bool(feasible.all()):
            rows = xp.nonzero(~feasible)[0][:5]
            shown = ", ".join(f"sequence {int(r)} needs {int(needed[r])}" for r in rows)
            raise ge.DataError(f"ctc: {int((~feasible).sum())} label sequence(s) cannot fit in "
                               f"{steps} frames ({shown}: its labels plus a blank between each "
                               f"repeated pair); give the network more frames, shorten the labels, "
                               f"or pass zero_infinity=True to count such sequences 0")
        return feasible

    def _forward_variables(self, xp: Any, lattice: dict[str, Any]) -> Any:
        """alpha (N, T, U): log-probability of the paths reading the first states up to each
        state at each frame, emissions up to that frame included."""
        emit, skip = lattice["emit"], lattice["skip"]
        alpha = xp.full_like(emit, LOG_ZERO)
        alpha[:, 0, :2] = emit[:, 0, :2]  # start at the first blank or the first label
        for t in range(1, emit.shape[1]):
            previous = alpha[:, t - 1]
            jump = xp.where(skip, _shift(xp, previous, 2), LOG_ZERO)
            alpha[:, t] = _logaddexp3(xp, previous, _shift(xp, previous, 1), jump) + emit[:, t]
        return alpha

    def _backward_variables(self, xp: Any, lattice: dict[str, Any]) -> Any:
        """beta (N, T, U): log-probability of the rest of a path after each state at each
        frame, the emission at that frame excluded."""
        emit, skip = lattice["emit"], lattice["skip"]
        beta = xp.full_like(emit, LOG_ZERO)
        beta[:, -1] = xp.where(lattice["ends"], 0.0, LOG_ZERO)
        skip_from = xp.zeros_like(skip)  # whether a state may jump to the one two ahead
        skip_from[:, :-2] = skip[:, 2:]
        for t in range(emit.shape[1] - 2, -1, -1):
            after = beta[:, t + 1] + emit[:, t + 1]
            jump = xp.where(skip_from, _shift(xp, after, -2), LOG_ZERO)
            beta[:, t] = _logaddexp3(xp, after, _shift(xp, after, -1), jump)
        return beta

    @staticmethod
    def _log_likelihood(xp: Any, alpha: Any, lattice: dict[str, Any]) -> Any:
        last = xp.where(lattice["ends"], alpha[:, -1], LOG_ZERO)
        top = last.max(axis=1, keepdims=True)
        return top[:, 0] + xp.log(xp.exp(last - top).sum(axis=1))

    # -- the loss ------------------------------------------------------------------------------

    def forward(self, ctx, xp, pred, target):
        ctx.lattice = lattice = self._lattice(xp, pred, target)
        ctx.alpha = alpha = self._forward_variables(xp, lattice)
        loglik = self._log_likelihood(xp, alpha, lattice)
        return xp.where(lattice["feasible"], -loglik, 0.0).sum() * (1.0 / pred.shape[0])

    def backward(self, ctx, xp, pred, target):
        lattice, alpha = ctx.lattice, ctx.alpha
        beta = self._backward_variables(xp, lattice)
        feasible = lattice["feasible"]
        # An infeasible sequence's log-likelihood is about LOG_ZERO, and exp(alpha + beta - it)
        # would overflow: log 1 stands in for it, and its gradient is zeroed below.
        loglik = xp.where(feasible, self._log_likelihood(xp, alpha, lattice), 0.0)
        # Posterior of each state at each frame, summed per class: the expected label counts.
        occupancy = xp.exp(alpha + beta - loglik[:, None, None])
        classes = pred.shape[-1]
        one_hot = (lattice["extended"][:, :, None] == xp.arange(classes)[None, None, :]).astype(pred.dtype)
        grad = xp.exp(lattice["logp"]) - xp.matmul(occupancy, one_hot)
        grad *= (feasible.astype(pred.dtype) * (1.0 / pred.shape[0]))[:, None, None]
        return grad

    def predict(self, xp, pred):
        return softmax(xp, pred)

    def accuracy(self, xp, pred, target):
        decoded = greedy_decode(xp, pred, self.blank)
        width = max(decoded.shape[1], target.shape[1])
        return (_pad_to(xp, decoded, width) == _pad_to(xp, target, width)).all(axis=1).mean()


def _pad_to(xp: Any, labels: Any, width: int) -> Any:
    out = xp.full((labels.shape[0], width), -1, dtype=labels.dtype)
    out[:, :labels.shape[1]] = labels
    return out


def greedy_decode(xp: Any, scores: Any, blank: int = 0) -> Any:
    """Best-path decoding: the most likely symbol of each frame, repeats merged, blanks dropped.

    ``scores`` (N, T, C), logits or probabilities. Returns (N, T) int64 labels, each row's labels
    first and -1 after them: the same padding as CTC's targets.
    """
    best = scores.argmax(axis=-1)
    keep = best != blank
    keep[:, 1:] &= best[:, 1:] != best[:, :-1]
    slot = xp.cumsum(keep, axis=1) - 1  # where each kept symbol lands in its row
    decoded = xp.full(best.shape, -1, dtype="int64")
    rows = xp.broadcast_to(xp.arange(best.shape[0])[:, None], best.shape)
    decoded[rows[keep], slot[keep]] = best[keep]
    return decoded


@ge.hookimpl
def graphengine_register_losses(register):
    register("ctc", CTC)
