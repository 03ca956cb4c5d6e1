"""Issue 13's primitives: where, clip, stack, max/min, var/std, squeeze/expand_dims, astype,
gather, tensor powers, softmax/log_softmax on any axis.

Each is gradient-checked (float64 finite differences on every backend), compared with PyTorch in
float64 (forward and input gradients), reached through its Tensor method or ``ge`` function,
and refuses bad arguments with an error naming the node and its inputs' shapes.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import graphengine as ge
from graphengine.ir import operators as ops
from graphengine.testing import check_backward, inferred, make_context

rng = np.random.default_rng(13)
#: NumPy's backend namespace, with the helpers operators use (scatter_add).
xp = ge.get_backend("numpy").xp


def r(*shape):
    return rng.standard_normal(shape)


def positive(*shape):
    return rng.uniform(0.5, 2.0, shape)


def ties(*shape):
    """Small integers as floats: a reduction over them meets many ties."""
    return rng.integers(0, 3, shape).astype(np.float64)


def spread(*shape):
    """Values at least 0.1 apart from each other (no ties, no kink within a finite step)."""
    values = rng.permutation(np.prod(shape)) * 0.1 - 0.05 * np.prod(shape)
    return values.reshape(shape)


def mask(*shape):
    return rng.random(shape) > 0.5


def indices(high, *shape):
    return rng.integers(-high, high, shape)


CASES = {
    "power": (lambda: ops.Power(), [positive(3, 4), r(3, 4)]),
    "power_scalar_base": (lambda: ops.Power(), [np.array(2.0), r(3, 4)]),
    "power_broadcast": (lambda: ops.Power(), [positive(3, 1), r(4)]),
    "clip": (lambda: ops.Clip(-0.5, 0.5), [r(3, 4)]),
    "clip_low_only": (lambda: ops.Clip(lo=0.0), [r(3, 4)]),
    "where": (lambda: ops.Where(), [mask(3, 4), r(3, 4), r(3, 4)]),
    "where_broadcast": (lambda: ops.Where(), [mask(3, 1), r(4), r(3, 4)]),
    "astype": (lambda: ops.Astype("float64"), [r(3, 4)]),
    "max_axis": (lambda: ops.Max(axis=1), [spread(3, 4)]),
    "min_all": (lambda: ops.Min(), [spread(3, 4)]),
    "var": (lambda: ops.Var(axis=1), [r(3, 4)]),
    "var_ddof": (lambda: ops.Var(axis=(0, 2), keepdims=True, ddof=1), [r(3, 4, 2)]),
    "std": (lambda: ops.Std(axis=-1), [r(3, 4)]),
    "std_ddof_all": (lambda: ops.Std(ddof=1), [r(3, 4)]),
    "squeeze": (lambda: ops.Squeeze(axis=1), [r(3, 1, 4)]),
    "squeeze_all": (lambda: ops.Squeeze(), [r(1, 3, 1)]),
    "expand_dims": (lambda: ops.ExpandDims(axis=-1), [r(3, 4)]),
    "stack": (lambda: ops.Stack(axis=1), [r(3, 4), r(3, 4), r(3, 4)]),
    "gather": (lambda: ops.Gather(axis=1), [r(3, 4), indices(4, 3, 6)]),
    "gather_broadcast": (lambda: ops.Gather(axis=0), [r(5, 1), indices(5, 2, 3)]),
    "softmax_axis0": (lambda: ops.Softmax(axis=0), [r(3, 4, 2)]),
    "log_softmax_axis1": (lambda: ops.LogSoftmax(axis=1), [r(3, 4, 2)]),
}




@pytest.mark.parametrize("case", sorted(CASES))
def test_gradient(case, backend):
    factory, inputs = CASES[case]
    check_backward(inferred(factory, inputs), inputs, backend=backend)


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_keeps_nothing_on_the_operator(case):
    factory, inputs = CASES[case]
    op = inferred(factory, inputs)()
    described = dict(vars(op))
    op.forward(make_context(), xp, *inputs)
    assert vars(op) == described


# --------------------------------------------------------------------------- against PyTorch

def against_torch(op, inputs, torch_fn):
    """``op``'s forward and input gradients against ``torch_fn(torch, *inputs)``'s autograd,
    in float64."""
    torch = pytest.importorskip("torch")
    op.infer(*[ops.TensorSpec(a.shape, str(a.dtype)) for a in inputs])
    ctx = make_context()
    out = op.forward(ctx, xp, *inputs)
    grad = rng.standard_normal(np.shape(out))
    kept = tuple(a if i in op.retain_inputs else None for i, a in enumerate(inputs))
    grads = op.backward(ctx, xp, kept, out if op.retain_output else None, grad)
    leaves = [torch.tensor(a, requires_grad=a.dtype.kind == "f") for a in inputs]
    expected = torch_fn(torch, *leaves)
    expected.backward(torch.tensor(grad))
    np.testing.assert_allclose(out, expected.detach().numpy(), rtol=1e-12, atol=1e-12)
    for i, (g, leaf) in enumerate(zip(grads, leaves)):
        if leaf.requires_grad and i not in op.nondifferentiable_inputs:
            np.testing.assert_allclose(g, leaf.grad.numpy(), rtol=1e-10, atol=1e-12,
                                       err_msg=f"gradient of input {i}")


TORCH = {
    "where": (ops.Where(), [mask(3, 1), r(4), r(3, 4)], lambda T, *a: T.where(*a)),
    "clamp": (ops.Clip(-0.5, 0.5), [np.array([-1.0, -0.5, 0.0, 0.5, 2.0])],
              lambda T, x: T.clamp(x, -0.5, 0.5)),
    "clamp_max_only": (ops.Clip(hi=0.0), [r(3, 4)], lambda T, x: T.clamp(x, max=0.0)),
    "stack": (ops.Stack(axis=-1), [r(3, 4), r(3, 4)], lambda T, a, b: T.stack([a, b], dim=-1)),
    "amax_ties": (ops.Max(axis=1), [ties(4, 6)], lambda T, x: T.amax(x, dim=1)),
    "amin_ties_keepdim": (ops.Min(axis=(0, 2), keepdims=True), [ties(3, 4, 2)],
                          lambda T, x: T.amin(x, dim=(0, 2), keepdim=True)),
    "var_unbiased_false": (ops.Var(axis=0), [r(5, 3)], lambda T, x: T.var(x, dim=0, unbiased=False)),
    "var_correction_1": (ops.Var(axis=1, ddof=1), [r(5, 3)], lambda T, x: T.var(x, dim=1)),
    "std_correction_0": (ops.Std(axis=1, keepdims=True), [r(5, 3)],
                         lambda T, x: T.std(x, dim=1, correction=0, keepdim=True)),
    "std_all_correction_1": (ops.Std(ddof=1), [r(5, 3)], lambda T, x: T.std(x)),
    "squeeze": (ops.Squeeze(axis=0), [r(1, 3)], lambda T, x: T.squeeze(x, 0)),
    "unsqueeze": (ops.ExpandDims(axis=1), [r(2, 3)], lambda T, x: T.unsqueeze(x, 1)),
    "gather": (ops.Gather(axis=1), [r(3, 4), rng.integers(0, 4, (3, 5))],
               lambda T, x, i: T.gather(x, 1, i)),
    "pow_tensor_exponent": (ops.Power(), [positive(3, 4), r(3, 4)], lambda T, a, b: T.pow(a, b)),
    "pow_zero_base": (ops.Power(), [np.array([0.0, 0.0, 1.5]), np.array([2.0, 0.0, 3.0])],
                      lambda T, a, b: T.pow(a, b)),  # 0 ** 0 and 0 ** 2: no NaN from 0 * log 0 or 0 * 0 ** -1
    "softmax_dim0": (ops.Softmax(axis=0), [r(3, 4, 2)], lambda T, x: T.softmax(x, dim=0)),
    "log_softmax_dim1": (ops.LogSoftmax(axis=1), [r(3, 4, 2)],
                         lambda T, x: T.log_softmax(x, dim=1)),
}


@pytest.mark.parametrize("case", sorted(TORCH))
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning",
                            "ignore:invalid value:RuntimeWarning")
def test_matches_pytorch(case):
    op, inputs, torch_fn = TORCH[case]
    against_torch(op, inputs, torch_fn)


def test_max_splits_the_gradient_of_a_tie_evenly():
    op = ops.Max(axis=1)
    op.infer(ops.TensorSpec((1, 4), "float64"))
    ctx = make_context()
    x = np.array([[1.0, 3.0, 3.0, 3.0]])
    out = op.forward(ctx, xp, x)
    np.testing.assert_allclose(op.backward(ctx, xp, (x,), out, np.array([6.0]))[0], [[0, 2, 2, 2]])


def test_std_of_a_constant_has_a_zero_gradient_not_nan():
    op = ops.Std(axis=1)
    op.infer(ops.TensorSpec((2, 3), "float64"))
    ctx = make_context()
    x = np.array([[2.0, 2.0, 2.0], [1.0, 2.0, 3.0]])
    out = op.forward(ctx, xp, x)
    grad = op.backward(ctx, xp, (x,), out, np.ones(2))[0]
    np.testing.assert_array_equal(grad[0], 0.0)
    assert np.abs(grad[1]).sum() > 0


# --------------------------------------------------------------------------- through the graph

def model_of(build, *input_specs, dtype="float64"):
    """A model whose loss is ``sum(build(inputs...) * p)`` with a parameter p of ones, so that
    backward reaches the inputs; returns (model, output tensor)."""
    g = ge.Graph("primitives")
    inputs = [g.input(name, shape, dtype=dt) for name, shape, dt in input_specs]
    out = build(g, *inputs)
    p = g.parameter("p", (1,), init="ones", dtype=dtype)
    return g.compile((out * p).sum(), outputs=[out], optimizer=ge.optimizer("sgd")), out


def test_reflected_operators_build_scalar_minus_and_scalar_power():
    torch = pytest.importorskip("torch")
    x = r(3, 4)
    for build, torch_fn in ((lambda g, t: 3.0 - t, lambda t: torch.rsub(t, 3.0)),
                            (lambda g, t: 2 ** t, lambda t: torch.pow(2.0, t)),
                            (lambda g, t: t ** (t * 0.5), lambda t: torch.pow(t, t * 0.5))):
        model, out = model_of(build, ("x", (None, 4), "float64"))
        feeds = {"x": np.abs(x) + 0.1}
        model.forward(feeds)
        model.backward(wrt=["x"])
        leaf = torch.tensor(feeds["x"], requires_grad=True)
        expected = torch_fn(leaf)
        expected.sum().backward()
        np.testing.assert_allclose(model.run(feeds)[out.name], expected.detach().numpy(), rtol=1e-12)
        np.testing.assert_allclose(model.input_gradient("x"), leaf.grad.numpy(), rtol=1e-10)


def test_tensor_methods_and_ge_functions_build_the_primitives():
    g = ge.Graph("methods")
    x = g.input("x", (None, 3, 1))
    i = g.input("i", (None, 3, 2), dtype="int64")
    c = g.input("c", (None, 3, 1), dtype="bool")
    built = {
        "max": x.max(1), "min": x.min(keepdims=True), "var": x.var(1, ddof=1), "std": x.std(),
        "clip": x.clip(0, 1), "squeeze": x.squeeze(-1), "expand_dims": x.expand_dims(0),
        "astype": x.astype(np.float64), "softmax": x.softmax(1), "log_softmax": x.log_softmax(0),
        "stack": ge.stack([x, x], axis=-1), "where": ge.where(c, x, 0.0),
        "gather": ge.gather(x, i, axis=2), "power": 2 ** x, "sub": 1 - x, "pow": x ** 2,
    }
    for kind, tensor in built.items():
        assert tensor.node.kind == kind
    assert built["astype"].dtype == "float64"
    assert built["squeeze"].shape == (None, 3)
    assert built["stack"].shape == (None, 3, 1, 2)
    assert built["gather"].shape == (None, 3, 2)
    assert built["var"].shape == (None, 1)


def test_a_model_with_every_primitive_trains_on_the_strict_backend():
    g = ge.Graph("all")
    x, i = g.input("x", (None, 4)), g.input("i", (None, 2), dtype="int64")
    c = g.input("c", (None, 4), dtype="bool")
    h = x * g.parameter("w", (4,), init="ones")
    parts = [ge.where(c, h, 0.0), h.clip(-0.5, 0.5), ge.stack([h, x], 1).max(1), h.min(0),
             h.var(1, keepdims=True), h.std(1, keepdims=True), h.expand_dims(1).squeeze(1),
             h.astype("float64").astype("float32"), ge.gather(h, i, 1), 2 ** h, h ** x,
             h.softmax(0), h.log_softmax(1)]
    loss = sum((p.sum() for p in parts), start=g.constant(0.0))
    model = g.compile(loss, outputs=[loss], optimizer=ge.optimizer("adamw", lr=0.01),
                      backend="strict")
    feeds = {"x": rng.random((3, 4), dtype=np.float32) + 0.1,
             "i": np.array([[0, 3], [1, 1], [2, -1]]), "c": mask(3, 4)}
    before = model.backend.to_numpy(model.parameters()["w"])
    model.train_step(feeds)
    after = model.backend.to_numpy(model.parameters()["w"])
    assert after.dtype == np.float32
    assert np.all(np.isfinite(after)) and not np.allclose(before, after)


def test_a_cast_to_integers_passes_no_gradient():
    g = ge.Graph("cast")
    x = g.input("x", (None, 2))
    w = g.parameter("w", (2,), init="ones")
    loss = (x * w).astype("int64").astype("float32").sum()
    with pytest.raises(ge.CompileError, match="nothing to differentiate"):
        g.compile(loss, outputs=[loss], optimizer=ge.optimizer("sgd"))


def test_the_dtype_error_suggests_the_cast_that_fixes_it():
    g = ge.Graph("dtypes")
    a, b = g.input("a", (None, 2)), g.input("b", (None, 2), dtype="float64")
    with pytest.raises(ge.ShapeError, match=r"x\.astype\('float32'\)"):
        a + b
    assert (a + b.astype("float32")).dtype == "float32"


def test_astype_gradient_comes_back_in_the_input_dtype():
    op = ops.Astype("float64")
    ctx = make_context()
    x = r(2, 3).astype(np.float32)
    op.forward(ctx, xp, x)
    assert op.backward(ctx, xp, (None,), None, np.ones((2, 3)))[0].dtype == np.float32


# --------------------------------------------------------------------------- bad arguments

BAD = {
    "axis out of range": (lambda g, x, i, c: x.max(axis=2),
                          r"node 'max.*axis 2 is out of range.*\(None, 4\)"),
    "squeeze a wide axis": (lambda g, x, i, c: x.squeeze(1), r"node 'squeeze.*size 1.*\(None, 4\)"),
    "expand_dims out of range": (lambda g, x, i, c: x.expand_dims(3), r"expand_dims.*axis 3 is out of range"),
    "lo above hi": (lambda g, x, i, c: x.clip(1.0, -1.0), r"node 'clip.*lo <= hi.*\(None, 4\)"),
    "clip without bounds": (lambda g, x, i, c: x.clip(), r"node 'clip.*lower bound"),
    "where shapes": (lambda g, x, i, c: ge.where(c, x, x[:, :3]),
                     r"node 'where.*\(None, 4\) and \(None, 3\) do not broadcast"),
    "where cond not bool": (lambda g, x, i, c: ge.where(x, x, x), r"node 'where.*must be bool"),
    "stack shapes": (lambda g, x, i, c: ge.stack([x, x[:, :2]]),
                     r"node 'stack.*one shape.*\(None, 4\), \(None, 2\)"),
    "stack dtypes": (lambda g, x, i, c: ge.stack([x, x.astype("float64")]), r"node 'stack.*dtypes differ"),
    "dtype not supported": (lambda g, x, i, c: x.astype("complex64"),
                            r"node 'astype.*cannot cast to dtype 'complex64'"),
    "gather float indices": (lambda g, x, i, c: ge.gather(x, x, 1), r"node 'gather.*integers"),
    "gather ranks": (lambda g, x, i, c: ge.gather(x, i[:, 0], 1), r"node 'gather.*one rank"),
    "gather axis": (lambda g, x, i, c: ge.gather(x, i, 2), r"node 'gather.*axis 2 is out of range"),
    "var without freedom": (lambda g, x, i, c: x.var(1, ddof=4), r"node 'var.*ddof=4"),
    "softmax axis": (lambda g, x, i, c: x.softmax(axis=-3), r"node 'softmax.*axis -3"),
    "int power": (lambda g, x, i, c: 2 ** i, r"node 'power.*floating point"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_arguments_name_the_node_and_shapes(case):
    build, message = BAD[case]
    g = ge.Graph("bad")
    x, i = g.input("x", (None, 4)), g.input("i", (None, 4), dtype="int64")
    c = g.input("c", (None, 4), dtype="bool")
    with pytest.raises(ge.GraphEngineError, match=message) as failure:
        build(g, x, i, c)
    failed = str(failure.value).split("'")[1]  # "node 'max_0' (max): ..."
    assert failed not in g.nodes


def test_ge_functions_need_a_tensor():
    with pytest.raises(ge.GraphBuildError, match="stack takes tensors of a graph"):
        ge.stack([np.ones(2), np.ones(2)])
    with pytest.raises(ge.GraphBuildError, match="where takes tensors of a graph"):
        ge.where(np.ones(2, bool), 1.0, 0.0)


# --------------------------------------------------------------------------- properties

@st.composite
def gather_case(draw):
    """x, indices and axis for take_along_axis: equal ranks, other axes broadcastable."""
    ndim = draw(st.integers(1, 3))
    axis = draw(st.integers(-ndim, ndim - 1))
    x_shape, i_shape = [], []
    for d in range(ndim):
        if d == axis % ndim:
            x_shape.append(draw(st.integers(1, 4)))
            i_shape.append(draw(st.integers(1, 4)))
        else:
            size = draw(st.integers(1, 3))
            x_shape.append(draw(st.sampled_from([size, 1])))
            i_shape.append(draw(st.sampled_from([size, 1])))
    seed = draw(st.integers(0, 2**16))
    local = np.random.default_rng(seed)
    high = x_shape[axis % ndim]
    return local.standard_normal(x_shape), local.integers(-high, high, i_shape), axis


@settings(max_examples=60, deadline=None)
@given(gather_case())
def test_gather_is_take_along_axis_and_its_backward_is_the_adjoint(case):
    x, index, axis = case
    op = ops.Gather(axis=axis)
    spec = op.infer(ops.TensorSpec(x.shape, "float64"), ops.TensorSpec(index.shape, "int64"))
    ctx = make_context()
    out = op.forward(ctx, xp, x, index)
    expected = np.take_along_axis(x, index, axis=axis)
    np.testing.assert_array_equal(out, expected)
    assert spec.shape == expected.shape
    grad = np.random.default_rng(0).standard_normal(out.shape)
    grad_x = op.backward(ctx, xp, (None, index), None, grad)[0]
    # <gather(x), g> = <x, gather^T(g)>: the backward is the transpose of the (linear) forward
    np.testing.assert_allclose(np.sum(out * grad), np.sum(x * grad_x), rtol=1e-10, atol=1e-10)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 3), max_size=3), st.integers(1, 4), st.data())
def test_stack_is_numpy_stack(shape, count, data):
    axis = data.draw(st.integers(-len(shape) - 1, len(shape)))
    arrays = [np.random.default_rng(k).standard_normal(shape) for k in range(count)]
    op = ops.Stack(axis=axis)
    spec = op.infer(*[ops.TensorSpec(tuple(shape), "float64")] * count)
    out = op.forward(make_context(), xp, *arrays)
    np.testing.assert_array_equal(out, np.stack(arrays, axis=axis))
    assert spec.shape == out.shape
    grads = op.backward(make_context(), xp, (None,) * count, None, out * 2)
    for array, grad in zip(arrays, grads):
        np.testing.assert_array_equal(grad, array * 2)


# --------------------------------------------------------------------------- conventions

def input_gradient(build, x):
    """d sum(build(x * p)) / dx, p a parameter of ones: the gradient each element receives."""
    g = ge.Graph("ties")
    t = g.input("x", x.shape, dtype="float64")
    out = build(g, t * g.parameter("p", (1,), init="ones", dtype="float64"))
    model = g.compile(out.sum(), outputs=[out], optimizer=ge.optimizer("sgd"))
    model.forward({"x": x})
    model.backward(wrt=["x"])
    return model.input_gradient("x")


def test_ties_in_maximum_and_max_pool_go_to_one_side_where_torch_may_split():
    # docs/from_pytorch.md: ge.maximum gives a tie to its first input (torch.maximum halves it);
    # max_pool2d to the first maximum in column-major order (torch: row-major)
    a = np.array([1.0, 2.0])
    grad = input_gradient(lambda g, t: ge.maximum(t, g.constant(np.array([1.0, 3.0]),
                                                                 dtype="float64")), a)
    np.testing.assert_array_equal(grad, [1.0, 0.0])
    window = np.array([[[[0.0, 5.0], [5.0, 1.0]]]])
    grad = input_gradient(lambda g, t: g.layer("max_pool2d", t, kernel_size=2), window)
    np.testing.assert_array_equal(grad, [[[[0.0, 0.0], [1.0, 0.0]]]])
    # max and min (this issue's) split a tie evenly, as torch.amax and amin do
    grad = input_gradient(lambda g, t: t.max(axis=1), np.array([[2.0, 7.0, 7.0]]))
    np.testing.assert_array_equal(grad, [[0.0, 0.5, 0.5]])


def test_batch_norm_momentum_is_the_complement_of_torchs():
    torch = pytest.importorskip("torch")
    x = r(6, 3)
    g = ge.Graph("bn")
    t = g.input("x", (None, 3), dtype="float64")
    out = g.layer("batch_norm", t * g.parameter("p", (1,), init="ones", dtype="float64"),
                  momentum=0.8, name="bn")
    model = g.compile(out.sum(), outputs=[out], optimizer=ge.optimizer("sgd"))
    model.forward({"x": x}, training=True)
    reference = torch.nn.BatchNorm1d(3, momentum=1 - 0.8, dtype=torch.float64)
    reference(torch.tensor(x))
    params = model.parameters()
    np.testing.assert_allclose(params["bn/running_mean"], reference.running_mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(params["bn/running_var"], reference.running_var.numpy(), rtol=1e-12)


def test_multi_class_hinge_is_multi_margin_loss_times_the_classes():
    torch = pytest.importorskip("torch")
    scores, labels = r(5, 4), rng.integers(0, 4, 5)
    g = ge.Graph("hinge")
    z, y = g.input("z", (None, 4), dtype="float64"), g.input("y", (None,), dtype="int64")
    loss = g.loss("hinge", z * g.parameter("p", (1,), init="ones", dtype="float64"), y, margin=0.7)
    value = g.compile(loss, optimizer=ge.optimizer("sgd")).forward({"z": scores, "y": labels})
    expected = torch.nn.functional.multi_margin_loss(torch.tensor(scores), torch.tensor(labels),
                                                     margin=0.7)
    assert value == pytest.approx(4 * float(expected), rel=1e-12)


def test_a_loss_target_receives_no_gradient():
    # torch: mse_loss(pred, target.detach()); the target's side gets nothing
    g = ge.Graph("target")
    x = g.input("x", (None, 2), dtype="float64")
    pred = g.layer("dense", x, units=1, name="pred")
    target = g.layer("dense", x, units=1, name="target")
    model = g.compile(g.loss("mse", pred, target), optimizer=ge.optimizer("sgd"))
    model.forward({"x": r(4, 2)})
    model.backward()
    assert set(model.gradients()) == {"pred/W", "pred/b"}
