"""Run an ONNX graph as a trainable PyTorch module (onnxpress's own converter, used by `distill`).

    module = OnnxGraphModule(model)          # float weights become nn.Parameters (same names)
    out = module(input=torch.randn(8, 1, 8, 8))["logits"]
    loss.backward(); opt.step()
    module.write_back(model)                 # trained values into the same initializers

The module interprets the graph node by node with torch operators, so the graph's structure is
never rebuilt: writing back only replaces initializer values. It covers the operators of CNN and
MLP graphs (Conv, Gemm, MatMul, pooling, normalisation, activations, shape ops); any other op
raises UnsupportedOpError naming the node. Why not onnx2torch: its release on PyPI imports
torchvision, which does not import beside the torch build this project uses.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnxpress.errors import MissingExtraError, UnsupportedOpError

TRAINABLE_INPUTS = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (0, 1),
    "BatchNormalization": (1, 2), "LayerNormalization": (1, 2), "InstanceNormalization": (1, 2),
    "PRelu": (1,), "Mul": (0, 1), "Add": (0, 1),
}


def _torch():
    try:
        import torch
    except ImportError:
        raise MissingExtraError("distill needs PyTorch: pip install 'onnxpress[torch]'") from None
    return torch


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode()
        if isinstance(v, onnx.TensorProto):
            v = numpy_helper.to_array(v)
        out[a.name] = v
    return out


def trainable_names(model: onnx.ModelProto) -> list[str]:
    """Float initializers that act as weights (Conv/Gemm/MatMul/norm parameters, per-channel
    scales and offsets), directly or through an Identity."""
    inits = {t.name: t for t in model.graph.initializer
             if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 1
             and int(np.prod(t.dims)) > 1}
    alias = {n.output[0]: n.input[0] for n in model.graph.node
             if n.op_type == "Identity" and n.input[0] in inits}
    names = []
    for node in model.graph.node:
        for i in TRAINABLE_INPUTS.get(node.op_type, ()):
            if i < len(node.input):
                name = alias.get(node.input[i], node.input[i])
                if name in inits and name not in names:
                    names.append(name)
    return names


class _Mod:
    """Lazily built nn.Module subclass (torch imported only when used)."""

    cls = None


def OnnxGraphModule(model: onnx.ModelProto, trainable: list[str] | None = None):  # noqa: N802
    """Build the torch module for `model` (see the module docstring)."""
    torch = _torch()
    if _Mod.cls is None:
        _Mod.cls = _make_class(torch)
    return _Mod.cls(model, trainable)


def _make_class(torch):
    F = torch.nn.functional  # noqa: N806

    class _OnnxGraphModule(torch.nn.Module):
        def __init__(self, model: onnx.ModelProto, trainable: list[str] | None):
            super().__init__()
            self.graph = model.graph
            names = trainable_names(model) if trainable is None else list(trainable)
            self.keys = {n: f"p{i}" for i, n in enumerate(names)}
            self.params = torch.nn.ParameterDict()
            self.consts: dict[str, Any] = {}
            for t in model.graph.initializer:
                arr = numpy_helper.to_array(t)
                if t.name in self.keys:
                    self.params[self.keys[t.name]] = torch.nn.Parameter(torch.from_numpy(arr.copy()))
                else:
                    self.consts[t.name] = torch.from_numpy(np.array(arr))
            self.outputs = [o.name for o in model.graph.output]
            for node in self.graph.node:
                if node.domain not in ("", "ai.onnx") or node.op_type not in OPS:
                    raise UnsupportedOpError(
                        f"distill: op {node.domain + '.' if node.domain else ''}{node.op_type} "
                        f"(node '{node.name}') is not supported by onnxpress's torch converter")

        def masks_from_zeros(self, min_fraction: float = 0.01) -> dict[str, Any]:
            """{param key: mask} for weights that are at least `min_fraction` exact zeros."""
            out = {}
            for k, p in self.params.items():
                if p.dim() >= 2:
                    z = (p.detach() == 0)
                    if float(z.float().mean()) >= min_fraction:
                        out[k] = (~z).to(p.dtype)
            return out

        def forward(self, **inputs):
            env: dict[str, Any] = dict(self.consts)
            for name, key in self.keys.items():
                env[name] = self.params[key]
            for k, v in inputs.items():
                env[k] = v if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v))
            for node in self.graph.node:
                args = [env[i] if i else None for i in node.input]
                res = OPS[node.op_type](torch, F, args, _attrs(node))
                if not isinstance(res, (list, tuple)):
                    res = [res]
                for name, val in zip(node.output, res):
                    if name:
                        env[name] = val
            return {o: env[o] for o in self.outputs}

        def write_back(self, model: onnx.ModelProto) -> int:
            """Copy the trained values into `model`'s initializers of the same names."""
            n = 0
            for t in model.graph.initializer:
                key = self.keys.get(t.name)
                if key is None:
                    continue
                arr = self.params[key].detach().cpu().numpy().astype(
                    onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
                t.CopyFrom(numpy_helper.from_array(arr, t.name))
                n += 1
            return n

    return _OnnxGraphModule


# -- operators ---------------------------------------------------------------------------------
def _ints(x) -> list[int]:
    return [int(v) for v in (x.tolist() if hasattr(x, "tolist") else x)]


def _pads_for(x, a: dict, kernel: list[int], strides: list[int], dilations: list[int]) -> list[int]:
    nd = len(kernel)
    auto = a.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads_b, pads_e = [], []
        for i in range(nd):
            size = x.shape[2 + i]
            out = math.ceil(size / strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size)
            small, big = total // 2, total - total // 2
            pads_b.append(small if auto == "SAME_UPPER" else big)
            pads_e.append(big if auto == "SAME_UPPER" else small)
        return pads_b + pads_e
    if auto == "VALID":
        return [0] * (2 * nd)
    return list(a.get("pads", [0] * (2 * nd)))


def _pad_input(torch, F, x, pads: list[int], value: float = 0.0):
    """Apply ONNX pads [b1..bn, e1..en] over the spatial dims; return (x, symmetric pads or None)."""
    nd = len(pads) // 2
    b, e = pads[:nd], pads[nd:]
    if b == e:
        return x, b
    torch_pads = []
    for i in reversed(range(nd)):
        torch_pads += [b[i], e[i]]
    return F.pad(x, torch_pads, value=value), [0] * nd


def _conv(torch, F, args, a):
    x, w = args[0], args[1]
    b = args[2] if len(args) > 2 else None
    nd = w.dim() - 2
    kernel = list(a.get("kernel_shape", w.shape[2:]))
    strides = list(a.get("strides", [1] * nd))
    dil = list(a.get("dilations", [1] * nd))
    x, pads = _pad_input(torch, F, x, _pads_for(x, a, kernel, strides, dil))
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    return fn(x, w, b, stride=strides, padding=pads, dilation=dil, groups=int(a.get("group", 1)))


def _conv_transpose(torch, F, args, a):
    x, w = args[0], args[1]
    b = args[2] if len(args) > 2 else None
    nd = w.dim() - 2
    strides = list(a.get("strides", [1] * nd))
    dil = list(a.get("dilations", [1] * nd))
    pads = list(a.get("pads", [0] * (2 * nd)))
    if pads[:nd] != pads[nd:] or a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise UnsupportedOpError("distill: ConvTranspose with asymmetric or automatic pads")
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[nd]
    return fn(x, w, b, stride=strides, padding=pads[:nd],
              output_padding=list(a.get("output_padding", [0] * nd)),
              groups=int(a.get("group", 1)), dilation=dil)


def _gemm(torch, F, args, a):
    x, w = args[0], args[1]
    if a.get("transA", 0):
        x = x.t()
    if a.get("transB", 0):
        w = w.t()
    y = a.get("alpha", 1.0) * (x @ w)
    if len(args) > 2 and args[2] is not None:
        y = y + a.get("beta", 1.0) * args[2]
    return y


def _pool(kind):
    def run(torch, F, args, a):
        x = args[0]
        kernel = list(a["kernel_shape"])
        nd = len(kernel)
        strides = list(a.get("strides", [1] * nd))
        dil = list(a.get("dilations", [1] * nd))
        value = -math.inf if kind == "max" else 0.0
        x, pads = _pad_input(torch, F, x, _pads_for(x, a, kernel, strides, dil), value)
        ceil = bool(a.get("ceil_mode", 0))
        if kind == "max":
            fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nd]
            return fn(x, kernel, strides, pads, dil, ceil_mode=ceil)
        fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
        return fn(x, kernel, strides, pads, ceil_mode=ceil,
                  count_include_pad=bool(a.get("count_include_pad", 0)))
    return run


def _axes(args, a, idx=1):
    if "axes" in a:
        return _ints(a["axes"])
    if len(args) > idx and args[idx] is not None:
        return _ints(args[idx])
    return None


def _reduce(name):
    def run(torch, F, args, a):
        x = args[0]
        axes = _axes(args, a)
        keep = bool(a.get("keepdims", 1))
        if axes is None:
            if a.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        axes = [ax % x.dim() for ax in axes]
        if name == "mean":
            return x.mean(dim=axes, keepdim=keep)
        if name == "sum":
            return x.sum(dim=axes, keepdim=keep)
        if name == "l2":
            return torch.sqrt((x * x).sum(dim=axes, keepdim=keep))
        y = x
        for ax in sorted(axes, reverse=True):
            y = (y.amax if name == "max" else y.amin)(dim=ax, keepdim=keep)
        return y
    return run


def _reshape(torch, F, args, a):
    x, shape = args[0], _ints(args[1])
    shape = [x.shape[i] if s == 0 and not a.get("allowzero", 0) else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _squeeze(torch, F, args, a):
    x = args[0]
    axes = _axes(args, a)
    if axes is None:
        return x.squeeze()
    for ax in sorted((ax % x.dim() for ax in axes), reverse=True):
        x = x.squeeze(ax)
    return x


def _unsqueeze(torch, F, args, a):
    x = args[0]
    axes = _axes(args, a)
    rank = x.dim() + len(axes)
    for ax in sorted(ax % rank for ax in axes):
        x = x.unsqueeze(ax)
    return x


def _clip(torch, F, args, a):
    x = args[0]
    lo = args[1] if len(args) > 1 and args[1] is not None else a.get("min")
    hi = args[2] if len(args) > 2 and args[2] is not None else a.get("max")
    lo = float(lo) if lo is not None else None
    hi = float(hi) if hi is not None else None
    return torch.clamp(x, lo, hi)


def _slice(torch, F, args, a):
    x = args[0]
    starts, ends = _ints(args[1]), _ints(args[2])
    axes = _ints(args[3]) if len(args) > 3 and args[3] is not None else list(range(len(starts)))
    steps = _ints(args[4]) if len(args) > 4 and args[4] is not None else [1] * len(starts)
    idx = [slice(None)] * x.dim()
    for s, e, ax, st in zip(starts, ends, axes, steps):
        if st < 0:
            raise UnsupportedOpError("distill: Slice with a negative step")
        n = x.shape[ax]
        s = max(0, min(n, s + n if s < 0 else s))
        e = max(0, min(n, e + n if e < 0 else e))
        idx[ax % x.dim()] = slice(s, e, st)
    return x[tuple(idx)]


def _split(torch, F, args, a):
    x = args[0]
    axis = a.get("axis", 0)
    split = _ints(args[1]) if len(args) > 1 and args[1] is not None else a.get("split")
    if split is None:
        n = a.get("num_outputs")
        if n is None:
            raise UnsupportedOpError("distill: Split without sizes")
        size = math.ceil(x.shape[axis] / n)
        return list(torch.split(x, size, dim=axis))
    return list(torch.split(x, list(split), dim=axis))


def _cast(torch, F, args, a):
    dt = onnx.helper.tensor_dtype_to_np_dtype(a["to"])
    return args[0].to({np.dtype("float32"): torch.float32, np.dtype("float64"): torch.float64,
                       np.dtype("float16"): torch.float16, np.dtype("int64"): torch.int64,
                       np.dtype("int32"): torch.int32, np.dtype("bool"): torch.bool}[np.dtype(dt)])


def _layer_norm(torch, F, args, a):
    x = args[0]
    axis = a.get("axis", -1) % x.dim()
    return F.layer_norm(x, tuple(x.shape[axis:]), args[1], args[2] if len(args) > 2 else None,
                        eps=a.get("epsilon", 1e-5))


def _batch_norm(torch, F, args, a):
    x, scale, bias, mean, var = args[:5]
    return F.batch_norm(x, mean, var, scale, bias, training=False, eps=a.get("epsilon", 1e-5))


def _instance_norm(torch, F, args, a):
    return F.instance_norm(args[0], weight=args[1], bias=args[2], eps=a.get("epsilon", 1e-5))


def _flatten(torch, F, args, a):
    x = args[0]
    axis = a.get("axis", 1) % max(x.dim(), 1)
    lead = int(np.prod(x.shape[:axis])) if axis else 1
    return x.reshape(lead, -1)


def _gelu(torch, F, args, a):
    return F.gelu(args[0], approximate="tanh" if a.get("approximate", "none") == "tanh" else "none")


def _const(torch, F, args, a):
    v = a.get("value")
    if v is None:
        for k in ("value_float", "value_floats", "value_int", "value_ints"):
            if k in a:
                v = np.array(a[k], dtype=np.float32 if "float" in k else np.int64)
    return torch.from_numpy(np.array(v))


def _variadic(fn):
    def run(torch, F, args, a):
        out = args[0]
        for x in args[1:]:
            out = fn(torch, out, x)
        return out
    return run


def _pad(torch, F, args, a):
    x = args[0]
    pads = _ints(args[1]) if len(args) > 1 and args[1] is not None else list(a["pads"])
    value = float(args[2]) if len(args) > 2 and args[2] is not None else 0.0
    mode = a.get("mode", "constant")
    nd = x.dim()
    torch_pads = []
    for i in reversed(range(nd)):
        torch_pads += [pads[i], pads[i + nd]]
    while len(torch_pads) > 2 and torch_pads[-2:] == [0, 0]:
        torch_pads = torch_pads[:-2]
    return F.pad(x, torch_pads, mode=mode, value=value) if mode == "constant" else \
        F.pad(x, torch_pads, mode={"reflect": "reflect", "edge": "replicate"}[mode])


OPS = {
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "MatMul": lambda t, F, args, a: t.matmul(args[0], args[1]),
    "Relu": lambda t, F, args, a: t.relu(args[0]),
    "Sigmoid": lambda t, F, args, a: t.sigmoid(args[0]),
    "Tanh": lambda t, F, args, a: t.tanh(args[0]),
    "Erf": lambda t, F, args, a: t.erf(args[0]),
    "Sqrt": lambda t, F, args, a: t.sqrt(args[0]),
    "Exp": lambda t, F, args, a: t.exp(args[0]),
    "Log": lambda t, F, args, a: t.log(args[0]),
    "Neg": lambda t, F, args, a: -args[0],
    "Abs": lambda t, F, args, a: args[0].abs(),
    "Reciprocal": lambda t, F, args, a: 1.0 / args[0],
    "Softplus": lambda t, F, args, a: F.softplus(args[0]),
    "HardSigmoid": lambda t, F, args, a: t.clamp(a.get("alpha", 0.2) * args[0] + a.get("beta", 0.5), 0, 1),
    "HardSwish": lambda t, F, args, a: F.hardswish(args[0]),
    "LeakyRelu": lambda t, F, args, a: F.leaky_relu(args[0], a.get("alpha", 0.01)),
    "Elu": lambda t, F, args, a: F.elu(args[0], a.get("alpha", 1.0)),
    "Gelu": _gelu,
    "PRelu": lambda t, F, args, a: t.where(args[0] >= 0, args[0], args[0] * args[1]),
    "Clip": _clip,
    "Add": lambda t, F, args, a: args[0] + args[1],
    "Sub": lambda t, F, args, a: args[0] - args[1],
    "Mul": lambda t, F, args, a: args[0] * args[1],
    "Div": lambda t, F, args, a: args[0] / args[1],
    "Pow": lambda t, F, args, a: t.pow(args[0], args[1]),
    "Max": _variadic(lambda t, x, y: t.maximum(x, y)),
    "Min": _variadic(lambda t, x, y: t.minimum(x, y)),
    "Sum": _variadic(lambda t, x, y: x + y),
    "MaxPool": _pool("max"),
    "AveragePool": _pool("avg"),
    "GlobalAveragePool": lambda t, F, args, a: args[0].mean(dim=tuple(range(2, args[0].dim())), keepdim=True),
    "GlobalMaxPool": lambda t, F, args, a: args[0].amax(dim=tuple(range(2, args[0].dim())), keepdim=True),
    "ReduceMean": _reduce("mean"),
    "ReduceSum": _reduce("sum"),
    "ReduceMax": _reduce("max"),
    "ReduceMin": _reduce("min"),
    "ReduceL2": _reduce("l2"),
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": lambda t, F, args, a: args[0].permute(
        *(a["perm"] if "perm" in a else list(range(args[0].dim()))[::-1])),
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Concat": lambda t, F, args, a: t.cat([x for x in args if x is not None], dim=a.get("axis", 0)),
    "Slice": _slice,
    "Split": _split,
    "Pad": _pad,
    "Identity": lambda t, F, args, a: args[0],
    "Dropout": lambda t, F, args, a: args[0],
    "Cast": _cast,
    "Constant": _const,
    "Shape": lambda t, F, args, a: t.tensor(list(args[0].shape), dtype=t.int64),
    "Gather": lambda t, F, args, a: t.index_select(
        args[0], a.get("axis", 0) % args[0].dim(), args[1].reshape(-1).long()).reshape(
        list(args[0].shape[:a.get("axis", 0) % args[0].dim()]) + list(args[1].shape)
        + list(args[0].shape[a.get("axis", 0) % args[0].dim() + 1:])),
    "Softmax": lambda t, F, args, a: t.softmax(args[0], dim=a.get("axis", -1)),
    "LogSoftmax": lambda t, F, args, a: t.log_softmax(args[0], dim=a.get("axis", -1)),
    "BatchNormalization": _batch_norm,
    "InstanceNormalization": _instance_norm,
    "LayerNormalization": _layer_norm,
}
