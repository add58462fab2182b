"""Element-wise ops: math, comparisons, logic, activations, Clip, Cast, Where."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from onnx import TensorProto

from onnxpress.passes.torch_graph.registry import OPS, arg, op, scalar, torch_dtype


def _unary(fn):
    return lambda args, a, ctx: fn(args[0])


UNARY = {
    "Abs": torch.abs, "Neg": torch.neg, "Sign": torch.sign, "Ceil": torch.ceil,
    "Floor": torch.floor, "Round": torch.round,  # torch.round rounds half to even, as ONNX
    "Exp": torch.exp, "Log": torch.log, "Sqrt": torch.sqrt, "Reciprocal": torch.reciprocal,
    "Erf": torch.erf, "Sin": torch.sin, "Cos": torch.cos, "Tan": torch.tan, "Asin": torch.asin,
    "Acos": torch.acos, "Atan": torch.atan, "Sinh": torch.sinh, "Cosh": torch.cosh,
    "Tanh": torch.tanh, "Asinh": torch.asinh, "Acosh": torch.acosh, "Atanh": torch.atanh,
    "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Softplus": F.softplus,
    "Softsign": F.softsign, "Mish": F.mish, "HardSwish": F.hardswish,
    "IsNaN": torch.isnan, "Not": torch.logical_not, "BitwiseNot": torch.bitwise_not,
    "Identity": lambda x: x,
}
for _name, _fn in UNARY.items():
    OPS[_name] = _unary(_fn)


@op("Dropout")
def dropout(args, a, ctx):
    """Inference semantics (the graph is trained as it runs); the mask output is all True."""
    return [args[0], torch.ones_like(args[0], dtype=torch.bool)]


@op("Elu")
def elu(args, a, ctx):
    return F.elu(args[0], a.get("alpha", 1.0))


@op("Selu")
def selu(args, a, ctx):
    x = args[0]
    alpha, gamma = a.get("alpha", 1.67326319217681884765625), a.get("gamma", 1.05070102214813232421875)
    return gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


@op("Celu")
def celu(args, a, ctx):
    return F.celu(args[0], a.get("alpha", 1.0))


@op("LeakyRelu")
def leaky_relu(args, a, ctx):
    return F.leaky_relu(args[0], a.get("alpha", 0.01))


@op("ThresholdedRelu")
def thresholded_relu(args, a, ctx):
    x = args[0]
    return torch.where(x > a.get("alpha", 1.0), x, torch.zeros_like(x))


@op("HardSigmoid")
def hard_sigmoid(args, a, ctx):
    return torch.clamp(a.get("alpha", 0.2) * args[0] + a.get("beta", 0.5), 0, 1)


@op("Shrink")
def shrink(args, a, ctx):
    x, bias, lambd = args[0], a.get("bias", 0.0), a.get("lambd", 0.5)
    zero = torch.zeros_like(x)
    return torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, zero)).to(x.dtype)


@op("Swish")
def swish(args, a, ctx):
    x = args[0]
    return x * torch.sigmoid(a.get("alpha", 1.0) * x)


@op("Gelu")
def gelu(args, a, ctx):
    return F.gelu(args[0], approximate="tanh" if a.get("approximate", "none") == "tanh" else "none")


@op("PRelu")
def prelu(args, a, ctx):
    x, slope = args
    return torch.where(x >= 0, x, x * slope)


@op("IsInf")
def is_inf(args, a, ctx):
    x = args[0]
    neg = torch.isneginf(x) if a.get("detect_negative", 1) else torch.zeros_like(x, dtype=torch.bool)
    pos = torch.isposinf(x) if a.get("detect_positive", 1) else torch.zeros_like(x, dtype=torch.bool)
    return neg | pos


@op("Clip")
def clip(args, a, ctx):
    x = args[0]
    lo, hi = arg(args, 1), arg(args, 2)
    lo = scalar(lo) if lo is not None else a.get("min")
    hi = scalar(hi) if hi is not None else a.get("max")
    if lo is None and hi is None:
        return x
    return torch.clamp(x, lo, hi)


# -- binary and variadic -------------------------------------------------------------------------
@op("Add")
def add(args, a, ctx):
    return args[0] + args[1]


@op("Sub")
def sub(args, a, ctx):
    return args[0] - args[1]


@op("Mul")
def mul(args, a, ctx):
    return args[0] * args[1]


@op("Div")
def div(args, a, ctx):
    x, y = args
    if x.dtype.is_floating_point:
        return x / y
    return torch.div(x, y, rounding_mode="trunc")


@op("Pow")
def pow_(args, a, ctx):
    x, y = args
    return torch.pow(x, y).to(x.dtype)


@op("Mod")
def mod(args, a, ctx):
    x, y = args
    return torch.fmod(x, y) if a.get("fmod", 0) else torch.remainder(x, y)


@op("BitShift")
def bit_shift(args, a, ctx):
    x, y = args
    if a["direction"] == "LEFT":
        return torch.bitwise_left_shift(x, y)
    return torch.bitwise_right_shift(x, y)


BINARY = {
    "Equal": torch.eq, "Greater": torch.gt, "GreaterOrEqual": torch.ge, "Less": torch.lt,
    "LessOrEqual": torch.le, "And": torch.logical_and, "Or": torch.logical_or,
    "Xor": torch.logical_xor, "BitwiseAnd": torch.bitwise_and, "BitwiseOr": torch.bitwise_or,
    "BitwiseXor": torch.bitwise_xor,
}
for _name, _fn in BINARY.items():
    OPS[_name] = (lambda fn: lambda args, a, ctx: fn(args[0], args[1]))(_fn)


def _variadic(fn):
    def run(args, a, ctx):
        out = args[0]
        for x in args[1:]:
            out = fn(out, x)
        return out
    return run


OPS["Max"] = _variadic(torch.maximum)
OPS["Min"] = _variadic(torch.minimum)
OPS["Sum"] = _variadic(torch.add)


@op("Mean")
def mean(args, a, ctx):
    return _variadic(torch.add)(args, a, ctx) / len(args)


@op("Where")
def where(args, a, ctx):
    return torch.where(args[0].bool(), args[1], args[2])


# -- types ---------------------------------------------------------------------------------------
@op("Cast")
def cast(args, a, ctx):
    to = a["to"]
    if to == TensorProto.STRING:
        raise ctx.unsupported("casts to string have no torch equivalent")
    return args[0].to(torch_dtype(to, ctx.node))


@op("CastLike")
def cast_like(args, a, ctx):
    return args[0].to(args[1].dtype)

