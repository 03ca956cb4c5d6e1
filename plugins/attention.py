"""Attention layers: scaled dot-product attention and multi-head attention.

``g.layer("attention", q, k, v[, mask])`` computes ``softmax(q k^T * scale + mask) v``, as
PyTorch's ``F.scaled_dot_product_attention``. It is two nodes: ``<layer>/weights``, the
attention weights (an :class:`AttentionWeights` operator: scores, mask and softmax in one, so
that a masked key's weight is exactly 0), and ``<layer>/output``, the
weights times the values (the batched matmul primitive). The weights node is an ordinary node
of the graph: fetch it to draw attention maps::

    out = g.layer("attention", q, k, v, mask, name="attn")
    model = g.compile(loss, outputs=[out, g["attn/weights"]])
    weights = model.run(feeds)["attn/weights"]          # (..., Tq, Tk), rows sum to 1

Masks follow PyTorch's ``scaled_dot_product_attention``: a ``bool`` mask is True where a query
may attend to a key; a float mask (the dtype of ``q``) is added to the scores (0 or ``-inf``, or
a learned bias, which then gets its gradient). A mask broadcasts against the scores (..., Tq,
Tk) from the right, without growing them: a key-padding mask is (N, 1, Tk). A query that may
attend to no key gets zero weights and a zero output rather than NaN, as PyTorch's CPU kernel
gives (the tests compare).
"""

from __future__ import annotations

from typing import Any

import graphengine as ge
from graphengine.errors import GraphBuildError, ShapeError, require_int
from graphengine.ir.operators import (
    Shape,
    TensorSpec,
    broadcast_shapes,
    require_float,
    same_dtype,
    unbroadcast,
)


def check_mask(mask: TensorSpec, scores: Shape, where: str) -> None:
    """Raise ShapeError unless ``mask`` broadcasts against attention scores of shape ``scores``
    (..., Tq, Tk) without growing them. A batch dimension (None) must meet the batch."""
    if mask.ndim > len(scores) or any(
            m != 1 and m != s for m, s in zip(reversed(mask.shape), reversed(scores))):
        raise ShapeError(f"{where}: the mask {mask.shape} does not broadcast against the attention "
                         f"scores {scores} (..., queries, keys): each of its dimensions, aligned from "
                         f"the right, must be 1 or equal; a key-padding mask is (batch, 1, keys)")


class AttentionWeights(ge.Operator):
    """``softmax(q k^T * scale + mask)`` over the keys: the attention weights.

    Inputs: ``q`` (..., Tq, d), ``k`` (..., Tk, d), optionally ``mask``, bool (True: attend)
    or additive float, broadcasting against (..., Tq, Tk). ``scale`` defaults to
    ``1 / sqrt(d)``; ``causal`` also masks the keys after each query (key j > query i, PyTorch's
    ``is_causal``, aligned top-left). Leading dimensions of ``q`` and ``k`` broadcast.
    """

    kind = "attention_weights"
    retain_inputs = (0, 1)
    retain_output = True

    def __init__(self, scale: float | None = None, causal: bool = False) -> None:
        self.scale = None if scale is None else float(scale)
        self.causal = bool(causal)

    def config(self) -> dict[str, Any]:
        return {"scale": self.scale, "causal": self.causal}

    def infer(self, q: TensorSpec, k: TensorSpec, *mask: TensorSpec) -> TensorSpec:
        require_float(q, "the query")
        dtype = same_dtype(q, k)
        if q.ndim < 2 or k.ndim != q.ndim:
            raise ShapeError(f"attention takes a query (..., queries, d) and keys (..., keys, d) of "
                             f"one rank, got {q.shape} and {k.shape}")
        if q.shape[-1] != k.shape[-1]:
            raise ShapeError(f"the query's features d={q.shape[-1]} and the keys' d={k.shape[-1]} "
                             f"differ (query {q.shape}, keys {k.shape}): project them to one size")
        scores = broadcast_shapes(q.shape[:-2], k.shape[:-2]) + (q.shape[-2], k.shape[-2])
        if len(mask) > 1:
            raise ShapeError(f"attention weights take q, k and at most one mask, got {2 + len(mask)} inputs")
        if mask:
            if mask[0].dtype != "bool" and mask[0].dtype != dtype:
                raise ShapeError(f"the mask must be bool (True: attend) or {dtype} (added to the "
                                 f"scores), got {mask[0].dtype}")
            check_mask(mask[0], scores, "attention")
        return TensorSpec(scores, dtype)

    def forward(self, ctx, xp, q, k, *mask):
        scale = self.scale if self.scale is not None else q.shape[-1] ** -0.5
        scores = q @ xp.swapaxes(k, -1, -2)
        scores *= scale
        additive = bool(mask) and mask[0].dtype.kind != "b"
        if additive:
            scores += mask[0]
        allowed = mask[0] if mask and not additive else None
        if self.causal:
            below = xp.tril(xp.ones(scores.shape[-2:], dtype=bool))
            allowed = below if allowed is None else allowed & below
        if allowed is not None:
            scores = xp.where(allowed, scores, -xp.inf)
        ctx.mask_shape, ctx.additive = (mask[0].shape if mask else None), additive
        return _softmax_of_allowed(xp, scores)

    def backward(self, ctx, xp, inputs, output, grad):
        q, k = inputs[0], inputs[1]
        scale = self.scale if self.scale is not None else q.shape[-1] ** -0.5
        # Softmax's backward; a masked key has weight 0 and so gets no gradient.
        grad_scores = grad * output
        grad_scores -= output * grad_scores.sum(axis=-1, keepdims=True)
        grads = ()
        if ctx.mask_shape is not None:  # an additive mask's gradient is the scores'; a bool one has none
            wanted = ctx.additive and ctx.grad_wanted(2)
            grads = (unbroadcast(xp, grad_scores, ctx.mask_shape) if wanted else None,)
        # scaled after the products (the mask's gradient may be grad_scores itself)
        grad_q = unbroadcast(xp, (grad_scores @ k) * scale, q.shape) if ctx.grad_wanted(0) else None
        grad_k = (unbroadcast(xp, (xp.swapaxes(grad_scores, -1, -2) @ q) * scale, k.shape)
                  if ctx.grad_wanted(1) else None)
        return (grad_q, grad_k, *grads)


def _softmax_of_allowed(xp: Any, scores: Any) -> Any:
    """softmax over the last axis, in ``scores``'s buffer, where ``-inf`` marks a masked score:
    a row with no finite score (a query that may attend to nothing) gets zeros, not NaN."""
    top = scores.max(axis=-1, keepdims=True)
    top = xp.where(xp.isfinite(top), top, 0)
    scores -= top
    xp.exp(scores, out=scores)
    total = scores.sum(axis=-1, keepdims=True)
    scores /= xp.where(total > 0, total, 1)
    return scores


class Attention(ge.Layer):
    """``g.layer("attention", q, k, v[, mask], causal=False, scale=None)``: scaled dot-product
    attention, ``softmax(q k^T / sqrt(d) + mask) v``, as PyTorch's
    ``F.scaled_dot_product_attention``.

    Inputs: ``q`` (..., Tq, d), ``k`` (..., Tk, d), ``v`` (..., Tk, dv), e.g. (N, T, d) or with
    heads (N, H, T, d); optionally a mask broadcasting against (..., Tq, Tk), bool (True: attend)
    or float (added to the scores). Output (..., Tq, dv). No parameters. The weights (..., Tq,
    Tk) are the node ``<layer>/weights``: ``g["attn/weights"]`` for ``name="attn"``.
    """

    def __init__(self, causal: bool = False, scale: float | None = None, mask: Any = None) -> None:
        if mask is not None:
            raise GraphBuildError("the mask is an input, not an option: "
                                  "g.layer('attention', q, k, v, mask)")
        if scale is not None and (not isinstance(scale, (int, float)) or scale <= 0):
            raise GraphBuildError(f"scale must be a positive number (or None: 1/sqrt(d)), got {scale!r}")
        super().__init__(causal=causal, scale=scale)
        self.causal, self.scale = causal, scale

    def build(self, g, *inputs):
        if len(inputs) not in (3, 4):
            raise GraphBuildError(f"attention takes q, k, v and optionally a mask, got {len(inputs)} "
                                  f"input(s): {', '.join(f'{t.name} {t.shape}' for t in inputs)}")
        q, k, v, *mask = inputs
        if v.ndim != k.ndim or v.shape[:-1] != k.shape[:-1]:
            raise ShapeError(f"attention: the values {v.name} {v.shape} must be (..., keys, dv) with "
                             f"the keys' leading dimensions and number of keys, keys {k.name} {k.shape}")
        weights = g.apply(AttentionWeights(self.scale, self.causal), q, k, *mask, name="weights")
        return g.op("matmul", weights, v, name="output")


class MultiHeadAttention(ge.Layer):
    """``g.layer("multi_head_attention", q, kv[, mask], heads=, units=, causal=False)``:
    ``units / heads``-wide attention in ``heads`` subspaces at once, as PyTorch's
    ``nn.MultiheadAttention(units, heads, batch_first=True)(q, kv, kv)``.

    Inputs: the queries ``q`` (N, Tq, Eq), the sequence attended to ``kv`` (N, Tk, Ekv) (``q``
    itself for self-attention), optionally a mask broadcasting against (N, Tq, Tk), with the
    convention of ``attention`` (bool True: attend; float: added). PyTorch's ``key_padding_mask``
    and bool ``attn_mask`` say True where *not* to attend: pass their negation. Output (N, Tq,
    units).

    Parameters ``Wq`` (Eq, units), ``Wk``, ``Wv`` (Ekv, units), ``Wo`` (units, units) and biases
    ``bq``, ``bk``, ``bv``, ``bo``; PyTorch's ``in_proj_weight`` is ``[Wq; Wk; Wv]`` transposed,
    ``out_proj.weight`` is ``Wo`` transposed. The per-head weights (N, heads, Tq, Tk) are the node
    ``<layer>/attention/weights`` (PyTorch returns their mean over heads).
    """

    def __init__(self, heads: int, units: int, causal: bool = False, init: str | dict = "xavier",
                 mask: Any = None) -> None:
        if mask is not None:
            raise GraphBuildError("the mask is an input, not an option: "
                                  "g.layer('multi_head_attention', q, kv, mask, heads=..., units=...)")
        heads, units = require_int(heads, "heads"), require_int(units, "units")
        if units % heads:
            raise GraphBuildError(f"units={units} is not divisible by heads={heads}: each head "
                                  f"takes units / heads features")
        super().__init__(heads=heads, units=units, causal=causal, init=init)
        self.heads, self.units, self.causal, self.init = heads, units, causal, init

    def build(self, g, *inputs):
        if len(inputs) not in (2, 3):
            raise GraphBuildError(f"multi_head_attention takes q, kv and optionally a mask, got "
                                  f"{len(inputs)} input(s): "
                                  f"{', '.join(f'{t.name} {t.shape}' for t in inputs)}")
        q, kv, *mask = inputs
        for role, t in (("query", q), ("kv", kv)):
            if t.ndim != 3 or t.shape[-1] is None:
                raise ShapeError(f"multi_head_attention takes (batch, time, features) with known "
                                 f"features; the {role} {t.name} is {t.shape}")
        if mask:
            check_mask(mask[0].node.spec, (q.shape[0], q.shape[1], kv.shape[1]),
                       f"multi_head_attention on query {q.shape} and kv {kv.shape}")
            if mask[0].ndim == 3:  # a head axis, so that it broadcasts over the heads
                mask = [mask[0].reshape(mask[0].shape[0], 1, *mask[0].shape[1:])]
        heads = [self._project(g, x, role) for x, role in ((q, "q"), (kv, "k"), (kv, "v"))]
        out = g.layer("attention", *heads, *mask, causal=self.causal, name="attention")
        merged = out.transpose(0, 2, 1, 3).reshape(None, -1, self.units)
        return self._dense(g, merged, "o")

    def _dense(self, g, x, role: str):
        w = g.parameter(f"W{role}", (x.shape[-1], self.units), init=self.init, dtype=x.dtype)
        return x @ w + g.parameter(f"b{role}", (self.units,), init="zeros", dtype=x.dtype)

    def _project(self, g, x, role: str):
        """(N, T, E) -> the projection split into heads, (N, heads, T, units / heads)."""
        split = self._dense(g, x, role).reshape(None, -1, self.heads, self.units // self.heads)
        return split.transpose(0, 2, 1, 3)


@ge.hookimpl
def graphengine_register_layers(register):
    register("attention", Attention, aliases=("scaled_dot_product_attention",))
    register("multi_head_attention", MultiHeadAttention, aliases=("mha",))
