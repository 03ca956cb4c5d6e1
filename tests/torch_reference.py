"""Comparing a graph with PyTorch in float64: the output of a node, and the gradients of
``sum(output * weight)`` for the float inputs and the parameters, on both sides."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

import graphengine as ge


def graph_result(g: ge.Graph, out: ge.Tensor, feeds: Mapping[str, np.ndarray], weight: np.ndarray,
                 backend: str = "numpy", parameters: Mapping[str, np.ndarray] | None = None
                 ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(output, input gradients by name, parameter gradients by name, parameter values by name).
    ``parameters`` gives initial values by name."""
    weighted = out * g.constant(weight, dtype=out.dtype)
    if not g.parameters():  # compile refuses a loss that no parameter influences: give it one, 1
        weighted = weighted * g.parameter("one", (1,), init="ones", dtype=out.dtype)
    loss = weighted.sum()
    model = g.compile(loss, outputs=[out], backend=backend, initial_values=parameters)
    wrt = [name for name in g.inputs() if g.nodes[name].dtype.startswith("float")]
    value = model.run(feeds)[out.name]
    model.forward(feeds)
    model.backward(wrt=wrt)

    def host(array: Any) -> np.ndarray:
        return model.backend.to_numpy(array)

    return (value, {n: host(model.input_gradient(n)) for n in wrt},
            {n: host(v) for n, v in model.gradients().items()},
            {n: host(v) for n, v in model.parameters().items()})


def torch_result(fn: Callable[..., Any], feeds: Mapping[str, np.ndarray], weight: np.ndarray
                 ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``fn(**tensors)`` and the gradients of ``sum(fn(...) * weight)`` for the float feeds
    (the gradients of a module's parameters are on the module)."""
    import torch

    tensors = {n: torch.tensor(a, requires_grad=a.dtype.kind == "f") for n, a in feeds.items()}
    out = fn(**tensors)
    (out * torch.tensor(weight)).sum().backward()
    return out.detach().numpy(), {n: t.grad.numpy() for n, t in tensors.items() if t.grad is not None}
