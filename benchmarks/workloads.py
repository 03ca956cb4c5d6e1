"""The MLP workloads of the guide (section 6), each defined three times: graphengine, PyTorch CPU
and a hand-written NumPy step (the floor for the NumPy backend).

A workload maker takes the batch size and returns a zero-argument ``step()`` that runs one
training step (forward, backward, optimizer update) on a fixed random float32 batch and returns
the loss as a float. Every side builds its own parameters; the data and the maths are the same.

Other workload modules (``workloads_cnn_lstm.py``) follow the same contract: a module-level
``WORKLOADS`` list of :class:`Workload`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Step = Callable[[], float]
Maker = Callable[[int], Step]


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    batch: int
    graphengine: Maker
    torch: Maker
    #: The hand-written NumPy step, where one is written (the MLPs).
    numpy: Maker | None = None


@dataclass(frozen=True)
class MLPSpec:
    features: int
    hidden: tuple[int, ...]
    classes: int
    activation: str  # "relu" or "sigmoid"
    optimizer: str  # "adam" or "momentum"
    lr: float

    def sizes(self) -> list[int]:
        return [self.features, *self.hidden, self.classes]


MLP = MLPSpec(784, (512, 512), 10, "relu", "adam", 1e-3)
DEEP = MLPSpec(64, (64,) * 20, 10, "sigmoid", "momentum", 0.05)
MOMENTUM = 0.9
ADAM = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8}


def batch_data(batch: int, features: int | tuple[int, ...], classes: int,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (batch, *features) if isinstance(features, tuple) else (batch, features)
    return rng.standard_normal(shape, dtype=np.float32), rng.integers(0, classes, batch)


def graphengine_optimizer(name: str, lr: float):
    """Adam, or SGD with momentum, with the hyper-parameters PyTorch's side gets."""
    import graphengine as ge
    hyper = {"adam": ADAM, "momentum": {"momentum": MOMENTUM}}[name]
    return ge.optimizer(name, lr=lr, **hyper)


# ------------------------------------------------------------------------------ graphengine

def graphengine_mlp(spec: MLPSpec, batch: int, backend: str = "numpy"):
    import graphengine as ge
    g = ge.Graph("mlp")
    x = g.input("x", (None, spec.features))
    y = g.input("y", (None,), dtype="int64")
    h = x
    for i, units in enumerate(spec.hidden):
        h = g.activation(spec.activation, g.layer("dense", h, units=units, name=f"fc{i + 1}"))
    logits = g.layer("dense", h, units=spec.classes, name="out")
    loss = g.loss("softmax_cross_entropy", logits, y)
    model = g.compile(loss, optimizer=graphengine_optimizer(spec.optimizer, spec.lr),
                      backend=backend)
    xs, ys = batch_data(batch, spec.features, spec.classes)
    return model, {"x": xs, "y": ys}


def graphengine_maker(build: Callable[[int], tuple]) -> Maker:
    """A maker from ``build(batch) -> (model, feeds)``."""
    def make(batch: int) -> Step:
        model, feeds = build(batch)
        return lambda: model.train_step(feeds)
    return make


def graphengine_step(spec: MLPSpec) -> Maker:
    return graphengine_maker(lambda batch: graphengine_mlp(spec, batch))


# ------------------------------------------------------------------------------ PyTorch

def torch_optimizer(name: str, params, lr: float):
    import torch
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(ADAM["beta1"], ADAM["beta2"]), eps=ADAM["eps"])
    return torch.optim.SGD(params, lr=lr, momentum=MOMENTUM)


def torch_training_step(model, optimizer, x, y) -> Step:
    """The step as a PyTorch user writes it."""
    import torch.nn.functional as F

    def step() -> float:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        return loss.item()
    return step


def torch_step(spec: MLPSpec) -> Maker:
    def make(batch: int) -> Step:
        import torch
        torch.manual_seed(0)
        layers: list[torch.nn.Module] = []
        sizes = spec.sizes()
        act = torch.nn.ReLU if spec.activation == "relu" else torch.nn.Sigmoid
        for fan_in, fan_out in zip(sizes[:-2], sizes[1:-1]):
            layers += [torch.nn.Linear(fan_in, fan_out), act()]
        layers.append(torch.nn.Linear(sizes[-2], sizes[-1]))
        model = torch.nn.Sequential(*layers)
        xs, ys = batch_data(batch, spec.features, spec.classes)
        return torch_training_step(model, torch_optimizer(spec.optimizer, model.parameters(), spec.lr),
                                   torch.from_numpy(xs), torch.from_numpy(ys))
    return make


# ------------------------------------------------------------------------------ NumPy by hand

class NumpyMLP:
    """One training step written by hand in NumPy, float32: what the engine's step loop would
    cost with zero overhead. It makes the same choices the engine makes, so that the ratio
    measures the engine's own cost and nothing else: the bias added in the product's buffer, no
    input gradient for the first layer, sigmoid as ``1 / (1 + exp(-z))``, parameters and
    gradients in one flat buffer, updated in place in chunks of 65536 elements with one scratch
    array (an update over a 1.6 MB weight makes its temporaries out of cache)."""

    CHUNK = 65536

    def __init__(self, spec: MLPSpec, batch: int) -> None:
        rng = np.random.default_rng(0)
        sizes = spec.sizes()
        self.spec = spec
        shapes = [shape for a, b in zip(sizes[:-1], sizes[1:]) for shape in ((a, b), (b,))]
        total = sum(math.prod(shape) for shape in shapes)
        self.flat_params = np.zeros(total, np.float32)
        self.flat_grads = np.zeros(total, np.float32)
        self.params, self.grads = self._views(self.flat_params, shapes), self._views(self.flat_grads, shapes)
        for (a, b), w in zip(zip(sizes[:-1], sizes[1:]), self.params[::2]):
            w[...] = rng.standard_normal((a, b), dtype=np.float32) * np.float32(math.sqrt(2 / (a + b)))
        self.weights, self.biases = self.params[::2], self.params[1::2]
        self.state = [np.zeros_like(self.flat_params) for _ in range(2)]
        self.t = 0
        self.x, self.y = batch_data(batch, spec.features, spec.classes)

    @staticmethod
    def _views(flat: np.ndarray, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
        views, start = [], 0
        for shape in shapes:
            size = math.prod(shape)
            views.append(flat[start:start + size].reshape(shape))
            start += size
        return views

    def activation(self, z: np.ndarray) -> np.ndarray:
        if self.spec.activation == "relu":
            return np.maximum(z, 0, out=z)
        np.negative(z, out=z)
        np.exp(z, out=z)
        z += 1
        return np.reciprocal(z, out=z)

    def activation_grad(self, dy: np.ndarray, y: np.ndarray) -> np.ndarray:
        if self.spec.activation == "relu":
            return dy * (y > 0)
        return dy * y * (1 - y)

    def step(self) -> float:
        hs = [self.x]
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            z = hs[-1] @ w
            z += b
            hs.append(z if i == len(self.weights) - 1 else self.activation(z))
        logits = hs.pop()
        n = len(self.y)
        shifted = logits - logits.max(axis=1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        loss = -logp[np.arange(n), self.y].mean()
        dz = np.exp(logp)
        dz[np.arange(n), self.y] -= 1
        dz /= n
        for i in reversed(range(len(self.weights))):
            h = hs[i]
            dz.sum(axis=0, out=self.grads[2 * i + 1])
            np.matmul(h.T, dz, out=self.grads[2 * i])
            if i:
                dz = self.activation_grad(dz @ self.weights[i].T, h)
        self.update()
        return float(loss)

    def update(self) -> None:
        self.t += 1
        lr = self.spec.lr
        b1, b2, eps = ADAM["beta1"], ADAM["beta2"], ADAM["eps"]
        root_correction = math.sqrt(1 - b2 ** self.t)
        step_size = lr * root_correction / (1 - b1 ** self.t)
        for a in range(0, self.flat_params.size, self.CHUNK):
            p, g = self.flat_params[a:a + self.CHUNK], self.flat_grads[a:a + self.CHUNK]
            first, second = (s[a:a + self.CHUNK] for s in self.state)
            if self.spec.optimizer == "momentum":  # v <- mu v - lr g; w <- w + v
                first *= MOMENTUM
                first -= lr * g
                p += first
                continue
            scratch = np.multiply(g, 1 - b1)
            first *= b1
            first += scratch
            np.multiply(g, g, out=scratch)
            scratch *= 1 - b2
            second *= b2
            second += scratch
            np.sqrt(second, out=scratch)
            scratch += eps * root_correction
            np.divide(first, scratch, out=scratch)
            scratch *= step_size
            p -= scratch


def numpy_step(spec: MLPSpec) -> Maker:
    return lambda batch: NumpyMLP(spec, batch).step


WORKLOADS = [
    Workload("mlp", "MLP 784-512-512-10, ReLU, Adam, batch 128", 128,
             graphengine_step(MLP), torch_step(MLP), numpy_step(MLP)),
    Workload("deep_sigmoid", "deep narrow MLP 20x64, sigmoid, SGD momentum, batch 64", 64,
             graphengine_step(DEEP), torch_step(DEEP), numpy_step(DEEP)),
]
