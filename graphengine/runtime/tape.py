"""The tape of one run: everything a forward pass leaves for its backward, and what the run decided.

Operators are descriptions shared by every model and thread; a run's state lives here. The
executor makes a :class:`Tape` per forward pass and a :class:`Context` per operator call on it
(Chainer makes a FunctionNode per call, PyTorch hands ``ctx`` to ``save_for_backward``). A
backward reads the tape of its forward and consumes it; dropping a tape frees what it held.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..compiler.plan import Plan


class Context:
    """One operator call's own state. The operator sets what its backward will need as
    attributes (``ctx.mask = ...``); it reads what the run decided:

    - ``ctx.training``: training (True) or evaluation (False) mode of this run;
    - ``ctx.rng``: the run's random generator (``ctx.rng.random(shape, dtype)``);
    - ``ctx.grad_wanted(i)``, in backward: whether the gradient of input ``i`` is used, so that
      the work for the others can be skipped (PyTorch's ``needs_input_grad``).
    """

    #: For each input, whether its gradient is used; set by the executor before backward.
    wanted: tuple[bool, ...] = ()

    def __init__(self, tape: Tape) -> None:
        self.tape = tape

    @property
    def training(self) -> bool:
        return self.tape.training

    @property
    def rng(self) -> Any:
        return self.tape.rng

    def grad_wanted(self, index: int) -> bool:
        """Whether the gradient of input ``index`` is used (all are, unless told otherwise)."""
        return index >= len(self.wanted) or self.wanted[index]


class Tape:
    """The record of one forward pass over ``plan``: the values it computed (those a backward
    or the caller still needs), one :class:`Context` per step, and the run's decisions."""

    def __init__(self, plan: Plan, values: list[Any], training: bool, rng: Any,
                 generation: int = 0) -> None:
        self.plan = plan
        #: Slot -> array; one spare slot at the end stays None (plan slot -1 reads it).
        self.values = values
        self.training = training
        self.rng = rng
        #: One context per forward step, filled as the steps run.
        self.contexts: list[Context | None] = [None] * len(plan.steps)
        #: The parameters' generation when the forward ran (see ParameterStore).
        self.generation = generation
        #: Gradients by slot, once a backward has consumed this tape.
        self.grads: list[Any] | None = None
        #: The plan whose backward ran (it may ask for more input gradients than ``plan``).
        self.backward_plan: Plan | None = None
        self.consumed = False
        #: Whether ``plan`` is the fused variant of the plan asked for.
        self.fused = False

    def value(self, name: str) -> Any:
        """The value of node ``name`` in this run, if the run kept it (targets always are)."""
        slot = self.plan.slots.get(name)
        value = None if slot is None else self.values[slot]
        if value is None:
            raise KeyError(f"this run kept no value of node {name!r}")
        return value

    def gradient(self, name: str) -> Any | None:
        """The gradient reaching node ``name`` in the backward of this run, or None."""
        if self.grads is None:
            return None
        slot = self.plan.slots.get(name)
        return None if slot is None else self.grads[slot]
