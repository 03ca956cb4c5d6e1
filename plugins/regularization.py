"""Layers that regularize or stabilize training: ``dropout`` and ``batch_norm``.

Both behave differently in training and in evaluation. The mode is the run's, explicit and
visible: ``model.train()`` / ``model.eval()`` set what ``forward`` runs in; ``fit`` trains,
``predict``, ``run`` and ``evaluate`` evaluate. Each call reads the mode and the random
generator from its context (``ctx.training``, ``ctx.rng``) and keeps its mask or batch
statistics there, so runs never disturb each other.
"""

from __future__ import annotations

from typing import Any

import graphengine as ge
from graphengine import distributed
from graphengine.errors import GraphBuildError, ShapeError
from graphengine.ir.operators import TensorSpec, require_float, same_dtype


class DropoutOp(ge.Operator):
    """Inverted dropout: in training, each element is zeroed with probability ``rate`` and the
    survivors are scaled by ``1 / (1 - rate)``, so evaluation needs no rescaling and is the
    identity. Keeps its mask (one array the size of ``x``) on its context for backward."""

    kind = "dropout"

    def __init__(self, rate: float) -> None:
        self.rate = rate

    def config(self) -> dict[str, Any]:
        return {"rate": self.rate}

    def infer(self, x: TensorSpec) -> TensorSpec:
        require_float(x)
        return x

    def forward(self, ctx, xp, x):
        if not ctx.training or self.rate == 0.0:
            ctx.mask = None
            return x
        keep = ctx.rng.random(x.shape, x.dtype) >= self.rate
        ctx.mask = keep.astype(x.dtype) / (1.0 - self.rate)
        return x * ctx.mask

    def backward(self, ctx, xp, inputs, output, grad):
        return (grad if ctx.mask is None else grad * ctx.mask,)


class Dropout(ge.Layer):
    """``g.layer("dropout", h, rate=0.5)``: drop each unit with probability ``rate`` in training."""

    def __init__(self, rate: float = 0.5) -> None:
        if not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
            raise GraphBuildError(f"dropout rate must be a number in [0, 1), got {rate!r}")
        super().__init__(rate=rate)
        self.rate = float(rate)

    def build(self, g, x):
        return g.apply(DropoutOp(self.rate), x)


class BatchNormOp(ge.Operator):
    """Batch normalization over every axis but ``axis`` (the features or channels).

    Inputs: ``x, gamma, beta, running_mean, running_var``. In training it normalizes with the
    batch's mean and (biased) variance and updates the running statistics in place:
    ``running = momentum * running + (1 - momentum) * batch`` (the unbiased variance, as PyTorch
    does); in evaluation it normalizes with the running statistics. The running statistics are
    non-trainable parameters of the model, so they are saved and restored with its weights.

    ``sync``: in data-parallel training (see :mod:`graphengine.distributed`) the batch is the
    global batch: the moments, and the sums the backward needs, are reduced over the ranks.
    """

    kind = "batch_norm"
    retain_inputs = (0, 1)
    nondifferentiable_inputs = (3, 4)

    def __init__(self, axis: int, momentum: float, eps: float, sync: bool = False) -> None:
        self.axis, self.momentum, self.eps, self.sync = axis, momentum, eps, sync
        #: A training pass reduces over the ranks: every rank must run it (see fit).
        self.collective = sync

    def config(self) -> dict[str, Any]:
        return {"axis": self.axis, "momentum": self.momentum, "eps": self.eps, "sync": self.sync}

    def infer(self, x, gamma, beta, running_mean, running_var):
        require_float(x)
        same_dtype(x, gamma, beta, running_mean, running_var)
        if not -x.ndim <= self.axis < x.ndim:
            raise ShapeError(f"batch_norm axis {self.axis} is out of range for shape {x.shape}")
        features = x.shape[self.axis]
        for spec in (gamma, beta, running_mean, running_var):
            if spec.shape != (features,):
                raise ShapeError(f"batch_norm statistics must have shape ({features},), got {spec.shape}")
        self.reduce = tuple(i for i in range(x.ndim) if i != self.axis % x.ndim)
        # Per-feature vectors broadcast against x along the feature axis.
        self.broadcast = tuple(features if i == self.axis % x.ndim else 1 for i in range(x.ndim))
        return x

    def forward(self, ctx, xp, x, gamma, beta, running_mean, running_var):
        if ctx.training:
            ctx.group = distributed.reducing_group() if self.sync else None
            if ctx.group is not None:
                mean, var, count = ctx.group.moments(xp, x, self.reduce)
            else:
                mean, var = x.mean(axis=self.reduce), x.var(axis=self.reduce)
                count = x.size // x.shape[self.axis]
            if count < 2:
                raise ge.DataError(f"batch_norm in training needs at least 2 values per feature, "
                                   f"got a batch of shape {x.shape}; use a larger batch")
            running_mean[...] = self.momentum * running_mean + (1 - self.momentum) * mean
            running_var[...] = (self.momentum * running_var
                                + (1 - self.momentum) * var * (count / (count - 1)))
            ctx.count = count
        else:
            mean, var = running_mean, running_var
        ctx.mean = mean.reshape(self.broadcast)
        ctx.inv_std = (1.0 / xp.sqrt(var + self.eps)).reshape(self.broadcast)
        xhat = (x - ctx.mean) * ctx.inv_std
        return gamma.reshape(self.broadcast) * xhat + beta.reshape(self.broadcast)

    def backward(self, ctx, xp, inputs, output, grad):
        x, gamma = inputs[0], inputs[1]
        xhat = (x - ctx.mean) * ctx.inv_std
        grad_beta = grad.sum(axis=self.reduce)
        grad_gamma = (grad * xhat).sum(axis=self.reduce)
        scale = gamma.reshape(self.broadcast) * ctx.inv_std
        if not ctx.training:  # the statistics are constants here
            return grad * scale, grad_gamma, grad_beta, None, None
        # d/dx through the batch mean and variance as well as directly; synchronized, those are
        # the global batch's (the parameter gradients stay this rank's, averaged afterwards).
        sum_beta, sum_gamma = (ctx.group.batch_sums(grad_beta, grad_gamma) if ctx.group is not None
                               else (grad_beta, grad_gamma))
        grad_x = scale * (grad - (sum_beta.reshape(self.broadcast)
                                  + xhat * sum_gamma.reshape(self.broadcast)) / ctx.count)
        return grad_x, grad_gamma, grad_beta, None, None


class BatchNorm(ge.Layer):
    """``g.layer("batch_norm", h)``: normalize each feature over the batch, then scale by
    ``gamma`` and shift by ``beta`` (learned). ``axis`` is the feature axis (-1: last, as in
    dense and channels-last conv outputs; 1 for NCHW). Parameters: ``gamma``, ``beta`` and the
    non-trainable ``running_mean``, ``running_var`` used in evaluation.

    In data-parallel training each rank normalizes with its own share's statistics (as
    ChainerMN and PyTorch do by default; the ranks' running statistics then differ, and rank 0's
    are saved); ``sync=True`` normalizes with the global batch's, reduced over the ranks in
    forward and backward, which is what one process on the global batch computes."""

    def __init__(self, axis: int = -1, momentum: float = 0.9, eps: float = 1e-5,
                 sync: bool = False) -> None:
        if not 0.0 <= momentum < 1.0:
            raise GraphBuildError(f"batch_norm momentum must lie in [0, 1), got {momentum!r}")
        if eps <= 0:
            raise GraphBuildError(f"batch_norm eps must be positive, got {eps!r}")
        if not isinstance(sync, bool):
            raise GraphBuildError(f"batch_norm sync must be True or False, got {sync!r}")
        super().__init__(axis=axis, momentum=momentum, eps=eps, sync=sync)
        self.axis, self.momentum, self.eps, self.sync = axis, momentum, eps, sync

    def build(self, g, x):
        if not -x.ndim <= self.axis < x.ndim or x.shape[self.axis] is None:
            raise ShapeError(f"batch_norm needs a known feature dimension at axis {self.axis}, "
                             f"got shape {x.shape}")
        features = (x.shape[self.axis],)

        def stat(name: str, init: str, trainable: bool):
            return g.parameter(name, features, init=init, trainable=trainable, decay=False,
                               dtype=x.dtype)

        params = (stat("gamma", "ones", True), stat("beta", "zeros", True),
                  stat("running_mean", "zeros", False), stat("running_var", "ones", False))
        return g.apply(BatchNormOp(self.axis, self.momentum, self.eps, self.sync), x, *params)


@ge.hookimpl
def graphengine_register_layers(register):
    register("dropout", Dropout)
    register("batch_norm", BatchNorm, aliases=("batchnorm",))
