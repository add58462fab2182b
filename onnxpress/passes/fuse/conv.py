"""Folds into Conv/ConvTranspose/Gemm/MatMul with constant weights, and Conv + activation.

    before: y = BatchNormalization(Conv(x, W, B), s, t, m, v)   after: y = Conv(x, W', B')
            W' = W * s/sqrt(v+eps) (per output channel), B' = (B - m) * s/sqrt(v+eps) + t
            (likewise ConvTranspose, Gemm, and 2-D MatMul -> Gemm)
    before: y = Conv(x, W, B) * c[C,1,1] + d[C,1,1]             after: y = Conv(x, W*c, B*c + d)
            (likewise Gemm and MatMul with constants along the last axis)
    before: y = Conv(Pad(x, [0,0,t,l, 0,0,b,r]), W)             after: y = Conv(x, W, pads+=[t,l,b,r])
    before: y = Relu(Conv(x, W, B) [+ z])                       after: y = com.microsoft.FusedConv(
                                                                      x, W, B[, z], activation=Relu)
    before: y = Relu(Gemm(a, b, c))                             after: y = com.microsoft.FusedGemm(...)
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


def _weights(w) -> np.ndarray | None:
    arr = const(w)
    return None if arr is None or arr.dtype.kind != "f" else arr


def _node_attrs(value) -> dict:
    node = value.producer()
    return {k: a.value for k, a in node.attributes.items()}


# -- how each producer op scales and shifts its output channels ------------------------------
def _channel_count(kind: str, w: np.ndarray, value) -> int | None:
    if kind == "Conv":
        return w.shape[0]
    if kind == "ConvTranspose":
        return w.shape[1] * int(attr(value, "group", 1))
    if kind == "Gemm":
        return w.shape[0] if attr(value, "transB", 0) else w.shape[1]
    if kind == "MatMul":
        return w.shape[1] if w.ndim == 2 else None
    return None


def _scaled_weights(kind: str, w: np.ndarray, scale: np.ndarray, value) -> np.ndarray:
    """W with output channel c multiplied by scale[c]."""
    if kind == "Conv":
        return w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    if kind == "ConvTranspose":
        group = int(attr(value, "group", 1))
        per = w.shape[1]
        g = w.reshape((group, w.shape[0] // group, per) + w.shape[2:])
        g = g * scale.reshape((group, 1, per) + (1,) * (w.ndim - 2))
        return g.reshape(w.shape)
    if kind == "Gemm" and attr(value, "transB", 0):
        return w * scale.reshape(-1, 1)
    return w * scale.reshape(1, -1)


def _bias_of(kind: str, value, channels: int) -> np.ndarray | None:
    """The producer's per-channel bias as a vector (zeros when it has none), or None."""
    node = value.producer()
    if kind == "MatMul":
        return np.zeros(channels, np.float32)
    if kind == "Gemm":
        if len(node.inputs) < 3 or node.inputs[2] is None:
            return np.zeros(channels, np.float32)
        c = const(node.inputs[2])
        if c is None:
            return None
        beta = float(attr(value, "beta", 1.0))
        try:
            c = np.broadcast_to(c, (1, channels)) if c.ndim == 2 else np.broadcast_to(c, (channels,))
        except ValueError:
            return None
        if c.ndim == 2:
            if c.shape[0] != 1:
                return None
            c = c[0]
        return c * beta
    if len(node.inputs) < 3 or node.inputs[2] is None:
        return np.zeros(channels, np.float32)
    b = const(node.inputs[2])
    return None if b is None or b.shape != (channels,) else b


def _fold_plan(y, w, kind: str, scale: np.ndarray, shift: np.ndarray):
    """New (weights, bias) for `y = producer(x, w, ...) * scale + shift` (per channel)."""
    weights = _weights(w)
    if weights is None:
        return None
    channels = _channel_count(kind, weights, y)
    if channels is None or scale.shape != (channels,) or shift.shape != (channels,):
        return None
    bias = _bias_of(kind, y, channels)
    if bias is None:
        return None
    if kind == "Gemm":
        weights = weights * float(attr(y, "alpha", 1.0))
    new_w = _scaled_weights(kind, weights, scale, y).astype(weights.dtype)
    new_b = (bias * scale + shift).astype(weights.dtype)
    return new_w, new_b


def _rebuild(op, kind: str, x, y, new_w: np.ndarray, new_b: np.ndarray):
    w = new_initializer(op, new_w, f"{kind.lower()}_weight")
    b = new_initializer(op, new_b, f"{kind.lower()}_bias")
    attrs = _node_attrs(y)
    if kind == "Gemm":
        attrs.pop("alpha", None)
        attrs.pop("beta", None)
        return op.Gemm(x, w, b, **attrs)
    if kind == "MatMul":
        return op.Gemm(x, w, b)
    return getattr(op, kind)(x, w, b, **attrs)


# -- BatchNormalization ----------------------------------------------------------------------
def _bn_vectors(scale, bias, mean, var, bn_out):
    arrays = [const(v) for v in (scale, bias, mean, var)]
    if any(a is None or a.ndim != 1 for a in arrays):
        return None
    s, t, m, v = (a.astype(np.float64) for a in arrays)
    eps = float(attr(bn_out, "epsilon", 1e-5))
    if attr(bn_out, "training_mode", 0):
        return None
    k = s / np.sqrt(v + eps)
    return k, t - m * k


def _bn_pattern(kind: str):
    def pattern(op, x, w, scale, bias, mean, var):
        y = getattr(op, kind)(x, w, _allow_other_inputs=True, _outputs=["y"])
        return op.BatchNormalization(y, scale, bias, mean, var, _outputs=["bn_out"])

    return pattern


def _bn_fusion(kind: str, rank_ok):
    def plan(x, w, y, scale, bias, mean, var, bn_out):
        if not is_float(x) or not rank_ok(x, y):
            return None
        vec = _bn_vectors(scale, bias, mean, var, bn_out)
        if vec is None:
            return None
        return _fold_plan(y, w, kind, vec[0].astype(np.float64), vec[1].astype(np.float64))

    fusion(f"batchnorm_into_{kind.lower()}", family="batchnorm", priority=10,
           pattern=_bn_pattern(kind),
           condition=lambda ctx, x, w, y, scale, bias, mean, var, bn_out:
               plan(x, w, y, scale, bias, mean, var, bn_out) is not None,
           replacement=lambda op, x, w, y, scale, bias, mean, var, bn_out:
               _rebuild(op, kind, x, y, *plan(x, w, y, scale, bias, mean, var, bn_out)),
           doc=f"BatchNormalization({kind}(x, W{'' if kind == 'MatMul' else ', B'})) -> "
               f"{'Gemm' if kind == 'MatMul' else kind}(x, W', B')")


_bn_fusion("Conv", lambda x, y: True)
_bn_fusion("ConvTranspose", lambda x, y: True)
_bn_fusion("Gemm", lambda x, y: attr(y, "transA", 0) == 0)
_bn_fusion("MatMul", lambda x, y: rank(x) == 2)


# -- per-channel Mul / Add -------------------------------------------------------------------
def _channel_vector(c, y, kind: str, channels: int) -> np.ndarray | None:
    """A constant that varies only along y's channel axis, as a [channels] vector."""
    arr = const(c)
    ry = rank(y)
    if arr is None or ry is None or arr.ndim > ry or arr.dtype.kind != "f":
        return None
    axis = 1 if kind in ("Conv", "ConvTranspose") else ry - 1
    full = [1] * (ry - arr.ndim) + list(arr.shape)
    if any(d != 1 for i, d in enumerate(full) if i != axis):
        return None
    vec = arr.reshape(-1)
    if vec.size == 1:
        return np.full(channels, float(vec[0]))
    return vec.astype(np.float64) if vec.size == channels else None


def _affine_plan(kind, x, w, y, c, op_name):
    weights = _weights(w)
    if weights is None or not is_float(x):
        return None
    if kind == "Gemm" and attr(y, "transA", 0):
        return None
    if kind == "MatMul" and (rank(x) != 2 or weights.ndim != 2):
        return None
    channels = _channel_count(kind, weights, y)
    if channels is None:
        return None
    vec = _channel_vector(c, y, kind, channels)
    if vec is None:
        return None
    if op_name == "Mul":
        return _fold_plan(y, w, kind, vec, np.zeros(channels))
    return _fold_plan(y, w, kind, np.ones(channels), vec)


def _affine_fusion(kind: str, op_name: str):
    def pattern(op, x, w, c):
        y = getattr(op, kind)(x, w, _allow_other_inputs=True, _outputs=["y"])
        return getattr(op, op_name)(y, c)

    fusion(f"{op_name.lower()}_into_{kind.lower()}", family="channel_affine", priority=12,
           pattern=pattern,
           condition=lambda ctx, x, w, y, c: _affine_plan(kind, x, w, y, c, op_name) is not None,
           replacement=lambda op, x, w, y, c: _rebuild(
               op, kind, x, y, *_affine_plan(kind, x, w, y, c, op_name)),
           doc=f"{kind}(x, W, B) {'*' if op_name == 'Mul' else '+'} per-channel constant -> "
               f"{'Gemm' if kind == 'MatMul' else kind}(x, W', B')")


for _kind in ("Conv", "ConvTranspose", "Gemm"):
    for _op in ("Mul", "Add"):
        _affine_fusion(_kind, _op)


# MatMul with a constant weight of any input rank: a scale along the last axis folds into W
def _matmul_scale_plan(x, w, c, y):
    weights = _weights(w)
    if weights is None or weights.ndim != 2 or not is_float(x):
        return None
    vec = _channel_vector(c, y, "MatMul", weights.shape[1])
    return None if vec is None else (weights * vec.reshape(1, -1)).astype(weights.dtype)


fusion("mul_into_matmul", family="channel_affine", priority=13,
       pattern=lambda op, x, w, c: op.Mul(op.MatMul(x, w, _outputs=["y"]), c),
       condition=lambda ctx, x, w, c, y: _matmul_scale_plan(x, w, c, y) is not None,
       replacement=lambda op, x, w, c, y: op.MatMul(
           x, new_initializer(op, _matmul_scale_plan(x, w, c, y), "matmul_weight")),
       doc="MatMul(x, W) * c[N] -> MatMul(x, W * c)")


# -- Pad into Conv ---------------------------------------------------------------------------
def _pad_plan(x, pads, conv_out, pad_out):
    p = const(pads)
    r = rank(x)
    if p is None or r is None or p.size != 2 * r or not is_float(x):
        return None
    pad_node = pad_out.producer()
    if attr(pad_out, "mode", "constant") not in ("constant", b"constant"):
        return None
    if len(pad_node.inputs) > 2 and pad_node.inputs[2] is not None:
        v = scalar(pad_node.inputs[2])
        if v is None or v != 0.0:
            return None
    if len(pad_node.inputs) > 3 and pad_node.inputs[3] is not None:
        return None
    p = [int(a) for a in p]
    begin, end = p[:r], p[r:]
    if begin[:2] != [0, 0] or end[:2] != [0, 0] or min(p) < 0:
        return None
    if attr(conv_out, "auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        return None
    old = attr(conv_out, "pads", None) or [0] * (2 * (r - 2))
    k = r - 2
    return [old[i] + begin[2 + i] for i in range(k)] + [old[k + i] + end[2 + i] for i in range(k)]


def _pad_conv_replacement(op, x, pads, w, conv_out, pad_out):
    attrs = _node_attrs(conv_out)
    attrs["pads"] = _pad_plan(x, pads, conv_out, pad_out)
    inputs = list(conv_out.producer().inputs)[1:]
    return op.Conv(x, *inputs, **attrs)


fusion("pad_into_conv", family="pad", priority=14, opset=(11, None),
       pattern=lambda op, x, pads, w: op.Conv(
           op.Pad(x, pads, _allow_other_inputs=True, _outputs=["pad_out"]), w,
           _allow_other_inputs=True, _outputs=["conv_out"]),
       condition=lambda ctx, x, pads, conv_out, pad_out:
           _pad_plan(x, pads, conv_out, pad_out) is not None,
       replacement=_pad_conv_replacement,
       doc="Conv(Pad(x, zeros on spatial axes)) -> Conv(x, pads + padding)")


# -- Conv / Gemm + activation (onnxruntime) --------------------------------------------------
_ACTIVATIONS = {"Relu": None, "Tanh": None, "Sigmoid": None, "LeakyRelu": ("alpha",),
                "HardSigmoid": ("alpha", "beta"), "Clip": "clip"}
_DEFAULTS = {"alpha": {"LeakyRelu": 0.01, "HardSigmoid": 0.2}, "beta": {"HardSigmoid": 0.5}}


def _activation_params(act_name: str, act_out) -> list[float] | None:
    spec = _ACTIVATIONS[act_name]
    if spec is None:
        return []
    if spec == "clip":
        node = act_out.producer()
        lo = scalar(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None \
            else float(attr(act_out, "min", -3.4028234663852886e38))
        hi = scalar(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None \
            else float(attr(act_out, "max", 3.4028234663852886e38))
        return None if lo is None or hi is None else [lo, hi]
    return [float(attr(act_out, a, _DEFAULTS[a][act_name])) for a in spec]


def _conv_act_fusion(act_name: str, with_sum: bool):
    def pattern(op, x, w, z=None):
        y = op.Conv(x, w, _allow_other_inputs=True, _outputs=["conv_out"])
        if with_sum:
            y = op.Add(y, z, _outputs=["sum_out"])
        return getattr(op, act_name)(y, _allow_other_inputs=True, _outputs=["act_out"])

    if not with_sum:
        def pattern(op, x, w):  # noqa: F811  (no `z` parameter: it must not be a variable)
            y = op.Conv(x, w, _allow_other_inputs=True, _outputs=["conv_out"])
            return getattr(op, act_name)(y, _allow_other_inputs=True, _outputs=["act_out"])

    def condition(ctx, x, w, conv_out, act_out, z=None):
        if not is_float(x) or rank(x) != 4 or _weights(w) is None:
            return False
        if attr(conv_out, "auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
            return False
        if _activation_params(act_name, act_out) is None:
            return False
        if with_sum:
            # the sum must have exactly the conv output's shape (FusedConv does not broadcast)
            sz, sy = shape(z), shape(conv_out)
            if sz is None or sy is None or sz != sy or not all(isinstance(d, int) for d in sz):
                return False
        return True

    def replacement(op, x, w, conv_out, act_out, z=None):
        attrs = _node_attrs(conv_out)
        params = _activation_params(act_name, act_out)
        if params:
            attrs["activation_params"] = params
        inputs = list(conv_out.producer().inputs)[1:]
        if with_sum:
            if len(inputs) < 2:
                channels = _weights(w).shape[0]
                inputs.append(new_initializer(op, np.zeros(channels, np.float32), "conv_bias"))
            inputs.append(z)
        return op.FusedConv(x, *inputs, activation=act_name, _domain=MS_DOMAIN, **attrs)

    name = f"conv_{'add_' if with_sum else ''}{act_name.lower()}_ort"
    fusion(name, family="conv_activation", priority=70 if with_sum else 71, targets=("ort",),
           pattern=pattern, condition=condition, replacement=replacement,
           doc=f"{act_name}(Conv(x, W, B){' + z' if with_sum else ''}) -> "
               f"com.microsoft.FusedConv(activation={act_name})")


for _act in _ACTIVATIONS:
    _conv_act_fusion(_act, with_sum=False)
_conv_act_fusion("Relu", with_sum=True)


def _gemm_act_condition(ctx, a, act_out):
    return is_float(a) and _activation_params(_act_of(act_out), act_out) is not None


def _act_of(value) -> str:
    return value.producer().op_type


def _gemm_act_fusion(act_name: str):
    def replacement(op, a, act_out, gemm_out):
        attrs = _node_attrs(gemm_out)
        params = _activation_params(act_name, act_out)
        if params:
            attrs["activation_params"] = params
        inputs = list(gemm_out.producer().inputs)[1:]
        return op.FusedGemm(a, *inputs, activation=act_name, _domain=MS_DOMAIN, **attrs)

    fusion(f"gemm_{act_name.lower()}_ort", family="gemm_activation", priority=72,
           targets=("ort",),
           pattern=lambda op, a: getattr(op, act_name)(
               op.Gemm(a, _allow_other_inputs=True, _outputs=["gemm_out"]),
               _allow_other_inputs=True, _outputs=["act_out"]),
           condition=_gemm_act_condition, replacement=replacement,
           doc=f"{act_name}(Gemm(a, b, c)) -> com.microsoft.FusedGemm(activation={act_name})")


for _act in ("Relu", "Tanh", "Sigmoid", "LeakyRelu"):
    _gemm_act_fusion(_act)
