"""The activations PyTorch and Keras users expect (gelu, silu/swish, selu, softsign, hard_sigmoid,
relu6, mish): gradients on every backend, values and input gradients against PyTorch, health."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import graphengine as ge
from graphengine.errors import GraphBuildError, GraphEngineError
from graphengine.ir.contracts import ActivationOp
from graphengine.testing import check_backward, make_context
from graphengine.tools.monitor import SATURATED_SLOPE, GradientMonitor

#: (kind, options, the PyTorch function's name in torch.nn.functional, its keyword arguments)
BLOCKS = [
    ("gelu", {}, "gelu", {}),
    ("gelu", {"approximate": "tanh"}, "gelu", {"approximate": "tanh"}),
    ("silu", {}, "silu", {}),
    ("selu", {}, "selu", {}),
    ("softsign", {}, "softsign", {}),
    ("hard_sigmoid", {}, "hardsigmoid", {}),
    ("relu6", {}, "relu6", {}),
    ("mish", {}, "mish", {}),
]
IDS = [f"{kind}-{options}" if options else kind for kind, options, _, _ in BLOCKS]
#: PyTorch's hardsigmoid backward multiplies by 1/6 as a float32 constant even in float64, 3e-8
#: relative to the exact 1/6: the one gradient that differs by more than float64 round-off.
GRAD_RTOL = {"hard_sigmoid": 1e-7}


def activation_op(kind: str, **options) -> ActivationOp:
    return ActivationOp(kind, ge.get_plugin_manager().activations.get(kind)(**options))


def forward_backward(kind: str, x: np.ndarray, dy: np.ndarray, **options):
    op = activation_op(kind, **options)
    ctx = make_context()
    y = op.forward(ctx, np, x)
    (dx,) = op.backward(ctx, np, (x,), y, dy)
    return y, dx


def inputs(dtype=np.float64) -> np.ndarray:
    """Both tails, every kink's neighbourhood (-3, 0, 3, 6) and the region between."""
    rng = np.random.default_rng(7)
    return np.concatenate([rng.standard_normal(40) * 4, np.linspace(-9, 9, 41) + 0.013]).astype(dtype)


@pytest.mark.parametrize("kind, options, _torch_name, _torch_options", BLOCKS, ids=IDS)
def test_backward_matches_finite_differences(kind, options, _torch_name, _torch_options, backend):
    x = np.random.default_rng(1).standard_normal((4, 6)) * 4
    check_backward(lambda: ge.get_plugin_manager().activations.get(kind)(**options), [x],
                   backend=backend)


@pytest.mark.parametrize("kind, options, torch_name, torch_options", BLOCKS, ids=IDS)
def test_matches_pytorch_in_float64(kind, options, torch_name, torch_options):
    torch = pytest.importorskip("torch")
    x = inputs()
    dy = np.random.default_rng(3).standard_normal(x.shape)
    y, dx = forward_backward(kind, x, dy, **options)
    tx = torch.tensor(x, requires_grad=True)
    ty = getattr(torch.nn.functional, torch_name)(tx, **torch_options)
    ty.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=GRAD_RTOL.get(kind, 1e-12), atol=1e-14)


@pytest.mark.parametrize("kind, options, torch_name, torch_options", BLOCKS, ids=IDS)
def test_float32_stays_float32_and_matches_pytorch(kind, options, torch_name, torch_options):
    torch = pytest.importorskip("torch")
    x = inputs(np.float32)
    dy = np.random.default_rng(3).standard_normal(x.shape).astype(np.float32)
    y, dx = forward_backward(kind, x, dy, **options)
    assert y.dtype == np.float32 and dx.dtype == np.float32
    tx = torch.tensor(x, requires_grad=True)
    getattr(torch.nn.functional, torch_name)(tx, **torch_options).backward(torch.tensor(dy))
    # float32 round-off: a few units in the last place (~6e-8), on values up to 9
    np.testing.assert_allclose(y, getattr(torch.nn.functional, torch_name)(
        torch.tensor(x), **torch_options).numpy(), rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("kind, options, _torch_name, _torch_options", BLOCKS, ids=IDS)
def test_large_inputs_neither_overflow_nor_give_nan(kind, options, _torch_name, _torch_options):
    x = np.array([-1e4, -100.0, 100.0, 1e4], dtype=np.float32)
    # an exp may overflow to inf on purpose (1 / (1 + inf) is exactly 0): models run so
    with np.errstate(over="ignore", invalid="raise", divide="raise"):
        y, dx = forward_backward(kind, x, np.ones_like(x), **options)
    assert np.isfinite(y).all() and np.isfinite(dx).all()
    limits = {"selu": -1.0507009873554805 * 1.6732632423543772, "softsign": -1.0, "hard_sigmoid": 0.0}
    np.testing.assert_allclose(y[0], limits.get(kind, 0.0), atol=1e-3)  # the left tail's limit
    right = {"softsign": 1.0, "hard_sigmoid": 1.0, "relu6": 6.0, "selu": 1.0507009873554805 * 1e4}
    np.testing.assert_allclose(y[-1], right.get(kind, 1e4), rtol=1e-3)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, st.integers(1, 8), elements=st.floats(-30, 30)))
def test_swish_is_silu_and_gelu_forms_agree(x):
    """Properties: ``swish`` is an alias of ``silu`` (x sigmoid(x)); the tanh form of GELU stays
    within 1e-3 of the exact one (Hendrycks & Gimpel's bound is about 5e-4)."""
    silu = forward_backward("silu", x, np.ones_like(x))[0]
    np.testing.assert_array_equal(forward_backward("swish", x, np.ones_like(x))[0], silu)
    np.testing.assert_allclose(silu, x / (1 + np.exp(-x)), rtol=1e-12)
    exact = forward_backward("gelu", x, np.ones_like(x))[0]
    tanh_form = forward_backward("gelu", x, np.ones_like(x), approximate="tanh")[0]
    np.testing.assert_allclose(tanh_form, exact, atol=1e-3)


def test_swish_is_an_alias_of_silu():
    entry = ge.get_plugin_manager().activations.entry("swish")
    assert entry.name == "silu" and entry.plugin == "activations"


def test_activations_keep_only_what_backward_reads():
    keeps_output = {"softsign", "hard_sigmoid", "relu6"}
    for kind in ("gelu", "silu", "mish", "softsign", "hard_sigmoid", "relu6"):
        op = activation_op(kind)
        assert op.retain_output == (kind in keeps_output), kind
        assert op.retain_inputs == (() if kind in keeps_output else (0,)), kind


def test_health_measures():
    # hard_sigmoid passes no gradient outside (-3, 3): 3 of these 5 outputs
    hard = activation_op("hard_sigmoid").activation
    x = np.array([[-4.0, -3.0, 0.0, 2.9, 5.0]])
    assert float(hard.measure_health(np, hard.forward(np, x))) == pytest.approx(3 / 5)
    # softsign's slope (1 - |y|)^2 falls under 5% of its peak beyond |x| = 1/sqrt(0.05) - 1 = 3.47
    soft = activation_op("softsign").activation
    x = np.array([[-3.4, -3.5, 0.0, 3.4, 10.0]])
    assert float(soft.measure_health(np, soft.forward(np, x))) == pytest.approx(2 / 5)
    assert 1 / np.sqrt(SATURATED_SLOPE) - 1 == pytest.approx(3.472, abs=1e-3)
    # relu6: units that no example of the batch activates are dead, capped ones are not
    relu6 = activation_op("relu6").activation
    batch = np.array([[-1.0, 7.0, -2.0, 0.5], [-3.0, 9.0, 1.0, -1.0]])
    assert float(relu6.measure_health(np, relu6.forward(np, batch))) == pytest.approx(1 / 4)
    assert {activation_op(k).activation.health for k in ("gelu", "silu", "selu", "mish")} == {None}


def test_health_is_recorded_by_the_monitor():
    g = ge.Graph()
    x = g.input("x", (None, 3))
    h = g.activation("relu6", g.layer("dense", x, units=4, name="fc"), name="act")
    model = g.compile((h * h).mean(), outputs=[h], optimizer="sgd", seed=0)
    model.parameters()["fc/b"][:] = [-50.0, -50.0, 0.0, 0.0]  # two units that nothing activates
    feeds = {"x": np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32)}
    stats = GradientMonitor().capture(model, feeds).node("act")
    assert stats.dead_fraction == pytest.approx(0.5) and stats.saturation is None


def test_bad_options_name_the_activation():
    g = ge.Graph()
    x = g.input("x", (None, 3))
    with pytest.raises(GraphEngineError, match=r"gelu: approximate must be one of \('none', 'tanh'\)"):
        g.activation("gelu", x, approximate="erf")
    with pytest.raises(GraphBuildError, match=r"activation 'silu'.*unexpected arguments \['beta'\]"):
        g.activation("silu", x, beta=2.0)
