"""Graphviz diagrams of a model, annotated with its gradient flow.

One node per operator (type, output shape, parameter count), the layers' nodes grouped in
clusters. With gradient statistics (those ``fit`` records, or a snapshot of one batch with
``data=``), each node's fill is log10 of its gradient RMS relative to the model's strongest
parameter gradient, on one fixed viridis scale from 10^0 down to 10^-8 (colour-blind-safe and
the same in every picture, so a colour means the same thing in two diagrams), with a legend;
a layer's box is filled by its parameters' gradient on that scale. Each flag is drawn twice, as
a border style and as a text badge, never by colour alone; edge width follows the gradient norm
flowing back along the edge; SVG tooltips carry the exact numbers.

:func:`render` writes only the files it is asked for. Without the ``dot`` executable it writes
the ``.gv`` source and a text table into a new temporary directory, then raises
:class:`GraphvizMissingError` saying where they are and how to install Graphviz.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import graphviz

from graphengine.distributed import writes
from graphengine.errors import GraphEngineError
from graphengine.ir.graph import in_scope
from graphengine.ir.operators import Constant, Input, Parameter
from graphengine.model import Model
from graphengine.tools.monitor import GradientMonitor, NodeStats, Record

from .gradflow import (
    Diagnosis,
    NodeHealth,
    NoStatisticsError,
    diagnose,
    layer_kinds,
    shape_text,
    snapshot,
)

FORMATS = ("svg", "png", "pdf")
RANKDIRS = ("TB", "LR", "BT", "RL")
#: Border style of each flag, most severe first: a node with several flags shows the first.
BORDERS = {
    "exploding": {"style": "bold", "peripheries": "2", "penwidth": "2.5"},
    "vanishing": {"style": "dashed", "penwidth": "2.2"},
    "dead": {"style": "dotted", "penwidth": "2.8"},
    "saturated": {"style": "diagonals", "penwidth": "2.2"},
}
BORDER_WORDS = {"exploding": "bold double border", "vanishing": "dashed border",
                "dead": "dotted border", "saturated": "cut corners"}
NO_GRADIENT_FILL = "#f2f2f2"
FONT = "Helvetica"
THRESHOLDS = ("vanishing", "exploding", "dead", "saturated")


class GraphvizMissingError(GraphEngineError):
    """The ``dot`` program is not installed: the source and a text table were written instead,
    to ``source_path`` and ``table_path`` (in a new temporary directory)."""

    source_path: Path
    table_path: Path


# --------------------------------------------------------------------------- colour scale

@dataclass(frozen=True)
class ColourScale:
    """log10 of a ratio -> a viridis colour, over the whole decades [low, high]."""

    low: int = -8
    high: int = 0
    cmap: str = "viridis"

    def fraction(self, value: float) -> float:
        """Where ``value`` lies on the scale, 0 (at or below 10^low) to 1 (at or above 10^high)."""
        if value <= 0:
            return 0.0
        if not math.isfinite(value):
            return 1.0
        return min(1.0, max(0.0, (math.log10(value) - self.low) / (self.high - self.low)))

    def colours(self, value: float) -> tuple[str, str]:
        """(fill, text colour readable on it)."""
        import matplotlib
        red, green, blue, _ = matplotlib.colormaps[self.cmap](self.fraction(value))
        luminance = 0.2126 * red + 0.7152 * green + 0.0722 * blue
        fill = "#{:02x}{:02x}{:02x}".format(*(round(255 * c) for c in (red, green, blue)))
        return fill, "white" if luminance < 0.45 else "black"

    def ticks(self) -> list[int]:
        return list(range(self.low, self.high + 1))


#: The one scale of every diagram: a gradient RMS as a share of the model's strongest parameter
#: gradient. A scale stretched to each picture's own range made a healthy network, whose
#: gradients all lie within one decade, span the whole palette and look vanishing.
SCALE = ColourScale()


def strongest_parameter_gradient(diagnosis: Diagnosis) -> tuple[str, float] | None:
    """(name, RMS) of the reference of the colours: the layer with the largest parameter-gradient
    RMS, else the parameter node with the largest; None when no parameter has a finite gradient."""
    candidates = [(layer.name, layer.grad_rms) for layer in diagnosis.layers
                  if layer.grad_rms is not None and math.isfinite(layer.grad_rms) and layer.grad_rms > 0]
    if not candidates:
        candidates = [(name, health.stats.grad_rms) for name, health in diagnosis.nodes.items()
                      if health.kind == "parameter" and health.stats.grad_rms is not None
                      and math.isfinite(health.stats.grad_rms) and health.stats.grad_rms > 0]
    return max(candidates, key=lambda pair: pair[1]) if candidates else None


# --------------------------------------------------------------------------- what is drawn

@dataclass
class _Unit:
    """One drawn node: an operator, or a whole collapsed layer."""

    id: str
    name: str
    kind: str
    shape: tuple
    dtype: str
    params: int = 0
    stats: NodeStats | None = None
    relative: float | None = None
    flags: list[str] = field(default_factory=list)
    members: list[str] = field(default_factory=list)
    cluster: str | None = None  # the (uncollapsed) layer scope it is drawn in
    origin: str | None = None


def _text(lines: Sequence[str]) -> str:
    """Lines for a DOT label or tooltip: backslashes escaped, joined by DOT's ``\\n``."""
    return "\\n".join(line.replace("\\", "\\\\") for line in lines)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if not math.isfinite(value) else f"{value:.3e}"


def _params(model: Model, name: str) -> int:
    node = model.graph.nodes[name]
    return math.prod(node.shape) if isinstance(node.op, Parameter) else 0


def _scopes_to_collapse(model: Model, collapse: bool | Sequence[str]) -> list[str]:
    """The layer scopes to draw as one node each. For ``True``: the graph's groups
    (``Graph.groups``): every layer a builder call made, also inside the user's name scopes,
    which stay boxes around them (a discriminator's scope is not one node), and each top-level
    scope written by hand from primitives."""
    layers = {node.layer for node in model.graph.nodes.values() if node.layer}
    if collapse is True:
        return sorted(set(model.graph.groups().values()))
    if not collapse:
        return []
    known = {"/".join(layer.split("/")[:depth]) for layer in layers
             for depth in range(1, layer.count("/") + 2)}
    unknown = [scope for scope in collapse if scope not in known]
    if unknown:
        raise GraphEngineError(f"collapse names unknown layer(s) {unknown}; layers: {sorted(known)}")
    return list(collapse)


def _units(model: Model, diagnosis: Diagnosis | None, collapse: list[str],
           constants: bool) -> tuple[dict[str, _Unit], dict[str, str]]:
    """The drawn units, and node name -> id of the unit drawing it."""
    graph = model.graph
    kinds = layer_kinds(model)
    layers = {layer.name: layer for layer in diagnosis.layers} if diagnosis else {}
    units: dict[str, _Unit] = {}
    owner: dict[str, str] = {}
    by_parameters: set[str] = set()
    output: dict[str, str] = {}  # collapsed unit id -> the node giving its output so far

    def collapsed_scope(layer: str | None) -> str | None:
        for scope in collapse:
            if layer is not None and in_scope(layer, scope):
                return scope
        return None

    def follows(name: str) -> str | None:
        """The collapsed unit an activation applied outside any collapsed layer joins: the one
        whose output is its only input and feeds nothing else, in the same scope (``dense`` then
        ``sigmoid`` reads as one step)."""
        node = graph.nodes[name]
        if len(node.inputs) != 1 or graph.is_source(name):
            return None
        (source,) = node.inputs
        uid = owner.get(source)
        if (uid is None or output.get(uid) != source or len(set(graph.consumers(source))) != 1
                or units[uid].cluster != node.layer):
            return None
        return uid

    for i, (name, node) in enumerate(graph.nodes.items()):
        if isinstance(node.op, Constant) and not constants:
            continue
        health: NodeHealth | None = diagnosis.nodes.get(name) if diagnosis else None
        scope = collapsed_scope(node.layer)
        uid = f"L{collapse.index(scope)}" if scope is not None else follows(name) if collapse else None
        if uid is None:
            unit = _Unit(f"n{i}", name, node.kind, node.shape, node.dtype, _params(model, name),
                         health.stats if health else None, health.relative if health else None,
                         list(health.flags) if health else [], [name], node.layer, node.origin)
            units[unit.id] = unit
            owner[name] = unit.id
            continue
        unit = units.get(uid)
        if unit is None:  # no ':' in ids: DOT reads it as a port
            unit = units[uid] = _Unit(uid, scope, kinds.get(scope, "layer"), node.shape, node.dtype,
                                      cluster=scope.rsplit("/", 1)[0] if "/" in scope else None)
            layer = layers.get(scope)
            if layer is not None and layer.grad_rms is not None:
                # a layer with parameters is coloured and flagged by their gradients
                unit.stats = NodeStats(grad_rms=layer.grad_rms, update_ratio=layer.update_ratio)
                unit.relative = layer.relative
                unit.flags = list(layer.flags)
                by_parameters.add(uid)
        elif scope is None:
            unit.kind += f" + {node.kind}"
        unit.members.append(name)
        unit.params += _params(model, name)
        if not isinstance(node.op, (Parameter, Constant)):
            unit.shape, unit.dtype = node.shape, node.dtype  # ends as the layer's output
            output[uid] = name
            if health is not None and uid not in by_parameters:
                unit.stats, unit.relative = health.stats, health.relative  # likewise
        if health is not None:
            unit.flags += [f for f in health.flags if f in ("dead", "saturated", "exploding")
                           and f not in unit.flags]
        owner[name] = uid
    _lift_lonely(units)
    for unit in units.values():  # by severity: the first flag sets the border
        unit.flags.sort(key=list(BORDERS).index)
    return units, owner


def _lift_lonely(units: Mapping[str, _Unit]) -> None:
    """A layer box around a single node says nothing its label does not: draw the node in the
    enclosing box instead (innermost first, so nested one-node boxes all go)."""
    while True:
        holding: dict[str, int] = {}
        for unit in units.values():
            scope = unit.cluster
            while scope:
                holding[scope] = holding.get(scope, 0) + 1
                scope = scope.rsplit("/", 1)[0] if "/" in scope else None
        lonely = {scope for scope, count in holding.items() if count == 1}
        if not lonely:
            return
        for unit in units.values():
            if unit.cluster in lonely:
                unit.cluster = unit.cluster.rsplit("/", 1)[0] if "/" in unit.cluster else None


# --------------------------------------------------------------------------- DOT

def to_dot(model: Model, source: GradientMonitor | Record | Sequence[Record] | None = None, *,
           diagnosis: Diagnosis | None = None, forward_only: bool = False, rankdir: str = "TB",
           collapse: bool | Sequence[str] = False, constants: bool = True, title: str | None = None,
           window: int = 5, **thresholds: float) -> graphviz.Digraph:
    """The diagram as a :class:`graphviz.Digraph` (``.source`` is the DOT text).

    Gradient statistics come from ``diagnosis``, else from ``source`` or the model's attached
    monitor; without any (or with ``forward_only=True``) the structure alone is drawn.
    ``collapse=True`` draws each top-level layer as one node (or pass the layer names);
    ``constants=False`` leaves constants out; ``thresholds`` as for :func:`viz.gradflow.diagnose`.
    """
    if rankdir not in RANKDIRS:
        raise GraphEngineError(f"rankdir must be one of {RANKDIRS}, got {rankdir!r}")
    diagnosis = _resolve(model, source, diagnosis, forward_only, window, thresholds)
    units, owner = _units(model, diagnosis, _scopes_to_collapse(model, collapse), constants)
    strongest = strongest_parameter_gradient(diagnosis) if diagnosis is not None else None
    edges = _edges(model, diagnosis, owner)
    norms = [norm for *_, norm in edges.values() if norm is not None and math.isfinite(norm)]
    top_edge = max(norms, default=0.0) or None

    dot = graphviz.Digraph(model.graph.name, graph_attr={
        "rankdir": rankdir, "fontname": FONT, "fontsize": "11", "nodesep": "0.22", "ranksep": "0.32",
        "newrank": "true", "labelloc": "t", "label": title or _title(model, diagnosis),
        "tooltip": model.graph.name},
        node_attr={"fontname": FONT, "fontsize": "10", "margin": "0.08,0.03", "height": "0.3"},
        edge_attr={"fontname": FONT, "fontsize": "8", "arrowsize": "0.6"})
    clusters: dict[str | None, list[_Unit]] = {}
    for unit in units.values():
        clusters.setdefault(unit.cluster, []).append(unit)
    reference = strongest[1] if strongest else None
    _draw_clusters(dot, _Drawing(model, diagnosis, reference, clusters, _besides(model, units, owner)),
                   None)
    for (tail, head), (shape, dtype, rms, norm) in edges.items():
        dot.edge(tail, head, **_edge_attrs(units[tail], units[head], shape, dtype, rms, norm, top_edge))
    if strongest is not None:
        with dot.subgraph() as foot:  # alone on the last rank: below the graph, not widening it
            foot.attr(rank="sink")
            foot.node("legend", _legend(strongest, diagnosis.thresholds), shape="plaintext", margin="0")
        # ranks are counted per connected part: tie the legend to the graph's last node
        dot.edge(list(units)[-1], "legend", style="invis")
    return dot


def _resolve(model: Model, source: Any, diagnosis: Diagnosis | None, forward_only: bool, window: int,
             thresholds: Mapping[str, float]) -> Diagnosis | None:
    """The diagnosis to draw: the one given, else one from ``source`` or the attached monitor;
    None for a forward-only drawing or when nothing was recorded."""
    if forward_only or diagnosis is not None:
        return None if forward_only else diagnosis
    try:
        return diagnose(model, source, window=window, **thresholds)
    except NoStatisticsError:
        if source is not None:
            raise
        return None  # nothing recorded: the structure alone


def _title(model: Model, diagnosis: Diagnosis | None) -> str:
    if diagnosis is None:
        return f"{model.graph.name}: structure (no gradient statistics)"
    flagged = {f.flag for f in diagnosis.findings} & set(BORDERS)
    verdict = ("flags: " + ", ".join(sorted(flagged))) if flagged else "no flags"
    return f"{model.graph.name}: gradient flow {diagnosis.when()}, {verdict}"


@dataclass
class _Drawing:
    model: Model
    diagnosis: Diagnosis | None
    #: the strongest parameter gradient RMS: a fill is a node's gradient RMS over it
    reference: float | None
    clusters: dict[str | None, list[_Unit]]
    #: unit id -> the unit it is drawn beside (a parameter next to the operator using it)
    beside: dict[str, str]


def _besides(model: Model, units: Mapping[str, _Unit], owner: Mapping[str, str]) -> dict[str, str]:
    """Parameters and constants ranked level with their only consumer in the same layer: the
    data path then runs straight down instead of shifting sideways at every layer."""
    pairs = {}
    for unit in units.values():
        node = model.graph.nodes.get(unit.name)
        if node is None or not isinstance(node.op, (Parameter, Constant)):
            continue
        consumers = {owner.get(c) for c in model.graph.consumers(unit.name)}
        if len(consumers) == 1:
            (head,) = consumers
            if head is not None and units[head].cluster == unit.cluster:
                pairs[unit.id] = head
    return pairs


def _draw_clusters(dot: graphviz.Digraph, drawing: _Drawing, scope: str | None) -> None:
    model, diagnosis, clusters = drawing.model, drawing.diagnosis, drawing.clusters
    for unit in clusters.get(scope, []):
        dot.node(unit.id, **_node_attrs(model, unit, drawing.reference))
    for unit in clusters.get(scope, []):
        if unit.id in drawing.beside:
            with dot.subgraph() as level:
                level.attr(rank="same")
                level.node(unit.id)
                level.node(drawing.beside[unit.id])
    children = dict.fromkeys(_ancestor_below(s, scope) for s in clusters if s and _inside(s, scope))
    kinds = layer_kinds(model)
    layers = {layer.name: layer for layer in diagnosis.layers} if diagnosis else {}
    for child in children:
        with dot.subgraph(name=f"cluster_{child}") as sub:
            layer = layers.get(child)
            flags = layer.flags if layer else []
            params = sum(u.params for s, us in clusters.items() if s and (s == child or _inside(s, child))
                         for u in us)
            # a scope around layers (a GAN's "gen") is the user's name scope, not a layer
            kind = kinds.get(child) or ("name scope" if any(_inside(k, child) for k in kinds) else "layer")
            label = f"{child.rsplit('/', 1)[-1]} · {kind}"
            label += f" · {params:,} params" if params else ""
            label = _text([label, *(_badge(flag, layer.relative if layer else None, None) for flag in flags)])
            tooltip = [f"{child} ({kind}), {params:,} parameters"]
            if layer is not None and layer.grad_rms is not None:
                tooltip += [f"{what} {_fmt(value)}" for what, value in (
                    ("parameter gradient RMS", layer.grad_rms),
                    ("relative to the strongest layer", layer.relative),
                    ("update/weight ratio", layer.update_ratio)) if value is not None]
            style = "rounded" + (",dashed" if "vanishing" in flags else ",bold" if flags else "")
            fill, ink = "#fafafa", "black"
            if layer is not None and layer.grad_rms is not None and drawing.reference:
                fill, ink = SCALE.colours(layer.grad_rms / drawing.reference)
            sub.attr(label=label, style=style, color="#555555", bgcolor=fill, fontcolor=ink, fontsize="10",
                     tooltip=_text(tooltip), penwidth="2" if flags else "1", labeljust="l")
            _draw_clusters(sub, drawing, child)


def _inside(scope: str, outer: str | None) -> bool:
    return outer is None or scope.startswith(outer + "/")


def _ancestor_below(scope: str, outer: str | None) -> str:
    """The child of ``outer`` (None: the top) on the way down to ``scope``."""
    parts = scope.split("/")
    depth = 0 if outer is None else outer.count("/") + 1
    return "/".join(parts[:depth + 1])


def _badge(flag: str, relative: float | None, stats: NodeStats | None) -> str:
    if flag == "vanishing" and relative is not None:
        exponent = math.floor(math.log10(relative)) if relative > 0 else None
        return f"[VANISHING {'0' if exponent is None else f'10^{exponent}'} of max]"
    if flag == "exploding" and stats is not None and stats.nonfinite:
        return "[EXPLODING: NaN/Inf]"
    if flag == "dead" and stats is not None and stats.dead_fraction is not None:
        return f"[DEAD {100 * stats.dead_fraction:.0f}%]"
    if flag == "saturated" and stats is not None and stats.saturation is not None:
        return f"[SATURATED {100 * stats.saturation:.0f}%]"
    return f"[{flag.upper()}]"


def _node_attrs(model: Model, unit: _Unit, reference: float | None) -> dict[str, str]:
    node = model.graph.nodes.get(unit.name)
    op = node.op if node is not None else None
    inside = unit.cluster and unit.name.startswith(unit.cluster + "/")
    short = unit.name.rsplit("/", 1)[-1] if inside else unit.name
    plain = unit.kind in ("parameter", "input") or short.startswith(unit.kind)
    lines = [short if plain else f"{short}: {unit.kind}"]
    lines.append(shape_text(unit.shape) + (f" · {unit.params:,} params" if unit.params else ""))
    stats = unit.stats
    if stats is not None and stats.grad_rms is not None:
        lines.append(f"grad rms {stats.grad_rms:.1e}")
    lines += [_badge(flag, unit.relative, stats) for flag in unit.flags]
    attrs = {"label": _text(lines), "tooltip": _tooltip(model, unit, reference)}
    if isinstance(op, Input):
        attrs["shape"] = "invhouse"
    elif isinstance(op, Parameter):
        attrs["shape"] = "box"
    elif isinstance(op, Constant):
        attrs.update(shape="plaintext", fontsize="8", label=_text([short, shape_text(unit.shape)]))
    elif node is not None and not node.shape:
        attrs["shape"] = "octagon"
    else:
        attrs["shape"] = "box"
    styles = ["filled"] + (["rounded"] if isinstance(op, Parameter) or op is None else [])
    if stats is not None and stats.grad_rms is not None and reference and unit.shape:
        attrs["fillcolor"], attrs["fontcolor"] = SCALE.colours(stats.grad_rms / reference)
    else:
        attrs["fillcolor"] = NO_GRADIENT_FILL if not isinstance(op, Constant) else "white"
    if unit.flags:
        border = dict(BORDERS[unit.flags[0]])
        styles += [s for s in border.pop("style").split(",") if s not in styles]
        if "diagonals" in styles and "rounded" in styles:
            styles.remove("rounded")
        attrs.update(border)
    attrs["style"] = ",".join(styles)
    return attrs


def _tooltip(model: Model, unit: _Unit, reference: float | None) -> str:
    lines = [f"{unit.name} ({unit.kind})", f"output {shape_text(unit.shape)} {unit.dtype}"]
    node = model.graph.nodes.get(unit.name)
    if node is not None and node.op.config():
        lines.append("config " + ", ".join(f"{k}={v!r}" for k, v in node.op.config().items()))
    if unit.params:
        lines.append(f"{unit.params:,} parameters")
    if len(unit.members) > 1:
        lines.append(f"{len(unit.members)} nodes: {', '.join(unit.members)}")
    s = unit.stats
    if s is not None:
        for label, value in (("gradient RMS", s.grad_rms), ("gradient L2 norm", s.grad_norm),
                             ("max |gradient|", s.grad_max),
                             ("share of the strongest parameter gradient (the fill)",
                              s.grad_rms / reference if reference and s.grad_rms is not None else None),
                             ("relative to the strongest comparable", unit.relative),
                             ("update/weight ratio", s.update_ratio)):
            if value is not None:
                lines.append(f"{label} {_fmt(value)}")
        if s.dead_fraction is not None:
            lines.append(f"dead units {100 * s.dead_fraction:.2f}%")
        if s.saturation is not None:
            lines.append(f"saturated outputs {100 * s.saturation:.2f}%")
    else:
        lines.append("no gradient recorded")
    if unit.flags:
        lines.append("flags: " + ", ".join(unit.flags))
    if unit.origin:
        lines.append(f"built at {os.path.basename(unit.origin)}")
    return _text(lines)


def _edges(model: Model, diagnosis: Diagnosis | None,
           owner: Mapping[str, str]) -> dict[tuple[str, str], tuple[tuple, str, float | None, float | None]]:
    """(tail unit, head unit) -> (tensor shape, dtype, gradient rms and norm flowing back)."""
    edges: dict[tuple[str, str], tuple[tuple, str, float | None, float | None]] = {}
    for name, node in model.graph.nodes.items():
        for source in dict.fromkeys(node.inputs):
            tail, head = owner.get(source), owner.get(name)
            if tail is None or head is None or tail == head:
                continue
            rms = norm = None
            if diagnosis is not None:
                if (source, name) in diagnosis.edges:
                    rms, norm = diagnosis.edges[(source, name)]
                elif source in diagnosis.nodes and _receives_gradient(diagnosis, name):
                    # one consumer passes gradient back: the edge carries the source's whole gradient
                    stats = diagnosis.nodes[source].stats
                    rms, norm = stats.grad_rms, stats.grad_norm
            spec = model.graph.nodes[source].spec
            previous = edges.get((tail, head))
            if previous is not None and (norm is None or (previous[3] or 0) >= norm):
                continue
            edges[(tail, head)] = (spec.shape, spec.dtype, rms, norm)
    return edges


def _receives_gradient(diagnosis: Diagnosis, name: str) -> bool:
    health = diagnosis.nodes.get(name)
    return health is not None and health.stats.grad_rms is not None


def _edge_attrs(tail: _Unit, head: _Unit, shape: tuple, dtype: str, rms: float | None,
                norm: float | None, top: float | None) -> dict[str, str]:
    tooltip = [f"{tail.name} -> {head.name}: {shape_text(shape)} {dtype}"]
    attrs = {"tooltip": _text(tooltip)}
    if tail.kind not in ("parameter", "constant"):
        # the data path: labelled, and kept straight by the layout
        attrs.update(label=shape_text(shape), weight="4")
    if norm is None or top is None:
        attrs["color"] = "#9a9a9a"
        return attrs
    tooltip.append(f"gradient flowing back: RMS {_fmt(rms)}, L2 norm {_fmt(norm)}")
    attrs["tooltip"] = _text(tooltip)
    attrs["penwidth"] = f"{0.6 + 4.4 * SCALE.fraction(norm / top):.2f}"
    attrs["color"] = "#303030"
    return attrs


def _legend(strongest: tuple[str, float], thresholds: Any) -> str:
    ticks = SCALE.ticks()
    cells = "".join(
        '<TD BGCOLOR="{}" WIDTH="26"><FONT COLOR="{}" POINT-SIZE="8">{}</FONT></TD>'.format(
            *SCALE.colours(10.0 ** t), "1" if t == 0 else f"1e{t}") for t in ticks)
    span = len(ticks)
    meaning = {"exploding": f"RMS &gt; {thresholds.exploding:g} or NaN/Inf",
               "vanishing": f"&lt; {thresholds.vanishing:g} x the strongest comparable",
               "dead": f"&#8805; {100 * thresholds.dead:.0f}% of ReLU units never active",
               "saturated": f"&#8805; {100 * thresholds.saturated:.0f}% of outputs in flat tails"}
    style = {"exploding": ' STYLE="solid" BORDER="3"', "vanishing": ' STYLE="dashed" BORDER="2"',
             "dead": ' STYLE="dotted" BORDER="2"', "saturated": ' BORDER="1"'}
    rows = "".join(
        f'<TR><TD COLSPAN="{span}"{style[flag]} ALIGN="LEFT">[{flag.upper()}] {BORDER_WORDS[flag]}: '
        f'{meaning[flag]}</TD></TR>' for flag in BORDERS)
    name, value = strongest
    return (f'<<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="1" CELLPADDING="2">'
            f'<TR><TD COLSPAN="{span}"><B>fill: gradient RMS / strongest parameter gradient</B></TD></TR>'
            f'<TR><TD COLSPAN="{span}">(1 = {name}, {value:.1e}; the same scale in every diagram)</TD></TR>'
            f'<TR>{cells}</TR>{rows}'
            f'<TR><TD COLSPAN="{span}" ALIGN="LEFT">edge width: gradient norm flowing back; '
            f'grey: none</TD></TR></TABLE>>')


# --------------------------------------------------------------------------- files

def stats_table(model: Model, diagnosis: Diagnosis | None) -> str:
    """The numbers of the diagram as text (what is written when ``dot`` is missing)."""
    if diagnosis is not None:
        return f"{diagnosis}\n\n{diagnosis.table()}\n"
    lines = [f"{model.graph.name}: structure (no gradient statistics)",
             f"{'node':<28} {'op':<14} {'shape':<16} {'params':>8}"]
    for name, node in model.graph.nodes.items():
        lines.append(f"{name:<28} {node.kind:<14} {shape_text(node.shape):<16} {_params(model, name):>8}")
    return "\n".join(lines) + "\n"


def render(model: Model, path: str | os.PathLike,
           source: GradientMonitor | Record | Sequence[Record] | None = None, *,
           data: Mapping[str, Any] | None = None, format: str | None = None, keep_source: bool = False,
           diagnosis: Diagnosis | None = None, forward_only: bool = False, window: int = 5,
           **options: Any) -> Path:
    """Draw ``model`` to ``path`` (.svg, .png or .pdf, or ``format=``); returns the path.

    The gradients drawn are those recorded while training (the model's monitor), or ``source``,
    or, with ``data=`` (a batch: input name -> array), a fresh snapshot of one forward and
    backward pass on it (no update). Options are those of :func:`to_dot` (``rankdir``,
    ``collapse``, ...). Only ``path`` is written; ``keep_source=True`` also writes the DOT source
    next to it (same name, ``.gv``). A drawing without gradient statistics says so on stderr.
    In a distributed run every rank calls it (a snapshot with ``data=`` is a collective step)
    and rank 0 draws: its monitor holds the gradients of the global batch.
    """
    path = Path(path)
    fmt = (format or path.suffix.lstrip(".")).lower()
    if fmt not in FORMATS:
        raise GraphEngineError(f"cannot render {path.name!r}: the format {fmt!r} is not one of "
                               f"{FORMATS}; pick it with the file suffix or format=")
    if data is not None:
        if source is not None or diagnosis is not None:
            raise GraphEngineError("render: pass data= (a batch to snapshot) or source=/diagnosis=, "
                                   "not both")
        if not forward_only:
            source = snapshot(model, data)
    thresholds = {k: options.pop(k) for k in THRESHOLDS if k in options}
    diagnosis = _resolve(model, source, diagnosis, forward_only, window, thresholds)
    if diagnosis is None and not forward_only:
        print(f"graphengine.viz.render: {model.graph.name!r} has no gradient statistics, so {path} "
              f"shows its structure alone; train it with fit() or pass data=<a batch> to draw the "
              f"gradient flow (forward_only=True draws the structure without this note)",
              file=sys.stderr)
    dot = to_dot(model, diagnosis=diagnosis, forward_only=forward_only, **options)
    if not writes(model):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    if keep_source:
        dot.save(path.with_suffix(".gv"))
    try:
        picture = dot.pipe(format=fmt, quiet=True)
    except graphviz.ExecutableNotFound:
        raise _missing_dot(model, dot, diagnosis, path, fmt, keep_source) from None
    path.write_bytes(picture)
    return path


def _missing_dot(model: Model, dot: graphviz.Digraph, diagnosis: Diagnosis | None, path: Path,
                 fmt: str, keep_source: bool) -> GraphvizMissingError:
    """Keep what can be kept without ``dot``, in a new directory: files next to ``path`` (the
    user's own ``graph.txt`` or ``graph.gv``) are never overwritten unasked."""
    folder = Path(tempfile.mkdtemp(prefix="graphengine-render-"))
    gv = path.with_suffix(".gv") if keep_source else folder / f"{path.stem}.gv"
    if not keep_source:
        dot.save(gv)
    table = folder / f"{path.stem}.txt"
    table.write_text(stats_table(model, diagnosis))
    error = GraphvizMissingError(
        f"the Graphviz 'dot' program is not installed, so {path} was not drawn. The diagram source "
        f"is in {gv} (draw it later with: dot -T{fmt} {gv} -o {path}) and the numbers, as a text "
        f"table, in {table}. Install Graphviz: apt-get install graphviz (Debian/Ubuntu), "
        f"brew install graphviz (macOS) or conda install graphviz.")
    error.source_path, error.table_path = gv, table
    return error
