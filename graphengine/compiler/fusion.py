"""Compile-time fusion: ``matmul -> add bias -> activation`` chains become one step.

The graph keeps its meaningful nodes (``fc1/matmul``, ``fc1/add``, ``relu``): diagrams, gradient
statistics and observers see them. Only the *execution* plan runs a chain as one
:class:`FusedDense` step, which adds the bias in the matrix product's own output buffer and
applies the activation. Its backward runs as two steps (:func:`backward_parts`): the
activation's, then the dense part's, so that the output and its gradient are released before
the input gradient is allocated; the dense part computes only the input gradients the plan
needs (the first layer's ``dL/dx`` is skipped when nothing asks for it).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..ir.contracts import ActivationOp
from ..ir.operators import Add, MatMul, Operator


class FusedDense(Operator):
    """``activation(x @ W + b)`` for a 2-D ``x``, a matrix ``W`` and a vector ``b``.

    The activation must not need its input in backward (ReLU, sigmoid, tanh keep only their
    output): the pre-activation lives only inside ``forward``.
    """

    kind = "fused_dense"
    retain_inputs = (0, 1)

    def __init__(self, nodes: tuple[str, ...], activation: ActivationOp | None) -> None:
        self.nodes = nodes
        self.activation_op = activation
        self.activation = activation.activation if activation is not None else None
        self.retain_output = activation is not None and activation.retain_output
        #: Arrays that backward writes the gradients of W and b into (the model's flat gradient
        #: buffer), or None to allocate them.
        self.grad_out: tuple[Any, Any] = (None, None)

    def config(self) -> dict[str, Any]:
        return {"nodes": list(self.nodes)}

    def forward(self, ctx, xp, x, w, b):
        z = x @ w
        z += b
        return z if self.activation is None else self.activation.forward(xp, z)

    def backward(self, ctx, xp, inputs, output, grad):
        x, w = inputs[0], inputs[1]
        dz = grad if self.activation is None else self.activation.backward(xp, None, output, grad)
        want_x, want_w, want_b = map(ctx.grad_wanted, range(3))
        out_w, out_b = self.grad_out
        grad_w = grad_b = None
        if want_w:
            grad_w = x.T @ dz if out_w is None else xp.matmul(x.T, dz, out=out_w)
        if want_b:
            grad_b = dz.sum(axis=0) if out_b is None else dz.sum(axis=0, out=out_b)
        return dz @ w.T if want_x else None, grad_w, grad_b


def backward_parts(step: Any, slots: dict[str, int]) -> list[Any]:
    """The steps whose backward makes up ``step``'s: a fused dense step with an activation
    splits into the activation (gradient into the pre-activation's slot) and the dense part."""
    op = step.op
    if not isinstance(op, FusedDense) or op.activation_op is None:
        return [step]
    pre_activation = slots[op.nodes[1]]
    return [replace(step, name=op.nodes[2], op=op.activation_op, args=(pre_activation,)),
            replace(step, name=op.nodes[1], op=FusedDense(op.nodes[:2], None), out=pre_activation)]


def fusible_activation(op: Operator) -> bool:
    return isinstance(op, ActivationOp) and not op.retain_inputs


def fuse_dense(steps: list, specs: list, keep: set[int]) -> list:
    """``steps`` with every fusible chain replaced by one step (a copy of the chain's last step
    with the fused operator and the chain's inputs); the slots in ``keep`` (targets) are never
    hidden inside a chain. ``specs`` are the slots' tensor specs."""
    # By slot, in lists: the step that makes it, how often steps read it, and the last reader.
    producer = [-1] * len(specs)
    reads = [0] * len(specs)
    reader: list[Any] = [None] * len(specs)
    for i, step in enumerate(steps):
        producer[step.out] = i
        for slot in step.args:
            reads[slot] += 1
            reader[slot] = step

    def sole_reader(slot: int) -> Any:
        """The step that alone reads ``slot``'s value (once), if that value may vanish into a
        chain."""
        return reader[slot] if reads[slot] == 1 and slot not in keep else None

    fused: dict[int, Any] = {}
    swallowed: set[int] = set()
    for i, step in enumerate(steps):
        if not isinstance(step.op, MatMul) or i in swallowed:
            continue
        x, w = step.args
        z = specs[step.out]
        if specs[x].ndim != 2 or specs[w].ndim != 2:
            continue
        add = sole_reader(step.out)
        if add is None or not isinstance(add.op, Add):
            continue
        a, c = add.args
        bias = c if a == step.out else a
        if a == c or specs[bias].shape != z.shape[-1:] or specs[bias].dtype != z.dtype:
            continue
        last, activation = add, None
        after = sole_reader(add.out)
        if after is not None and fusible_activation(after.op):
            last, activation = after, after.op
        chain = (step, add, last) if activation else (step, add)
        op = FusedDense(tuple(s.name for s in chain), activation)
        fused[producer[last.out]] = replace(last, op=op, args=(x, w, bias))
        swallowed |= {producer[s.out] for s in chain}
    return [fused.get(i, step) for i, step in enumerate(steps)
            if i in fused or i not in swallowed]
