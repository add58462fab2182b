"""Attention (opset 23+), RotaryEmbedding and LinearAttention, written from the ONNX spec."""

from __future__ import annotations

import math

import torch

from onnxpress.passes.torch_graph.registry import arg, op


def _heads(x, n):
    """(B, T, H*D) -> (B, H, T, D)."""
    b, t, hd = x.shape
    return x.reshape(b, t, n, hd // n).transpose(1, 2)


def _allowed_bias(allowed, dtype):
    zero = torch.zeros((), dtype=dtype)
    return torch.where(allowed, zero, torch.tensor(-math.inf, dtype=dtype))


@op("Attention")
def attention(args, a, ctx):
    q, k, v = args[:3]
    mask, past_k, past_v, nonpad = (arg(args, i) for i in (3, 4, 5, 6))
    rank3 = q.dim() == 3
    if rank3:
        q, k, v = _heads(q, a["q_num_heads"]), _heads(k, a["kv_num_heads"]), _heads(v, a["kv_num_heads"])
    dtype = q.dtype
    scale = a.get("scale", 1.0 / math.sqrt(q.shape[-1]))
    root = torch.tensor(math.sqrt(scale), dtype=dtype)
    if past_k is not None:
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
    present_k, present_v = k, v
    lq, lk = q.shape[2], k.shape[2]
    bias = torch.zeros((lq, lk), dtype=dtype)
    if mask is not None and mask.shape[-1] < lk:  # a short mask covers the first keys
        fill = False if mask.dtype == torch.bool else -math.inf
        extra = torch.full(tuple(mask.shape[:-1]) + (lk - mask.shape[-1],), fill, dtype=mask.dtype)
        mask = torch.cat([mask, extra], dim=-1)
    if mask is not None and mask.dtype == torch.bool:
        mask = _allowed_bias(mask, dtype)
    i_idx, j_idx = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
    # the causal and window frontiers: a query at i sits at position i + offset among the keys
    if past_k is None and nonpad is not None:
        offset = nonpad.reshape(-1, 1, 1).to(torch.int64) - lq
    else:
        offset = past_k.shape[2] if past_k is not None else 0
    per_batch = not isinstance(offset, int)
    if a.get("is_causal", 0):
        base = bias if mask is None else mask
        # onnxruntime masks causally with the lowest float, not -inf (its qk output shows it)
        causal = torch.where(j_idx <= i_idx + offset, torch.zeros((), dtype=dtype),
                             torch.tensor(torch.finfo(dtype).min, dtype=dtype))
        bias = base + (causal[:, None] if per_batch else causal)
    elif mask is not None:
        bias = bias + mask
    left, right = a.get("left_window_size", -1), a.get("right_window_size", -1)
    if left >= 0 or right >= 0:
        diff = i_idx + offset - j_idx
        allowed = torch.ones_like(diff, dtype=torch.bool)
        if left >= 0:
            allowed &= diff <= left
        if right >= 0:
            allowed &= -diff <= right
        window = _allowed_bias(allowed, dtype)
        bias = bias + (window[:, None] if per_batch else window)
    if nonpad is not None:
        keep = torch.arange(lk)[None, :] < nonpad.reshape(-1, 1)
        bias = bias + _allowed_bias(keep, dtype).reshape(-1, 1, 1, lk)
    hq, hk = q.shape[1], k.shape[1]
    if hq != hk and hq % hk == 0:  # grouped-query attention: each KV head serves hq/hk heads
        k, v = k.repeat_interleave(hq // hk, dim=1), v.repeat_interleave(hq // hk, dim=1)
    scores = torch.matmul(q * root, (k * root).transpose(-1, -2))
    softcap = a.get("softcap", 0.0)
    if softcap and softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    mode = a.get("qk_matmul_output_mode", 0)
    with_bias = scores + bias
    qk_out = with_bias if mode == 2 else scores
    work = with_bias
    if "softmax_precision" in a:
        from onnxpress.passes.torch_graph.registry import torch_dtype

        work = work.to(torch_dtype(a["softmax_precision"], ctx.node))
    masked_rows = bias.amax(dim=-1, keepdim=True) <= torch.finfo(dtype).min
    safe = torch.where(torch.isneginf(work.amax(dim=-1, keepdim=True)), torch.zeros_like(work), work)
    probs = torch.softmax(safe, dim=-1)
    probs = torch.where(masked_rows, torch.zeros_like(probs), probs)
    if mode == 3:
        qk_out = probs
    y = torch.matmul(probs.to(dtype), v)
    if rank3:
        y = y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1)
    return [y, present_k, present_v, qk_out.to(dtype)]


@op("RotaryEmbedding")
def rotary_embedding(args, a, ctx):
    x, cos, sin, pos = args[0], args[1], args[2], arg(args, 3)
    shape = x.shape
    if x.dim() == 4:
        x = x.transpose(1, 2)  # (B, S, H, D)
    else:
        x = x.reshape(shape[0], shape[1], a["num_heads"], -1)
    dim = a.get("rotary_embedding_dim", 0) or x.shape[-1]
    rot, rest = x[..., :dim], x[..., dim:]
    if pos is not None:
        cos, sin = cos[pos.to(torch.int64)], sin[pos.to(torch.int64)]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    if a.get("interleaved", 0):
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
    else:
        x1, x2 = rot.chunk(2, dim=-1)
    real, imag = cos * x1 - sin * x2, sin * x1 + cos * x2
    if a.get("interleaved", 0):
        rot = torch.stack([real, imag], dim=-1).reshape(rot.shape)
    else:
        rot = torch.cat([real, imag], dim=-1)
    y = torch.cat([rot, rest], dim=-1)
    return y.transpose(1, 2) if len(shape) == 4 else y.reshape(shape)


@op("LinearAttention")
def linear_attention(args, a, ctx):
    """The recurrent form: state <- state * exp(decay) (gated), value corrected by what the
    state already retrieves (delta), plus the outer product of key and value; out = q . state."""
    q, k, v = args[:3]
    past, decay, beta = arg(args, 3), arg(args, 4), arg(args, 5)
    hq, hk = a["q_num_heads"], a["kv_num_heads"]
    rule = a.get("update_rule", "gated_delta")
    gated, delta = rule in ("gated", "gated_delta"), rule in ("delta", "gated_delta")
    b, t, _ = q.shape
    q4, k4, v4 = _heads(q, hq).float(), _heads(k, hk).float(), _heads(v, hk).float()
    dk, dv = q4.shape[-1], v4.shape[-1]
    if gated:
        g4 = (decay.reshape(b, t, hk, 1) if decay.shape[-1] == hk else
              decay.reshape(b, t, hk, dk)).transpose(1, 2).float()
    if delta:
        b4 = beta.reshape(b, t, beta.shape[-1], 1).transpose(1, 2).float()
    state = past.float() if past is not None else torch.zeros(b, hk, dk, dv)
    scale = a.get("scale", 0.0) or 1.0 / math.sqrt(dk)
    outs = []
    for i in range(t):
        kt, vt = k4[:, :, i], v4[:, :, i]
        if gated:
            state = state * torch.exp(g4[:, :, i])[..., None]
        if delta:
            vt = b4[:, :, i] * (vt - torch.einsum("bhdm,bhd->bhm", state, kt))
        state = state + kt[..., :, None] * vt[..., None, :]
        read = state.repeat_interleave(hq // hk, dim=1) if hq != hk else state
        outs.append(scale * torch.einsum("bhd,bhdm->bhm", q4[:, :, i], read))
    y = torch.stack(outs, dim=2).transpose(1, 2).reshape(b, t, hq * dv).to(q.dtype)
    return [y, state.to(past.dtype if past is not None else q.dtype)]
