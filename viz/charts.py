"""Gradient-flow charts over training (matplotlib): the picture of the course notes, from real numbers.

For each model, two panels sharing one log axis across models:

- left: the gradient RMS of every parameter, layers from the input side to the output side,
  one line per epoch (weights solid, biases dotted): a vanishing gradient is a line that falls
  towards the input side and stays low while training goes on;
- right: each layer's weight-gradient RMS over the training steps, coloured from the input side
  (dark) to the output side (light).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from graphengine.distributed import writes
from graphengine.errors import GraphEngineError
from graphengine.ir.operators import Parameter
from graphengine.model import Model
from graphengine.tools.monitor import GradientMonitor, Record, find_monitor


def parameter_order(model: Model) -> list[str]:
    """Trainable parameters from the input side to the output side (graph order)."""
    return [name for name, node in model.graph.nodes.items()
            if isinstance(node.op, Parameter) and node.op.trainable]


def per_epoch(records: Sequence[Record], names: Sequence[str]) -> dict[int, np.ndarray]:
    """Epoch -> median gradient RMS of each parameter in ``names`` over that epoch's records."""
    epochs: dict[int, list[list[float]]] = {}
    for record in records:
        values = [record.value(name, "grad_rms") for name in names]
        epochs.setdefault(record.epoch, []).append([np.nan if v is None else v for v in values])
    with np.errstate(all="ignore"):
        return {epoch: np.nanmedian(np.array(rows), axis=0) for epoch, rows in sorted(epochs.items())}


def pick_epochs(epochs: Sequence[int], most: int = 6) -> list[int]:
    """At most ``most`` epochs, evenly spread, first and last included."""
    if len(epochs) <= most:
        return list(epochs)
    picks = np.linspace(0, len(epochs) - 1, most).round().astype(int)
    return [epochs[i] for i in dict.fromkeys(picks.tolist())]


def _monitor(model: Model) -> GradientMonitor:
    monitor = find_monitor(model)
    if monitor is None or not monitor.records:
        raise GraphEngineError(f"model {model.graph.name!r} has no recorded gradient statistics: "
                               f"attach graphengine.tools.monitor.GradientMonitor before training")
    return monitor


def gradient_flow_chart(models: Mapping[str, Model], path: str | os.PathLike, *,
                        epochs: int = 6, vanishing: float | None = 1e-3, title: str | None = None) -> Path:
    """Draw the gradient flow of each model (title -> model) to ``path`` (.png, .svg or .pdf).

    ``vanishing`` draws the relative threshold under the strongest weight gradient of the last
    epoch shown (None: no line).
    """
    import matplotlib
    from matplotlib.figure import Figure  # not pyplot: no global state, no GUI backend
    from matplotlib.lines import Line2D

    if not models:
        raise GraphEngineError("gradient_flow_chart needs at least one model")
    # constrained layout makes room for the legends, which sit beside the panels, never on the data
    fig = Figure(figsize=(14, 3.6 * len(models)), layout="constrained")
    axes = fig.subplots(len(models), 2, sharey=True, squeeze=False,
                        gridspec_kw={"width_ratios": [1.25, 1]})
    for row, (label, model) in enumerate(models.items()):
        records = _monitor(model).records
        names = parameter_order(model)
        layers = [model.graph.nodes[n].layer or n for n in names]
        columns = list(dict.fromkeys(layers))
        x = np.array([columns.index(layer) for layer in layers])
        weights = np.array([len(model.graph.nodes[n].shape) > 1 for n in names])
        table = per_epoch(records, names)
        shown = pick_epochs(list(table))
        cmap = matplotlib.colormaps["cividis"]
        left, right = axes[row]
        for i, epoch in enumerate(shown):
            colour = cmap(i / max(1, len(shown) - 1))
            for mask, style, marker in ((weights, "-", "o"), (~weights, ":", "v")):
                if mask.any():
                    left.plot(x[mask], table[epoch][mask], style, marker=marker, color=colour, ms=4,
                              label=f"epoch {epoch}" if style == "-" else None)
        if vanishing is not None:
            last = table[shown[-1]]
            top = np.nanmax(last[weights] if weights.any() else last)
            left.axhline(top * vanishing, color="#b2182b", lw=1, ls="--",
                         label=f"{vanishing:g} x strongest")
        left.set_xticks(range(len(columns)), columns, rotation=45 if len(columns) > 10 else 0)
        left.set_yscale("log")
        left.set_ylabel("gradient RMS")
        left.set_title(f"{label}: per layer, input side -> output side", fontsize=10)
        handles, texts = left.get_legend_handles_labels()
        handles += [Line2D([], [], color="grey", marker="o", ls="-", ms=4),
                    Line2D([], [], color="grey", marker="v", ls=":", ms=4)]
        texts += ["weights", "biases"]
        left.legend(handles, texts, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                    borderaxespad=0.0)
        left.grid(True, which="major", alpha=0.3)

        steps = [r.step for r in records]
        weight_names = [n for n, w in zip(names, weights) if w]
        depth = matplotlib.colormaps["viridis"]
        for i, name in enumerate(weight_names):
            series = [r.value(name, "grad_rms") for r in records]
            right.plot(steps, [np.nan if v is None else v for v in series], lw=1.2,
                       color=depth(i / max(1, len(weight_names) - 1)),
                       label=model.graph.nodes[name].layer or name)
        right.set_yscale("log")
        right.set_xlabel("training step")
        right.set_title(f"{label}: weight gradients over training", fontsize=10)
        right.legend(fontsize=7, ncol=1 + len(weight_names) // 12, loc="upper left",
                     bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
                     title="input (dark)\n-> output (light)", title_fontsize=7)
        right.grid(True, which="major", alpha=0.3)
    if title:
        fig.suptitle(title)
    path = Path(path)
    if not all(writes(model) for model in models.values()):  # distributed: rank 0 draws
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
