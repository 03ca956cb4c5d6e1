"""graphengine's ONNX plugin (entry point ``onnx``): the ``onnx_node`` layer, an imported ONNX
node that graphengine has no operator of its own for, run by
:class:`graphengine.onnx.ops.OnnxOp` (a plugin, so that a saved imported model is rebuilt like
any other), and the ``graphengine export`` command. Imports nothing of ``onnx`` until a command
runs.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..hooks import get_plugin_manager, hookimpl
from ..ir.contracts import Layer
from .ops import FORWARD, OnnxOp

LAYER = "onnx_node"


class OnnxNode(Layer):
    """``g.layer("onnx_node", *inputs, op_type="Conv", attributes={...}, static={...})``: the
    ONNX operator ``op_type`` on the tensor ``inputs``; ``static`` holds, by ONNX input
    position, the inputs that fix the output's shape (a Reshape's shape); ``output`` picks one
    output of an operator that has several."""

    def __init__(self, op_type: str, attributes: dict[str, Any] | None = None,
                 static: dict[str, Any] | None = None, output: int = 0) -> None:
        if op_type not in FORWARD:
            raise ValueError(f"ONNX operator {op_type!r} is not supported; supported: "
                             f"{', '.join(sorted(FORWARD))}")
        super().__init__(op_type=op_type, attributes=attributes or {}, static=static or {},
                         output=output)
        self.op_type, self.attributes, self.static = op_type, attributes or {}, static or {}
        self.output = output

    def build(self, g, *inputs):
        return g.apply(OnnxOp(self.op_type, self.attributes, self.static, self.output), *inputs,
                       name=self.op_type)


@hookimpl
def graphengine_register_layers(register):
    register(LAYER, OnnxNode)


@hookimpl
def graphengine_register_commands(register):
    register("export", _export_args, export_command)


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_file", help="a model saved with model.save(path)")
    p.add_argument("-o", "--output", required=True, help="the ONNX file to write (.onnx)")
    p.add_argument("--opset", type=int, default=None,
                   help="the ONNX opset to write (default 17; 14 or newer)")


def export_command(args: argparse.Namespace) -> int:
    """Export a saved model's inference graph to ONNX, to run in onnxruntime and elsewhere."""
    from ..io.serialize import load
    from .export import DEFAULT_OPSET, export

    proto = export(load(args.model_file), args.output, opset=args.opset or DEFAULT_OPSET)
    print(f"wrote {args.output}: {len(proto.graph.node)} ONNX nodes, opset "
          f"{proto.opset_import[0].version}, inputs {[i.name for i in proto.graph.input]}, "
          f"outputs {[o.name for o in proto.graph.output]}")
    return 0


def ensure_registered() -> None:
    """Register this module with the process's plugin manager unless an entry point did."""
    import sys

    manager = get_plugin_manager()
    if LAYER not in manager.layers:
        manager.register(sys.modules[__name__], name="onnx", distribution="graphengine")
