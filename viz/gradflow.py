"""Gradient statistics -> per-node and per-layer health, and advice in plain words.

No rendering here: :func:`diagnose` reads the records of a model's
:class:`~graphengine.tools.monitor.GradientMonitor` and flags each node

- ``vanishing``: its gradient RMS is below ``vanishing`` (default 1e-3) times the strongest
  comparable gradient (parameters are compared with parameters, per-example tensors with
  per-example tensors);
- ``exploding``: its gradient RMS is above ``exploding`` (default 10), or holds NaN/Inf;
- ``dead``: a ReLU whose units are mostly (``dead``, default 50%) never active on a batch;
- ``saturated``: a sigmoid/tanh whose outputs mostly (``saturated``, default 50%) sit in the flat
  tails, where the slope is under 5% of its peak.

The advice follows the course notes' recipe: when training itself goes badly, change the
network (relu/maxout, he initialization, batch_norm) or the optimizer (adam); when only
validation goes badly, regularize (early stopping, dropout, L2). :func:`diagnose_history` gives
the second kind from a training :class:`~graphengine.History`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphengine.errors import GraphEngineError
from graphengine.ir.operators import Parameter
from graphengine.model import Model
from graphengine.tools.monitor import (
    SATURATED_SLOPE,
    GradientMonitor,
    NodeStats,
    Record,
    find_monitor,
)
from graphengine.train.loop import EarlyStopping, History


def health_kinds(model: Model, measure: str) -> list[str]:
    """The kinds of the model's activations that declare the health ``measure``
    (``"saturation"``: sigmoid, tanh; ``"dead_fraction"``: relu); the advice names them."""
    return sorted({node.kind for node in model.graph.nodes.values()
                   if getattr(getattr(node.op, "activation", None), "health", None) == measure})


class NoStatisticsError(GraphEngineError):
    """Nothing was recorded to diagnose: no monitor, or no gradient in its records yet."""


@dataclass(frozen=True)
class Thresholds:
    vanishing: float = 1e-3
    exploding: float = 10.0
    dead: float = 0.5
    saturated: float = 0.5


@dataclass
class NodeHealth:
    """One node: its (median) statistics over the diagnosed records, and its flags."""

    name: str
    kind: str
    layer: str | None
    shape: tuple
    stats: NodeStats
    #: Gradient RMS over the strongest comparable gradient (None where not compared).
    relative: float | None = None
    flags: list[str] = field(default_factory=list)


@dataclass
class LayerHealth:
    """A layer (a name scope holding parameters): the size-weighted RMS of its parameters'
    gradients, and the median update-to-weight ratio of its weights (biases excluded)."""

    name: str
    kind: str
    parameters: list[str]
    size: int
    grad_rms: float | None
    update_ratio: float | None
    relative: float | None = None
    flags: list[str] = field(default_factory=list)


@dataclass
class Finding:
    flag: str
    names: list[str]
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass
class Diagnosis:
    """What :func:`diagnose` found; ``str()`` gives the report in words."""

    step: int
    #: The epoch being trained when recorded; for a snapshot, the epochs trained before it.
    epoch: int
    records: int
    thresholds: Thresholds
    nodes: dict[str, NodeHealth]
    layers: list[LayerHealth]
    findings: list[Finding]
    #: (source, consumer) -> (rms, norm) of the gradient along edges out of fanned-out tensors.
    edges: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)
    #: Recorded outside training (``GradientMonitor.capture``, ``render(data=...)``): no update
    #: followed the pass.
    snapshot: bool = False

    def when(self) -> str:
        """``at step 1280 (epoch 30)``, or for a snapshot ``on one batch after 30 epochs``."""
        if not self.snapshot:
            return f"at step {self.step} (epoch {self.epoch})"
        if self.epoch == 0 and self.step == 0:
            return "on one batch, before training"
        if self.epoch == 0:  # a hand-written loop counts steps, not epochs
            return f"on one batch after {self.step} step{'s' if self.step != 1 else ''}"
        return f"on one batch after {self.epoch} epoch{'s' if self.epoch != 1 else ''} (step {self.step})"

    def flagged(self, flag: str) -> list[str]:
        """Names of the nodes carrying ``flag``, in graph order."""
        return [n for n, h in self.nodes.items() if flag in h.flags]

    def flagged_layers(self, flag: str) -> list[str]:
        return [layer.name for layer in self.layers if flag in layer.flags]

    def layer(self, name: str) -> LayerHealth:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer {name!r}; layers: {[layer.name for layer in self.layers]}")

    def __str__(self) -> str:
        count = f"median of {self.records} record{'s' if self.records != 1 else ''}"
        head = (f"gradient flow {self.when()}:" if self.snapshot else
                f"gradient flow at step {self.step} (epoch {self.epoch}, {count}):")
        return "\n".join([head, *(f"- {f.message}" for f in self.findings)])

    def table(self) -> str:
        """Per-layer and per-node statistics as a fixed-width text table."""
        lines = [f"{'layer':<16} {'kind':<10} {'params':>8} {'grad rms':>10} {'relative':>9} "
                 f"{'upd/weight':>10}  flags"]
        for layer in self.layers:
            lines.append(f"{layer.name:<16} {layer.kind:<10} {layer.size:>8} {_num(layer.grad_rms):>10} "
                         f"{_num(layer.relative):>9} {_num(layer.update_ratio):>10}  "
                         f"{' '.join(layer.flags)}")
        lines += ["", f"{'node':<24} {'op':<12} {'shape':<14} {'grad rms':>10} {'max|grad|':>10} "
                      f"{'relative':>9} {'dead':>6} {'satur.':>6} {'upd/w':>9}  flags"]
        for health in self.nodes.values():
            s = health.stats
            lines.append(f"{health.name:<24} {health.kind:<12} {shape_text(health.shape):<14} "
                         f"{_num(s.grad_rms):>10} {_num(s.grad_max):>10} {_num(health.relative):>9} "
                         f"{_pct(s.dead_fraction):>6} {_pct(s.saturation):>6} {_num(s.update_ratio):>9}  "
                         f"{' '.join(health.flags)}")
        return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}" if not math.isfinite(value) else f"{value:.2e}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def shape_text(shape: tuple) -> str:
    """``(N, 64)``: a tensor shape, N for the batch."""
    dims = ", ".join("N" if d is None else str(d) for d in shape)
    return f"({dims}{',' if len(shape) == 1 else ''})"


# --------------------------------------------------------------------------- combining records

def window_stats(records: Sequence[Record]) -> dict[str, NodeStats]:
    """Per-node median of each statistic over ``records`` (a NaN/Inf gradient in any of them
    is kept: the result's ``grad_rms`` is then inf)."""
    last = records[-1]
    same = [r for r in records if r.index is last.index]
    tables = np.stack([r.table for r in same])
    nonfinite = np.isinf(tables[:, :, :3]).any(axis=(0, 2))
    present = ~np.isnan(tables).all(axis=(0, 2)) | nonfinite
    clean = np.where(np.isinf(tables), np.nan, tables)
    finite = ~np.isnan(clean).all(axis=0)
    medians = np.full(tables.shape[1:], np.nan)
    medians[finite] = np.nanmedian(clean[:, finite], axis=0)
    medians[nonfinite, :3] = math.inf
    return {name: NodeStats(*(None if np.isnan(v) else float(v) for v in medians[row]))
            for name, row in last.index.items() if present[row]}


def window_edges(records: Sequence[Record]) -> dict[tuple[str, str], tuple[float, float]]:
    """Per-edge median (rms, norm) of the gradient along fanned-out edges over ``records``."""
    keys = {key for r in records for key in r.edges}
    return {key: tuple(float(np.median(values)) for values in
                       zip(*(r.edges[key] for r in records if key in r.edges)))
            for key in keys}


def _records_of(model: Model, source: GradientMonitor | Record | Sequence[Record] | None,
                window: int) -> list[Record]:
    if isinstance(source, Record):
        return [source]
    if source is None:
        source = find_monitor(model)
        if source is None:
            raise NoStatisticsError(
                "no gradient statistics: attach a monitor before training "
                "(graphengine.tools.monitor.GradientMonitor(every=20).attach(model)), or record one "
                "batch with GradientMonitor().capture(model, feeds)")
    records = source.records if isinstance(source, GradientMonitor) else list(source)
    records = [r for r in records if not np.isnan(r.table[:, 0]).all()]
    if not records:
        raise NoStatisticsError("the monitor has no record with gradients yet: train at least one "
                               "step (or capture a batch) first")
    return records[-window:]


# --------------------------------------------------------------------------- diagnosis

def diagnose(model: Model, source: GradientMonitor | Record | Sequence[Record] | None = None, *,
             window: int = 5, thresholds: Thresholds | None = None, **overrides: float) -> Diagnosis:
    """Flag every node of ``model`` from the last ``window`` records of ``source`` (default:
    the model's attached monitor), group the flags by layer and say what to try.

    Threshold overrides by keyword: ``diagnose(model, vanishing=1e-4, exploding=100)``.
    """
    thresholds = thresholds or Thresholds()
    if overrides:
        unknown = set(overrides) - set(Thresholds.__dataclass_fields__)
        if unknown:
            raise GraphEngineError(f"unknown threshold(s) {sorted(unknown)}; known: "
                                   f"{list(Thresholds.__dataclass_fields__)}")
        thresholds = Thresholds(**{**thresholds.__dict__, **overrides})
    records = _records_of(model, source, window)
    stats = window_stats(records)
    graph = model.graph
    nodes = {name: NodeHealth(name, graph.nodes[name].kind, graph.nodes[name].layer,
                              graph.nodes[name].shape, s)
             for name, s in stats.items()}
    layers = _layers(model, nodes, thresholds)
    _flag_nodes(model, nodes, layers, thresholds)
    findings = _findings(model, nodes, layers, thresholds)
    last = records[-1]
    # A record taken in training is followed by its update, which counts the step; one that
    # nothing followed is a snapshot, and its "epoch in progress" was never trained.
    taken_alone = last.step == model.step_count
    epoch = model.epoch if taken_alone else last.epoch
    return Diagnosis(last.step, epoch, len(records), thresholds, nodes, layers, findings,
                     window_edges(records), snapshot=taken_alone)


def snapshot(model: Model, feeds: Mapping[str, Any]) -> Record:
    """Record one forward and backward pass of ``model`` on the batch ``feeds`` now, without
    updating it, and without adding to the history of a monitor it already has (the one ``fit``
    records with), so charts of the training stay as they were."""
    existing = find_monitor(model)
    position = model.observers.index(existing) if existing is not None else None
    if existing is not None:
        existing.detach(model)
    fresh = GradientMonitor()
    try:
        return fresh.capture(model, feeds)
    finally:
        if fresh in model.observers:
            fresh.detach(model)
        if existing is not None:
            model.observers.insert(position, existing)


def _comparison_group(model: Model, name: str) -> str | None:
    """Gradients of parameters scale like sums over the batch, per-example tensors' like one
    example's share of the mean loss: each is compared within its own group (parameters with
    the strongest layer, so a parameter is flagged where its layer would be). Scalars (the
    loss) are not compared."""
    node = model.graph.nodes[name]
    if not node.shape:
        return None
    if isinstance(node.op, Parameter):
        return "parameter"
    return "per-example" if None in node.shape else "fixed"


def _flag_nodes(model: Model, nodes: dict[str, NodeHealth], layers: list[LayerHealth],
                t: Thresholds) -> None:
    strongest: dict[str, float] = {}
    for name, health in nodes.items():
        rms = health.stats.grad_rms
        group = _comparison_group(model, name)
        if group is not None and rms is not None and math.isfinite(rms):
            strongest[group] = max(strongest.get(group, 0.0), rms)
    layer_rms = [layer.grad_rms for layer in layers
                 if layer.grad_rms is not None and math.isfinite(layer.grad_rms)]
    if layer_rms:
        strongest["parameter"] = max(layer_rms)
    for name, health in nodes.items():
        s = health.stats
        group = _comparison_group(model, name)
        if s.grad_rms is not None:
            if s.nonfinite or s.grad_rms > t.exploding:
                health.flags.append("exploding")
            top = strongest.get(group or "", 0.0)
            if group is not None and top > 0 and not s.nonfinite:
                health.relative = s.grad_rms / top
                if health.relative < t.vanishing:
                    health.flags.append("vanishing")
        if s.dead_fraction is not None and s.dead_fraction >= t.dead:
            health.flags.append("dead")
        if s.saturation is not None and s.saturation >= t.saturated:
            health.flags.append("saturated")


def layer_of(model: Model) -> dict[str, str | None]:
    """Node -> the layer it belongs to: its name scope, or for a node built outside any layer
    (an activation applied with ``g.activation``), the layer of its first input."""
    owner: dict[str, str | None] = {}
    for name, node in model.graph.nodes.items():
        if node.layer is not None:
            owner[name] = node.layer
        elif node.inputs and not model.graph.is_source(name):
            owner[name] = owner.get(node.inputs[0])
        else:
            owner[name] = None
    return owner


def layer_kinds(model: Model) -> dict[str, str]:
    """Layer scope -> the registered layer kind that built it (from the graph's builder calls)."""
    return {scope: call["kind"] for scope, call in model.graph.layers().items()}


def _layers(model: Model, nodes: dict[str, NodeHealth], t: Thresholds) -> list[LayerHealth]:
    graph = model.graph
    kinds = layer_kinds(model)
    layers: dict[str, LayerHealth] = {}
    for name, node in graph.nodes.items():
        if not isinstance(node.op, Parameter) or node.layer is None:
            continue
        layer = layers.setdefault(node.layer, LayerHealth(node.layer, kinds.get(node.layer, "layer"),
                                                          [], 0, None, None))
        layer.parameters.append(name)
        layer.size += math.prod(node.shape)
    strongest = 0.0
    for layer in layers.values():
        squares, size, ratios, nonfinite = 0.0, 0, [], False
        for name in layer.parameters:
            health = nodes.get(name)
            if health is None or health.stats.grad_rms is None:
                continue
            count = math.prod(graph.nodes[name].shape)
            nonfinite |= health.stats.nonfinite
            squares += health.stats.grad_rms ** 2 * count
            size += count
            # A bias starts at zero, so its ratio says little; a layer's is its weights'.
            if health.stats.update_ratio is not None and len(graph.nodes[name].shape) > 1:
                ratios.append(health.stats.update_ratio)
        if size:
            layer.grad_rms = math.inf if nonfinite else math.sqrt(squares / size)
            if math.isfinite(layer.grad_rms):
                strongest = max(strongest, layer.grad_rms)
        layer.update_ratio = float(np.median(ratios)) if ratios else None
    for layer in layers.values():
        if layer.grad_rms is None:
            continue
        if not math.isfinite(layer.grad_rms) or layer.grad_rms > t.exploding:
            layer.flags.append("exploding")
        elif strongest > 0:
            layer.relative = layer.grad_rms / strongest
            if layer.relative < t.vanishing:
                layer.flags.append("vanishing")
    return list(layers.values())


# --------------------------------------------------------------------------- advice

def ranges(names: Sequence[str], order: Sequence[str]) -> str:
    """``fc1-fc4, fc6``: runs of consecutive names (in ``order``) joined by a dash."""
    position = {n: i for i, n in enumerate(order)}
    ordered = sorted(names, key=lambda n: position.get(n, len(order)))
    runs: list[list[str]] = []
    for name in ordered:
        if runs and position.get(name) is not None and position.get(runs[-1][-1]) == position[name] - 1:
            runs[-1].append(name)
        else:
            runs.append([name])
    return ", ".join(run[0] if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs)


def _power(value: float) -> str:
    return f"10^{math.floor(math.log10(value))}" if value > 0 else "0"


def _findings(model: Model, nodes: dict[str, NodeHealth], layers: list[LayerHealth],
              t: Thresholds) -> list[Finding]:
    findings: list[Finding] = []
    order = [layer.name for layer in layers]
    owner = layer_of(model)
    saturating = health_kinds(model, "saturation")

    exploding = [n for n, h in nodes.items() if "exploding" in h.flags]
    if exploding:
        nonfinite = [n for n in exploding if nodes[n].stats.nonfinite]
        where = ranges(sorted({owner[n] or n for n in exploding}), order)
        what = (f"NaN/Inf in the gradients of {', '.join(nonfinite[:4])}" if nonfinite else
                f"gradient RMS above {t.exploding:g} (largest "
                f"{max(nodes[n].stats.grad_rms for n in exploding):.2e})")
        findings.append(Finding("exploding", exploding, (
            f"exploding gradients in {where}: {what}. Try a lower learning rate, gradient "
            f"clipping (ClipNorm), xavier/he initialization, or batch_norm.")))

    vanishing_layers = [layer for layer in layers if "vanishing" in layer.flags]
    vanishing_nodes = [n for n, h in nodes.items() if "vanishing" in h.flags]
    if vanishing_layers:
        strongest = max((layer for layer in layers if layer.relative is not None),
                        key=lambda layer: layer.relative)
        weakest = min(layer.relative for layer in vanishing_layers)
        moving = [layer.update_ratio for layer in vanishing_layers if layer.update_ratio is not None]
        slow = (f"; their weights change by ~{float(np.median(moving)):.0e} of their size per step "
                f"(~1e-3 is healthy), so they stay near their random initial values while the "
                f"layers near the output converge" if moving else "")
        instead = f" instead of {'/'.join(saturating)}" if saturating else ""
        findings.append(Finding("vanishing", vanishing_nodes, (
            f"vanishing gradients: layers {ranges([x.name for x in vanishing_layers], order)} "
            f"receive gradients down to {_power(weakest)} of the strongest layer's "
            f"({strongest.name}){slow}. Try relu or maxout{instead}, he initialization, "
            f"batch_norm, or an adaptive optimizer (adam).")))
    elif vanishing_nodes:
        findings.append(Finding("vanishing", vanishing_nodes, (
            f"vanishing gradients at {ranges(vanishing_nodes, list(nodes))}: below "
            f"{t.vanishing:g} of the strongest comparable gradient. Try relu or maxout, he "
            f"initialization, batch_norm, or a skip connection around the weak part.")))

    for flag, measure, what, consequence in (
            ("dead", "dead_fraction", "dead ReLUs",
             "of the units never activate on a batch, pass no gradient and stop learning. Try a "
             "lower learning rate, leaky_relu, he initialization, or batch_norm."),
            ("saturated", "saturation", f"saturated {'/'.join(saturating) or 'activations'}",
             f"of the outputs sit where the slope is under {SATURATED_SLOPE:.0%} of its peak, so "
             f"little gradient passes. Try standardized inputs, xavier initialization, batch_norm, "
             f"or relu.")):
        names = [n for n, h in nodes.items() if flag in h.flags]
        if names:
            share = max(getattr(nodes[n].stats, measure) for n in names)
            where = ranges(sorted({owner[n] or n for n in names}), order)
            findings.append(Finding(flag, names, f"{what} after {where}: up to {share:.0%} {consequence}"))

    if not findings:
        measured = [layer for layer in layers if layer.relative is not None]
        if measured:
            weakest_layer = min(measured, key=lambda layer: layer.relative)
            findings.append(Finding("healthy", [], (
                f"gradient flow looks healthy: the weakest layer ({weakest_layer.name}) receives "
                f"{weakest_layer.relative:.2g} of the strongest layer's gradient RMS.")))
        else:
            findings.append(Finding("healthy", [], "no flags: gradients are within the thresholds."))
    return findings


def diagnose_history(history: History, tolerance: float = 0.02, *,
                     early_stopping: EarlyStopping | None = None) -> list[Finding]:
    """Advice from the training curves: overfitting (training loss falls while validation loss
    rises), or a training loss that barely falls (a training problem, which regularization
    would only make worse).

    Pass the ``early_stopping`` callback that trained the model: when it restored the weights of
    the best epoch, the advice says so instead of advising early stopping again.
    """
    if "loss" not in history or len(history["loss"]) < 2:
        return [Finding("history", [], "too few epochs to judge the training curves.")]
    epochs, loss = history.epochs, history["loss"]
    findings = []
    if loss[-1] > 0.9 * loss[0]:
        findings.append(Finding("not-learning", [], (
            f"training loss barely falls ({loss[0]:.3f} -> {loss[-1]:.3f} over {len(loss)} epochs): "
            f"the network does not fit even the training set. This is not overfitting, so "
            f"dropout or L2 would make it worse; check the gradient flow (vanishing gradients?), "
            f"try relu, he initialization, adam, or another learning rate.")))
    if "val_loss" in history:
        val = history["val_loss"]
        best = int(np.argmin(val))
        restored = _restored_epoch(early_stopping, history)
        if restored is not None and best < len(val) - 1:
            findings.append(Finding("early-stopped", [], (
                f"validation loss rose after epoch {epochs[best]} ({val[best]:.3f} -> {val[-1]:.3f}); "
                f"early stopping restored epoch {restored}'s weights, so the model is its best "
                f"epoch's. To do better than {val[best]:.3f}: dropout, L2 (weight decay), or more "
                f"data.")))
        elif best < len(val) - 1 and val[-1] > val[best] * (1 + tolerance) and loss[-1] < loss[best]:
            findings.append(Finding("overfitting", [], (
                f"training loss is low ({loss[-1]:.3f}) but validation loss rises after epoch "
                f"{epochs[best]} ({val[best]:.3f} -> {val[-1]:.3f}): overfitting; try early stopping "
                f"(keep epoch {epochs[best]}'s weights), dropout, L2 (weight decay), or more data.")))
        elif not findings:
            findings.append(Finding("fitting", [], (
                f"no overfitting: validation loss {val[best]:.3f} is lowest at epoch {epochs[best]} "
                f"of {epochs[-1]}.")))
    elif not findings:
        findings.append(Finding("fitting", [], (
            f"training loss falls ({loss[0]:.3f} -> {loss[-1]:.3f}); pass validation= to fit() "
            f"to detect overfitting.")))
    return findings


def _restored_epoch(early_stopping: EarlyStopping | None, history: History) -> int | None:
    """The epoch whose weights ``early_stopping`` put back at the end of the run in ``history``."""
    if early_stopping is None or not early_stopping.restore_best:
        return None
    best = getattr(early_stopping, "best_epoch", None)  # unset before the callback ever ran
    if best is None or best not in history.epochs or best == history.epochs[-1]:
        return None
    return best
