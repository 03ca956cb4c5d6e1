"""The convolution building blocks beyond plain conv2d: dilation and groups, conv1d,
conv_transpose2d, global_avg_pool2d, avg_pool2d(count_include_pad=False) and ceil_mode on both
pools. Gradients on every backend, values and gradients against PyTorch in float64, the adjoint
identity that ties conv_transpose2d to conv2d, build-time errors, what a convolution keeps
for its backward, its blocks of im2col rows and the memory layout the operators pass on."""

from __future__ import annotations

import numpy as np
import pytest
from graphengine.plugins import conv
from graphengine.plugins.conv import AvgPool2D, Conv2D, ConvTranspose2D, GlobalAvgPool2D, MaxPool2D
from hypothesis import given, settings
from hypothesis import strategies as st
from test_conv import naive_pool, prepared
from torch_reference import graph_result, torch_result

import graphengine as ge
from graphengine.ir.operators import TensorSpec
from graphengine.testing import check_backward, make_context

rng = np.random.default_rng(11)


def r(*shape):
    return rng.standard_normal(shape)


GRADIENT_CASES = {
    "conv_dilation2_pad2": (lambda: Conv2D(1, 2, dilation=2), [r(2, 3, 7, 6), r(4, 3, 3, 3), r(4)]),
    "conv_dilation_1x2_stride2": (lambda: Conv2D(2, ((1, 0), (2, 1)), dilation=(1, 2)),
                                  [r(2, 2, 7, 8), r(3, 2, 3, 2), r(3)]),
    "conv_dilation_same": (lambda: Conv2D(1, "same", dilation=2), [r(2, 2, 6, 5), r(3, 2, 3, 3), r(3)]),
    "conv_groups2": (lambda: Conv2D(1, 1, groups=2), [r(2, 4, 5, 5), r(6, 2, 3, 3), r(6)]),
    "conv_depthwise_stride2": (lambda: Conv2D(2, 1, groups=3), [r(2, 3, 6, 7), r(3, 1, 3, 3), r(3)]),
    "conv_groups_dilation_no_bias": (lambda: Conv2D(1, 0, dilation=2, groups=2),
                                     [r(2, 4, 7, 7), r(4, 2, 2, 3)]),
    "conv1d_as_height_1": (lambda: Conv2D((1, 2), ((0, 0), (1, 2)), dilation=(1, 2)),
                           [r(2, 3, 1, 9), r(4, 3, 1, 3), r(4)]),
    "transpose_stride2_output_padding": (lambda: ConvTranspose2D(2, 1, 1),
                                         [r(2, 3, 4, 3), r(3, 2, 3, 3), r(2)]),
    "transpose_stride1_no_bias": (lambda: ConvTranspose2D(1, 0), [r(2, 2, 4, 5), r(2, 3, 2, 3)]),
    "transpose_asymmetric": (lambda: ConvTranspose2D((2, 3), ((0, 1), (2, 0)), (1, 2)),
                             [r(1, 2, 3, 4), r(2, 3, 3, 4), r(3)]),
    "transpose_stride_beyond_kernel": (lambda: ConvTranspose2D(3, 0, 2),
                                       [r(2, 1, 3, 3), r(1, 2, 2, 2), r(2)]),
    "global_avg_pool": (GlobalAvgPool2D, [r(2, 3, 4, 5)]),
    "avg_pool_exclude_pad": (lambda: AvgPool2D(3, 2, 1, count_include_pad=False), [r(2, 3, 7, 6)]),
    "avg_pool_ceil": (lambda: AvgPool2D(2, ceil_mode=True), [r(2, 2, 5, 7)]),
    "avg_pool_ceil_pad_include": (lambda: AvgPool2D(3, 2, 1, ceil_mode=True), [r(2, 2, 6, 8)]),
    "avg_pool_ceil_exclude_overlap": (lambda: AvgPool2D((3, 2), (2, 1), (1, 0), True, False),
                                      [r(2, 2, 6, 5)]),
    "max_pool_ceil": (lambda: MaxPool2D(2, ceil_mode=True), [r(2, 3, 5, 7)]),
    "max_pool_ceil_pad_overlap": (lambda: MaxPool2D(3, 2, 1, ceil_mode=True), [r(2, 2, 6, 8)]),
}


@pytest.mark.parametrize("case", sorted(GRADIENT_CASES))
def test_gradient(case, backend):
    factory, inputs = GRADIENT_CASES[case]
    check_backward(prepared(factory, inputs), inputs, backend=backend)


# --------------------------------------------------------------------------- against PyTorch

def functional(name, *args, **options):
    """PyTorch's ``F.<name>(inputs..., *args, **options)``, the inputs by keyword."""
    def call(F, **tensors):
        return getattr(F, name)(*tensors.values(), *args, **options)
    return call


#: layer, its config, input shape, PyTorch's functional form (float64 inputs and parameters).
TORCH_CASES = {
    "conv2d_dilation_groups": (
        "conv2d", {"filters": 6, "kernel_size": 3, "padding": 2, "dilation": 2, "groups": 2}, (2, 4, 7, 6),
        functional("conv2d", padding=2, dilation=2, groups=2)),
    "conv2d_depthwise_stride": (
        "conv2d", {"filters": 6, "kernel_size": (3, 2), "stride": 2, "padding": (1, 2), "dilation": (1, 2),
                   "groups": 3}, (2, 3, 8, 9),
        functional("conv2d", stride=2, padding=(1, 2), dilation=(1, 2), groups=3)),
    "conv2d_same_dilated": (
        "conv2d", {"filters": 3, "kernel_size": 3, "padding": "same", "dilation": 2}, (2, 2, 6, 7),
        functional("conv2d", padding="same", dilation=2)),
    "conv1d": (
        "conv1d", {"filters": 4, "kernel_size": 3, "stride": 2, "padding": 2, "dilation": 2, "groups": 2},
        (2, 6, 11), functional("conv1d", stride=2, padding=2, dilation=2, groups=2)),
    "conv1d_valid": ("conv1d", {"filters": 3, "kernel_size": 4}, (3, 2, 9), functional("conv1d")),
    "conv_transpose2d": (
        "conv_transpose2d", {"filters": 3, "kernel_size": 3, "stride": 2, "padding": 1, "output_padding": 1},
        (2, 4, 4, 5), functional("conv_transpose2d", stride=2, padding=1, output_padding=1)),
    "conv_transpose2d_asymmetric": (
        "conv_transpose2d", {"filters": 2, "kernel_size": (2, 4), "stride": (3, 2), "padding": (0, 1),
                             "output_padding": (2, 1)}, (2, 3, 3, 4),
        functional("conv_transpose2d", stride=(3, 2), padding=(0, 1), output_padding=(2, 1))),
    "global_avg_pool2d": ("global_avg_pool2d", {}, (2, 3, 5, 4),
                          lambda F, x: F.adaptive_avg_pool2d(x, 1).flatten(1)),
    "avg_pool2d_exclude_pad_ceil": (
        "avg_pool2d", {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True,
                       "count_include_pad": False}, (2, 3, 8, 7),
        functional("avg_pool2d", 3, 2, 1, ceil_mode=True, count_include_pad=False)),
    "avg_pool2d_include_pad_ceil": (
        "avg_pool2d", {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True}, (2, 3, 8, 7),
        functional("avg_pool2d", 3, 2, 1, ceil_mode=True)),
    "avg_pool2d_ceil_odd": ("avg_pool2d", {"kernel_size": 2, "ceil_mode": True}, (2, 2, 5, 7),
                            functional("avg_pool2d", 2, ceil_mode=True)),
    "max_pool2d_ceil": (
        "max_pool2d", {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True}, (2, 3, 8, 7),
        functional("max_pool2d", 3, 2, 1, ceil_mode=True)),
    "max_pool2d_ceil_odd": ("max_pool2d", {"kernel_size": 2, "ceil_mode": True}, (2, 2, 5, 7),
                            functional("max_pool2d", 2, ceil_mode=True)),
}


@pytest.mark.parametrize("case", sorted(TORCH_CASES))
def test_matches_pytorch(case):
    torch = pytest.importorskip("torch")
    kind, config, shape, reference = TORCH_CASES[case]
    gen = np.random.default_rng(3)
    g = ge.Graph()
    out = g.layer(kind, g.input("x", (None, *shape[1:]), dtype="float64"), name="layer", **config)
    parameters = {name: gen.standard_normal(g.nodes[name].shape) for name in g.parameters()}
    feeds = {"x": gen.standard_normal(shape)}
    weight = gen.standard_normal((shape[0], *out.shape[1:]))
    value, input_grads, grads, _ = graph_result(g, out, feeds, weight, parameters=parameters)
    by_torch_name = {name.split("/")[-1]: array for name, array in parameters.items()}
    expected, expected_grads = torch_result(
        lambda **t: reference(torch.nn.functional, **t), {**feeds, **by_torch_name}, weight)
    np.testing.assert_allclose(value, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(input_grads["x"], expected_grads["x"], rtol=1e-10, atol=1e-12)
    for name in parameters:
        np.testing.assert_allclose(grads[name], expected_grads[name.split("/")[-1]], rtol=1e-10,
                                   atol=1e-12, err_msg=name)


# --------------------------------------------------------------------------- properties

def run(op, *inputs):
    op.infer(*(TensorSpec(a.shape, str(a.dtype)) for a in inputs))
    return op.forward(make_context(), np, *inputs)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_conv_transpose2d_is_the_adjoint_of_conv2d(data):
    """<conv2d(y, W), x> == <y, conv_transpose2d(x, W)> for every geometry: the two share one
    kernel layout, stride and padding, and output_padding only adds unreached pixels."""
    draw = data.draw
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    pads = tuple((draw(st.integers(0, k - 1)), draw(st.integers(0, k - 1))) for k in kernel)
    extra = tuple(draw(st.integers(0, s - 1)) for s in stride)
    x_shape = (2, draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    filters = draw(st.integers(1, 3))
    gen = np.random.default_rng(draw(st.integers(0, 2**16)))
    x, w = gen.standard_normal(x_shape), gen.standard_normal((x_shape[1], filters, *kernel))
    up = ConvTranspose2D(stride, pads, extra)
    y_shape = (2, filters, *((n - 1) * s - sum(p) + k + e
                             for n, s, p, k, e in zip(x_shape[2:], stride, pads, kernel, extra)))
    if min(y_shape[2:]) < 1:
        with pytest.raises(ge.ShapeError, match="to nothing"):
            up.infer(TensorSpec(x.shape, "float64"), TensorSpec(w.shape, "float64"))
        return
    spread = run(up, x, w)
    assert spread.shape == y_shape
    y = gen.standard_normal(y_shape)
    np.testing.assert_allclose(np.sum(run(Conv2D(stride, pads), y, w) * x), np.sum(y * spread), rtol=1e-10)


@settings(max_examples=40, deadline=None)
@given(size=st.tuples(st.integers(1, 9), st.integers(1, 9)), kernel=st.integers(1, 4),
       stride=st.integers(1, 3), pad=st.integers(0, 2), ceil_mode=st.booleans())
def test_averages_over_real_pixels_only_return_a_constant_image(size, kernel, stride, pad, ceil_mode):
    """count_include_pad=False divides by the pixels each window holds, ceil_mode's partial
    windows included: a constant image stays that constant, and so does its max pool."""
    if pad >= kernel or min(size) + 2 * pad < kernel:
        return
    x = np.full((1, 2, *size), 2.5)
    for op in (AvgPool2D(kernel, stride, pad, ceil_mode, count_include_pad=False),
               MaxPool2D(kernel, stride, pad, ceil_mode)):
        np.testing.assert_allclose(run(op, x), 2.5, rtol=1e-12)


def pairs(lo: int, hi: int) -> st.SearchStrategy:
    return st.tuples(st.integers(lo, hi), st.integers(lo, hi))


@settings(max_examples=60, deadline=None)
@given(size=pairs(1, 9), kernel=pairs(1, 4), stride=pairs(1, 3), pad=pairs(0, 2), ceil_mode=st.booleans(),
       count_include_pad=st.booleans())
def test_pools_match_pytorch_on_any_geometry(size, kernel, stride, pad, ceil_mode, count_include_pad):
    torch = pytest.importorskip("torch")
    if any(p > k // 2 or n + 2 * p < k for n, k, p in zip(size, kernel, pad)):
        return  # PyTorch refuses these
    x = np.random.default_rng(sum(size)).standard_normal((1, 2, *size))
    F = torch.nn.functional
    avg = AvgPool2D(kernel, stride, pad, ceil_mode, count_include_pad)
    np.testing.assert_allclose(run(avg, x), F.avg_pool2d(torch.tensor(x), kernel, stride, pad, ceil_mode,
                                                         count_include_pad).numpy(), rtol=1e-12, atol=1e-12)
    expected = F.max_pool2d(torch.tensor(x), kernel, stride, pad, ceil_mode=ceil_mode).numpy()
    np.testing.assert_array_equal(run(MaxPool2D(kernel, stride, pad, ceil_mode), x), expected)


@pytest.mark.parametrize("op,reduce", [(MaxPool2D, np.max), (AvgPool2D, np.mean)])
@pytest.mark.parametrize("memory", ["channels-last, one image", "(C, H, W, N), one channel"])
def test_a_contiguous_first_slab_is_pooled_right_and_the_input_left_untouched(op, reduce, memory):
    """Where the first tap's slab of the input is contiguous, the pass must copy it, not add
    into the input."""
    if memory.startswith("channels-last"):
        x = np.ascontiguousarray(r(1, 4, 5, 3).transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    else:
        x = r(1, 5, 3, 4).transpose(3, 0, 1, 2)  # (N, C, H, W) view of a contiguous (C, H, W, N)
    before = x.copy()
    pool = prepared(lambda: op(3, 1), [x])()
    expected = naive_pool(x, (3, 3), (1, 1), ((0, 0), (0, 0)), reduce, 0.0)
    np.testing.assert_allclose(pool.forward(make_context(), np, x), expected, atol=1e-12)
    np.testing.assert_array_equal(x, before)


BLOCK_CASES = {
    "dilation_groups": (lambda: Conv2D(2, 1, dilation=2, groups=2), [r(5, 4, 7, 6), r(6, 2, 3, 3), r(6)]),
    "one_channel_same": (lambda: Conv2D(1, "same"), [r(5, 1, 6, 5), r(3, 1, 3, 3), r(3)]),
    "stride2_asymmetric_no_bias": (lambda: Conv2D(2, ((2, 0), (1, 2))), [r(3, 2, 9, 6), r(4, 2, 3, 2)]),
    "depthwise_stride_1x2": (lambda: Conv2D((1, 2), 1, groups=3), [r(2, 3, 7, 8), r(6, 1, 3, 3), r(6)]),
    "transpose_stride2": (lambda: ConvTranspose2D(2, 1, 1), [r(5, 3, 4, 3), r(3, 2, 3, 3), r(2)]),
    "transpose_asymmetric": (lambda: ConvTranspose2D((2, 3), ((0, 1), (2, 0)), (1, 2)),
                             [r(2, 2, 5, 4), r(2, 3, 3, 4), r(3)]),
}


@pytest.mark.parametrize("budget", [1, 1000, 2000, 5000, 9000])
@pytest.mark.parametrize("case", sorted(BLOCK_CASES))
def test_blocks_give_the_same_result(case, budget, monkeypatch):
    """The im2col matrix (and in conv2d's backward its gradient) is built a block at a time:
    any block size, from one output pixel per block through parts of rows to uneven blocks of
    rows, gives the result of one block for all, values and all gradients."""
    factory, inputs = BLOCK_CASES[case]

    def outputs():
        op = prepared(factory, inputs)()
        ctx = make_context()
        y = op.forward(ctx, np, *inputs)
        return [y, *op.backward(ctx, np, (inputs[0],), None, np.cos(np.arange(y.size)).reshape(y.shape))]

    whole = outputs()
    monkeypatch.setattr(conv, "COLUMN_BLOCK_BYTES", budget)
    for got, want in zip(outputs(), whole, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("out_h,out_w,n,rows,budget", [
    (14, 14, 64, 145, 1 << 20), (14, 14, 64, 145, 1), (7, 3, 2, 3, 10 ** 9), (5, 3, 2, 4, 2 * 3 * 4 * 2 * 8),
    (9, 3, 2, 2, 3 * 3 * 2 * 2 * 8 + 7), (4, 10, 5, 5, 3 * 5 * 5 * 8), (3, 7, 5, 5, 2 * 5 * 5 * 8 + 1)])
def test_blocks_are_the_fewest_within_the_budget_even_and_contiguous(out_h, out_w, n, rows, budget,
                                                                     monkeypatch):
    monkeypatch.setattr(conv, "COLUMN_BLOCK_BYTES", budget)
    correlation = conv.Correlation(conv.Window.resolve((3, 3), (1, 1), 1, (out_h, out_w)), 4, 4)
    blocks = correlation.blocks(n, rows, 8)
    per_pixel = rows * n * 8  # the columns of one output pixel of the batch
    sizes = [len(r) * len(c) for r, c in blocks]
    assert max(sizes) * per_pixel <= max(budget, per_pixel)
    whole_rows = all(c == range(out_w) for _, c in blocks)
    assert whole_rows or all(len(r) == 1 for r, _ in blocks)
    lengths = [len(r) for r, _ in blocks] if whole_rows else [len(c) for _, c in blocks]
    assert max(lengths) - min(lengths) <= 1
    fitting = max(1, budget // per_pixel)
    assert len(blocks) == (-(-out_h // (fitting // out_w)) if fitting >= out_w
                           else out_h * -(-out_w // fitting))
    # In order, each block one range of the output matrix's columns, together all of them.
    wheres = [correlation.where(block, n) for block in blocks]
    assert [i for w in wheres for i in range(w.start, w.stop)] == list(range(out_h * out_w * n))


@pytest.mark.parametrize("factory,weights", [(lambda: Conv2D(1, 1), [r(4, 3, 3, 3), r(4)]),
                                             (lambda: ConvTranspose2D(2, 1), [r(3, 2, 3, 3), r(2)])])
def test_an_empty_batch_gives_empty_outputs_and_zero_parameter_gradients(factory, weights):
    inputs = [np.zeros((0, 3, 5, 5)), *weights]
    op = prepared(factory, inputs)()
    ctx = make_context()
    y = op.forward(ctx, np, *inputs)
    grads = op.backward(ctx, np, (inputs[0],), None, np.zeros_like(y))
    assert y.shape[0] == 0 and grads[0].shape == inputs[0].shape
    for grad, weight in zip(grads[1:], weights, strict=True):
        np.testing.assert_array_equal(grad, np.zeros_like(weight))


def test_the_conv_stack_passes_batch_innermost_arrays_without_copies():
    """conv2d, the pools and their gradients give (C, H, W, N) arrays in memory (NCHW views of
    them), so that a conv stack never converts layouts between its operators."""
    x = r(3, 2, 8, 8)

    def internal(a):
        return a.transpose(1, 2, 3, 0)

    for factory, inputs in [(lambda: Conv2D(1, 1), [x, r(4, 2, 3, 3), r(4)]),
                            (lambda: MaxPool2D(2), [x]), (lambda: AvgPool2D(3, 2, 1), [x]),
                            (lambda: ConvTranspose2D(2, 1), [x, r(2, 3, 3, 3), r(3)])]:
        op = prepared(factory, inputs)()
        ctx = make_context()
        y = op.forward(ctx, np, *inputs)
        grad_x = op.backward(ctx, np, (x,), None, internal(np.ones_like(y)).copy().transpose(3, 0, 1, 2))[0]
        assert internal(y).flags.c_contiguous
        # Contiguous, or (conv2d's) a view that trims the padding off a contiguous array.
        assert internal(grad_x).strides[2:] == (x.shape[0] * x.itemsize, x.itemsize)


def test_a_convolution_keeps_its_input_not_its_im2col_matrix():
    x, w, b = r(8, 16, 14, 14), r(32, 16, 3, 3), r(32)
    op = prepared(lambda: Conv2D(1, 1), [x, w, b])()
    ctx = make_context()
    op.forward(ctx, np, x, w, b)
    assert op.retain_inputs == (0,)
    kept = [v for v in vars(ctx).values() if isinstance(v, np.ndarray)]
    assert sum(a.nbytes for a in kept) <= w.nbytes + b.nbytes  # the kernel matrix, no columns


@pytest.mark.parametrize("op", [Conv2D(1, 1, dilation=2, groups=2), ConvTranspose2D(2, 1, 1),
                                GlobalAvgPool2D(), AvgPool2D(3, 2, 1, True, False), MaxPool2D(3, 2, 1, True)])
def test_float32_stays_float32(op):
    x = r(2, 4, 6, 6).astype(np.float32)
    params = {Conv2D: [r(4, 2, 3, 3), r(4)], ConvTranspose2D: [r(4, 3, 3, 3), r(3)]}.get(type(op), [])
    inputs = [x, *(p.astype(np.float32) for p in params)]
    op.infer(*(TensorSpec(a.shape, "float32") for a in inputs))
    ctx = make_context()
    y = op.forward(ctx, np, *inputs)
    grads = op.backward(ctx, np, (x,), None, np.ones_like(y))
    assert y.dtype == np.float32 and all(g.dtype == np.float32 for g in grads)


# --------------------------------------------------------------------------- networks

def test_an_encoder_decoder_with_every_block_trains():
    """conv1d features, a grouped dilated conv, pooling with ceil_mode, upsampling back with
    conv_transpose2d, and a global average for the class: the loss falls."""
    gen = np.random.default_rng(0)
    g = ge.Graph()
    x = g.input("x", (None, 2, 7, 7))
    y = g.input("y", (None,), dtype="int64")
    h = g.activation("relu", g.layer("conv2d", x, filters=4, kernel_size=3, padding="same", dilation=2,
                                     groups=2))
    h = g.layer("max_pool2d", h, kernel_size=2, ceil_mode=True)  # 7x7 -> 4x4
    h = g.layer("avg_pool2d", h, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    h = g.activation("relu", g.layer("conv_transpose2d", h, filters=3, kernel_size=3, stride=2, padding=1))
    line = g.layer("conv1d", g.layer("flatten", h).reshape(None, 3, 49), filters=3, kernel_size=5)
    logits = g.layer("global_avg_pool2d", line.reshape(None, 3, 5, 9))
    model = g.compile(g.loss("softmax_cross_entropy", logits, y), optimizer=ge.optimizer("adam", lr=0.02))
    feeds = {"x": gen.standard_normal((24, 2, 7, 7)).astype(np.float32), "y": gen.integers(0, 3, 24)}
    feeds["x"][np.arange(24), feeds["y"] % 2] += feeds["y"][:, None, None]  # learnable from the image
    first = model.forward(feeds)
    model.fit(feeds, epochs=30, batch_size=24, verbose=0)
    assert model.forward(feeds) < 0.5 * first


def test_saved_blocks_predict_the_same(tmp_path):
    g = ge.Graph()
    x = g.input("x", (None, 4, 7, 6))
    h = g.layer("conv2d", x, filters=4, kernel_size=(3, 2), padding=((2, 1), (0, 1)), dilation=(2, 1),
                groups=2)
    h = g.layer("max_pool2d", h, kernel_size=2, ceil_mode=True)
    h = g.layer("avg_pool2d", h, kernel_size=2, stride=1, padding=1, ceil_mode=True, count_include_pad=False)
    up = g.layer("conv_transpose2d", h, filters=2, kernel_size=(3, 2), stride=(2, 3),
                 padding=((1, 0), (0, 1)), output_padding=(1, 2))
    line = g.layer("conv1d", g.input("s", (None, 3, 9)), filters=2, kernel_size=3, padding=(2, 0), groups=1)
    model = g.compile(outputs=[up, g.layer("global_avg_pool2d", up), line])
    feeds = {"x": r(2, 4, 7, 6).astype(np.float32), "s": r(2, 3, 9).astype(np.float32)}
    model.save(tmp_path / "blocks.ge")
    loaded, expected = ge.load(tmp_path / "blocks.ge").predict(feeds), model.predict(feeds)
    for name, value in expected.items():
        np.testing.assert_array_equal(loaded[name], value)


# --------------------------------------------------------------------------- build-time errors

@pytest.mark.parametrize("kind,shape,config,error,message", [
    ("conv2d", (None, 6, 8, 8), {"filters": 4, "kernel_size": 3, "groups": 4}, ge.ShapeError,
     r"groups=4 must divide both the input's 6 channels of x \(None, 6, 8, 8\) and the 4 filters"),
    ("conv2d", (None, 4, 8, 8), {"filters": 6, "kernel_size": 3, "groups": 4}, ge.ShapeError,
     "groups=4 must divide both the input's 4 channels of x .* and the 6 filters"),
    ("conv2d", (None, 2, 4, 4), {"filters": 2, "kernel_size": 3, "dilation": 2}, ge.ShapeError,
     r"node 'layer/conv2d'.*3x3 window \(dilated to 5x5\) does not fit the input 4x4 padded to 4x4"),
    ("conv2d", (None, 2, 4, 4), {"filters": 2, "kernel_size": 3, "dilation": 0}, ge.GraphBuildError,
     "dilation must be a positive int"),
    ("conv1d", (None, 2, 4, 4), {"filters": 2, "kernel_size": 3}, ge.ShapeError,
     r"conv1d takes \(batch, channels, length\).*x \(None, 2, 4, 4\)"),
    ("conv1d", (None, 2, 4), {"filters": 2, "kernel_size": 5}, ge.ShapeError,
     r"node 'layer/conv2d'.*1x5 window does not fit the input 1x4"),
    ("conv1d", (None, 2, 4), {"filters": 2, "kernel_size": 3, "padding": "full"}, ge.GraphBuildError,
     "conv1d padding must be"),
    ("conv_transpose2d", (None, 2, 4, 4), {"filters": 2, "kernel_size": 3, "stride": 2, "output_padding": 2},
     ge.GraphBuildError, r"output_padding \(2, 2\) must be smaller than the stride \(2, 2\)"),
    ("conv_transpose2d", (None, 2, 1, 1), {"filters": 2, "kernel_size": 2, "padding": 1}, ge.ShapeError,
     r"node 'layer/conv_transpose2d'.*padding \(\(1, 1\), \(1, 1\)\) trims the 1x1 input.*to nothing"),
    ("conv_transpose2d", (None, 2, 4, 4), {"filters": 2, "kernel_size": 3, "padding": "same"},
     ge.GraphBuildError, "conv_transpose2d padding must be 'valid'"),
    ("global_avg_pool2d", (None, 2, 4), {}, ge.ShapeError,
     r"global_avg_pool2d takes NCHW input.*\(None, 2, 4\)"),
    ("avg_pool2d", (None, 2, 4, 4), {"kernel_size": 2, "count_include_pad": 0}, ge.GraphBuildError,
     "count_include_pad must be True or False"),
    ("max_pool2d", (None, 2, 4, 4), {"kernel_size": 2, "ceil_mode": "yes"}, ge.GraphBuildError,
     "ceil_mode must be True or False"),
    ("max_pool2d", (None, 2, 4, 4), {"kernel_size": 2, "padding": 2, "ceil_mode": True}, ge.ShapeError,
     "must be smaller than the 2x2 window"),
])
def test_bad_configurations_are_refused_at_build_time(kind, shape, config, error, message):
    g = ge.Graph()
    x = g.input("x", shape)
    with pytest.raises(error, match=message):
        g.layer(kind, x, name="layer", **config)
    assert not any(name.startswith("layer") for name in g.nodes)  # the failed call left nothing
