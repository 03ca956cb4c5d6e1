"""Fuzzing model files: mutations of valid files (header JSON types, missing keys, nesting,
truncation, byte flips, huge declared shapes, documents with valid checksums) make ``ge.load``
and ``load_weights`` raise SerializationError or succeed, nothing else, and never allocate much
more than the file holds. Runs in a few seconds (CI budget: 20 s)."""

from __future__ import annotations

import json
import tracemalloc
from typing import Any

import numpy as np
import pytest
from filecraft import join, nested, split, with_document
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graphengine as ge

#: A file of this small model holds ~3 KB; loading any mutation of it must stay far below this.
MEMORY_BOUND = 16 * 2**20

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> bytes:
    g = ge.Graph("fuzz")
    x = g.input("x", (None, 3))
    y = g.input("y", (None,), dtype="int64")
    h = g.activation("relu", g.layer("dense", x, units=4, name="fc"))
    h = g.layer("batch_norm", h, name="bn") * g.constant(np.arange(4.0), name="scale")
    model = g.compile(g.loss("softmax_cross_entropy", g.layer("dense", h, units=3, name="out"), y),
                      optimizer=ge.optimizer("adam", lr=0.01), regularizer=ge.L2(1e-3),
                      clip_norm=1.0, constraint=ge.MaxNorm(2.0))
    rng = np.random.default_rng(0)
    model.fit({"x": rng.standard_normal((8, 3)).astype(np.float32), "y": rng.integers(0, 3, 8)},
              batch_size=4, verbose=0)
    path = tmp_path_factory.mktemp("fuzz") / "base.gem"
    model.save(path)
    return path.read_bytes()


def paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value inside nested dicts and lists."""
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += paths(item, (*prefix, i))
    return found


def replace(root: Any, path: tuple, new: Any, delete: bool) -> Any:
    if not path:
        return new
    parent = root
    for key in path[:-1]:
        parent = parent[key]
    if delete and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = new
    return root


@st.composite
def mutations(draw, raw: bytes) -> bytes:
    kind = draw(st.sampled_from(["document", "header", "nesting", "truncate", "flip", "shape"]))
    header, data = split(raw)
    if kind == "document":  # with a checksum that matches: the document's own checks must hold
        document = json.loads(header["__metadata__"]["document"])
        where = draw(st.sampled_from(paths(document)))
        changed = replace(document, where, draw(json_values), draw(st.booleans()))
        return with_document(raw, text=json.dumps(changed))
    if kind == "header":
        where = draw(st.sampled_from(paths(header)))
        return join(replace(header, where, draw(json_values), draw(st.booleans())), data)
    if kind == "nesting":
        deep = nested(draw(st.sampled_from([65, 1000, 60000])))
        if draw(st.booleans()):
            return with_document(raw, text=deep)
        return join(None, data, text=deep)
    if kind == "truncate":
        return raw[:draw(st.integers(0, len(raw) - 1))]
    if kind == "flip":
        flipped = bytearray(raw)
        for offset in draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=4)):
            flipped[offset] ^= draw(st.integers(1, 255))
        return bytes(flipped)
    tensor = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    header[tensor]["shape"] = draw(st.lists(st.integers(0, 2**40), min_size=1, max_size=4))
    if draw(st.booleans()):  # offsets that agree with the shape, the file too short for it
        begin = header[tensor]["data_offsets"][0]
        size = int(np.prod(header[tensor]["shape"], dtype=object)) * 4
        header[tensor]["data_offsets"] = [begin, begin + size]
    return join(header, data)


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_a_mutated_file_raises_only_serialization_errors(original, tmp_path, data):
    path = tmp_path / "mutant.gem"
    path.write_bytes(data.draw(mutations(original)))
    tracemalloc.start()
    try:
        for attempt in (lambda: ge.load(path),
                        lambda: fresh_model().load_weights(path, strict=False, training_state=True)):
            try:
                attempt()
            except ge.SerializationError:
                pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MEMORY_BOUND


def fresh_model() -> ge.Model:
    g = ge.Graph("target")
    x = g.input("x", (None, 3))
    return g.compile(outputs=[g.layer("dense", x, units=4, name="fc")], optimizer=ge.optimizer("adam"))
