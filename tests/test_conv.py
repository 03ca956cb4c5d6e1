"""conv2d, pooling, embedding and one_hot: gradients on every backend, forward values against
plain loop implementations, build-time shape errors, and small networks end to end."""

from __future__ import annotations

import numpy as np
import pytest
from graphengine.plugins.conv import AvgPool2D, Conv2D, EmbeddingLookup, MaxPool2D, OneHot

import graphengine as ge
from graphengine.ir.operators import TensorSpec
from graphengine.testing import check_backward, isolated_plugin_manager, make_context

rng = np.random.default_rng(7)


def r(*shape):
    return rng.standard_normal(shape)


def prepared(factory, inputs):
    """A factory that runs ``infer`` first, as the graph does when the node is added."""
    def make():
        op = factory()
        op.infer(*[TensorSpec(a.shape, "float64" if a.dtype.kind == "f" else str(a.dtype))
                   for a in inputs])
        return op
    return make


GRADIENT_CASES = {
    "conv_3x3_pad1": (lambda: Conv2D(1, 1), [r(2, 3, 5, 5), r(4, 3, 3, 3), r(4)]),
    "conv_stride2_odd": (lambda: Conv2D(2, 0), [r(2, 2, 7, 5), r(3, 2, 3, 3), r(3)]),
    "conv_stride2_same": (lambda: Conv2D(2, "same"), [r(2, 3, 7, 6), r(4, 3, 3, 3), r(4)]),
    "conv_no_bias_2x3": (lambda: Conv2D(1, "valid"), [r(2, 2, 5, 6), r(3, 2, 2, 3)]),
    "conv_1x1": (lambda: Conv2D(1, 0), [r(2, 3, 4, 4), r(5, 3, 1, 1), r(5)]),
    "conv_asymmetric": (lambda: Conv2D((2, 1), ((0, 2), (1, 0))), [r(1, 2, 6, 5), r(3, 2, 3, 2), r(3)]),
    "conv_uncovered_edge": (lambda: Conv2D(3, 0), [r(2, 1, 8, 8), r(2, 1, 3, 3), r(2)]),
    "conv_one_channel_no_bias": (lambda: Conv2D(1, "same"), [r(2, 1, 6, 5), r(3, 1, 3, 3)]),
    "max_pool_2": (lambda: MaxPool2D(2), [r(2, 3, 6, 6)]),
    "max_pool_odd_input": (lambda: MaxPool2D(2), [r(2, 3, 7, 5)]),
    "max_pool_3_stride2_pad1": (lambda: MaxPool2D(3, 2, 1), [r(2, 3, 7, 5)]),
    "max_pool_overlapping": (lambda: MaxPool2D(3, 1, "same"), [r(2, 2, 5, 4)]),
    "max_pool_2x3": (lambda: MaxPool2D((2, 3), (1, 2)), [r(2, 3, 5, 7)]),
    "avg_pool_2": (lambda: AvgPool2D(2), [r(2, 3, 6, 6)]),
    "avg_pool_3_stride2_pad1": (lambda: AvgPool2D(3, 2, 1), [r(2, 3, 7, 5)]),
    "avg_pool_overlapping": (lambda: AvgPool2D((3, 2), 1), [r(2, 2, 5, 4)]),
    "embedding_repeated_ids": (lambda: EmbeddingLookup(), [np.array([[1, 2, 1], [0, 1, 4]]), r(5, 3)]),
    "embedding_1d": (lambda: EmbeddingLookup(), [np.array([3, 3, 3, 0]), r(4, 2)]),
}


@pytest.mark.parametrize("case", sorted(GRADIENT_CASES))
def test_gradient(case, backend):
    factory, inputs = GRADIENT_CASES[case]
    check_backward(prepared(factory, inputs), inputs, backend=backend)


# --------------------------------------------------------------------------- forward values

def naive_conv(x, w, b, stride, pads):
    (top, bottom), (left, right) = pads
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    n, _, height, width = x.shape
    filters, _, kh, kw = w.shape
    oh, ow = (height - kh) // stride[0] + 1, (width - kw) // stride[1] + 1
    out = np.zeros((n, filters, oh, ow))
    for i in range(oh):
        for j in range(ow):
            patch = x[:, :, i * stride[0]:i * stride[0] + kh, j * stride[1]:j * stride[1] + kw]
            out[:, :, i, j] = np.einsum("nchw,fchw->nf", patch, w) + b
    return out


def naive_pool(x, kernel, stride, pads, reduce, fill):
    (top, bottom), (left, right) = pads
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=fill)
    oh = (x.shape[2] - kernel[0]) // stride[0] + 1
    ow = (x.shape[3] - kernel[1]) // stride[1] + 1
    out = np.zeros(x.shape[:2] + (oh, ow))
    for i in range(oh):
        for j in range(ow):
            window = x[:, :, i * stride[0]:i * stride[0] + kernel[0], j * stride[1]:j * stride[1] + kernel[1]]
            out[:, :, i, j] = reduce(window, axis=(2, 3))
    return out


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("stride,padding,size", [(1, 1, (6, 6)), (2, "same", (7, 5)), (2, 0, (8, 7)),
                                                 ((1, 2), ((2, 0), (0, 1)), (5, 6))])
def test_conv_forward_matches_loops(stride, padding, size, channels):
    x, w, b = r(2, channels, *size), r(4, channels, 3, 2), r(4)
    op = prepared(lambda: Conv2D(stride, padding), [x, w, b])()
    expected = naive_conv(x, w, b, op.window.stride, op.window.pads)
    np.testing.assert_allclose(op.forward(make_context(), np, x, w, b), expected, atol=1e-12)


@pytest.mark.parametrize("op,reduce,fill", [(MaxPool2D, np.max, -np.inf), (AvgPool2D, np.mean, 0.0)])
@pytest.mark.parametrize("kernel,stride,padding", [(2, None, 0), (3, 2, 1), ((2, 3), 1, 0), (3, 1, "same")])
def test_pool_forward_matches_loops(op, reduce, fill, kernel, stride, padding):
    x = r(2, 3, 7, 6)
    pool = prepared(lambda: op(kernel, stride, padding), [x])()
    expected = naive_pool(x, pool.kernel, pool.stride, pool.window.pads, reduce, fill)
    np.testing.assert_allclose(pool.forward(make_context(), np, x), expected, atol=1e-12)


def test_max_pool_sends_each_gradient_to_one_maximum_on_ties():
    x = np.zeros((1, 1, 4, 4))  # every window is a tie, as after a ReLU
    pool = prepared(lambda: MaxPool2D(2), [x])()
    described = dict(vars(pool))
    ctx = make_context()
    pool.forward(ctx, np, x)
    assert vars(pool) == described  # the winners stay on the call's context
    (grad,) = pool.backward(ctx, np, (None,), None, np.ones((1, 1, 2, 2)))
    assert grad.sum() == 4 and grad.max() == 1  # not four times the gradient per window


@pytest.mark.parametrize("stride,size,expected", [(1, 7, 7), (2, 7, 4), (2, 8, 4), (3, 7, 3)])
def test_same_padding_output_size(stride, size, expected):
    g = ge.Graph()
    x = g.input("x", (None, 2, size, size))
    assert g.layer("conv2d", x, filters=3, kernel_size=3, stride=stride, padding="same").shape == (
        None, 3, expected, expected)


def test_float32_stays_float32():
    x = r(2, 3, 6, 6).astype(np.float32)
    w, b = r(4, 3, 3, 3).astype(np.float32), r(4).astype(np.float32)
    spec = [TensorSpec(a.shape, "float32") for a in (x, w, b)]
    conv = Conv2D(1, 1)
    conv.infer(*spec)
    conv_ctx = make_context()  # one context per call, as a run gives each step its own
    y = conv.forward(conv_ctx, np, x, w, b)
    for pool in (MaxPool2D(2, padding=1), AvgPool2D(2, padding=1)):
        pool.infer(TensorSpec(y.shape, "float32"))
        ctx = make_context()
        out = pool.forward(ctx, np, y)
        assert out.dtype == np.float32
        assert pool.backward(ctx, np, (None,), None, np.ones_like(out))[0].dtype == np.float32
    assert y.dtype == np.float32
    grads = conv.backward(conv_ctx, np, (x, None, None), None, np.ones_like(y))  # keeps its input
    assert all(g.dtype == np.float32 for g in grads)


# --------------------------------------------------------------------------- embedding and one_hot

def test_embedding_backward_adds_up_repeated_ids(backend):
    be = ge.get_backend(backend)
    ids = np.array([[1, 1, 3], [1, 0, 3]])
    table = r(5, 2)
    op = EmbeddingLookup()
    ctx = make_context()
    out = op.forward(ctx, be.xp, be.asarray(ids), be.asarray(table))
    np.testing.assert_array_equal(be.to_numpy(out), table[ids])
    grad = np.arange(12, dtype=float).reshape(2, 3, 2)
    _, grad_table = op.backward(ctx, be.xp, (be.asarray(ids), None), None, be.asarray(grad))
    expected = np.zeros((5, 2))
    expected[1] = grad[0, 0] + grad[0, 1] + grad[1, 0]  # id 1 three times
    expected[3] = grad[0, 2] + grad[1, 2]
    expected[0] = grad[1, 1]
    np.testing.assert_array_equal(be.to_numpy(grad_table), expected)  # rows 2 and 4 stay zero


def test_one_hot_values_and_no_gradient(backend):
    be = ge.get_backend(backend)
    op = OneHot(4, "float64")
    ctx = make_context()
    out = be.to_numpy(op.forward(ctx, be.xp, be.asarray(np.array([[0, 3], [2, 2]]))))
    np.testing.assert_array_equal(out, np.eye(4)[[[0, 3], [2, 2]]])
    assert op.backward(ctx, be.xp, (None,), None, None) == (None,)


@pytest.mark.parametrize("layer,config", [("embedding", {"vocab_size": 4, "dim": 2}),
                                          ("one_hot", {"depth": 4})])
def test_ids_out_of_range_are_an_error(layer, config):
    g = ge.Graph()
    ids = g.input("ids", (None, 3), dtype="int64")
    model = g.compile(outputs=[g.layer(layer, ids, **config)])
    with pytest.raises(ge.DataError, match=r"\[0, 4\).*from 0 to 4"):
        model.run({"ids": np.array([[0, 1, 4]])})


def test_embedding_trains_to_separate_ids():
    g = ge.Graph()
    ids = g.input("ids", (None, 2), dtype="int64")
    y = g.input("y", (None,), dtype="int64")
    vectors = g.layer("embedding", ids, vocab_size=6, dim=4)  # (batch, 2, 4)
    logits = g.layer("dense", g.layer("flatten", vectors), units=2)
    model = g.compile(g.loss("softmax_cross_entropy", logits, y), optimizer=ge.optimizer("sgd", lr=0.5))
    pairs = np.array([[a, b] for a in range(6) for b in range(6)])
    labels = (pairs[:, 0] < pairs[:, 1]).astype(np.int64)  # order matters: no bag of words
    model.fit({"ids": pairs, "y": labels}, epochs=150, batch_size=36)
    assert model.evaluate({"ids": pairs, "y": labels})["accuracy"] >= 0.95


# --------------------------------------------------------------------------- build-time errors

@pytest.mark.parametrize("shape,config,message", [
    ((None, 8, 8), {"filters": 2, "kernel_size": 3}, "NCHW"),
    ((None, 1, 4, 4), {"filters": 2, "kernel_size": 5}, "window does not fit the input 4x4"),
    ((None, 1, 4, 4), {"filters": 2, "kernel_size": 3, "padding": "full"}, "padding must be"),
    ((None, 1, 4, 4), {"filters": 2, "kernel_size": 3, "stride": 0}, "stride must be a positive int"),
    ((None, 1, 4, 4), {"filters": 0, "kernel_size": 3}, "filters must be a positive int"),
])
def test_conv_shape_errors_at_build_time(shape, config, message):
    g = ge.Graph()
    x = g.input("x", shape)
    with pytest.raises(ge.GraphBuildError, match=message):
        g.layer("conv2d", x, **config)


class MismatchedKernel(ge.Layer):
    """A kernel made for 3 channels, applied to whatever comes."""

    def build(self, g, x):
        return g.apply(Conv2D(), x, g.parameter("W", (2, 3, 3, 3)))


class MismatchPlugin:
    @ge.hookimpl
    def graphengine_register_layers(self, register):
        register("mismatched_conv", MismatchedKernel)


def test_conv_error_names_the_node_and_shapes():
    with isolated_plugin_manager(MismatchPlugin(), entry_points=True):
        g = ge.Graph()
        x = g.input("x", (None, 1, 5, 5))
        with pytest.raises(ge.ShapeError, match=r"node 'bad/conv2d'.*1 channels, the kernel "
                                                r"expects 3.*x \(None, 1, 5, 5\)"):
            g.layer("mismatched_conv", x, name="bad")
        assert "bad/W" not in g  # the failed call left the graph as it was


@pytest.mark.parametrize("layer,config,message", [
    ("max_pool2d", {"kernel_size": 2, "padding": 2}, "must be smaller than the 2x2 window"),
    ("avg_pool2d", {"kernel_size": 7}, "window does not fit"),
])
def test_pool_shape_errors(layer, config, message):
    g = ge.Graph()
    x = g.input("x", (None, 1, 4, 4))
    with pytest.raises(ge.ShapeError, match=message):
        g.layer(layer, x, **config)


def test_embedding_refuses_float_ids():
    g = ge.Graph()
    x = g.input("x", (None, 3))
    with pytest.raises(ge.ShapeError, match="integer ids, got float32"):
        g.layer("embedding", x, vocab_size=5, dim=2)


# --------------------------------------------------------------------------- networks

def small_cnn(backend="numpy", optimizer=None, dtype="float32"):
    """conv-relu-maxpool-conv(stride 2)-relu-avgpool, then a conv spanning the whole 2x2 map as
    the classifier, so the network runs in any float dtype."""
    g = ge.Graph("cnn")
    x = g.input("x", (None, 1, 8, 8), dtype=dtype)
    y = g.input("y", (None,), dtype="int64")
    h = g.activation("relu", g.layer("conv2d", x, filters=4, kernel_size=3, padding="same"))
    h = g.layer("max_pool2d", h, kernel_size=2)
    h = g.activation("relu", g.layer("conv2d", h, filters=6, kernel_size=3, stride=2, padding=1))
    h = g.layer("avg_pool2d", h, kernel_size=2, stride=1, padding=1)
    logits = g.layer("flatten", g.layer("conv2d", h, filters=3, kernel_size=3))
    return g.compile(g.loss("softmax_cross_entropy", logits, y), optimizer=optimizer, backend=backend)


def stripes(n, seed=0):
    """8x8 images with a horizontal, vertical or diagonal bright line: class 0, 1, 2."""
    gen = np.random.default_rng(seed)
    x = gen.normal(0, 0.3, (n, 1, 8, 8)).astype(np.float32)
    y = gen.integers(0, 3, n)
    pos = gen.integers(1, 7, n)
    for k in range(n):
        if y[k] == 0:
            x[k, 0, pos[k]] += 1.5
        elif y[k] == 1:
            x[k, 0, :, pos[k]] += 1.5
        else:
            x[k, 0][np.eye(8, dtype=bool)] += 1.5
    return x, y


def test_small_cnn_learns_stripes(backend):
    model = small_cnn(backend, ge.optimizer("adam", lr=0.02))
    x, y = stripes(120)
    model.fit({"x": x, "y": y}, epochs=15, batch_size=30)
    x_test, y_test = stripes(60, seed=1)
    assert model.evaluate({"x": x_test, "y": y_test})["accuracy"] >= 0.9


def test_input_gradient_of_a_cnn_matches_finite_differences():
    model = small_cnn(dtype="float64")
    x, y = stripes(4)
    x = x.astype(np.float64)
    model.forward({"x": x, "y": y})
    model.backward(wrt=["x"])
    grad = model.input_gradient("x")
    assert grad.shape == x.shape
    direction = np.random.default_rng(0).standard_normal(x.shape)
    eps = 1e-6
    numeric = (model.forward({"x": x + eps * direction, "y": y})
               - model.forward({"x": x - eps * direction, "y": y})) / (2 * eps)
    np.testing.assert_allclose(float((grad * direction).sum()), numeric, rtol=1e-6)


def test_saved_cnn_predicts_the_same(tmp_path):
    g = ge.Graph()
    x = g.input("x", (None, 2, 7, 6))
    h = g.layer("conv2d", x, filters=3, kernel_size=(3, 2), stride=(2, 1), padding=((1, 0), (0, 1)))
    h = g.layer("max_pool2d", g.activation("relu", h), kernel_size=2, stride=1, padding="same")
    ids = g.input("ids", (None, 4), dtype="int64")
    words = g.layer("embedding", ids, vocab_size=5, dim=3)
    model = g.compile(outputs=[g.layer("avg_pool2d", h, kernel_size=2), words,
                               g.layer("one_hot", ids, depth=5)])
    feeds = {"x": r(2, 2, 7, 6).astype(np.float32), "ids": np.array([[0, 4, 4, 1], [2, 3, 0, 0]])}
    model.save(tmp_path / "cnn.ge")
    loaded, expected = ge.load(tmp_path / "cnn.ge").predict(feeds), model.predict(feeds)
    for name, value in expected.items():
        np.testing.assert_array_equal(loaded[name], value)
