"""Attention: the scaled dot-product attention of BERT and ViT exports -> one fused op.

    BERT (separate projections):                    ViT (packed projection):
      q = Transpose(Reshape(x @ Wq + bq), 0213)       t = Transpose(Reshape(x @ Wqkv + b, [B,S,3,N,d]), 20314)
      k = Transpose(Reshape(x @ Wk + bk), 0231)       q, k, v = Squeeze(Split(t, axis 0))
      v = Transpose(Reshape(x @ Wv + bv), 0213)       s = (q * a) @ (Transpose(k, 0132) * b)
      s = Softmax((q @ k) * scale [+ mask])           y = Reshape(Transpose(Softmax(s) @ v, 0213))
      y = Reshape(Transpose(s @ v, 0213), [B,S,H])
    after (target ort): y = com.microsoft.Attention(x, [Wq|Wk|Wv], [bq|bk|bv], , , mask,
                                                    num_heads=N, scale=scale)

The additive mask, when there is one, becomes the op's `attention_bias` input unchanged (shape
[B or 1, 1, S, S]), so any mask computation upstream is kept as it is. Other targets keep the
plain ops (TVM fuses them itself).
"""

from __future__ import annotations

import numpy as np

from onnxpress.passes.fuse.api import (
    MS_DOMAIN,
    attr,
    const,
    fusion,
    is_float,
    new_initializer,
    rank,
    scalar,
    shape,
)


# -- shared pieces ---------------------------------------------------------------------------
def _scores(op, q, kt, style: str):
    """Attention scores in the three ways exports scale them."""
    if style == "split":            # q * sqrt(scale) @ k^T * sqrt(scale)   (timm, SDPA export)
        return op.MatMul(q * op_var(op, "scale_q"), kt * op_var(op, "scale_k"))
    if style == "mul":
        return op.MatMul(q, kt) * op_var(op, "scale")
    return op.MatMul(q, kt) / op_var(op, "divisor")


def op_var(op, name):
    """A named pattern variable created inside a pattern function (bound like a parameter)."""
    from onnxscript.rewriter import _pattern_ir

    return _pattern_ir.Var(name)


def _attention_tail(op, scores, v, masked: bool):
    if masked:
        scores = scores + op_var(op, "mask")
    probs = op.Softmax(scores, _outputs=["probs"])
    context = op.Transpose(op.MatMul(probs, v), perm=[0, 2, 1, 3])
    return op.Reshape(context, op_var(op, "out_shape"), _allow_other_attributes=True)


def _scale_of(scale_q, scale_k, scale, divisor) -> float | None:
    if scale_q is not None or scale_k is not None:
        a, b = scalar(scale_q), scalar(scale_k)
        return None if a is None or b is None else a * b
    if scale is not None:
        return scalar(scale)
    if divisor is not None:
        d = scalar(divisor)
        return None if not d else 1.0 / d
    return None


def _common_ok(x, probs, mask, out, hidden: int, head: int) -> bool:
    if not is_float(x) or rank(x) != 3:
        return False
    xs = shape(x)
    if xs is None or xs[-1] != hidden or head <= 0 or hidden % head:
        return False
    axis = attr(probs, "axis", -1)
    if axis not in (-1, 3):
        return False
    if mask is not None:
        if rank(mask) != 4 or not is_float(mask):
            return False
        # onnxruntime takes attention_bias as (B or 1, 1 or N, S, T): a mask broadcast along
        # the query axis ([B, 1, 1, T]) would need an Expand first, so it is left alone
        ms, ss = shape(mask), shape(probs)
        if isinstance(ms[1], int) and ms[1] != 1:
            return False
        if isinstance(ms[2], int) and ms[2] == 1 and not (ss and ss[2] == 1):
            return False
    os_ = shape(out)
    if os_ is None or len(os_) != 3 or (isinstance(os_[-1], int) and os_[-1] != hidden):
        return False
    return True


def _replacement(op, x, weights: np.ndarray, bias: np.ndarray, mask, heads: int, scale: float):
    # com.microsoft.MultiHeadAttention after one packed MatMul measured the same on MiniLM
    # (2 threads, ORT_ENABLE_ALL and disabled) with two more nodes per layer: Attention it is.
    w = new_initializer(op, weights.astype(np.float32), "attention_qkv_weight")
    b = new_initializer(op, bias.astype(np.float32), "attention_qkv_bias")
    inputs = [x, w, b, None, None, mask] if mask is not None else [x, w, b]
    return op.Attention(*inputs, num_heads=heads, scale=float(scale), _domain=MS_DOMAIN)


# -- BERT: separate Q, K, V projections ------------------------------------------------------
def _bert_pattern(style: str, masked: bool):
    def pattern(op, x, wq, bq, wk, bk, wv, bv, shape_q, shape_k, shape_v):
        q = op.Transpose(op.Reshape(op.MatMul(x, wq) + bq, shape_q, _allow_other_attributes=True),
                         perm=[0, 2, 1, 3], _outputs=["q"])
        kt = op.Transpose(op.Reshape(op.MatMul(x, wk) + bk, shape_k, _outputs=["k4"],
                                     _allow_other_attributes=True), perm=[0, 2, 3, 1])
        v = op.Transpose(op.Reshape(op.MatMul(x, wv) + bv, shape_v, _outputs=["v4"],
                                    _allow_other_attributes=True), perm=[0, 2, 1, 3])
        return _attention_tail(op, _scores(op, q, kt, style), v, masked)

    return pattern


def _bert_weights(wq, bq, wk, bk, wv, bv):
    arrays = [const(v) for v in (wq, wk, wv, bq, bk, bv)]
    if any(a is None for a in arrays):
        return None
    w_q, w_k, w_v, b_q, b_k, b_v = arrays
    if w_q.ndim != 2 or w_q.shape != w_k.shape or w_q.shape != w_v.shape or \
            w_q.shape[0] != w_q.shape[1]:
        return None
    hidden = w_q.shape[1]
    if any(b.shape != (hidden,) for b in (b_q, b_k, b_v)):
        return None
    return np.concatenate([w_q, w_k, w_v], axis=1), np.concatenate([b_q, b_k, b_v])


def _head_size(q) -> int:
    qs = shape(q)
    return qs[-1] if qs is not None and len(qs) == 4 and isinstance(qs[-1], int) else -1


def _split_heads_ok(value, heads: int, head: int) -> bool:
    """A Reshape output [B, S, N, d] that splits only the hidden axis into heads x head size."""
    s = shape(value)
    if s is None or len(s) != 4 or s[3] != head:
        return False
    if isinstance(s[2], int) and s[2] != heads:
        return False
    target = const(value.producer().inputs[1])
    if target is not None and [int(t) for t in target[2:]] not in ([heads, head], [-1, head],
                                                                    [heads, -1]):
        return False
    return True


def _bert_condition(ctx, x, wq, bq, wk, bk, wv, bv, q, k4, v4, probs, out_shape, mask=None,
                    scale_q=None, scale_k=None, scale=None, divisor=None, **_):
    packed = _bert_weights(wq, bq, wk, bk, wv, bv)
    if packed is None or _scale_of(scale_q, scale_k, scale, divisor) is None:
        return False
    head = _head_size(q)
    if head <= 0 or packed[0].shape[0] % head:
        return False
    heads = packed[0].shape[0] // head
    if not all(_split_heads_ok(v, heads, head) for v in (q.producer().inputs[0], k4, v4)):
        return False
    hidden = packed[0].shape[0]
    out = ctx.root.outputs[0] if hasattr(ctx, "root") else None
    return _common_ok(x, probs, mask, out, hidden, _head_size(q))


def _bert_replacement(op, x, wq, bq, wk, bk, wv, bv, q, mask=None, scale_q=None,
                      scale_k=None, scale=None, divisor=None, **_):
    weights, bias = _bert_weights(wq, bq, wk, bk, wv, bv)
    heads = weights.shape[0] // _head_size(q)
    return _replacement(op, x, weights, bias, mask, heads,
                        _scale_of(scale_q, scale_k, scale, divisor))


fusion("attention_bert", family="attention", priority=20, targets=("ort",),
       pattern=[_bert_pattern(s, m) for s in ("mul", "div", "split") for m in (True, False)],
       condition=_bert_condition, replacement=_bert_replacement,
       doc="BERT attention (Q/K/V MatMul+Add, Reshape, Transpose, MatMul, scale, mask, Softmax, "
           "MatMul) -> com.microsoft.Attention")


# -- ViT: one packed QKV projection ----------------------------------------------------------
def _vit_pattern(style: str, masked: bool):
    def pattern(op, x, w, b, shape5):
        t = op.Transpose(op.Reshape(op.MatMul(x, w) + b, shape5, _allow_other_attributes=True),
                         perm=[2, 0, 3, 1, 4])
        q5, k5, v5 = op.Split(t, _allow_other_inputs=True, _outputs=["split_q", "split_k",
                                                                      "split_v"])
        q = op.Squeeze(q5, _allow_other_inputs=True, _outputs=["q"])
        k = op.Squeeze(k5, _allow_other_inputs=True)
        v = op.Squeeze(v5, _allow_other_inputs=True)
        kt = op.Transpose(k, perm=[0, 1, 3, 2])
        return _attention_tail(op, _scores(op, q, kt, style), v, masked)

    return pattern


def _vit_condition(ctx, x, w, b, shape5, split_q, q, probs, out_shape, mask=None,
                   scale_q=None, scale_k=None, scale=None, divisor=None, **_):
    weights, bias, target = const(w), const(b), const(shape5)
    if weights is None or bias is None or target is None or weights.ndim != 2:
        return False
    hidden = weights.shape[0]
    head = _head_size(q)
    if weights.shape[1] != 3 * hidden or bias.shape != (3 * hidden,) or head <= 0:
        return False
    if target.shape != (5,) or list(target[2:]) not in ([3, hidden // head, head],
                                                         [3, -1, head], [3, hidden // head, -1]):
        return False
    if attr(split_q, "axis", 0) != 0 or _scale_of(scale_q, scale_k, scale, divisor) is None:
        return False
    split_node = split_q.producer()
    if len(split_node.outputs) != 3:
        return False
    if len(split_node.inputs) > 1 and split_node.inputs[1] is not None:
        sizes = const(split_node.inputs[1])
        if sizes is None or list(sizes) != [1, 1, 1]:
            return False
    for sq in (q.producer(),):
        axes = const(sq.inputs[1]) if len(sq.inputs) > 1 and sq.inputs[1] is not None else \
            attr(sq.outputs[0], "axes", None)
        if axes is None or [int(a) for a in np.ravel(axes)] != [0]:
            return False
    for out in split_node.outputs[1:]:
        sq = next((u.node for u in out.uses() if u.node.op_type == "Squeeze"), None)
        if sq is None:
            return False
        axes = const(sq.inputs[1]) if len(sq.inputs) > 1 and sq.inputs[1] is not None else \
            attr(sq.outputs[0], "axes", None)
        if axes is None or [int(a) for a in np.ravel(axes)] != [0]:
            return False
    out = ctx.root.outputs[0] if hasattr(ctx, "root") else None
    return _common_ok(x, probs, mask, out, hidden, head)


def _vit_replacement(op, x, w, b, q, mask=None, scale_q=None, scale_k=None, scale=None,
                     divisor=None, **_):
    weights, bias = const(w), const(b)
    heads = weights.shape[0] // _head_size(q)
    return _replacement(op, x, weights, bias, mask, heads,
                        _scale_of(scale_q, scale_k, scale, divisor))


fusion("attention_vit", family="attention", priority=20, targets=("ort",),
       pattern=[_vit_pattern(s, m) for s in ("split", "mul", "div") for m in (False, True)],
       condition=_vit_condition, replacement=_vit_replacement,
       doc="ViT attention (packed QKV MatMul+Add, Reshape, Transpose, Split, Squeeze, scale, "
           "Softmax, MatMul) -> com.microsoft.Attention")
