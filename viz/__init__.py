"""The gradient-flow visualizer: diagrams, charts and a diagnosis of a model's gradients.

    from graphengine import viz

    model.fit(data, epochs=10)                 # records gradient statistics as it trains
    print(viz.diagnose(model))                 # flags and advice, no rendering needed
    viz.render(model, "graph.svg")             # the annotated diagram (.svg, .png, .pdf)
    viz.render(model, "now.svg", data=batch)   # a fresh snapshot of one batch
    viz.gradient_flow_chart({"mine": model}, "flow.png")

The core (``graphengine``) never imports this package.
"""

from __future__ import annotations

from .charts import gradient_flow_chart
from .gradflow import Diagnosis, Thresholds, diagnose, diagnose_history, snapshot
from .render import GraphvizMissingError, render, stats_table, to_dot

__all__ = ["Diagnosis", "GraphvizMissingError", "Thresholds", "diagnose", "diagnose_history",
           "gradient_flow_chart", "render", "snapshot", "stats_table", "to_dot"]
