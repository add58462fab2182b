"""RNN, GRU and LSTM, step by step as the ONNX spec writes them (gate orders, activations,
clip, sequence_lens, both directions)."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812

from onnxpress.passes.torch_graph.registry import OPS, arg


def _activation(name: str, alpha: list[float], beta: list[float]):
    """An activation by its ONNX name; `alpha`/`beta` are consumed in order when it takes them."""
    def take(values, default):
        return values.pop(0) if values else default

    if name == "Tanh":
        return torch.tanh
    if name == "Sigmoid":
        return torch.sigmoid
    if name == "Relu":
        return torch.relu
    if name == "Softsign":
        return F.softsign
    if name == "Softplus":
        return F.softplus
    if name == "Affine":
        al, be = take(alpha, 1.0), take(beta, 0.0)
        return lambda x: al * x + be
    if name == "LeakyRelu":
        al = take(alpha, 0.01)
        return lambda x: F.leaky_relu(x, al)
    if name == "ThresholdedRelu":
        al = take(alpha, 1.0)
        return lambda x: torch.where(x > al, x, torch.zeros_like(x))
    if name == "ScaledTanh":
        al, be = take(alpha, 1.0), take(beta, 1.0)
        return lambda x: al * torch.tanh(be * x)
    if name == "HardSigmoid":
        al, be = take(alpha, 0.2), take(beta, 0.5)
        return lambda x: torch.clamp(al * x + be, 0, 1)
    if name == "Elu":
        al = take(alpha, 1.0)
        return lambda x: F.elu(x, al)
    raise KeyError(name)


def _recurrent(kind: str, defaults: list[str], n_gates: int):
    def run(args, a, ctx):
        x, w, r = args[:3]
        b, lens, h0 = arg(args, 3), arg(args, 4), arg(args, 5)
        c0, peep = arg(args, 6), arg(args, 7)
        if a.get("layout", 0):
            x = x.transpose(0, 1)
            h0 = h0.transpose(0, 1) if h0 is not None else None
            c0 = c0.transpose(0, 1) if c0 is not None else None
        direction = a.get("direction", "forward")
        dirs = 2 if direction == "bidirectional" else 1
        hidden = w.shape[1] // n_gates
        names = list(a.get("activations", defaults * dirs))
        alpha, beta = list(a.get("activation_alpha", [])), list(a.get("activation_beta", []))
        try:
            acts = [_activation(n, alpha, beta) for n in names]
        except KeyError as exc:
            raise ctx.unsupported(f"activation {exc}") from None
        seq, batch = x.shape[0], x.shape[1]
        lens = lens.to(torch.int64) if lens is not None else torch.full((batch,), seq)
        clip = a.get("clip")
        ys, hs, cs = [], [], []
        for d in range(dirs):
            reverse = direction == "reverse" or d == 1
            bias = b[d] if b is not None else torch.zeros(2 * n_gates * hidden, dtype=x.dtype)
            h = h0[d] if h0 is not None else torch.zeros(batch, hidden, dtype=x.dtype)
            c = c0[d] if c0 is not None else torch.zeros(batch, hidden, dtype=x.dtype)
            p = peep[d] if peep is not None else None
            f_acts = acts[d * len(defaults):(d + 1) * len(defaults)]
            out = [None] * seq
            for t in (range(seq - 1, -1, -1) if reverse else range(seq)):
                live = (t < lens).to(x.dtype)[:, None]
                h_new, c_new = STEPS[kind](x[t], w[d], r[d], bias, h, c, p, f_acts, clip, a, hidden)
                h = live * h_new + (1 - live) * h
                c = live * c_new + (1 - live) * c if c_new is not None else c
                out[t] = live * h_new
            ys.append(torch.stack(out))
            hs.append(h)
            cs.append(c)
        y = torch.stack(ys, dim=1)            # [seq, dirs, batch, hidden]
        yh, yc = torch.stack(hs), torch.stack(cs)
        if a.get("layout", 0):
            y, yh, yc = y.permute(2, 0, 1, 3), yh.transpose(0, 1), yc.transpose(0, 1)
        return [y, yh, yc] if kind == "LSTM" else [y, yh]
    return run


def _clip(v, clip):
    return v if clip is None else torch.clamp(v, -clip, clip)


def _rnn_step(xt, w, r, bias, h, c, p, acts, clip, a, hidden):
    wb, rb = bias.chunk(2)
    return acts[0](_clip(xt @ w.t() + h @ r.t() + wb + rb, clip)), None


def _gru_step(xt, w, r, bias, h, c, p, acts, clip, a, hidden):
    f, g = acts
    wb, rb = bias.chunk(2)
    wz, wr, wh = w.chunk(3)
    rz, rr, rh = r.chunk(3)
    wbz, wbr, wbh = wb.chunk(3)
    rbz, rbr, rbh = rb.chunk(3)
    z = f(_clip(xt @ wz.t() + h @ rz.t() + wbz + rbz, clip))
    rt = f(_clip(xt @ wr.t() + h @ rr.t() + wbr + rbr, clip))
    if a.get("linear_before_reset", 0):
        pre = xt @ wh.t() + rt * (h @ rh.t() + rbh) + wbh
    else:
        pre = xt @ wh.t() + (rt * h) @ rh.t() + rbh + wbh
    hh = g(_clip(pre, clip))
    return (1 - z) * hh + z * h, None


def _lstm_step(xt, w, r, bias, h, c, p, acts, clip, a, hidden):
    f, g, hact = acts
    wb, rb = bias.chunk(2)
    gates = xt @ w.t() + h @ r.t() + wb + rb
    gi, go, gf, gc = gates.chunk(4, dim=-1)
    pi, po, pf = p.chunk(3) if p is not None else (0, 0, 0)
    i = f(_clip(gi + pi * c, clip))
    fg = 1 - i if a.get("input_forget", 0) else f(_clip(gf + pf * c, clip))
    ct = fg * c + i * g(_clip(gc, clip))
    o = f(_clip(go + po * ct, clip))
    return o * hact(ct), ct


STEPS = {"RNN": _rnn_step, "GRU": _gru_step, "LSTM": _lstm_step}

OPS["RNN"] = _recurrent("RNN", ["Tanh"], 1)
OPS["GRU"] = _recurrent("GRU", ["Sigmoid", "Tanh"], 3)
OPS["LSTM"] = _recurrent("LSTM", ["Sigmoid", "Tanh", "Tanh"], 4)
