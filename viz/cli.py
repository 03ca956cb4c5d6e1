"""The visualizer's ``graphengine`` subcommands: ``render`` and ``demo``.

A graphengine plugin (entry point ``viz`` in the ``graphengine`` group) that registers them
through the ``graphengine_register_commands`` hook. Every program using graphengine imports this
module when it loads its plugins, so the commands import what they need when they run.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import graphengine as ge
from graphengine.cli import positive_int
from graphengine.errors import DataError

#: The picture formats of ``render`` (as in graphengine.viz.render, which imports graphviz: the
#: command line parser must not).
FORMATS = ("svg", "png", "pdf")
#: Most rows a ``--data`` batch may hold, and most bytes in all: one batch for one pass, not a
#: data set. A small compressed file can declare gigabytes of zeros.
MAX_ROWS = 65536
MAX_BYTES = 1 << 30


@ge.hookimpl
def graphengine_register_commands(register):
    register("render", _render_args, render_command)
    register("demo", _demo_args, demo_command)


def _render_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_file", help="a model saved with model.save(path), or an ONNX model (.onnx)")
    p.add_argument("-o", "--output", required=True, help="the picture to write: .svg, .png or .pdf")
    p.add_argument("--format", choices=FORMATS,
                   help="the picture's format (default: from the output's suffix)")
    p.add_argument("--data", help="an .npz file of one batch of input arrays (named like the model's "
                                  "inputs): one forward and backward pass on it annotates the "
                                  "gradient flow")
    p.add_argument("--rankdir", default="TB", choices=("TB", "LR", "BT", "RL"),
                   help="layout direction (default TB: top to bottom)")
    p.add_argument("--collapse", action="store_true", help="draw each layer as one node")
    p.add_argument("--forward-only", action="store_true", help="structure only, no gradients")
    p.add_argument("--keep-source", action="store_true", help="also keep the .gv DOT file")
    p.add_argument("--loss", default="mse",
                   help="for an ONNX model with --data: the loss on its first output, against the "
                        "array 'target' of the batch (default mse; softmax_cross_entropy takes "
                        "class labels)")


def render_command(args: argparse.Namespace) -> int:
    """Draw a saved model as a diagram, annotated with its gradient flow when --data is given."""
    from .gradflow import diagnose, snapshot
    from .render import render

    # A user error (a malformed model file, bad --data) is one line and exit 2: graphengine.cli
    model = _load_model(args)
    diagnosis = None
    if args.data and not args.forward_only:
        feeds = load_batch(args.data, model)
        diagnosis = diagnose(model, snapshot(model, feeds))
        print(diagnosis)
    path = render(model, args.output, diagnosis=diagnosis, format=args.format,
                  rankdir=args.rankdir, collapse=args.collapse,
                  forward_only=args.forward_only, keep_source=args.keep_source)
    print(f"wrote {path}")
    return 0


def _load_model(args: argparse.Namespace) -> ge.Model:
    """A saved model, or an ONNX model imported (graphengine.onnx); with --data, the ONNX model
    gets ``--loss`` on its first output, against the batch's array ``target``."""
    if Path(args.model_file).suffix.lower() != ".onnx":
        return ge.load(args.model_file)
    from graphengine.onnx import load

    loss = args.loss if args.data and not args.forward_only else None
    return load(args.model_file, loss=loss)


def load_batch(path: str | Path, model: ge.Model, *, max_rows: int = MAX_ROWS,
               max_bytes: int = MAX_BYTES) -> dict[str, Any]:
    """The arrays of the .npz file ``path``, after checking from the headers alone, before
    anything is decompressed, that each is one of the model's inputs, with its shape, and that
    together they are no larger than one batch needs."""
    import zipfile

    import numpy as np

    inputs = {name: model.graph.nodes[name] for name in model.graph.inputs()}
    try:
        archive = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise DataError(f"--data {path}: no such file") from None
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"--data {path}: not an .npz file ({exc})") from None
    with archive:
        declared = {}
        for info in archive.infolist():
            name = info.filename.removesuffix(".npy")
            if name not in inputs:
                raise DataError(f"--data {path}: array {name!r} is not an input of the model; its "
                                f"inputs are {sorted(inputs)}")
            try:
                with archive.open(info) as member:
                    major, _ = np.lib.format.read_magic(member)
                    read_header = (np.lib.format.read_array_header_1_0 if major == 1 else
                                   np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read_header(member)
            except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
                raise DataError(f"--data {path}: array {name!r} has no valid .npy header ({exc})") from None
            expected = inputs[name].shape
            if dtype.hasobject or len(shape) != len(expected) or any(
                    want is not None and want != have for want, have in zip(expected, shape)):
                raise DataError(f"--data {path}: array {name!r} is {dtype} {shape}; the model's input "
                                f"{name!r} takes shape {tuple('N' if d is None else d for d in expected)}")
            if shape and shape[0] > max_rows:
                raise DataError(f"--data {path}: array {name!r} holds {shape[0]:,} rows; one batch "
                                f"of at most {max_rows:,} is enough to draw the gradient flow")
            declared[name] = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
            if info.file_size > declared[name] + 4096:  # the header, padded to 64 bytes, and no more
                raise DataError(f"--data {path}: array {name!r} takes {info.file_size:,} bytes "
                                f"unpacked but declares {declared[name]:,}")
        total = sum(declared.values())
        if total > max_bytes:
            raise DataError(f"--data {path}: the arrays hold {total:,} bytes unpacked; one batch "
                            f"of at most {max_bytes:,} is enough")
    with np.load(path, allow_pickle=False) as arrays:
        return {name: arrays[name] for name in arrays.files}


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=("vanishing",), help="which demo (vanishing: deep sigmoid vs ReLU)")
    p.add_argument("--out", default="demo_output", help="where to write the pictures (default demo_output)")
    p.add_argument("--epochs", type=positive_int, default=30, help="epochs per network (default 30)")
    p.add_argument("--seed", type=int, default=0, help="the random seed of every network (default 0)")
    p.add_argument("--images", help="also write the documentation's pictures to this folder "
                                    "(make docs: docs/images)")


def demo_command(args: argparse.Namespace) -> int:
    """Run a demo: `vanishing` trains deep sigmoid and ReLU networks and shows the gradient flow."""
    from .demo import DemoConfig, vanishing_demo
    return vanishing_demo(Path(args.out), DemoConfig(epochs=args.epochs, seed=args.seed),
                          images=args.images)
