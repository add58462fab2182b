"""`clip`: clip weight outliers so that a quantizer's range fits the bulk of the weights.

    before: W = [0.02, -0.05, 0.03, ..., 4.7]        int8 scale = 4.7/127: small weights -> 0
    after:  W = [0.02, -0.05, 0.03, ..., 0.11]       int8 scale = 0.11/127: small weights kept

method=percentile clips |W| at the given percentile, method=std at mean +- k standard deviations,
method=range to [lo, hi]; per tensor or per output channel. Only weights of Conv, ConvTranspose,
Gemm and MatMul are touched.
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
import onnx
from onnx import numpy_helper

from onnxpress.errors import PassOptionError
from onnxpress.passes.context import PassContext
from onnxpress.passes.prune import calib_error, remember_teacher
from onnxpress.passes.prune.unstructured import prunable_weights
from onnxpress.passes.registry import Range, register


def clip_bounds(w: np.ndarray, reduce_axes: tuple[int, ...], *, method: str, percentile: float,
                k: float, lo: float, hi: float, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) bounds broadcastable to `w`: one pair per tensor or per output channel."""
    axes = reduce_axes if per_channel else tuple(range(w.ndim))
    w64 = w.astype(np.float64)
    if method == "range":
        return np.full((1,) * w.ndim, lo), np.full((1,) * w.ndim, hi)
    if method == "std":
        mu = w64.mean(axis=axes, keepdims=True)
        sd = w64.std(axis=axes, keepdims=True)
        return mu - k * sd, mu + k * sd
    t = np.percentile(np.abs(w64), percentile, axis=axes, keepdims=True)
    return -t, t


@register("clip", lossy=True, uses=("calib",))
def clip(model: onnx.ModelProto, ctx: PassContext, *,
         percentile: Annotated[float, Range(50, 100)] = 99.9,
         method: Literal["percentile", "std", "range"] = "percentile",
         k: Annotated[float, Range(0, None, lo_inclusive=False)] = 3.0,
         lo: float = -1.0,
         hi: float = 1.0,
         per_channel: bool = False,
         exclude: list[str] = ()) -> onnx.ModelProto:
    """Clip Conv/Gemm/MatMul weight outliers (percentile of |W|, k std, or a range) before quantization.

    before: W with a few huge values      after: W clipped to [-t, t] (t = 99.9th percentile of |W|,
    or mean +- k*std, or [lo, hi]); per_channel=true computes t for each output channel.
    Reports tensors and values clipped, the largest change, and the output error on calib data.
    """
    if method == "range" and not lo < hi:
        raise PassOptionError(f"pass 'clip': option 'lo' ({lo}) must be below 'hi' ({hi})")
    remember_teacher(model, ctx)
    inits = {t.name: t for t in model.graph.initializer}
    original = onnx.ModelProto()
    original.CopyFrom(model)
    tensors = values = 0
    max_shift = 0.0
    per_layer = {}
    for ref in prunable_weights(model, exclude):
        t = inits[ref.name]
        w = numpy_helper.to_array(t)
        low, high = clip_bounds(w, ref.reduce_axes, method=method, percentile=percentile, k=k,
                                lo=lo, hi=hi, per_channel=per_channel)
        clipped = np.clip(w.astype(np.float64), low, high).astype(w.dtype)
        n = int(np.count_nonzero(clipped != w))
        if n:
            tensors += 1
            values += n
            shift = float(np.abs(clipped.astype(np.float64) - w).max())
            max_shift = max(max_shift, shift)
            per_layer[ref.node] = {"clipped": n, "max_abs_before": float(np.abs(w).max()),
                                   "max_abs_after": float(np.abs(clipped).max())}
            t.CopyFrom(numpy_helper.from_array(clipped, ref.name))
    ctx.record(method=method, per_channel=per_channel, tensors_clipped=tensors,
               values_clipped=values, max_shift=max_shift, per_layer=per_layer,
               **calib_error(original, model, ctx))
    return model
