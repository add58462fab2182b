"""Fourier transforms (DFT, STFT) and the quantization ops (computed in float, then cast)."""

from __future__ import annotations

import torch

from onnxpress.passes.torch_graph.registry import arg, op, scalar, torch_dtype


def _complex(x):
    """[..., 1] real or [..., 2] (re, im) -> a complex tensor without the last axis."""
    if x.shape[-1] == 2:
        return torch.view_as_complex(x.to(torch.float64).contiguous())
    return x[..., 0].to(torch.float64)


@op("DFT")
def dft(args, a, ctx):
    x = args[0]
    length = arg(args, 1)
    if ctx.opset >= 20:
        axis = int(scalar(args[2])) if arg(args, 2) is not None else -2
    else:
        axis = a.get("axis", 1)
    axis = axis % x.dim()
    n = int(scalar(length)) if length is not None and length.numel() else x.shape[axis]
    sig = _complex(x)
    if a.get("inverse", 0):
        y = torch.fft.ifft(sig, n=n, dim=axis)
    else:
        y = torch.fft.fft(sig, n=n, dim=axis)
    if a.get("onesided", 0):
        y = y.narrow(axis, 0, n // 2 + 1)
    return torch.view_as_real(y).to(x.dtype)


@op("STFT")
def stft(args, a, ctx):
    x, step = args[0], int(scalar(args[1]))
    window, length = arg(args, 2), arg(args, 3)
    n = int(scalar(length)) if length is not None else window.shape[0]
    frames = _complex(x).unfold(1, n, step)                    # [batch, frames, n]
    if window is not None:
        frames = frames * window.to(torch.float64)
    y = torch.fft.fft(frames, dim=-1)
    if a.get("onesided", 1):
        y = y[..., :n // 2 + 1]
    return torch.view_as_real(y).to(x.dtype)


# -- quantization --------------------------------------------------------------------------------
def _per_axis(v, x, axis):
    if v.dim() == 0 or v.numel() == 1:
        return v.reshape(())
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    return v.reshape(shape)


def _saturate(y, dtype):
    info = torch.iinfo(dtype)
    return torch.round(y).clamp(info.min, info.max).to(dtype)


@op("QuantizeLinear")
def quantize_linear(args, a, ctx):
    x, scale, zp = args[0], args[1], arg(args, 2)
    if a.get("block_size", 0):
        raise ctx.unsupported("blocked quantization")
    axis = a.get("axis", 1)
    if zp is not None:
        dtype = zp.dtype
    else:
        dtype = torch_dtype(a["output_dtype"], ctx.node) if a.get("output_dtype") else torch.uint8
    if dtype.is_floating_point:
        raise ctx.unsupported("float8 quantization")
    y = x.to(torch.float32) / _per_axis(scale, x, axis).to(torch.float32)
    if zp is not None:
        y = torch.round(y) + _per_axis(zp, x, axis).to(torch.float32)
    return _saturate(y, dtype)


@op("DequantizeLinear")
def dequantize_linear(args, a, ctx):
    x, scale, zp = args[0], args[1], arg(args, 2)
    if a.get("block_size", 0):
        raise ctx.unsupported("blocked quantization")
    axis = a.get("axis", 1)
    y = x.to(torch.float32)
    if zp is not None:
        y = y - _per_axis(zp, x, axis).to(torch.float32)
    return (y * _per_axis(scale, x, axis).to(torch.float32)).to(scale.dtype)


@op("DynamicQuantizeLinear")
def dynamic_quantize_linear(args, a, ctx):
    x = args[0]
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = torch.tensor((hi - lo) / 255.0, dtype=torch.float32)
    zp = _saturate(torch.tensor(-lo) / scale, torch.uint8) if scale else torch.tensor(0, dtype=torch.uint8)
    y = _saturate(torch.round(x / scale) + zp.float(), torch.uint8) if scale else \
        torch.zeros_like(x, dtype=torch.uint8)
    return [y, scale, zp]


@op("QLinearMatMul")
def qlinear_matmul(args, a, ctx):
    qa, sa, za, qb, sb, zb, sy, zy = args
    fa = (qa.to(torch.float64) - za.to(torch.float64)) * sa.to(torch.float64)
    fb = (qb.to(torch.float64) - _row(zb, qb)) * _row(sb.to(torch.float64), qb)
    y = torch.matmul(fa, fb) / sy.to(torch.float64)
    return _saturate(y + zy.to(torch.float64), zy.dtype)


def _row(v, b):
    """A per-column parameter of B (shape [N]) broadcast over B's rows."""
    v = v.to(torch.float64)
    return v if v.numel() == 1 else v.reshape([-1, 1, b.shape[-1]][-b.dim():]
                                               if v.dim() > 1 else [b.shape[-1]])
