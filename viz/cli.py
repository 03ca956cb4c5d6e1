"""The visualizer's ``graphengine`` subcommands: ``render`` and ``demo``.

A graphengine plugin (entry point ``viz`` in the ``graphengine`` group) that registers them
through the ``graphengine_register_commands`` hook. Every program using graphengine imports this
module when it loads its plugins, so the commands import what they need when they run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import graphengine as ge
from graphengine.errors import GraphEngineError


@ge.hookimpl
def graphengine_register_commands(register):
    register("render", _render_args, render_command)
    register("demo", _demo_args, demo_command)


def _render_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_file", help="a model saved with model.save(path)")
    p.add_argument("-o", "--output", required=True, help="the picture to write: .svg, .png or .pdf")
    p.add_argument("--data", help="an .npz file of input arrays (named like the model's inputs): "
                                  "one forward and backward pass on it annotates the gradient flow")
    p.add_argument("--rankdir", default="TB", choices=("TB", "LR", "BT", "RL"),
                   help="layout direction (default TB: top to bottom)")
    p.add_argument("--collapse", action="store_true", help="draw each layer as one node")
    p.add_argument("--forward-only", action="store_true", help="structure only, no gradients")
    p.add_argument("--keep-source", action="store_true", help="also keep the .gv DOT file")


def render_command(args: argparse.Namespace) -> int:
    """Draw a saved model as a diagram, annotated with its gradient flow when --data is given."""
    import numpy as np

    from graphengine.tools.monitor import GradientMonitor

    from .gradflow import diagnose
    from .render import render

    try:
        model = ge.load(args.model_file)
        diagnosis = None
        if args.data and not args.forward_only:
            with np.load(args.data, allow_pickle=False) as arrays:
                feeds = {name: arrays[name] for name in arrays.files}
            record = GradientMonitor().capture(model, feeds)
            diagnosis = diagnose(model, record)
            print(diagnosis)
        path = render(model, args.output, diagnosis=diagnosis, rankdir=args.rankdir,
                      collapse=args.collapse, forward_only=args.forward_only,
                      keep_source=args.keep_source)
    except GraphEngineError as exc:
        print(f"graphengine render: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=("vanishing",), help="which demo (vanishing: deep sigmoid vs ReLU)")
    p.add_argument("--out", default="demo_output", help="where to write the pictures (default demo_output)")
    p.add_argument("--epochs", type=int, default=30, help="epochs per network (default 30)")
    p.add_argument("--seed", type=int, default=0)


def demo_command(args: argparse.Namespace) -> int:
    """Run a demo: `vanishing` trains deep sigmoid and ReLU networks and shows the gradient flow."""
    from .demo import DemoConfig, vanishing_demo
    return vanishing_demo(Path(args.out), DemoConfig(epochs=args.epochs, seed=args.seed))
