"""attention and multi_head_attention: gradients on every backend, PyTorch's
scaled_dot_product_attention and nn.MultiheadAttention (forward, input and parameter gradients,
attention weights), masks, properties, build-time errors, saving."""

from __future__ import annotations

import numpy as np
import pytest
from graphengine.plugins.attention import AttentionWeights
from hypothesis import given, settings
from hypothesis import strategies as st
from torch_reference import graph_result, torch_result

import graphengine as ge
from graphengine.testing import check_backward, inferred

rng = np.random.default_rng(3)


def r(*shape):
    return rng.standard_normal(shape)




def bool_mask(*shape, empty_row=True):
    mask = rng.random(shape) > 0.4
    mask[..., 0] = True
    if empty_row:  # a query that may attend to nothing
        mask[(0,) * (len(shape) - 1)] = False
    return mask


def additive_mask(*shape):
    return np.where(rng.random(shape) > 0.3, r(*shape), -np.inf)


# q, k, mask (None: none) and options
GRADIENT_CASES = {
    "plain": (r(2, 3, 4), r(2, 5, 4), None, {}),
    "bool_mask": (r(2, 3, 4), r(2, 5, 4), bool_mask(2, 3, 5), {}),
    "key_padding": (r(2, 3, 4), r(2, 5, 4), bool_mask(2, 1, 5, empty_row=False), {}),
    "additive_mask": (r(2, 3, 4), r(2, 5, 4), additive_mask(2, 3, 5), {}),  # its gradient: all of the scores'
    "causal_and_scale": (r(2, 4, 3), r(2, 4, 3), r(4, 4), {"causal": True, "scale": 0.7}),
    "heads_broadcast": (r(2, 3, 4, 5), r(2, 1, 6, 5), bool_mask(2, 1, 1, 6, empty_row=False), {}),
}


@pytest.mark.parametrize("case", sorted(GRADIENT_CASES))
def test_attention_weights_gradient(case, backend):
    q, k, mask, options = GRADIENT_CASES[case]
    inputs = [q, k] if mask is None else [q, k, mask]
    check_backward(inferred(lambda: AttentionWeights(**options), inputs), inputs, backend=backend)


# --------------------------------------------------------------------------- PyTorch

def attention_graph(q, k, v, mask=None, **options):
    g = ge.Graph()
    inputs = [g.input(name, (None, *a.shape[1:]), dtype="bool" if a.dtype == bool else "float64")
              for name, a in (("q", q), ("k", k), ("v", v), ("mask", mask)) if a is not None]
    out = g.layer("attention", *inputs, name="attn", **options)
    return g, out


SDPA_CASES = {
    "plain": (r(2, 3, 4), r(2, 5, 4), r(2, 5, 6), None, {}),
    "bool_mask": (r(2, 3, 4), r(2, 5, 4), r(2, 5, 6), bool_mask(2, 3, 5), {}),
    "key_padding": (r(2, 3, 4), r(2, 5, 4), r(2, 5, 6), bool_mask(2, 1, 5, empty_row=False), {}),
    "additive_mask": (r(2, 3, 4), r(2, 5, 4), r(2, 5, 6), additive_mask(2, 3, 5), {}),
    "causal": (r(2, 5, 4), r(2, 5, 4), r(2, 5, 2), None, {"causal": True}),
    "heads_and_scale": (r(2, 3, 4, 5), r(2, 3, 6, 5), r(2, 3, 6, 2), bool_mask(2, 1, 4, 6), {"scale": 0.3}),
}


@pytest.mark.parametrize("case", sorted(SDPA_CASES))
def test_attention_matches_pytorch(case):
    torch = pytest.importorskip("torch")
    q, k, v, mask, options = SDPA_CASES[case]
    g, out = attention_graph(q, k, v, mask, **options)
    feeds = {"q": q, "k": k, "v": v, **({"mask": mask} if mask is not None else {})}
    weight = r(*q.shape[:-1], v.shape[-1])
    value, input_grads, _, _ = graph_result(g, out, feeds, weight)

    def sdpa(q, k, v, mask=None):
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=options.get("causal", False), scale=options.get("scale"))

    expected, expected_grads = torch_result(sdpa, feeds, weight)
    np.testing.assert_allclose(value, expected, atol=1e-12)
    assert input_grads.keys() == expected_grads.keys()
    for name in expected_grads:  # q, k, v, and an additive mask
        np.testing.assert_allclose(input_grads[name], expected_grads[name], atol=1e-12, err_msg=name)


def test_weights_are_a_node_to_fetch():
    torch = pytest.importorskip("torch")
    q, k, v, mask, _ = SDPA_CASES["bool_mask"]
    g, out = attention_graph(q, k, v, mask)
    model = g.compile(outputs=[out, g["attn/weights"]])
    weights = model.run({"q": q, "k": k, "v": v, "mask": mask})["attn/weights"]
    scores = torch.tensor(q) @ torch.tensor(k).transpose(-1, -2) / 2  # sqrt(d) = 2
    expected = torch.softmax(scores.masked_fill(~torch.tensor(mask), -torch.inf), dim=-1)
    expected = torch.nan_to_num(expected)  # the row that attends to nothing: zeros
    np.testing.assert_allclose(weights, expected.numpy(), atol=1e-14)
    np.testing.assert_allclose(weights.sum(axis=-1), mask.any(axis=-1).astype(float), atol=1e-14)
    assert not weights[~mask].any()


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 5), st.integers(1, 4), st.integers(0, 1000))
def test_output_ignores_the_order_of_the_keys(batch, queries, keys, features, seed):
    """Attention reads keys as a set: permuting keys, values and mask together changes nothing."""
    gen = np.random.default_rng(seed)
    q, k, v = (gen.standard_normal((batch, n, features)) for n in (queries, keys, keys))
    mask = gen.random((batch, 1, keys)) > 0.3
    order = gen.permutation(keys)
    g, out = attention_graph(q, k, v, mask)
    model = g.compile(outputs=[out])
    a = model.run({"q": q, "k": k, "v": v, "mask": mask})[out.name]
    b = model.run({"q": q, "k": k[:, order], "v": v[:, order], "mask": mask[..., order]})[out.name]
    np.testing.assert_allclose(a, b, atol=1e-12)


# --------------------------------------------------------------------------- multi-head

HEADS, UNITS = 2, 6


def mha_graph(tq, tk, eq, ekv, mask_shape=None, causal=False, self_attention=False):
    g = ge.Graph()
    q = g.input("q", (None, tq, eq), dtype="float64")
    kv = q if self_attention else g.input("kv", (None, tk, ekv), dtype="float64")
    mask = [g.input("mask", (None, *mask_shape), dtype="bool")] if mask_shape else []
    return g, g.layer("multi_head_attention", q, kv, *mask, heads=HEADS, units=UNITS, causal=causal,
                      name="mha")


MHA_CASES = {"cross": {}, "key_padding": {"mask_shape": (1, 5)}, "self_causal": {"self_attention": True,
                                                                                 "causal": True}}


@pytest.mark.parametrize("case", sorted(MHA_CASES))
def test_multi_head_attention_matches_pytorch(case):
    torch = pytest.importorskip("torch")
    options = MHA_CASES[case]
    tk = 4 if options.get("self_attention") else 5
    g, out = mha_graph(4, tk, UNITS, UNITS, **options)
    feeds = {"q": r(3, 4, UNITS)}
    if not options.get("self_attention"):
        feeds["kv"] = r(3, tk, UNITS)
    if "mask_shape" in options:
        feeds["mask"] = bool_mask(3, 1, tk, empty_row=False)
    weight = r(3, 4, UNITS)
    value, input_grads, grads, params = graph_result(g, out, feeds, weight)
    fetched = g.compile(outputs=[g["mha/attention/weights"]]).run(feeds)  # (3, heads, 4, tk)

    module = torch.nn.MultiheadAttention(UNITS, HEADS, batch_first=True, dtype=torch.float64)
    p = {name.split("/")[-1]: torch.tensor(a) for name, a in params.items()}
    with torch.no_grad():
        module.in_proj_weight.copy_(torch.cat([p["Wq"], p["Wk"], p["Wv"]], dim=1).T)
        module.in_proj_bias.copy_(torch.cat([p["bq"], p["bk"], p["bv"]]))
        module.out_proj.weight.copy_(p["Wo"].T)
        module.out_proj.bias.copy_(p["bo"])
    seen = {}

    def mha(q, kv=None, mask=None):
        kv = q if kv is None else kv
        causal = torch.ones(4, tk, dtype=torch.bool).triu(1) if options.get("causal") else None
        out, seen["weights"] = module(q, kv, kv, key_padding_mask=None if mask is None else ~mask[:, 0],
                                      attn_mask=causal, average_attn_weights=False)  # True: do not attend
        return out

    expected, expected_grads = torch_result(mha, feeds, weight)
    np.testing.assert_allclose(value, expected, atol=1e-12)
    np.testing.assert_allclose(fetched["mha/attention/weights"], seen["weights"].detach().numpy(), atol=1e-12)
    for name in expected_grads:
        np.testing.assert_allclose(input_grads[name], expected_grads[name], atol=1e-12, err_msg=name)
    torch_grads = {"Wo": module.out_proj.weight.grad.T, "bo": module.out_proj.bias.grad}
    for i, role in enumerate("qkv"):
        torch_grads[f"W{role}"] = module.in_proj_weight.grad[i * UNITS:(i + 1) * UNITS].T
        torch_grads[f"b{role}"] = module.in_proj_bias.grad[i * UNITS:(i + 1) * UNITS]
    for name, expected_grad in torch_grads.items():
        np.testing.assert_allclose(grads[f"mha/{name}"], expected_grad.numpy(), atol=1e-12, err_msg=name)


def test_multi_head_attention_shapes_and_parameters():
    g, out = mha_graph(4, 7, 3, 5, mask_shape=(4, 7))
    assert out.shape == (None, 4, UNITS)
    assert g["mha/attention/weights"].shape == (None, HEADS, 4, 7)
    shapes = {name: g.nodes[name].shape for name in g.parameters()}
    assert shapes == {"mha/Wq": (3, UNITS), "mha/bq": (UNITS,), "mha/Wk": (5, UNITS), "mha/bk": (UNITS,),
                      "mha/Wv": (5, UNITS), "mha/bv": (UNITS,), "mha/Wo": (UNITS, UNITS), "mha/bo": (UNITS,)}


# --------------------------------------------------------------------------- errors, saving

def inputs_of(g, *shapes, mask=None):
    tensors = [g.input(name, shape) for name, shape in zip("qkv", shapes)]
    return tensors + ([g.input("mask", mask, dtype="bool")] if mask else [])


@pytest.mark.parametrize("build,message", [
    (lambda g: g.layer("attention", *inputs_of(g, (None, 3, 4), (None, 5, 6), (None, 5, 2))),
     r"query's features d=4 and the keys' d=6 differ"),
    (lambda g: g.layer("attention", *inputs_of(g, (None, 3, 4), (None, 5, 4), (None, 5, 2), mask=(None, 5))),
     r"node 'attention_0/weights' \(attention_weights\): attention: the mask \(None, 5\) does not "
     r"broadcast against the attention scores \(None, 3, 5\)"),
    (lambda g: g.layer("attention", *inputs_of(g, (None, 3, 4), (None, 5, 4), (None, 6, 2))),
     r"the values v \(None, 6, 2\) must be"),
    (lambda g: g.layer("attention", *inputs_of(g, (None, 3, 4), (None, 5, 4))), "takes q, k, v"),
    (lambda g: g.layer("attention", *inputs_of(g, (None, 3, 4), (None, 5, 4), (None, 5, 2)),
                       mask=g.input("m", (None, 1, 5), dtype="bool")), "the mask is an input"),
    (lambda g: g.layer("multi_head_attention", *inputs_of(g, (None, 3, 4), (None, 5, 4)), heads=4, units=6),
     "units=6 is not divisible by heads=4"),
    (lambda g: g.layer("multi_head_attention", *inputs_of(g, (None, 3, 4), (None, 5, 4), mask=(None, 3, 4)),
                       heads=2, units=6),
     r"multi_head_attention on query \(None, 3, 4\) and kv \(None, 5, 4\): the mask \(None, 3, 4\)"),
    (lambda g: g.layer("multi_head_attention", *inputs_of(g, (None, 4), (None, 5, 4)), heads=2, units=6),
     r"the query q is \(None, 4\)"),
])
def test_build_time_errors(build, message):
    g = ge.Graph()
    with pytest.raises(ge.GraphBuildError, match=message):
        build(g)


def test_float_mask_of_another_dtype_is_refused():
    g = ge.Graph()
    q, k, v = inputs_of(g, (None, 3, 4), (None, 5, 4), (None, 5, 2))
    with pytest.raises(ge.ShapeError, match="mask must be bool .* or float32 .*, got float64"):
        g.layer("attention", q, k, v, g.input("mask", (None, 1, 5), dtype="float64"))


def test_saved_attention_model_predicts_the_same(tmp_path):
    g, out = mha_graph(4, 5, 3, 2, mask_shape=(1, 5), causal=True)
    model = g.compile(outputs=[out])
    feeds = {"q": r(2, 4, 3), "kv": r(2, 5, 2), "mask": bool_mask(2, 1, 5, empty_row=False)}
    model.save(tmp_path / "mha.ge")
    np.testing.assert_array_equal(ge.load(tmp_path / "mha.ge").predict(feeds), model.predict(feeds))
