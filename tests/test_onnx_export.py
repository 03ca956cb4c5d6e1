"""ONNX export: every exportable kind, trained, predicts in onnxruntime what it predicts here
(float32, within 1e-5 relative), at any batch size; kinds without a mapping fail naming
themselves, and a plugin's own mapping (the hook) makes them exportable; the command line."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import graphengine as ge
from graphengine.testing import isolated_plugin_manager

onnx = pytest.importorskip("onnx", reason="ONNX export needs pip install onnx onnxruntime")
ort = pytest.importorskip("onnxruntime", reason="the round trip runs in onnxruntime")

from graphengine.onnx import export, to_onnx  # noqa: E402

RTOL, ATOL = 1e-5, 1e-6
rng = np.random.default_rng(3)


def data(shape, dtype="float32"):
    return rng.standard_normal(shape).astype(dtype)


def labels(n, classes):
    return rng.integers(0, classes, n).astype("int64")


def onnx_predict(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {name: feeds[name] for name in names})


def assert_round_trip(model, train, tmp_path, batches=(5, 1)):
    """Train briefly, export, and compare predictions with onnxruntime's at several batch sizes
    (the batch dimension is symbolic)."""
    model.fit(train, epochs=2, batch_size=8, verbose=0)
    path = tmp_path / "model.onnx"
    export(model, path)
    for n in batches:
        feeds = {k: v[:n] for k, v in train.items()}
        ours = model.predict(feeds)
        ours = [ours] if not isinstance(ours, dict) else [ours[k] for k in model.output_names]
        theirs = onnx_predict(path, feeds)
        assert len(theirs) == len(ours)
        for a, b in zip(theirs, ours):
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)
    return onnx.load(str(path))


def op_types(proto):
    return {node.op_type for node in proto.graph.node}


# --------------------------------------------------------------------------- models of each kind

def mlp():
    g = ge.Graph("mlp")
    x, y = g.input("x", (None, 6)), g.input("y", (None,), dtype="int64")
    h = g.layer("zscore", x)
    h = g.activation("relu", g.layer("dense", h, units=8, name="fc1"))
    h = g.layer("batch_norm", h)
    h = g.activation("tanh", g.layer("dense", h, units=8))
    h = g.layer("dropout", g.activation("sigmoid", h), rate=0.3)
    h = g.activation("leaky_relu", g.layer("dense", h, units=8), slope=0.2)
    h = g.activation("softplus", g.activation("elu", h, alpha=0.5))
    out = g.layer("dense", g.layer("minmax", h), units=3)
    model = g.compile(g.loss("softmax_cross_entropy", out, y), optimizer="adam")
    return model, {"x": data((24, 6)), "y": labels(24, 3)}, {"Softmax", "BatchNormalization"}


def preprocessing():
    g = ge.Graph("pre")
    x, y = g.input("x", (None, 6)), g.input("y", (None, 2))
    h = g.layer("pca", g.layer("mean_subtraction", x), components=4, whiten=True)
    out = g.activation("sign", g.layer("dense", h, units=2)) * 0.0 + g.layer("dense", h, units=2)
    model = g.compile(g.loss("mse", out, y), optimizer="sgd")
    return model, {"x": data((24, 6)), "y": data((24, 2))}, {"MatMul", "Sign"}


def cnn():
    g = ge.Graph("cnn")
    x, y = g.input("x", (None, 2, 9, 9)), g.input("y", (None,), dtype="int64")
    h = g.layer("conv2d", x, filters=4, kernel_size=3, padding="same", stride=2)
    h = g.activation("relu", g.layer("batch_norm", h, axis=1))
    h = g.layer("max_pool2d", h, kernel_size=2, stride=1, padding=((0, 1), (0, 1)))
    h = g.layer("conv2d", h, filters=3, kernel_size=(2, 3), padding=1, bias=False)
    h = g.layer("avg_pool2d", h, kernel_size=2, padding=1)
    out = g.layer("dense", g.layer("flatten", h), units=3)
    model = g.compile(g.loss("softmax_cross_entropy", out, y), optimizer="adam")
    return model, {"x": data((20, 2, 9, 9)), "y": labels(20, 3)}, {"Conv", "MaxPool", "AveragePool"}


def recurrent(kind, **config):
    def build():
        g = ge.Graph(kind)
        x, y = g.input("x", (None, 5, 3)), g.input("y", (None, 2))
        h = g.layer(kind, x, units=4, return_sequences=True, **config)
        h = g.layer(kind, h, units=3, reverse=True, **config)
        model = g.compile(g.loss("mse", g.layer("dense", h, units=2), y), optimizer="adam")
        return model, {"x": data((16, 5, 3)), "y": data((16, 2))}, {kind.upper()}
    return build


def stacked_lstm():
    g = ge.Graph("stack")
    x, y = g.input("x", (None, 6, 3)), g.input("y", (None, 6, 2))
    h0, c0 = g.input("h0", (None, 4)), g.input("c0", (None, 4))
    h = g.layer("lstm", x, h0, c0, units=4, return_sequences=True)
    h = g.layer("lstm", h, units=5, num_layers=2, return_sequences=True)
    model = g.compile(g.loss("mse", g.layer("dense", h, units=2), y), optimizer="adam")
    train = {"x": data((16, 6, 3)), "y": data((16, 6, 2)), "h0": data((16, 4)), "c0": data((16, 4))}
    return model, train, {"LSTM"}


def bidirectional(merge):
    def build():
        g = ge.Graph("bi")
        x, y = g.input("x", (None, 5, 3)), g.input("y", (None, 2))
        h = g.layer("bidirectional", x, layer="lstm", units=4, merge=merge, return_sequences=True)
        h = g.layer("bidirectional", h, layer="gru", units=3, merge=merge)
        model = g.compile(g.loss("mse", g.layer("dense", h, units=2), y), optimizer="adam")
        return model, {"x": data((16, 5, 3)), "y": data((16, 2))}, {"LSTM", "GRU"}
    return build


def masked(kind):
    """Variable-length sequences: a prefix mask per row becomes ONNX's sequence_lens."""
    def build():
        g = ge.Graph(f"masked_{kind}")
        x, y = g.input("x", (None, 6, 3)), g.input("y", (None, 2))
        mask = g.input("mask", (None, 6), dtype="bool")
        h = g.layer("bidirectional", x, mask, layer=kind, units=4, return_sequences=True)
        h = g.layer(kind, h, mask, units=3)
        model = g.compile(g.loss("mse", g.layer("dense", h, units=2), y), optimizer="adam")
        lengths = rng.integers(1, 7, 16)
        train = {"x": data((16, 6, 3)), "y": data((16, 2)),
                 "mask": np.arange(6)[None, :] < lengths[:, None]}
        return model, train, {kind.upper(), "ReduceSum"}
    return build


def ids():
    g = ge.Graph("ids")
    tokens, y = g.input("tokens", (None, 4), dtype="int64"), g.input("y", (None,), dtype="int64")
    h = g.layer("embedding", tokens, vocab_size=7, dim=5).mean(axis=1)
    h = ge.concat([h, g.layer("one_hot", tokens, depth=7).sum(axis=1)], axis=-1)
    out = g.layer("dense", g.layer("maxout", h, units=4, pieces=3), units=3)
    out = g.layer("prelu", out)
    model = g.compile(g.loss("softmax_cross_entropy", out, y), optimizer="adam")
    train = {"tokens": rng.integers(0, 7, (20, 4)).astype("int64"), "y": labels(20, 3)}
    return model, train, {"Gather", "OneHot", "PRelu", "ReduceMax"}


def primitives():
    g = ge.Graph("prims")
    x, y = g.input("x", (None, 3, 4)), g.input("y", (None, 2))
    w = g.parameter("w", (4, 4))
    h = (x @ w).transpose(0, 2, 1)                      # (N, 4, 3)
    h = ge.exp(h * 0.1) - (h.abs() + 1).sqrt() / (ge.log(h.abs() + 2) + 1) + (-h) ** 2.0
    h = ge.maximum(h, 0.5) + h.mean(axis=1, keepdims=True) - h.sum(axis=(1, 2), keepdims=True)
    h = ge.concat([h[:, 1:3, ::2], h[:, -1:, 1:]], axis=1)   # (N, 3, 2)
    out = h.reshape(None, 6)[:, :2] + h[:, 0]
    model = g.compile(g.loss("mse", out, y), optimizer=ge.optimizer("sgd", lr=1e-3))
    return model, {"x": data((16, 3, 4)), "y": data((16, 2))}, {"Slice", "Squeeze", "Transpose"}


def blocks():
    """The kinds added with the blocks: conv1d, dilated and grouped conv2d, conv_transpose2d,
    ceil-mode pools, global average pooling, layer_norm and the newer activations."""
    g = ge.Graph("blocks")
    x, y = g.input("x", (None, 4, 8)), g.input("y", (None,), dtype="int64")
    h = g.activation("gelu", g.layer("conv1d", x, filters=4, kernel_size=3, padding="same", dilation=2))
    h = g.activation("silu", g.layer("layer_norm", h, axis=(-2, -1)))
    h = h.reshape(None, 4, 2, 4)
    h = g.layer("conv2d", h, filters=6, kernel_size=2, groups=2, dilation=(1, 2), padding=1)
    h = g.activation("mish", g.layer("conv_transpose2d", h, filters=3, kernel_size=3, stride=2,
                                     padding=1, output_padding=1))
    h = g.layer("max_pool2d", g.activation("selu", h), kernel_size=3, stride=2, ceil_mode=True)
    h = g.layer("avg_pool2d", g.activation("softsign", h), kernel_size=2, padding=1,
                count_include_pad=False)
    h = g.activation("relu6", g.activation("hard_sigmoid", h) * 8.0)
    out = g.layer("dense", g.layer("global_avg_pool2d", h), units=3, name="gelu_tanh")
    out = g.activation("gelu", out, approximate="tanh")
    model = g.compile(g.loss("softmax_cross_entropy", out, y), optimizer="adam")
    return model, {"x": data((16, 4, 8)), "y": labels(16, 3)}, {
        "Conv", "ConvTranspose", "LayerNormalization", "Erf", "Tanh", "Clip", "HardSigmoid"}


def attention():
    g = ge.Graph("attention")
    x, y = g.input("x", (None, 5, 6)), g.input("y", (None, 5, 4))
    mask = g.input("mask", (None, 5, 5), dtype="bool")
    h = g.layer("multi_head_attention", x, x, mask, heads=2, units=4, causal=True)
    bias = g.input("bias", (None, 5, 5))
    h = g.layer("attention", h, h, h, bias, scale=0.3)
    model = g.compile(g.loss("mse", h, y), optimizer="adam")
    masks = rng.random((16, 5, 5)) > 0.3
    masks[:, :, 0] = True  # every query may attend to something
    train = {"x": data((16, 5, 6)), "y": data((16, 5, 4)), "mask": masks, "bias": data((16, 5, 5))}
    return model, train, {"Where", "Softmax", "MatMul"}


def new_primitives():
    g = ge.Graph("new_primitives")
    x, y = g.input("x", (None, 3, 4)), g.input("y", (None, 4))
    idx = g.input("idx", (None, 2, 4), dtype="int64")
    x = x @ g.parameter("w", (4, 4))
    h = g.op("clip", x, lo=-1.0, hi=0.8) + g.op("power", ge.exp(x * 0.1), x.abs() * 0.5)
    h = g.op("where", g.op("astype", g.op("astype", x, dtype="int64"), dtype="bool"), h, -h)
    h = g.op("stack", h, x, axis=1).mean(axis=1)                                  # (N, 3, 4)
    h = g.op("softmax", h, axis=1) + g.op("log_softmax", h, axis=0)
    h = g.op("gather", h, idx, axis=1)                                            # (N, 2, 4)
    h = g.op("expand_dims", g.op("max", h, axis=1) - g.op("min", h, axis=1), axis=1)
    h = g.op("squeeze", h, axis=1) * g.op("var", x, axis=1, ddof=1) + g.op("std", x, axis=1)
    model = g.compile(g.loss("mse", h, y), optimizer=ge.optimizer("sgd", lr=1e-3))
    train = {"x": data((16, 3, 4)), "y": data((16, 4)),
             "idx": rng.integers(0, 3, (16, 2, 4)).astype("int64")}
    return model, train, {"Clip", "Pow", "Where", "Cast", "GatherElements", "ReduceMax", "Sqrt"}


MODELS = {"blocks": blocks, "attention": attention, "new_primitives": new_primitives, "mlp": mlp,
          "preprocessing": preprocessing, "cnn": cnn, "rnn": recurrent("rnn"),
          "lstm": recurrent("lstm"), "gru": recurrent("gru"), "stacked_lstm": stacked_lstm,
          "bidirectional_concat": bidirectional("concat"), "bidirectional_sum": bidirectional("sum"),
          "ids": ids, "primitives": primitives, "relu_rnn": recurrent("rnn", activation="relu"),
          "masked_lstm": masked("lstm"), "masked_gru": masked("gru"), "masked_rnn": masked("rnn")}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_trained_model_predicts_in_onnxruntime_what_it_predicts_here(name, tmp_path):
    model, train, expected_ops = MODELS[name]()
    proto = assert_round_trip(model, train, tmp_path)
    assert expected_ops <= op_types(proto)
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param == "N"


def test_export_writes_the_inference_graph_dropout_off_batch_norm_on_running_statistics(tmp_path):
    model, train, _ = mlp()
    proto = assert_round_trip(model, train, tmp_path)
    assert "Dropout" not in op_types(proto)
    assert [o.name for o in proto.graph.output] == [f"{model.output_names[0]}/softmax"]
    assert "y" not in [i.name for i in proto.graph.input]  # the target is not an input


def test_exported_recurrent_weights_are_in_onnx_gate_order(tmp_path):
    """ONNX's LSTM gates are (i, o, f, c), graphengine's (i, f, o, g): a forget-gate bias
    lands in ONNX's third block."""
    g = ge.Graph("gates")
    x = g.input("x", (None, 2, 3))
    out = g.layer("lstm", x, units=2)
    model = g.compile(outputs=[out])
    proto = to_onnx(model)
    bias = next(onnx.numpy_helper.to_array(t) for t in proto.graph.initializer
                if t.name.endswith("/B"))
    ours = np.asarray(model.parameters()["lstm_0/b"])
    np.testing.assert_array_equal(bias[0, :8], np.concatenate([ours[0:2], ours[4:6], ours[2:4], ours[6:8]]))
    assert ours[2:4].tolist() == [1.0, 1.0] and bias[0, 4:6].tolist() == [1.0, 1.0]


# --------------------------------------------------------------------------- plugins' kinds

class Cube(ge.Operator):
    kind = "cube"
    retain_inputs = (0,)

    def infer(self, x):
        return x

    def forward(self, ctx, xp, x):
        return x ** 3

    def backward(self, ctx, xp, inputs, output, grad):
        return (3 * inputs[0] ** 2 * grad,)


class CubeLayer(ge.Layer):
    def build(self, g, x):
        return g.apply(Cube(), x)


class CubePlugin:
    @ge.hookimpl
    def graphengine_register_layers(self, register):
        register("cube", CubeLayer)


class CubeExporter:
    @ge.hookimpl
    def graphengine_register_onnx_exporters(self, register):
        def export_cube(ex, node):
            ex.add("Pow", [ex.input(node, 0), ex.constant(np.float32(3.0), "three")], node.name)
        register("cube", export_cube)


def cube_model():
    g = ge.Graph("cubes")
    x = g.input("x", (None, 3))
    return g.compile(outputs=[g.layer("dense", g.layer("cube", x, name="cubed"), units=2)])


def test_a_kind_without_mapping_fails_export_naming_the_kind_and_its_layer(tmp_path):
    with isolated_plugin_manager(CubePlugin(), entry_points=True):
        model = cube_model()
        with pytest.raises(ge.GraphEngineError, match=r"'cube'.*layer 'cubed' of kind 'cube'.*hook"):
            export(model, tmp_path / "cube.onnx")
        assert not (tmp_path / "cube.onnx").exists()


def test_a_plugin_supplies_its_own_mapping_through_the_hook(tmp_path):
    with isolated_plugin_manager(CubePlugin(), CubeExporter(), entry_points=True) as manager:
        assert "cube" in manager.onnx_exporters
        model = cube_model()
        export(model, tmp_path / "cube.onnx")
        x = data((4, 3))
        np.testing.assert_allclose(onnx_predict(tmp_path / "cube.onnx", {"x": x})[0],
                                   model.predict({"x": x}), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("opset", [14, 18, 20])
@pytest.mark.parametrize("name", ["blocks", "new_primitives"])
def test_older_and_newer_opsets_predict_alike(name, opset, tmp_path):
    """Opset 18 moves reductions' axes to an input, 20 adds Gelu; before 17 layer norm and
    before 18 Mish are written as their formulas."""
    model, train, _ = MODELS[name]()
    export(model, tmp_path / "model.onnx", opset=opset)
    feeds = {k: v[:4] for k, v in train.items()}
    np.testing.assert_allclose(onnx_predict(tmp_path / "model.onnx", feeds)[0], model.predict(feeds),
                               rtol=RTOL, atol=ATOL)


def test_export_refuses_an_opset_it_cannot_write():
    model, _, _ = mlp()
    with pytest.raises(ge.GraphEngineError, match="opset 14 or newer"):
        to_onnx(model, opset=9)


# --------------------------------------------------------------------------- command line, imports

def test_the_export_command_writes_a_saved_model_as_onnx(tmp_path, capsys):
    from graphengine.cli import main
    from graphengine.onnx.plugin import ensure_registered

    ensure_registered()
    model, train, _ = cnn()
    model.fit(train, epochs=1, batch_size=8, verbose=0)
    model.save(tmp_path / "model.gem")
    assert main(["export", str(tmp_path / "model.gem"), "-o", str(tmp_path / "model.onnx")]) == 0
    assert "wrote" in capsys.readouterr().out
    np.testing.assert_allclose(onnx_predict(tmp_path / "model.onnx", train)[0],
                               model.predict(train), rtol=RTOL, atol=ATOL)
    assert main(["export", str(tmp_path / "missing.gem"), "-o", str(tmp_path / "x.onnx")]) == 2


def test_importing_graphengine_and_its_onnx_package_does_not_import_onnx():
    code = ("import sys, graphengine, graphengine.onnx; graphengine.get_plugin_manager().layers.names(); "
            "print([m for m in ('onnx', 'onnxruntime') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_five_lines_of_docs_onnx_run_and_agree_with_predict(tmp_path, monkeypatch):
    """docs/onnx.md's first example, as written, on a small trained digits-like model."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "onnx.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    model, train, _ = mlp()
    model.fit(train, epochs=1, batch_size=8, verbose=0)
    monkeypatch.chdir(tmp_path)
    model.save("digits.gem")
    namespace = {"X": train["x"][:7]}
    exec(code, namespace)
    np.testing.assert_allclose(namespace["probs"], model.predict({"x": train["x"][:7]}),
                               rtol=RTOL, atol=ATOL)
