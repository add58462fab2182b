"""Normalization fusions: LayerNorm and RMSNorm decompositions, residual Add + LayerNorm.

    before: d = x - ReduceMean(x, [-1]); y = d / Sqrt(ReduceMean(d^2, [-1]) + eps) * g + b
    after:  y = LayerNormalization(x, g, b, axis=-1, epsilon=eps)              (opset 17+)
    before: y = x / Sqrt(ReduceMean(x^2, [-1]) + eps) * g
    after:  y = RMSNormalization(x, g, axis=-1, epsilon=eps)                   (opset 23+)
    before: s = a + bias + skip; y = LayerNormalization(s, g, b)     (s possibly used further)
    after:  y, s = com.microsoft.SkipLayerNormalization(a, skip, g, b, bias)  (target ort)
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


def _reduced_axes(value, x) -> list[int] | None:
    """Axes reduced by the ReduceMean producing `value`, made non-negative, if it keeps dims
    and reduces the trailing axes of `x`; else None."""
    node = value.producer()
    r = rank(x)
    if node is None or r is None or attr(value, "keepdims", 1) != 1:
        return None
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = const(node.inputs[1])
    else:
        axes = attr(value, "axes", None)
    if axes is None:
        return None
    axes = sorted(int(a) % r for a in np.ravel(axes))
    if not axes or axes != list(range(r - len(axes), r)):
        return None
    return axes


def _full(value, normalized: list[int], fill: float) -> np.ndarray | None:
    """A constant broadcast to the normalized shape (LayerNormalization wants it whole)."""
    if value is None:
        return np.full(normalized, fill, dtype=np.float32)
    arr = const(value)
    if arr is None:
        return None
    # the constant may carry leading 1s ([1, 1, C]): drop them, then broadcast
    while arr.ndim > len(normalized) and arr.shape[0] == 1:
        arr = arr.reshape(arr.shape[1:])
    if arr.ndim > len(normalized):
        return None
    try:
        return np.ascontiguousarray(np.broadcast_to(arr, normalized)).astype(np.float32)
    except ValueError:
        return None


# -- LayerNorm -------------------------------------------------------------------------------
def _ln_core(op, x, eps, square: str):
    d = op.Sub(x, op.ReduceMean(x, _allow_other_inputs=True, _outputs=["mean"]))
    sq = op.Pow(d, 2.0) if square == "pow" else d * d
    var = op.ReduceMean(sq, _allow_other_inputs=True, _outputs=["var"])
    return d / op.Sqrt(var + eps)


# closures, not default arguments: every parameter of a pattern function is a variable.
# The affine forms are separate fusions tried first: the pass visits nodes in order, and the
# bare form would otherwise match at the Div before the scaled form is seen at the Add.
def _ln_forms(s: str):
    return {
        "affine": lambda op, x, eps, gamma, beta: _ln_core(op, x, eps, s) * gamma + beta,
        "scale": lambda op, x, eps, gamma: _ln_core(op, x, eps, s) * gamma,
        "bare": lambda op, x, eps: _ln_core(op, x, eps, s),
    }


def _ln_plan(x, eps, mean, var, gamma=None, beta=None):
    if not is_float(x) or scalar(eps) is None:
        return None
    axes = _reduced_axes(mean, x)
    if axes is None or axes != _reduced_axes(var, x):
        return None
    xs = shape(x)
    normalized = [xs[a] for a in axes]
    if not all(isinstance(d, int) and d > 0 for d in normalized):
        return None
    g, b = _full(gamma, normalized, 1.0), _full(beta, normalized, 0.0)
    if g is None or b is None:
        return None
    return axes[0] - len(xs), scalar(eps), g, b


def _ln_condition(ctx, x, eps, mean, var, gamma=None, beta=None):
    return _ln_plan(x, eps, mean, var, gamma, beta) is not None


def _ln_replacement(op, x, eps, mean, var, gamma=None, beta=None):
    axis, epsilon, g, b = _ln_plan(x, eps, mean, var, gamma, beta)
    return op.LayerNormalization(x, new_initializer(op, g, "ln_scale"),
                                 new_initializer(op, b, "ln_bias"), axis=axis, epsilon=epsilon)


for _i, _form in enumerate(("affine", "scale", "bare")):
    fusion("layernorm" if _form == "affine" else f"layernorm_{_form}", family="layernorm",
           priority=50 + _i, opset=(17, None),
           pattern=[_ln_forms("pow")[_form], _ln_forms("mul")[_form]],
           condition=_ln_condition, replacement=_ln_replacement,
           doc="ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div" +
               {"affine": "/Mul/Add", "scale": "/Mul", "bare": ""}[_form] +
               " -> LayerNormalization")


# -- RMSNorm ---------------------------------------------------------------------------------
def _rms_core(op, x, eps, square: str, form: str):
    sq = op.Pow(x, 2.0) if square == "pow" else x * x
    rms = op.Sqrt(op.ReduceMean(sq, _allow_other_inputs=True, _outputs=["var"]) + eps)
    return x / rms if form == "div" else x * op.Reciprocal(rms)


def _rms_forms(s: str, f: str, scaled: bool):
    if scaled:
        return lambda op, x, eps, gamma: _rms_core(op, x, eps, s, f) * gamma
    return lambda op, x, eps: _rms_core(op, x, eps, s, f)


def _rms_patterns(scaled: bool):
    return [_rms_forms(s, f, scaled) for s in ("pow", "mul") for f in ("div", "recip")]


def _rms_plan(x, eps, var, gamma=None):
    if not is_float(x) or scalar(eps) is None:
        return None
    axes = _reduced_axes(var, x)
    if axes is None:
        return None
    xs = shape(x)
    normalized = [xs[a] for a in axes]
    if not all(isinstance(d, int) and d > 0 for d in normalized):
        return None
    g = _full(gamma, normalized, 1.0)
    return None if g is None else (axes[0] - len(xs), scalar(eps), g)


for _scaled in (True, False):
    fusion("rmsnorm" if _scaled else "rmsnorm_bare", family="rmsnorm",
           priority=53 if _scaled else 54, opset=(23, None),
           pattern=_rms_patterns(_scaled),
           condition=lambda ctx, x, eps, var, gamma=None:
               _rms_plan(x, eps, var, gamma) is not None,
           replacement=lambda op, x, eps, var, gamma=None:
               _rms_replacement(op, x, eps, var, gamma),
           doc="x / Sqrt(ReduceMean(x^2) + eps)" + (" * g" if _scaled else "") +
               " -> RMSNormalization (opset 23+)")


def _rms_replacement(op, x, eps, var, gamma):
    axis, epsilon, g = _rms_plan(x, eps, var, gamma)
    return op.RMSNormalization(x, new_initializer(op, g, "rms_scale"), axis=axis,
                               epsilon=epsilon)


# -- residual Add + LayerNorm (onnxruntime) --------------------------------------------------
def _skip_patterns():
    def ln(op, s, gamma, beta):
        return op.LayerNormalization(s, gamma, beta, _outputs=["normed"])

    return [
        lambda op, a, skip, bias, gamma, beta: ln(op, (a + bias) + skip, gamma, beta),
        lambda op, a, skip, gamma, beta: ln(op, a + skip, gamma, beta),
    ]


def _skip_patterns_keep_sum():
    def both(op, s, gamma, beta):
        return op.LayerNormalization(s, gamma, beta, _outputs=["normed"]), s

    return [
        lambda op, a, skip, bias, gamma, beta: both(op, (a + bias) + skip, gamma, beta),
        lambda op, a, skip, gamma, beta: both(op, a + skip, gamma, beta),
    ]


def _skip_condition(ctx, a, skip, gamma, beta, normed, bias=None):
    sa, ss = shape(a), shape(skip)
    if not is_float(a) or sa is None or ss is None or len(sa) != 3 or sa != ss:
        return False
    hidden = sa[-1]
    if not isinstance(hidden, int):
        return False
    if attr(normed, "axis", -1) not in (-1, 2):
        return False
    node = normed.producer()
    if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        return False
    for v in (gamma, beta) + ((bias,) if bias is not None else ()):
        arr = const(v)
        if arr is None or arr.shape != (hidden,):
            return False
    return True


def _skip_replacement(op, a, skip, gamma, beta, normed, bias=None, keep_sum=False):
    eps = attr(normed, "epsilon", 1e-5)
    inputs = [a, skip, gamma, beta] + ([bias] if bias is not None else [])
    outs = op.SkipLayerNormalization(*inputs, epsilon=eps, _domain=MS_DOMAIN, _outputs=4)
    return (outs[0], outs[3]) if keep_sum else outs[0]


# Both SkipLayerNormalization fusions are off by default: onnxruntime 1.32's CPU kernel costs
# more than the Add + LayerNormalization it replaces (MiniLM, 2 threads, optimizations off: 11%
# more CPU time for the whole model; with ORT_ENABLE_ALL onnxruntime fuses it itself anyway).
# Turn them on for runtimes where the fused kernel wins (`fuse:enable=skip_layernorm_ort`).
fusion("skip_layernorm_ort", family="layernorm", priority=55, targets=("ort",), default=False,
       pattern=_skip_patterns(), condition=_skip_condition, replacement=_skip_replacement,
       doc="LayerNormalization(a + bias + skip) -> com.microsoft.SkipLayerNormalization")

# Writing the sum too is slower still (pre-LN ViT: 12-20% slower overall, 2 threads).
fusion("skip_layernorm_sum_ort", family="layernorm", priority=56, targets=("ort",),
       default=False,
       pattern=_skip_patterns_keep_sum(), condition=_skip_condition,
       replacement=lambda op, a, skip, gamma, beta, normed, bias=None: _skip_replacement(
           op, a, skip, gamma, beta, normed, bias, keep_sum=True),
       doc="LayerNormalization(s = a + bias + skip), s used again -> "
           "com.microsoft.SkipLayerNormalization (its 4th output is s)")
