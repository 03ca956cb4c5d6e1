"""ONNX import: graphs built with onnx.helper and a model exported from PyTorch predict here what
they predict in onnxruntime; Gemm and MatMul+Add become dense layers, Conv conv2d; after import
the gradients equal PyTorch's for the same weights, the model trains, saves, and its gradient
flow is drawn from the command line. The imported ONNX operators' backward passes the float64
finite-difference check on every backend."""

from __future__ import annotations

import numpy as np
import pytest

import graphengine as ge
from graphengine.testing import available_backends, check_backward

onnx = pytest.importorskip("onnx", reason="ONNX import needs pip install onnx onnxruntime")
ort = pytest.importorskip("onnxruntime", reason="the reference is onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from graphengine.onnx import export, load  # noqa: E402
from graphengine.onnx.ops import BACKWARD, OnnxOp  # noqa: E402

rng = np.random.default_rng(5)
FLOAT = TensorProto.FLOAT


def init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def model_of(nodes, inputs, outputs, initializers=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(proto)
    return proto


def tensor(name, shape, dtype=FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def onnxruntime(proto, feeds):
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def layer_kinds(model):
    return [call["kind"] for call in model.graph.calls if call["call"] in ("layer", "activation")]


def weights(*shape):
    return (rng.standard_normal(shape) * 0.5).astype("float32")


def mlp_proto():
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], transB=1, alpha=0.5, name="fc1"),
             helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("MatMul", ["a", "W2"], ["z"]),
             helper.make_node("Add", ["z", "b2"], ["logits"], name="fc2"),
             helper.make_node("Softmax", ["logits"], ["p"], axis=-1)]
    inits = [init("W1", weights(8, 5)), init("b1", weights(8)), init("W2", weights(8, 3)),
             init("b2", weights(3))]
    return model_of(nodes, [tensor("x", ["N", 5])], [tensor("p", ["N", 3])], inits)


def cnn_proto():
    nodes = [helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["c"], pads=[1, 0, 1, 2],
                              strides=[1, 2], kernel_shape=[3, 3]),
             helper.make_node("BatchNormalization", ["c", "bn.weight", "bn.bias", "bn.mean", "bn.var"],
                              ["n"], epsilon=1e-3),
             helper.make_node("Relu", ["n"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["m"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("GlobalAveragePool", ["m"], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["f"]),
             helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["y"], transB=1)]
    inits = [init("conv.weight", weights(4, 2, 3, 3)), init("conv.bias", weights(4)),
             init("bn.weight", weights(4) + 1), init("bn.bias", weights(4)),
             init("bn.mean", weights(4)), init("bn.var", np.abs(weights(4)) + 0.5),
             init("fc.weight", weights(3, 4)), init("fc.bias", weights(3))]
    return model_of(nodes, [tensor("x", ["N", 2, 9, 10])], [tensor("y", ["N", 3])], inits)


def test_gemm_and_matmul_add_become_dense_layers_that_predict_like_onnxruntime():
    proto = mlp_proto()
    model = load(proto)
    assert layer_kinds(model) == ["dense", "relu", "dense", "softmax"]
    assert sorted(model.trainable_parameters()) == ["fc1/W", "fc1/b", "fc2/W", "fc2/b"]
    for n in (7, 1):
        x = rng.standard_normal((n, 5)).astype("float32")
        np.testing.assert_allclose(model.predict({"x": x}), onnxruntime(proto, {"x": x})[0],
                                   rtol=1e-5, atol=1e-6)


def test_a_cnn_becomes_conv2d_and_batch_norm_layers_that_predict_like_onnxruntime():
    proto = cnn_proto()
    model = load(proto)
    assert {"conv2d", "batch_norm", "relu", "flatten", "dense", "onnx_node"} == set(layer_kinds(model))
    x = rng.standard_normal((3, 2, 9, 10)).astype("float32")
    np.testing.assert_allclose(model.predict({"x": x}), onnxruntime(proto, {"x": x})[0],
                               rtol=1e-5, atol=1e-5)
    trainable = model.trainable_parameters()
    assert "bn/running_mean" not in trainable and "bn/gamma" in trainable



def test_grouped_dilated_and_depthwise_convolutions_become_conv2d_layers():
    nodes = [helper.make_node("Conv", ["x", "grouped.weight", "grouped.bias"], ["c"], group=2,
                              dilations=[2, 1], pads=[2, 1, 1, 0], strides=[1, 2]),
             helper.make_node("Conv", ["c", "depthwise.weight"], ["y"], group=6,
                              kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    inits = [init("grouped.weight", weights(6, 2, 3, 2)), init("grouped.bias", weights(6)),
             init("depthwise.weight", weights(6, 1, 3, 3))]
    proto = model_of(nodes, [tensor("x", ["N", 4, 9, 8])], [tensor("y", ["N", 6, 8, 4])], inits)
    model = load(proto)
    assert layer_kinds(model) == ["conv2d", "conv2d"]
    ops = [node.op for node in model.graph.nodes.values() if node.kind == "conv2d"]
    assert [(op.groups, op.dilation) for op in ops] == [(2, (2, 1)), (6, (1, 1))]
    x = rng.standard_normal((3, 4, 9, 8)).astype("float32")
    np.testing.assert_allclose(model.predict({"x": x}), onnxruntime(proto, {"x": x})[0],
                               rtol=1e-5, atol=1e-5)

def test_shape_computations_on_known_values_are_folded():
    """Shape -> Gather -> Concat -> Reshape, as exporters write a flatten, needs no nodes."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "one"], ["c"], axis=0),
             helper.make_node("Unsqueeze", ["c", "zero"], ["c1"]),
             helper.make_node("Concat", ["minus_one", "c1"], ["shape"], axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["flat"]),
             helper.make_node("Transpose", ["flat"], ["t"], perm=[1, 0]),
             helper.make_node("ReduceMean", ["t"], ["y"], axes=[0], keepdims=0)]
    inits = [init("one", np.int64(1)), init("zero", np.array([0], np.int64)),
             init("minus_one", np.array([-1], np.int64))]
    proto = model_of(nodes, [tensor("x", [4, 3, 2])], [tensor("y", [None])], inits, opset=17)
    model = load(proto)
    assert [c["config"]["op_type"] for c in model.graph.calls if c["call"] == "layer"] == [
        "Reshape", "Transpose", "ReduceMean"]
    x = rng.standard_normal((4, 3, 2)).astype("float32")
    np.testing.assert_allclose(model.predict({"x": x}), onnxruntime(proto, {"x": x})[0], rtol=1e-6)


def test_unsupported_operators_are_listed_in_one_error():
    nodes = [helper.make_node("Hardmax", ["x"], ["a"]),
             helper.make_node("LpPool", ["a"], ["b"], kernel_shape=[1]),
             helper.make_node("Einsum", ["b"], ["c"], equation="ij->ji"),
             helper.make_node("Relu", ["c"], ["y"])]
    proto = model_of(nodes, [tensor("x", ["N", 3])], [tensor("y", [3, "N"])])
    with pytest.raises(ge.GraphEngineError, match=r"unsupported operator\(s\) Einsum, LpPool;"):
        load(proto)


def test_a_shape_that_is_only_known_at_run_time_is_refused_naming_the_node():
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape_it")]
    proto = model_of(nodes, [tensor("x", ["N", 6]), tensor("shape", [2], TensorProto.INT64)],
                     [tensor("y", ["N", 2, 3])])
    with pytest.raises(ge.GraphEngineError, match="reshape_it.*must be known"):
        load(proto)
    proto = model_of([helper.make_node("Relu", ["x"], ["y"])], [tensor("x", ["N", "K"])],
                     [tensor("y", ["N", "K"])])
    with pytest.raises(ge.GraphEngineError, match="symbolic dimension K at axis 1"):
        load(proto)


def test_an_imported_model_trains_and_saves_like_any_model(tmp_path):
    model = load(cnn_proto(), loss="mse", optimizer=ge.optimizer("adam", lr=0.02))
    own = np.random.default_rng(0)  # its own data, whichever tests ran before
    x = own.standard_normal((32, 2, 9, 10)).astype("float32")
    target = own.standard_normal((32, 3)).astype("float32")
    history = model.fit({"x": x, "target": target}, epochs=30, batch_size=32, verbose=0)
    losses = history.history["loss"] if hasattr(history, "history") else history["loss"]
    assert losses[-1] < 0.7 * losses[0]
    model.save(tmp_path / "imported.gem")
    again = ge.load(tmp_path / "imported.gem")
    np.testing.assert_array_equal(again.predict({"x": x}), model.predict({"x": x}))


def test_export_then_import_keeps_layers_and_predictions(tmp_path):
    g = ge.Graph("back")
    x = g.input("x", (None, 4))
    h = g.activation("tanh", g.layer("dense", x, units=6, name="hidden"))
    model = g.compile(outputs=[g.layer("dense", h, units=2, name="out")])
    export(model, tmp_path / "m.onnx")
    again = load(tmp_path / "m.onnx")
    assert layer_kinds(again) == ["dense", "tanh", "dense"]
    assert sorted(again.trainable_parameters()) == ["hidden/W", "hidden/b", "out/W", "out/b"]
    data = rng.standard_normal((5, 4)).astype("float32")
    np.testing.assert_allclose(again.predict({"x": data}), model.predict({"x": data}), rtol=1e-6)


def test_an_imported_model_exports_again_its_onnx_nodes_as_they_came(tmp_path):
    proto = cnn_proto()
    export(load(proto), tmp_path / "again.onnx")
    again = onnx.load(str(tmp_path / "again.onnx"))
    assert {"Conv", "BatchNormalization", "GlobalAveragePool", "MaxPool"} <= {
        n.op_type for n in again.graph.node}
    x = rng.standard_normal((2, 2, 9, 10)).astype("float32")
    np.testing.assert_allclose(onnxruntime(again, {"x": x})[0], onnxruntime(proto, {"x": x})[0],
                               rtol=1e-5, atol=1e-6)


def test_render_draws_the_gradient_flow_of_an_onnx_model(tmp_path, capsys):
    from graphengine.cli import main

    onnx.save(cnn_proto(), str(tmp_path / "cnn.onnx"))
    np.savez(tmp_path / "batch.npz", x=rng.standard_normal((8, 2, 9, 10)).astype("float32"),
             target=rng.standard_normal((8, 3)).astype("float32"))
    status = main(["render", str(tmp_path / "cnn.onnx"), "--data", str(tmp_path / "batch.npz"),
                   "-o", str(tmp_path / "cnn.svg")])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "conv" in out and any(p.name.startswith("cnn") for p in tmp_path.iterdir() if p.suffix != ".onnx")
    np.savez(tmp_path / "no_target.npz", x=np.zeros((2, 2, 9, 10), "float32"))
    assert main(["render", str(tmp_path / "cnn.onnx"), "--data", str(tmp_path / "no_target.npz"),
                 "-o", str(tmp_path / "x.svg")]) == 2


# --------------------------------------------------------------------------- from PyTorch

torch = None


def torch_net():
    global torch
    torch = pytest.importorskip("torch", reason="the PyTorch comparison needs torch")
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(4, 6, 3), torch.nn.Tanh(), torch.nn.Flatten(),
        torch.nn.Linear(6 * 2 * 2, 10), torch.nn.Sigmoid(), torch.nn.Linear(10, 3)).eval()


@pytest.fixture(scope="module")
def from_torch(tmp_path_factory):
    """A PyTorch CNN exported with torch.onnx.export, dynamic batch. The TorchScript exporter
    (dynamo=False) takes half a second; the dynamo exporter (dynamo=True, dynamic_shapes=...)
    writes the same operators here and imports alike, in ten times the time."""
    net = torch_net()
    path = tmp_path_factory.mktemp("torch") / "net.onnx"
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(2, 1, 8, 8),), str(path), dynamo=False,
                          input_names=["x"], dynamic_axes={"x": {0: "N"}})
    return net, path


@pytest.mark.slow
def test_a_pytorch_model_predicts_like_onnxruntime_and_pytorch(from_torch):
    net, path = from_torch
    model = load(path)
    assert layer_kinds(model).count("conv2d") == 2 and layer_kinds(model).count("dense") == 2
    x = rng.standard_normal((5, 1, 8, 8)).astype("float32")
    ours = model.predict({model.graph.inputs()[0]: x})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(ours, session.run(None, {session.get_inputs()[0].name: x})[0],
                               rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        np.testing.assert_allclose(ours, net(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_gradients_after_import_equal_pytorchs_for_the_same_weights(from_torch):
    net, path = from_torch
    model = load(path, loss="mse")
    x = rng.standard_normal((6, 1, 8, 8)).astype("float32")
    target = rng.standard_normal((6, 3)).astype("float32")
    loss = model.forward({model.graph.inputs()[0]: x, "target": target}, training=False)
    model.backward()
    grads = {k: np.asarray(v) for k, v in model.gradients().items()}
    net.zero_grad()
    reference = torch.nn.functional.mse_loss(net(torch.from_numpy(x)), torch.from_numpy(target))
    reference.backward()
    assert loss == pytest.approx(reference.item(), rel=1e-5)
    compared = 0
    for name, param in net.named_parameters():
        module, kind = name.rsplit(".", 1)
        ours = grads[f"{module}/{'W' if kind == 'weight' else 'b'}"]
        theirs = param.grad.numpy()
        if isinstance(net[int(module)], torch.nn.Linear) and kind == "weight":
            theirs = theirs.T  # a dense layer's W is (in, out), PyTorch's (out, in)
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)
        compared += 1
    assert compared == 8


@pytest.mark.slow
@pytest.mark.parametrize("cell,bidirectional", [("LSTM", True), ("GRU", False), ("RNN", True)])
def test_pytorch_recurrent_layers_become_graphengine_ones_and_predict_alike(cell, bidirectional, tmp_path):
    """PyTorch writes a 2-layer recurrent net as RNN/LSTM/GRU nodes with zero initial states of
    the batch's size (Shape -> ConstantOfShape): imported as the rnn, lstm, gru layers."""
    torch = pytest.importorskip("torch", reason="the PyTorch comparison needs torch")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = getattr(torch.nn, cell)(3, 4, num_layers=2, batch_first=True,
                                               bidirectional=bidirectional)
            self.fc = torch.nn.Linear(4 * (1 + bidirectional), 2)

        def forward(self, x):
            return self.fc(self.rnn(x)[0][:, -1])

    torch.manual_seed(1)
    net = Net().eval()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(2, 5, 3),), str(tmp_path / "rnn.onnx"), dynamo=False,
                          input_names=["x"], dynamic_axes={"x": {0: "N"}})
    model = load(tmp_path / "rnn.onnx")
    assert layer_kinds(model).count(cell.lower()) == 2 * (1 + bidirectional)
    x = rng.standard_normal((3, 5, 3)).astype("float32")
    with torch.no_grad():
        np.testing.assert_allclose(model.predict({"x": x}), net(torch.from_numpy(x)).numpy(),
                                   rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- the ONNX operators

def positive(*shape):
    return rng.uniform(0.5, 2.0, shape)


def unit(*shape):
    return rng.uniform(-0.8, 0.8, shape)


def normal(*shape):
    return rng.standard_normal(shape)


#: op_type -> (attributes, static inputs, input arrays) for the gradient check. Inputs stay away
#: from kinks (ReLU at 0) so the central difference is smooth.
CASES = {
    "Identity": ({}, {}, [normal(2, 3)]), "Neg": ({}, {}, [normal(2, 3)]),
    "Abs": ({}, {}, [positive(2, 3) * np.sign(normal(2, 3))]), "Exp": ({}, {}, [normal(2, 3)]),
    "Log": ({}, {}, [positive(2, 3)]), "Sqrt": ({}, {}, [positive(2, 3)]),
    "Reciprocal": ({}, {}, [positive(2, 3)]), "Sin": ({}, {}, [normal(3)]),
    "Cos": ({}, {}, [normal(3)]), "Tan": ({}, {}, [unit(3)]), "Asin": ({}, {}, [unit(3)]),
    "Acos": ({}, {}, [unit(3)]), "Atan": ({}, {}, [normal(3)]), "Sinh": ({}, {}, [normal(3)]),
    "Cosh": ({}, {}, [normal(3)]), "Asinh": ({}, {}, [normal(3)]),
    "Acosh": ({}, {}, [positive(3) + 1]), "Atanh": ({}, {}, [unit(3)]),
    "Tanh": ({}, {}, [normal(2, 3)]), "Sigmoid": ({}, {}, [normal(2, 3)]),
    "Relu": ({}, {}, [positive(2, 3) * np.sign(normal(2, 3))]),
    "LeakyRelu": ({"alpha": 0.1}, {}, [positive(2, 3) * np.sign(normal(2, 3))]),
    "ThresholdedRelu": ({"alpha": 0.1}, {}, [positive(2, 3) * np.sign(normal(2, 3))]),
    "Elu": ({"alpha": 0.7}, {}, [positive(2, 3) * np.sign(normal(2, 3))]),
    "Celu": ({"alpha": 0.7}, {}, [positive(2, 3) * np.sign(normal(2, 3))]),
    "Selu": ({}, {}, [positive(2, 3) * np.sign(normal(2, 3))]),
    "Softplus": ({}, {}, [normal(2, 3)]), "Softsign": ({}, {}, [positive(3) * np.sign(normal(3))]),
    "HardSigmoid": ({}, {}, [unit(2, 3)]), "HardSwish": ({}, {}, [normal(2, 3)]),
    "Mish": ({}, {}, [normal(2, 3)]), "Erf": ({}, {}, [normal(2, 3)]), "Gelu": ({}, {}, [normal(2, 3)]),
    "Sign": ({}, {}, [positive(3) * np.sign(normal(3))]), "Floor": ({}, {}, [normal(3) + 0.25]),
    "Ceil": ({}, {}, [normal(3) + 0.25]), "Round": ({}, {}, [normal(3) + 0.25]),
    "Cast": ({"to": TensorProto.DOUBLE}, {}, [normal(2, 3)]),
    "Add": ({}, {}, [normal(2, 3), normal(3)]), "Sub": ({}, {}, [normal(2, 3), normal(2, 1)]),
    "Mul": ({}, {}, [normal(2, 3), normal(3)]), "Div": ({}, {}, [normal(2, 3), positive(3)]),
    "Pow": ({}, {}, [positive(2, 3), normal(3)]), "PRelu": ({}, {}, [normal(2, 3), normal(3)]),
    "Max": ({}, {}, [normal(2, 3), normal(3), normal(2, 3)]),
    "Min": ({}, {}, [normal(2, 3), normal(3)]), "Sum": ({}, {}, [normal(2, 3), normal(3)]),
    "Mean": ({}, {}, [normal(2, 3), normal(2, 3)]),
    "Where": ({}, {}, [normal(2, 3) > 0, normal(2, 3), normal(3)]),
    "Clip": ({}, {1: -0.5, 2: 0.5}, [normal(2, 3) * 2]),
    "MatMul": ({}, {}, [normal(2, 3, 4), normal(4, 2)]),
    "Gemm": ({"transA": 1, "transB": 1, "alpha": 0.5, "beta": 2.0}, {},
             [normal(3, 2), normal(4, 3), normal(4)]),
    **{op: ({"keepdims": 0}, {1: [1]}, [positive(2, 3, 2)])
       for op in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd",
                  "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp")},
    "Softmax": ({"axis": 1}, {}, [normal(2, 3, 2)]), "LogSoftmax": ({"axis": 0}, {}, [normal(2, 3)]),
    "LayerNormalization": ({"axis": 1}, {}, [normal(2, 3, 2), normal(3, 2), normal(2)]),
    "BatchNormalization": ({}, {}, [normal(2, 3, 2), normal(3), normal(3), normal(3), positive(3)]),
    "Reshape": ({}, {1: [3, 0, -1]}, [normal(2, 2, 3)]), "Flatten": ({"axis": 2}, {}, [normal(2, 3, 2)]),
    "Squeeze": ({}, {1: [1]}, [normal(2, 1, 3)]), "Unsqueeze": ({}, {1: [0, 3]}, [normal(2, 3)]),
    "Transpose": ({"perm": [2, 0, 1]}, {}, [normal(2, 3, 4)]),
    "Concat": ({"axis": 1}, {}, [normal(2, 3), normal(2, 1)]),
    "Slice": ({}, {1: [0, -1], 2: [2, -4], 3: [0, 1], 4: [1, -1]}, [normal(3, 5)]),
    "Gather": ({"axis": 1}, {}, [normal(2, 4), np.array([[0, 3], [3, -1]])]),
    "Expand": ({}, {1: [2, 1, 3]}, [normal(1, 3)]), "Tile": ({}, {1: [2, 3]}, [normal(2, 2)]),
    "Pad": ({}, {1: [1, 0, 0, 2]}, [normal(2, 3)]), "Dropout": ({}, {}, [normal(2, 3)]),
    **{f"Pad:{mode}": ({"mode": mode}, {1: [1, 2, 2, 1]}, [normal(3, 4)])
       for mode in ("reflect", "edge", "wrap")},
    "Conv": ({"pads": [1, 0, 0, 1], "strides": [2, 1], "dilations": [1, 2], "group": 2}, {},
             [normal(2, 4, 5, 5), normal(4, 2, 2, 2), normal(4)]),
    "ConvTranspose": ({"strides": [2, 1], "pads": [1, 0, 0, 1], "output_padding": [1, 0],
                       "dilations": [1, 2], "group": 2}, {},
                      [normal(2, 4, 3, 3), normal(4, 3, 2, 2), normal(6)]),
    "CastLike": ({}, {1: np.zeros(1)}, [normal(2, 3)]),
    "CumSum": ({"exclusive": 1, "reverse": 1}, {1: [1]}, [normal(2, 4)]),
    "Trilu": ({"upper": 0}, {1: [1]}, [normal(2, 3, 4)]),
    "RMSNormalization": ({"axis": 1}, {}, [normal(2, 3, 2), normal(3, 2)]),
    "LpNormalization": ({"axis": 0, "p": 2}, {}, [normal(3, 2)]),
    "GatherElements": ({"axis": 1}, {}, [normal(2, 3), np.array([[0, 2, 2, -1], [1, 1, 0, 0]])]),
    "MaxPool": ({"kernel_shape": [2, 2], "pads": [1, 1, 0, 0], "ceil_mode": 1}, {}, [normal(2, 1, 4, 5)]),
    "AveragePool": ({"kernel_shape": [3], "strides": [2], "pads": [1, 1]}, {}, [normal(2, 2, 6)]),
    "GlobalAveragePool": ({}, {}, [normal(2, 3, 2, 2)]), "GlobalMaxPool": ({}, {}, [normal(2, 3, 2, 2)]),
}


def test_every_differentiable_onnx_operator_has_a_gradient_check():
    assert set(BACKWARD) <= set(CASES)


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("op_type", sorted(CASES))
def test_onnx_operator_backward_matches_finite_differences(op_type, backend):
    attributes, static, inputs = CASES[op_type]
    op_type = op_type.split(":")[0]  # "Pad:reflect": the operator, in one of its modes
    check_backward(lambda: OnnxOp(op_type, attributes, static), inputs, backend=backend)


def test_a_loss_that_applies_the_output_activation_takes_the_logits(tmp_path, recwarn):
    """A sigmoid-output model imported with loss="binary_cross_entropy" (from logits) feeds the
    loss the sigmoid's input, not its output (no sigmoid applied twice), as with softmax."""
    weight = init("W", rng.standard_normal((3, 1)).astype("float32"))
    proto = model_of([helper.make_node("MatMul", ["x", "W"], ["z"]),
                      helper.make_node("Sigmoid", ["z"], ["p"])],
                     [tensor("x", ["N", 3])], [tensor("p", ["N", 1])], [weight])
    path = tmp_path / "logistic.onnx"
    onnx.save(proto, str(path))
    model = load(path, loss="binary_cross_entropy", target="y")
    loss_node = model.graph.nodes[model.loss_name]
    assert model.graph.nodes[loss_node.inputs[0]].kind != "sigmoid"
    assert not [w for w in recwarn if issubclass(w.category, ge.GraphBuildWarning)]
    x = rng.standard_normal((4, 3)).astype("float32")
    np.testing.assert_allclose(model.predict({"x": x}), onnxruntime(proto, {"x": x})[0],
                               rtol=1e-5, atol=1e-6)


def test_a_missing_file_and_a_malformed_node_are_graphengine_errors(tmp_path):
    with pytest.raises(ge.SerializationError, match="cannot read ONNX file .*missing.onnx"):
        load(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07not a protobuf at all")
    with pytest.raises(ge.SerializationError, match="not an ONNX model"):
        load(tmp_path / "junk.onnx")
    w = init("W", rng.standard_normal((1, 4, 3)).astype("float32"))
    r = init("R", rng.standard_normal((1, 4, 4)).astype("float32"))
    rnn = helper.make_node("RNN", ["x", "W", "R"], ["y"], name="rnn_without_hidden_size")
    proto = helper.make_model(helper.make_graph([rnn], "g", [tensor("x", [5, 2, 3])],
                                                [tensor("y", None)], [w, r]))
    with pytest.raises(ge.GraphEngineError, match="node 'rnn_without_hidden_size' \\(RNN\\)"):
        load(proto)


def test_sequence_lens_that_may_be_shorter_than_the_sequence_are_refused():
    """ONNX's RNN with sequence_lens [3, 3] over a time axis of open length: graphengine's rnn
    would read all the steps, so the import refuses it instead of answering differently."""
    w = init("W", rng.standard_normal((1, 4, 3)).astype("float32"))
    r = init("R", rng.standard_normal((1, 4, 4)).astype("float32"))
    lengths = init("seq", np.array([3, 3], np.int32))
    rnn = helper.make_node("RNN", ["x", "W", "R", "", "seq"], ["", "yh"], hidden_size=4)
    proto = helper.make_model(helper.make_graph([rnn], "g", [tensor("x", ["T", 2, 3])],
                                                [tensor("yh", [1, 2, 4])], [w, r, lengths]),
                              opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ge.GraphEngineError, match="sequence_lens that may be shorter"):
        load(proto)


@pytest.mark.parametrize("shape,refused", [((2, 3, 4), True), ((2, 5), False)])
def test_softmax_of_an_opset_before_13_is_refused_where_it_meant_something_else(shape, refused):
    """Opset 11's Softmax normalizes over the axes from 1 on, flattened: on a 3-D input that is
    not graphengine's softmax (refused, naming the opset); on a 2-D input it is (imported)."""
    proto = helper.make_model(helper.make_graph([helper.make_node("Softmax", ["x"], ["y"])], "g",
                                                [tensor("x", list(shape))], [tensor("y", list(shape))]),
                              opset_imports=[helper.make_opsetid("", 11)])
    proto.ir_version = 7
    if refused:
        with pytest.raises(ge.GraphEngineError, match="opset 11 normalizes over the axes from 1 on"):
            load(proto)
    else:
        x = rng.standard_normal(shape).astype("float32")
        out = load(proto).predict({"x": x})
        np.testing.assert_allclose(out, onnxruntime(proto, {"x": x})[0], rtol=1e-5, atol=1e-6)
