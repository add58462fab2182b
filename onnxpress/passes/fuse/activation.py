"""Activation fusions: decomposed GELU, SiLU/Swish, HardSwish, HardSigmoid, Mish -> one op.

    before: y = (x * (Erf(x / 1.4142) + 1)) * 0.5        after: y = Gelu(x)       (opset 20+)
                                                                 y = com.microsoft.Gelu(x) (ort)
    before: y = Gelu(Add(x, b[C]))                        after: y = com.microsoft.BiasGelu(x, b)
    before: y = x * Sigmoid(x)                            after: y = Swish(x) (opset 24+)
                                                                 y = com.microsoft.QuickGelu(x, alpha=1) (ort)
    before: y = x * HardSigmoid(x, 1/6, 0.5)              after: y = HardSwish(x)   (opset 14+)
    before: y = Clip(x + 3, 0, 6) / 6                     after: y = HardSigmoid(x, 1/6, 0.5)
    before: y = x * Tanh(Softplus(x))                     after: y = Mish(x)        (opset 18+)
"""

from __future__ import annotations

import math

from onnxpress.passes.fuse.api import MS_DOMAIN, attr, fusion, is_float, rank, shape

SQRT2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


# -- GELU, erf form --------------------------------------------------------------------------
def _erf(op, x, divide: bool):
    return op.Erf(x / SQRT2) if divide else op.Erf(x * (1.0 / SQRT2))


def _erf_gelu_forms(d: bool):
    # closures, not default arguments: every parameter of a pattern function is a variable
    return [
        lambda op, x: (x * (_erf(op, x, d) + 1.0)) * 0.5,
        lambda op, x: (x * 0.5) * (_erf(op, x, d) + 1.0),
        lambda op, x: x * ((_erf(op, x, d) + 1.0) * 0.5),
    ]


def _erf_gelu_patterns():
    return _erf_gelu_forms(True) + _erf_gelu_forms(False)


def _float_input(op_or_ctx, x, **_):
    return is_float(x)


fusion("gelu_erf_ort", family="gelu", priority=30, targets=("ort",),
       pattern=_erf_gelu_patterns(), condition=_float_input,
       replacement=lambda op, x: op.Gelu(x, _domain=MS_DOMAIN),
       doc="0.5*x*(1+Erf(x/sqrt 2)) -> com.microsoft.Gelu(x) (exact erf GELU)")


fusion("gelu_erf", family="gelu", priority=31, opset=(20, None),
       pattern=_erf_gelu_patterns(), condition=_float_input,
       replacement=lambda op, x: op.Gelu(x),
       doc="0.5*x*(1+Erf(x/sqrt 2)) -> Gelu(x) (opset 20+)")


# -- GELU, tanh form -------------------------------------------------------------------------
def _tanh_inner(op, x, cube: str):
    x3 = op.Pow(x, 3.0) if cube == "pow" else x * (x * x)
    return op.Tanh((x + x3 * 0.044715) * SQRT_2_OVER_PI)


def _tanh_gelu_forms(c: str):
    return [
        lambda op, x: (x * 0.5) * (_tanh_inner(op, x, c) + 1.0),
        lambda op, x: (x * (_tanh_inner(op, x, c) + 1.0)) * 0.5,
        lambda op, x: x * ((_tanh_inner(op, x, c) + 1.0) * 0.5),
    ]


def _tanh_gelu_patterns():
    return _tanh_gelu_forms("pow") + _tanh_gelu_forms("mul")


fusion("gelu_tanh_ort", family="gelu", priority=30, targets=("ort",),
       pattern=_tanh_gelu_patterns(), condition=_float_input,
       replacement=lambda op, x: op.FastGelu(x, _domain=MS_DOMAIN),
       approximation="FastGelu evaluates the same tanh formula with onnxruntime's tanh "
                     "approximation: compare within 1e-3",
       doc="0.5*x*(1+Tanh(sqrt(2/pi)*(x+0.044715x^3))) -> com.microsoft.FastGelu(x)")

fusion("gelu_tanh", family="gelu", priority=31, opset=(20, None),
       pattern=_tanh_gelu_patterns(), condition=_float_input,
       replacement=lambda op, x: op.Gelu(x, approximate="tanh"),
       doc="0.5*x*(1+Tanh(sqrt(2/pi)*(x+0.044715x^3))) -> Gelu(x, approximate=tanh) (opset 20+)")


# -- bias + GELU (onnxruntime) ---------------------------------------------------------------
def _bias_gelu_condition(ctx, x, b):
    sb, sx = shape(b), shape(x)
    return (sb is not None and len(sb) == 1 and isinstance(sb[0], int) and sx is not None
            and len(sx) >= 2 and sx[-1] == sb[0])


fusion("bias_gelu_ort", family="gelu", priority=32, targets=("ort",),
       pattern=lambda op, x, b: op.Gelu(op.Add(x, b), _domain=MS_DOMAIN),
       condition=_bias_gelu_condition,
       replacement=lambda op, x, b: op.BiasGelu(x, b, _domain=MS_DOMAIN),
       doc="com.microsoft.Gelu(x + b[C]) -> com.microsoft.BiasGelu(x, b)")


def _native_gelu_condition(approximate: str):
    def condition(ctx, x, b, g):
        return attr(g, "approximate", "none") == approximate and _bias_gelu_condition(ctx, x, b)

    return condition


fusion("bias_gelu_native_ort", family="gelu", priority=33, targets=("ort",),
       pattern=lambda op, x, b: op.Gelu(op.Add(x, b), _outputs=["g"]),
       condition=_native_gelu_condition("none"),
       replacement=lambda op, x, b, g: op.BiasGelu(x, b, _domain=MS_DOMAIN),
       doc="Gelu(x + b[C]) (opset 20, as torch's dynamo export writes F.gelu) -> "
           "com.microsoft.BiasGelu(x, b)")

fusion("bias_fast_gelu_native_ort", family="gelu", priority=33, targets=("ort",),
       pattern=lambda op, x, b: op.Gelu(op.Add(x, b), _outputs=["g"]),
       condition=_native_gelu_condition("tanh"),
       replacement=lambda op, x, b, g: op.FastGelu(x, b, _domain=MS_DOMAIN),
       approximation="FastGelu evaluates the same tanh formula with onnxruntime's tanh "
                     "approximation: compare within 1e-3",
       doc="Gelu(x + b[C], approximate=tanh) (opset 20) -> com.microsoft.FastGelu(x, b)")


# -- SiLU / Swish ----------------------------------------------------------------------------
fusion("silu_ort", family="silu", priority=40, targets=("ort",),
       pattern=lambda op, x: x * op.Sigmoid(x), condition=_float_input,
       replacement=lambda op, x: op.QuickGelu(x, alpha=1.0, _domain=MS_DOMAIN),
       doc="x * Sigmoid(x) -> com.microsoft.QuickGelu(x, alpha=1) (x*sigmoid(alpha*x))")

fusion("silu", family="silu", priority=41, opset=(24, None),
       pattern=lambda op, x: x * op.Sigmoid(x), condition=_float_input,
       replacement=lambda op, x: op.Swish(x),
       doc="x * Sigmoid(x) -> Swish(x) (opset 24+)")


# -- HardSigmoid / HardSwish -----------------------------------------------------------------
def _hsig_patterns():
    return [
        lambda op, x: op.Clip(x + 3.0, 0.0, 6.0) / 6.0,
        lambda op, x: op.Clip(x + 3.0, 0.0, 6.0) * (1.0 / 6.0),
        lambda op, x: op.Relu(op.Min(x + 3.0, 6.0)) / 6.0,
    ]


fusion("hardsigmoid", family="hardswish", priority=45, opset=(6, None),
       pattern=_hsig_patterns(), condition=_float_input,
       replacement=lambda op, x: op.HardSigmoid(x, alpha=1.0 / 6.0, beta=0.5),
       doc="Clip(x + 3, 0, 6) / 6 -> HardSigmoid(x, alpha=1/6, beta=0.5)")


def _hswish_condition(ctx, x, hs):
    node = hs.producer()
    alpha = node.attributes.get("alpha")
    beta = node.attributes.get("beta")
    a = alpha.value if alpha is not None else 0.2
    b = beta.value if beta is not None else 0.5
    return is_float(x) and math.isclose(a, 1 / 6, rel_tol=1e-4) and math.isclose(b, 0.5, rel_tol=1e-4)


fusion("hardswish", family="hardswish", priority=46, opset=(14, None),
       pattern=lambda op, x: x * op.HardSigmoid(x, _outputs=["hs"]),
       condition=_hswish_condition,
       replacement=lambda op, x: op.HardSwish(x),
       doc="x * HardSigmoid(x, 1/6, 0.5) -> HardSwish(x) (opset 14+)")


# -- Mish ------------------------------------------------------------------------------------
fusion("mish", family="mish", priority=47, opset=(18, None),
       pattern=[lambda op, x: x * op.Tanh(op.Softplus(x)),
                lambda op, x: x * op.Tanh(op.Log(op.Exp(x) + 1.0))],
       condition=lambda ctx, x: is_float(x) and (rank(x) or 0) >= 0,
       replacement=lambda op, x: op.Mish(x),
       doc="x * Tanh(Softplus(x)) -> Mish(x) (opset 18+)")
