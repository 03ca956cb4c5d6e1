"""Large graphs build, compile, run and back-propagate correctly; the bookkeeping that keeps
building linear (operator ownership, taken layer scopes, undoing failed calls) stays exact.

No timing here: benchmarks/scaling.py measures how the phases scale.
"""

from __future__ import annotations

import gc
import sys
import weakref

import numpy as np
import pytest

import graphengine as ge
from graphengine.compiler.plan import build_plan
from graphengine.ir.operators import PRIMITIVES
from graphengine.testing import isolated_plugin_manager

CHAIN_BLOCKS = 5000  # 4 nodes each: a chain of 20k nodes


def exact_chain(blocks: int):
    """``x * w`` then ``blocks`` times ``((h * 2 + 1/4) * 1/2) - 1/8``: each block is the
    identity, exactly so on multiples of 1/8, and its derivative is exactly 1."""
    g = ge.Graph("chain")
    x = g.input("x", shape=(None, 3))
    w = g.parameter("w", (3,), init="ones")
    two, quarter, half, eighth = (g.constant(v) for v in (2.0, 0.25, 0.5, 0.125))
    h = x * w
    for _ in range(blocks):
        h = (h * two + quarter) * half - eighth
    return g, x, w, h, h.sum()


@pytest.fixture(scope="module")
def chain():
    return exact_chain(CHAIN_BLOCKS)


def test_a_20k_node_chain_builds_compiles_runs_and_backpropagates(chain):
    # Under Python's default recursion limit: a recursion per node anywhere would fail here.
    g, x, w, h, loss = chain
    assert len(g.nodes) > 20000
    model = g.compile(loss, outputs=[h], optimizer=ge.optimizer("sgd", lr=0.5))
    X = np.arange(-8, 8, dtype=np.float32).reshape(4, 4)[:, :3] / 8  # multiples of 1/8
    np.testing.assert_array_equal(model.run({"x": X})[h.name], X)
    assert model.forward({"x": X}) == pytest.approx(X.sum())
    model.backward()
    np.testing.assert_array_equal(model.gradients()["w"], X.sum(axis=0))  # dL/dw = sum of x
    model.step()
    np.testing.assert_array_equal(model.parameters()["w"], 1 - 0.5 * X.sum(axis=0))


def test_a_long_chain_keeps_only_a_few_values_alive(chain):
    g, x, w, h, loss = chain
    plan = build_plan(g, [h.name], fuse=False)
    assert len(plan.slots) == len(g.nodes) - 1  # all but the loss
    made = {s.out for s in plan.steps}
    live = {plan.slots[n] for n in (*plan.feeds, *plan.parameters, *plan.constants)}
    peak = 0
    for step in plan.steps:
        live.add(step.out)
        peak = max(peak, len(live))
        live -= set(step.release)
    sources = len(plan.feeds) + len(plan.parameters) + len(plan.constants)
    assert peak <= sources + 2  # an input and the output of the step at most
    assert live & made == {plan.slots[h.name]}  # every intermediate released, the target kept


def test_plan_order_is_insertion_order():
    g = ge.Graph()
    x = g.input("x", shape=(None, 2))
    a = x.exp()
    b = x.abs()
    c = a + b
    assert build_plan(g, [c.name]).names == ["x", a.name, b.name, c.name]


# ------------------------------------------------------------------ one operator per node

class Twice(ge.Layer):
    """Adds its one operator instance twice: the second node is refused."""

    def __init__(self, op):
        super().__init__(op=op)
        self.op = op

    def build(self, g, x):
        return g.apply(self.op, g.apply(self.op, x))


class Once(ge.Layer):
    def __init__(self, op):
        super().__init__(op=op)
        self.op = op

    def build(self, g, x):
        return g.apply(self.op, x)


class Layers:
    @ge.hookimpl
    def graphengine_register_layers(self, register):
        register("twice", Twice)
        register("once", Once)


@pytest.fixture
def custom_layers():
    with isolated_plugin_manager(Layers(), entry_points=True) as manager:
        yield manager


def test_an_operator_shared_by_two_nodes_is_refused_and_freed_with_a_failed_call(custom_layers):
    g = ge.Graph()
    x = g.input("x", shape=(None, 2))
    for _ in range(2000):  # a large graph around it
        x = x.exp().log()
    before, calls = list(g.nodes), len(g.calls)
    op = PRIMITIVES["exp"]()
    with pytest.raises(ge.GraphBuildError, match=r"node 'twice_0/exp_1': operator .* already belongs "
                       r"to node 'twice_0/exp'; create one operator instance per node"):
        g.layer("twice", x, op=op)
    assert list(g.nodes) == before and len(g.calls) == calls
    assert g.consumers(x.name) == []  # the failed call's readers of x are gone with it
    out = g.layer("once", x, op=op)  # the failed call gave the operator back
    assert g.nodes[out.name].op is op
    with pytest.raises(ge.GraphBuildError, match=f"already belongs to node '{out.name}'"):
        g.layer("once", x, op=op)


# ------------------------------------------------------------------ names and layer scopes

def test_failed_calls_leave_the_graph_as_it_was_and_free_their_names(custom_layers):
    g = ge.Graph()
    x = g.input("x", shape=(None, 4))
    before, calls = list(g.nodes), len(g.calls)
    op = PRIMITIVES["exp"]()
    with pytest.raises(ge.GraphBuildError, match="already belongs"):
        g.layer("twice", x, op=op, name="fc/inner")  # adds fc/inner/exp, then fails
    with pytest.raises(ge.ShapeError):
        x + np.ones((3,))  # a constant, then an add that fails: both undone
    assert list(g.nodes) == before and len(g.calls) == calls and g.consumers(x.name) == []
    assert g.layer("once", x, op=op, name="fc").name == "fc/exp"  # scope "fc" is free again
    assert g.layer("dense", x, units=3, name="inner").name == "inner/add"


def test_layer_scopes_are_numbered_and_taken_names_are_refused():
    g = ge.Graph()
    x = g.input("x", shape=(None, 4))
    for _ in range(3000):
        x = g.layer("dense", x, units=4)
    assert x.name == "dense_2999/add" and "dense_0/W" in g and "dense_2999/b" in g
    for taken in ("dense_0", "dense_2999", "x"):
        with pytest.raises(ge.GraphBuildError, match=f"already has a layer or node named '{taken}'"):
            g.layer("dense", x, units=4, name=taken)
    g.input("a/b", shape=(None, 4))  # a node in scope "a"
    with pytest.raises(ge.GraphBuildError, match="already has a layer or node named 'a'"):
        g.layer("dense", x, units=4, name="a")
    g.layer("dense", x, units=4, name="dense_3000")
    assert g.layer("dense", x, units=4).name == "dense_3001/add"  # skips the name taken by hand
    assert g.layer("dense", x, units=4, name="a/c").name == "a/c/add"  # a free name in scope "a"


SEEN_CONTEXTS: list = []
#: At each call, how many contexts of earlier calls were still alive.
ALIVE_BEFORE: list = []


class Remembering(ge.Operator):
    """x -> x, remembering a weak reference to each call's context."""

    kind = "remembering"
    retain_inputs = (0,)

    def infer(self, x):
        return x

    def forward(self, ctx, xp, x):
        ALIVE_BEFORE.append(sum(ref() is not None for ref in SEEN_CONTEXTS))
        SEEN_CONTEXTS.append(weakref.ref(ctx))
        ctx.kept = x  # what a backward would read
        return x

    def backward(self, ctx, xp, inputs, output, grad):
        return (grad,)


class RememberingLayer(ge.Layer):
    def build(self, g, x):
        return g.apply(Remembering(), x)


@ge.hookimpl
def graphengine_register_layers(register):
    register("remembering", RememberingLayer)


def test_an_inference_pass_frees_each_context_with_its_step():
    """predict keeps no context for a backward that will not come: what an operator saved goes
    with its step (peak memory), and no garbage collection has to traverse it."""
    SEEN_CONTEXTS.clear()
    ALIVE_BEFORE.clear()
    with isolated_plugin_manager(sys.modules[__name__], entry_points=True):
        g = ge.Graph("contexts")
        h = g.layer("dense", g.input("x", (None, 3)), units=3)
        for _ in range(4):
            h = g.layer("remembering", h * 2.0)
        model = g.compile((h * h).mean(), outputs=[h], optimizer="sgd")
        model.predict({"x": np.ones((2, 3), np.float32)})
        assert ALIVE_BEFORE == [0, 0, 0, 0]
        model.forward({"x": np.ones((2, 3), np.float32)})  # a training pass keeps them
        assert ALIVE_BEFORE[4:] == [0, 1, 2, 3]


@pytest.mark.parametrize("enabled", [True, False])
def test_compiling_and_planning_leave_the_garbage_collector_as_they_found_it(enabled):
    g, _, _, h, loss = exact_chain(3)
    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        g.compile(loss, outputs=[h], optimizer="sgd").run({"x": np.ones((1, 3), np.float32)})
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()


def test_a_graph_leaves_three_objects_per_node_for_the_garbage_collector():
    """What a full collection traverses while a large graph is built (it runs several, each over
    every tracked object): the node, its operator and the record of the builder call. Shapes are
    shared, readers are found when asked, and a primitive's record holds nothing to traverse."""
    gc.collect()
    before = {id(o) for o in gc.get_objects()}
    g, *_ = exact_chain(500)
    gc.collect()
    kept = sum(1 for o in gc.get_objects() if id(o) not in before)
    assert kept <= 3 * len(g.nodes) + 20
    specs = {id(node.spec) for node in g.nodes.values()}
    assert len(specs) == len({node.spec for node in g.nodes.values()})  # one object per spec


def test_readers_are_found_after_nodes_come_and_go():
    g = ge.Graph("readers")
    x = g.input("x", (None, 2))
    a = x * 2.0
    assert g.consumers(x.name) == [a.name]
    b = x + a  # asked before: the answer must include what came after
    assert g.consumers(x.name) == [a.name, b.name] and g.consumers(a.name) == [b.name]
    with pytest.raises(ge.GraphEngineError), g.atomic():
        x.exp()
        x.reshape(None, 3)  # fails: the exp goes with it
    assert g.consumers(x.name) == [a.name, b.name]
