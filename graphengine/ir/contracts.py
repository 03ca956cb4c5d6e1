"""The contracts a plugin implements: activations, losses, layers, optimizers, initializers.

Each contract is a small class. The core adapts activations and losses into operators
(:class:`ActivationOp`, :class:`LossOp`); layers build a piece of graph; optimizers update a
parameter in place; initializers produce the first value of a parameter on the host.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ..errors import ShapeError
from ..ir.operators import Operator, TensorSpec, require_float

if TYPE_CHECKING:
    from ..ir.graph import Graph, Tensor


class Activation:
    """An elementwise function ``y = f(x)``.

    ``keeps`` names what ``backward`` reads, ``"x"`` and/or ``"y"``; what it does not keep
    reaches ``backward`` as ``None``, so memory can be freed early. Constructor keyword
    arguments are the activation's hyper-parameters (``g.activation("leaky_relu", h, slope=0.1)``).

    Health (optional): an activation whose units can stop passing gradient declares how to
    measure that, and :class:`~graphengine.tools.monitor.GradientMonitor` records it on the
    steps it records. ``health`` names the measure, one of :attr:`HEALTH_MEASURES`:

    - ``"dead_fraction"``: the share of units that no example of the batch activates, and that
      so pass no gradient (ReLU);
    - ``"saturation"``: the share of outputs where the slope is below
      ``graphengine.tools.monitor.SATURATED_SLOPE`` (5%) of its peak (sigmoid, tanh).

    ``measure_health(xp, y)`` then computes it from the output ``y`` (batch first): the fraction
    as a 0-d array of ``xp`` (``xp.mean(...)``), left on the device, not a Python float.
    Leave ``health`` at None when no such measure applies.
    """

    keeps: ClassVar[tuple[str, ...]] = ("x", "y")
    #: The health measures an activation may declare: columns of the gradient monitor's records.
    HEALTH_MEASURES: ClassVar[tuple[str, ...]] = ("dead_fraction", "saturation")
    #: Which of :attr:`HEALTH_MEASURES` :meth:`measure_health` computes; None: none.
    health: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.health is None:
            return
        if cls.health not in Activation.HEALTH_MEASURES:
            raise TypeError(f"{cls.__qualname__}.health is {cls.health!r}; it must be one of "
                            f"{', '.join(map(repr, Activation.HEALTH_MEASURES))}, or None")
        if cls.measure_health is Activation.measure_health:
            raise TypeError(f"{cls.__qualname__} declares health = {cls.health!r} but does not "
                            f"define measure_health(self, xp, y)")

    def __init__(self, **config: Any) -> None:
        if config:
            raise TypeError(f"unexpected arguments {sorted(config)}")

    def config(self) -> dict[str, Any]:
        return {}

    def forward(self, xp: Any, x: Any) -> Any:
        raise NotImplementedError

    def backward(self, xp: Any, x: Any, y: Any, dy: Any) -> Any:
        raise NotImplementedError

    def measure_health(self, xp: Any, y: Any) -> Any:
        """The fraction named by :attr:`health` for the output ``y``, as a 0-d device array."""
        raise NotImplementedError(f"{type(self).__qualname__} declares no health measure")


class ActivationOp(Operator):
    """Adapts an :class:`Activation` plugin to the operator contract."""

    def __init__(self, kind: str, activation: Activation) -> None:
        self.kind = kind
        self.activation = activation
        self.retain_inputs = (0,) if "x" in activation.keeps else ()
        self.retain_output = "y" in activation.keeps

    def config(self) -> dict[str, Any]:
        return self.activation.config()

    def infer(self, x: TensorSpec) -> TensorSpec:
        require_float(x)
        return x

    def forward(self, ctx, xp, x):
        return self.activation.forward(xp, x)

    def backward(self, ctx, xp, inputs, output, grad):
        return (self.activation.backward(xp, inputs[0], output, grad),)


class Loss:
    """A loss ``L(pred, target)``: a scalar, the mean over the batch.

    ``backward`` returns dL/dpred. Optional: ``check`` validates shapes at build time,
    ``predict`` maps raw predictions to what ``Model.predict`` returns (softmax for
    softmax cross-entropy), and ``accuracy`` gives the fraction classified correctly.

    A loss whose backward would otherwise repeat its forward's work (CTC's forward recursion)
    sets ``uses_context = True``: its ``forward`` and ``backward`` then take the call's context
    first, ``forward(ctx, xp, pred, target)`` and ``backward(ctx, xp, pred, target)``, and the
    forward keeps what the backward reads on it (``ctx.alpha = ...``), as an operator does.
    """

    #: The dtype family the target must have: "float", "int", or "any" for a loss that takes
    #: both (softmax cross-entropy: class labels, or per-class probabilities); ``check`` then
    #: tells them apart by ``target.dtype``.
    target_kind: ClassVar[str] = "float"
    #: The activation this loss applies to its prediction itself (softmax cross-entropy from
    #: logits: "softmax"), if any: a prediction that is that activation's output is a mistake
    #: (it is applied twice), and ``g.loss`` warns of it.
    applies_activation: str | None = None  # or a property, where the configuration decides
    #: Whether ``forward`` and ``backward`` take the call's context first (see above).
    uses_context: ClassVar[bool] = False

    def __init__(self, **config: Any) -> None:
        if config:
            raise TypeError(f"unexpected arguments {sorted(config)}")

    def config(self) -> dict[str, Any]:
        return {}

    def check(self, pred: TensorSpec, target: TensorSpec) -> None:
        """Raise ShapeError when ``pred`` and ``target`` cannot go together."""
        if pred.shape != target.shape:
            raise ShapeError(f"prediction {pred.shape} and target {target.shape} differ")

    def forward(self, xp: Any, pred: Any, target: Any) -> Any:
        raise NotImplementedError

    def backward(self, xp: Any, pred: Any, target: Any) -> Any:
        raise NotImplementedError

    def predict(self, xp: Any, pred: Any) -> Any:
        return pred

    def accuracy(self, xp: Any, pred: Any, target: Any) -> Any | None:
        """Fraction of correct predictions, or None where accuracy means nothing (regression)."""
        return None


class LossOp(Operator):
    """Adapts a :class:`Loss` plugin to the operator contract."""

    retain_inputs = (0, 1)
    nondifferentiable_inputs = (1,)

    def __init__(self, kind: str, loss: Loss) -> None:
        self.kind = kind
        self.loss = loss

    def config(self) -> dict[str, Any]:
        return self.loss.config()

    def infer(self, pred: TensorSpec, target: TensorSpec) -> TensorSpec:
        require_float(pred, "prediction")
        family = "int" if target.dtype.startswith(("int", "uint")) else "float"
        if self.loss.target_kind not in (family, "any"):
            raise ShapeError(f"target must be {self.loss.target_kind}, got {target.dtype}: declare "
                             f"the target input with dtype="
                             f"{'int64' if self.loss.target_kind == 'int' else 'float32'!r}")
        self.loss.check(pred, target)
        return TensorSpec((), pred.dtype)

    def forward(self, ctx, xp, pred, target):
        if self.loss.uses_context:
            return self.loss.forward(ctx, xp, pred, target)
        return self.loss.forward(xp, pred, target)

    def backward(self, ctx, xp, inputs, output, grad):
        pred, target = inputs
        loss = self.loss
        dpred = loss.backward(ctx, xp, pred, target) if loss.uses_context else loss.backward(xp, pred, target)
        return dpred * grad, None


class Layer:
    """A layer builds a piece of graph from primitives and operators.

    Constructor keyword arguments are its configuration (``units=128``); ``build`` receives the
    graph, already inside the layer's name scope, and the input tensors, creates its parameters
    with ``g.parameter(...)`` (their names become ``<layer>/<name>``) and returns the output tensor.
    Shapes are known at build time: ``x.shape[-1]`` is the number of input features.
    """

    def __init__(self, **config: Any) -> None:
        self._config = config

    def config(self) -> dict[str, Any]:
        return dict(self._config)

    def build(self, g: Graph, *inputs: Tensor) -> Tensor:
        raise NotImplementedError


class Optimizer:
    """Updates parameters from gradients. Constructed with its hyper-parameters.

    ``init_state`` returns the per-parameter state (velocity, moment estimates, as arrays of the
    parameter's backend); ``update`` changes ``param`` in place. ``step`` counts from 1.
    ``lr`` may be changed between steps by a learning-rate schedule.
    """

    #: True when ``update`` treats every element alike (given scalar hyper-parameters and
    #: scalar state): the model may then update all parameters as one flat array in one call.
    #: Leave it False for per-layer rules (LARS/LAMB trust ratios, per-matrix norms).
    elementwise: ClassVar[bool] = False

    def __init__(self, lr: float = 0.01) -> None:
        self.lr = lr

    def hyperparameters(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def init_state(self, xp: Any, param: Any) -> dict[str, Any]:
        return {}

    def update(self, xp: Any, param: Any, grad: Any, state: dict[str, Any], step: int) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({args})"


class Initializer:
    """Produces a parameter's first value on the host, from a seeded ``numpy.random.Generator``.

    ``fan_in`` and ``fan_out`` follow the usual convention (see :func:`fans`).
    """

    def __init__(self, **config: Any) -> None:
        if config:
            raise TypeError(f"unexpected arguments {sorted(config)}")

    def __call__(self, rng: np.random.Generator, shape: tuple[int, ...], fan_in: int,
                 fan_out: int) -> np.ndarray:
        raise NotImplementedError


def fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """(fan_in, fan_out): (in, out) for a (in, out) matrix; for a (out, in, kh, kw) kernel,
    ``in*kh*kw`` and ``out*kh*kw``."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    if len(shape) == 2:
        return shape[0], shape[1]
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive
