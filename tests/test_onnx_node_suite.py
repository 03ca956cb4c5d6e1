"""ONNX's own operator test suite, run through graphengine's importer (graphengine.onnx.Backend).

The cases are those ``onnx.backend.test.loader.load_model_tests(kind="node")`` generates (onnx
1.23 generates them in memory; ~17 s, so once per session, at collection), without the
"expanded" variants (the same ops decomposed into others), for every case whose operators
the importer supports. Each runs as ONNX's backend test runner runs a node test: prepared by
``Backend.prepare``, fed ONNX's inputs, compared by ``BackendTest.assert_similar_outputs``
with the case's own tolerances. Selecting by the operators a case's graph holds, rather than
by name patterns, keeps out cases whose names merely start like a supported operator
(``test_gather_elements_*`` tests GatherElements).

The cases graphengine fails are expected failures, each for a reason listed in docs/onnx.md
and in ``KNOWN_FAILURES`` below; they are strict, so a case that starts passing is reported.
"""

from __future__ import annotations

import re
import warnings

import pytest

onnx = pytest.importorskip("onnx", reason="ONNX's node tests need pip install onnx")

from onnx.backend.test import BackendTest  # noqa: E402
from onnx.backend.test.loader import load_model_tests  # noqa: E402
from onnx.backend.test.runner import _normalize_tensor  # noqa: E402

from graphengine.onnx import Backend  # noqa: E402
from graphengine.onnx.load import supported_ops  # noqa: E402

#: Why graphengine fails these cases: pattern of the case's name -> reason.
KNOWN_FAILURES = {
    r"_uint(16|32|64)$":
        "graphengine has no uint16, uint32 or uint64 tensors",
    r"cast(like)?_(BFLOAT16|FLOAT8\w*|FLOAT4E2M1|U?INT[24])_to_|celu_bfloat16|range_bfloat16":
        "graphengine has no bfloat16, float8, 4-bit or 2-bit inputs",
    r"cast_e8m0": "float8e8m0 (exponent only): no such inputs in graphengine, and ONNX rounds a "
                  "cast to it up where NumPy rounds to nearest",
    r"equal_string": "graphengine has no string tensors",
    r"empty_set|zero_size|start_greater_than_end|start_out_of_bounds|int_shape_zero|allowzero|tril_zero":
        "graphengine refuses empty (zero-size) tensors when a graph is built",
    r"training_dropout(_default)?(_mask)?$":
        "Dropout in training mode draws a random mask: an imported graph is an inference graph, "
        "where Dropout is the identity",
    r"training_mode": "BatchNormalization's training-mode outputs (batch statistics) are not imported",
    r"with_argmax": "MaxPool's Indices output is not imported",
    r"identity_opt|identity_sequence": "optional and sequence values are not tensors",
    r"test_gru_": "GRU with linear_before_reset=0 (ONNX's default): graphengine's gru applies the "
                  "reset gate after the recurrent product (linear_before_reset=1, as PyTorch and "
                  "cuDNN do)",
    r"lstm_(bidirectional|reverse)": "LSTM's final cell state Y_c is not imported (the lstm layer "
                                     "returns the hidden state)",
    r"lstm_with_peepholes": "LSTM peepholes (input P): graphengine's lstm has none",
}


def _cases() -> list:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the generators' own overflow warnings (cast tests)
        every = load_model_tests(kind="node")
    supported = set(supported_ops())
    return [case for case in every if "expanded" not in case.name
            and {node.op_type for node in case.model.graph.node} <= supported]


CASES = _cases()


def _reason(name: str) -> str | None:
    return next((reason for pattern, reason in KNOWN_FAILURES.items() if re.search(pattern, name)),
                None)


def _param(case):
    reason = _reason(case.name)
    marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason else []
    return pytest.param(case, id=case.name.removeprefix("test_"), marks=marks)


def test_the_suite_covers_every_supported_operator_it_has_cases_for():
    ops = {node.op_type for case in CASES for node in case.model.graph.node}
    assert len(CASES) > 600 and len(ops) > 100


@pytest.mark.parametrize("case", [_param(case) for case in CASES])
def test_onnx_node_case(case):
    prepared = Backend.prepare(case.model)
    for inputs, expected in case.data_sets:
        outputs = prepared.run([_normalize_tensor(value) for value in inputs])
        BackendTest.assert_similar_outputs([_normalize_tensor(v) for v in expected], list(outputs),
                                           rtol=case.rtol, atol=case.atol)
