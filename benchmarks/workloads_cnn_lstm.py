"""The CNN and LSTM workloads of the guide (section 6), as graphengine graphs and as the equivalent
PyTorch modules. Same contract as ``workloads.py``: a maker takes the batch size and returns a
zero-argument training step (forward, backward, Adam update) on a fixed random float32 batch.

- CNN: conv3x3(1->16, pad 1)-ReLU-maxpool2-conv3x3(16->32, pad 1)-ReLU-maxpool2-dense(10),
  28x28 input, Adam, batch 64
- LSTM: sequence 32, input 32, hidden 128, last step -> dense(10), Adam, batch 32

PyTorch runs ``nn.LSTM`` on the CPU as one fused oneDNN kernel; ``lstm_unfused`` is the same
workload with oneDNN switched off for PyTorch's step, i.e. PyTorch composing the LSTM from its own
per-step operators, as graphengine composes it from NumPy's.
"""

from __future__ import annotations

from workloads import (
    Step,
    Workload,
    batch_data,
    graphengine_maker,
    graphengine_optimizer,
    torch_optimizer,
    torch_training_step,
)

LR = 1e-3
IMAGE = (1, 28, 28)
CLASSES = 10
SEQUENCE, FEATURES, HIDDEN = 32, 32, 128


def graphengine_cnn(batch: int, backend: str = "numpy"):
    import graphengine as ge
    g = ge.Graph("cnn")
    x = g.input("x", (None, *IMAGE))
    y = g.input("y", (None,), dtype="int64")
    h = g.activation("relu", g.layer("conv2d", x, filters=16, kernel_size=3, padding=1, name="conv1"))
    h = g.layer("max_pool2d", h, kernel_size=2)
    h = g.activation("relu", g.layer("conv2d", h, filters=32, kernel_size=3, padding=1, name="conv2"))
    h = g.layer("max_pool2d", h, kernel_size=2)
    logits = g.layer("dense", g.layer("flatten", h), units=CLASSES, name="out")
    loss = g.loss("softmax_cross_entropy", logits, y)
    model = g.compile(loss, optimizer=graphengine_optimizer("adam", LR), backend=backend)
    xs, ys = batch_data(batch, IMAGE, CLASSES)
    return model, {"x": xs, "y": ys}


def graphengine_lstm(batch: int, backend: str = "numpy"):
    import graphengine as ge
    g = ge.Graph("lstm")
    x = g.input("x", (None, SEQUENCE, FEATURES))
    y = g.input("y", (None,), dtype="int64")
    h = g.layer("lstm", x, units=HIDDEN, name="lstm")
    logits = g.layer("dense", h, units=CLASSES, name="out")
    loss = g.loss("softmax_cross_entropy", logits, y)
    model = g.compile(loss, optimizer=graphengine_optimizer("adam", LR), backend=backend)
    xs, ys = batch_data(batch, (SEQUENCE, FEATURES), CLASSES)
    return model, {"x": xs, "y": ys}


def torch_cnn():
    import torch
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, CLASSES))


def torch_lstm():
    import torch

    class LastStep(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = torch.nn.LSTM(FEATURES, HIDDEN, batch_first=True)
            self.out = torch.nn.Linear(HIDDEN, CLASSES)

        def forward(self, x):
            return self.out(self.lstm(x)[0][:, -1])

    return LastStep()


def torch_maker(module, features: tuple[int, ...], onednn: bool = True):
    def make(batch: int) -> Step:
        import torch
        torch.manual_seed(0)
        model = module()
        xs, ys = batch_data(batch, features, CLASSES)
        step = torch_training_step(model, torch_optimizer("adam", model.parameters(), LR),
                                   torch.from_numpy(xs), torch.from_numpy(ys))
        if onednn:
            return step

        def unfused() -> float:
            with torch.backends.mkldnn.flags(enabled=False):
                return step()
        return unfused
    return make


WORKLOADS = [
    Workload("cnn", "CNN conv16-pool-conv32-pool-dense_10 on 28x28, Adam, batch 64", 64,
             graphengine_maker(graphengine_cnn), torch_maker(torch_cnn, IMAGE)),
    Workload("lstm", "LSTM 32 steps, 32 -> 128, last step -> dense_10, Adam, batch 32", 32,
             graphengine_maker(graphengine_lstm), torch_maker(torch_lstm, (SEQUENCE, FEATURES))),
    Workload("lstm_unfused", "the LSTM workload, PyTorch without its fused oneDNN LSTM", 32,
             graphengine_maker(graphengine_lstm),
             torch_maker(torch_lstm, (SEQUENCE, FEATURES), onednn=False)),
]
