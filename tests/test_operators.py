"""Every primitive operator's backward against finite differences, on every backend."""

from __future__ import annotations

import numpy as np
import pytest
from test_primitives import CASES as MORE_CASES  # the primitives of issue 13, gradient-checked there

from graphengine.ir import operators as ops
from graphengine.testing import GradientCheckError, check_backward, inferred, make_context

rng = np.random.default_rng(42)


def r(*shape):
    return rng.standard_normal(shape)


def positive(*shape):
    return rng.uniform(0.5, 2.0, shape)


CASES = {
    "add": (lambda: ops.Add(), [r(3, 4), r(3, 4)]),
    "add_broadcast_bias": (lambda: ops.Add(), [r(5, 4), r(4)]),
    "add_broadcast_both": (lambda: ops.Add(), [r(5, 1), r(1, 4)]),
    "sub_broadcast": (lambda: ops.Sub(), [r(2, 3, 4), r(3, 1)]),
    "mul_broadcast": (lambda: ops.Mul(), [r(3, 4), r(1, 4)]),
    "mul_scalar": (lambda: ops.Mul(), [r(3, 4), r()]),
    "div": (lambda: ops.Div(), [r(3, 4), positive(3, 4)]),
    "div_broadcast": (lambda: ops.Div(), [r(3, 4), positive(4)]),
    "neg": (lambda: ops.Neg(), [r(3, 4)]),
    "pow": (lambda: ops.Pow(3.0), [r(3, 4)]),
    "pow_fraction": (lambda: ops.Pow(0.5), [positive(3, 4)]),
    "matmul": (lambda: ops.MatMul(), [r(5, 3), r(3, 4)]),
    "matmul_3d_by_2d": (lambda: ops.MatMul(), [r(2, 5, 3), r(3, 4)]),
    "matmul_batched": (lambda: ops.MatMul(), [r(2, 5, 3), r(2, 3, 4)]),
    "matmul_batched_broadcast": (lambda: ops.MatMul(), [r(2, 5, 3), r(1, 3, 4)]),
    "exp": (lambda: ops.Exp(), [r(3, 4)]),
    "log": (lambda: ops.Log(), [positive(3, 4)]),
    "sqrt": (lambda: ops.Sqrt(), [positive(3, 4)]),
    "abs": (lambda: ops.Abs(), [positive(3, 4) * np.sign(r(3, 4))]),
    "maximum": (lambda: ops.Maximum(), [r(3, 4), r(3, 4)]),
    "sum_all": (lambda: ops.Sum(), [r(3, 4)]),
    "sum_axis": (lambda: ops.Sum(axis=1), [r(3, 4, 2)]),
    "sum_keepdims": (lambda: ops.Sum(axis=(0, 2), keepdims=True), [r(3, 4, 2)]),
    "mean_all": (lambda: ops.Mean(), [r(3, 4)]),
    "mean_axis_negative": (lambda: ops.Mean(axis=-1), [r(3, 4)]),
    "reshape": (lambda: ops.Reshape((None, 12)), [r(2, 3, 4)]),
    "reshape_minus_one": (lambda: ops.Reshape((4, -1)), [r(2, 3, 4)]),
    "transpose": (lambda: ops.Transpose(), [r(2, 3, 4)]),
    "transpose_axes": (lambda: ops.Transpose((0, 2, 1)), [r(2, 3, 4)]),
    "concat": (lambda: ops.Concat(axis=1), [r(2, 3), r(2, 5), r(2, 1)]),
    "index_last_step": (lambda: ops.Index((slice(None), -1)), [r(2, 5, 3)]),
    "index_slice": (lambda: ops.Index((slice(1, None, 2),)), [r(5, 3)]),
}




@pytest.mark.parametrize("case", sorted(CASES))
def test_gradient(case, backend):
    factory, inputs = CASES[case]
    check_backward(inferred(factory, inputs), inputs, backend=backend)


def test_every_primitive_is_checked():
    checked = {type(factory()).__name__ for factory, _ in (*CASES.values(), *MORE_CASES.values())}
    assert checked == {cls.__name__ for cls in ops.PRIMITIVES.values()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_primitives_keep_their_call_state_on_the_context_not_on_themselves(case):
    factory, inputs = CASES[case]
    op = inferred(factory, inputs)()
    described = dict(vars(op))
    first, second = make_context(), make_context()
    out = op.forward(first, np, *inputs)
    other = [a * 2 + 1 for a in inputs]
    op.forward(second, np, *other)  # another call in between (another run, another thread)
    assert vars(op) == described  # forward wrote nothing on the operator
    assert not hasattr(op, "training") and not hasattr(op, "rng")
    kept = tuple(a if i in op.retain_inputs else None for i, a in enumerate(inputs))
    grad = rng.standard_normal(np.shape(out))
    grads = op.backward(first, np, kept, out if op.retain_output else None, grad)
    again = inferred(factory, inputs)()
    fresh = make_context()
    again.forward(fresh, np, *inputs)
    expected = again.backward(fresh, np, kept, out if op.retain_output else None, grad)
    for g, e in zip(grads, expected):  # the backward read its own call's state, not the latest
        if e is None:
            assert g is None
        else:
            np.testing.assert_array_equal(g, e)


def test_check_backward_catches_a_wrong_gradient():
    class WrongTanh(ops.Operator):
        kind = "wrong_tanh"
        retain_output = True

        def forward(self, ctx, xp, x):
            return xp.tanh(x)

        def backward(self, ctx, xp, inputs, output, grad):
            return (grad * (1 - output),)  # should be 1 - output**2

    with pytest.raises(GradientCheckError, match="finite difference"):
        check_backward(WrongTanh(), [r(3, 4)])


def test_check_backward_catches_a_wrong_gradient_shape():
    class Summed(ops.Operator):
        kind = "summed"

        def forward(self, ctx, xp, x):
            return x.sum()

        def backward(self, ctx, xp, inputs, output, grad):
            return (grad,)  # forgot to broadcast back to the input's shape

    with pytest.raises(GradientCheckError, match="shape"):
        check_backward(Summed(), [r(3, 4)])


def test_broadcast_shapes_with_batch_dimension():
    assert ops.broadcast_shapes((None, 4), (4,)) == (None, 4)
    assert ops.broadcast_shapes((None, 1), (1, 7)) == (None, 7)
    with pytest.raises(ops.ShapeError, match="do not broadcast"):
        ops.broadcast_shapes((None, 3), (4,))
