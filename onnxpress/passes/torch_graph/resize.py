"""Resize and Upsample (computed exactly, one axis at a time), GridSample and AffineGrid.

torch's interpolate covers only some of Resize's coordinate transforms and rounding modes, so
every resized axis is a small matrix instead: output = W @ input along that axis, W[i, j] the
weight of input j in output i (one-hot for nearest, two taps for linear, four for cubic, a
widened kernel with antialias). That is exact for every mode, differentiable, and cheap at the
sizes of a decoder's upsampling.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812

from onnxpress.passes.torch_graph.registry import arg, ints, op


def _source_coords(n_out: int, n_in: int, scale: float, mode: str, roi: tuple[float, float]):
    """Where each output index samples the input (float64), per coordinate_transformation_mode."""
    i = torch.arange(n_out, dtype=torch.float64)
    if mode == "half_pixel":
        return (i + 0.5) / scale - 0.5
    if mode == "half_pixel_symmetric":
        adjust = n_out / (scale * n_in)
        offset = n_in / 2 * (1 - adjust)
        return offset + (i + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (i + 0.5) / scale - 0.5 if n_out > 1 else torch.zeros(n_out, dtype=torch.float64)
    if mode == "align_corners":
        return i * (n_in - 1) / (n_out - 1) if n_out > 1 else torch.zeros(n_out, dtype=torch.float64)
    if mode == "asymmetric":
        return i / scale
    if mode == "tf_crop_and_resize":
        start, end = roi
        if n_out > 1:
            return start * (n_in - 1) + i * (end - start) * (n_in - 1) / (n_out - 1)
        return torch.full((n_out,), 0.5 * (start + end) * (n_in - 1), dtype=torch.float64)
    raise ValueError(mode)


def _nearest(x, mode: str):
    if mode == "round_prefer_floor":
        return torch.where(x - torch.floor(x) == 0.5, torch.floor(x), torch.round(x))
    if mode == "round_prefer_ceil":
        return torch.where(x - torch.floor(x) == 0.5, torch.ceil(x), torch.round(x))
    if mode == "floor":
        return torch.floor(x)
    if mode == "ceil":
        return torch.ceil(x)
    raise ValueError(mode)


def _cubic(d, A: float):
    """Keys' cubic convolution kernel at distance d."""
    d = d.abs()
    near = ((A + 2) * d - (A + 3)) * d * d + 1
    far = ((A * d - 5 * A) * d + 8 * A) * d - 4 * A
    return torch.where(d <= 1, near, torch.where(d < 2, far, torch.zeros_like(d)))


def _weights(n_in: int, src, kind: str, a: dict, scale: float):
    """W (n_out x n_in, float64) for linear or cubic sampling at `src`."""
    A = a.get("cubic_coeff_a", -0.75)
    if a.get("antialias", 0) and scale < 1:
        # downsampling with antialias: the kernel is stretched by 1/scale; taps past the edges
        # read the edge sample, as without antialias
        reach = math.ceil(2 / scale) + 1
        idx = torch.arange(-reach, n_in + reach)[None, :].expand(len(src), -1)
        d = (idx - src[:, None]) * scale
        w = torch.clamp(1 - d.abs(), min=0) if kind == "linear" else _cubic(d, A)
    else:
        base = torch.floor(src)
        t = src - base
        if kind == "linear":
            offsets, taps = [0, 1], [1 - t, t]
        else:
            offsets = [-1, 0, 1, 2]
            taps = [_cubic(t + 1, A), _cubic(t, A), _cubic(1 - t, A), _cubic(2 - t, A)]
        idx = torch.stack([base + o for o in offsets], dim=1).to(torch.int64)
        w = torch.stack(taps, dim=1)
    if a.get("exclude_outside", 0):
        w = torch.where((idx >= 0) & (idx < n_in), w, torch.zeros_like(w))
    w = w / w.sum(dim=1, keepdim=True)
    W = torch.zeros(len(src), n_in, dtype=torch.float64)
    return W.scatter_add_(1, idx.clamp(0, n_in - 1), w)


def _resize_axis(x, axis: int, n_out: int, scale: float, a: dict, ct: str, nearest_mode: str,
                 roi: tuple[float, float]):
    n_in = x.shape[axis]
    src = _source_coords(n_out, n_in, scale, ct, roi)
    kind = a.get("mode", "nearest")
    outside = (src < 0) | (src > n_in - 1) if ct == "tf_crop_and_resize" else None
    if kind == "nearest":
        idx = _nearest(src, nearest_mode).to(torch.int64).clamp(0, n_in - 1)
        y = x.index_select(axis, idx)
    else:
        W = _weights(n_in, src, kind, a, scale)
        xt = x.movedim(axis, -1)
        work = xt.dtype if xt.dtype.is_floating_point else torch.float64
        y = torch.matmul(xt.to(work), W.t().to(work))
        if not xt.dtype.is_floating_point:
            y = torch.round(y).clamp(torch.iinfo(x.dtype).min, torch.iinfo(x.dtype).max)
        y = y.to(x.dtype).movedim(-1, axis)
    if outside is not None and bool(outside.any()):
        shape = [1] * x.dim()
        shape[axis] = n_out
        fill = torch.tensor(a.get("extrapolation_value", 0.0), dtype=x.dtype)
        y = torch.where(outside.reshape(shape), fill, y)
    return y


def resize_tensor(x, out_sizes: list[int], scales: list[float], a: dict, *, ct: str,
                  nearest_mode: str, roi: list[float] | None = None):
    rank = x.dim()
    for ax in range(rank):
        r = (roi[ax], roi[rank + ax]) if roi else (0.0, 1.0)
        if out_sizes[ax] == x.shape[ax] and scales[ax] == 1.0 and ct != "tf_crop_and_resize":
            continue
        x = _resize_axis(x, ax, out_sizes[ax], scales[ax], a, ct, nearest_mode, r)
    return x


def _floats(t) -> list[float]:
    return [float(v) for v in t.reshape(-1).tolist()] if t is not None else []


@op("Resize")
def resize(args, a, ctx):
    x = args[0]
    rank = x.dim()
    if ctx.opset < 11:  # Resize-10: X, scales; asymmetric coordinates, nearest rounds down
        scales = _floats(args[1])
        sizes = [math.floor(n * s) for n, s in zip(x.shape, scales)]
        return resize_tensor(x, sizes, scales, a, ct="asymmetric", nearest_mode="floor")
    roi_in, scales_in, sizes_in = arg(args, 1), arg(args, 2), arg(args, 3)
    axes = [ax % rank for ax in a.get("axes", range(rank))]
    scales = [1.0] * rank
    sizes = list(x.shape)
    roi = None
    roi_vals = _floats(roi_in)
    if roi_vals:
        roi = [0.0] * rank + [1.0] * rank
        k = len(axes)
        for i, ax in enumerate(axes):
            roi[ax], roi[rank + ax] = roi_vals[i], roi_vals[k + i]
    if sizes_in is not None and sizes_in.numel():
        want = ints(sizes_in)
        policy = a.get("keep_aspect_ratio_policy", "stretch")
        if policy == "stretch":
            for ax, n in zip(axes, want):
                sizes[ax], scales[ax] = n, n / x.shape[ax]
        else:
            pick = min if policy == "not_larger" else max
            s = pick(n / x.shape[ax] for ax, n in zip(axes, want))
            for ax in axes:
                sizes[ax], scales[ax] = int(math.floor(s * x.shape[ax] + 0.5)), s
    else:
        for ax, s in zip(axes, _floats(scales_in)):
            r = (roi[rank + ax] - roi[ax]) if roi and a.get(
                "coordinate_transformation_mode") == "tf_crop_and_resize" else 1.0
            sizes[ax], scales[ax] = math.floor(x.shape[ax] * r * s), s
    return resize_tensor(x, sizes, scales, a, roi=roi,
                         ct=a.get("coordinate_transformation_mode", "half_pixel"),
                         nearest_mode=a.get("nearest_mode", "round_prefer_floor"))


@op("Upsample")
def upsample(args, a, ctx):
    x = args[0]
    scales = _floats(args[1]) if arg(args, 1) is not None else list(a["scales"])
    sizes = [math.floor(n * s) for n, s in zip(x.shape, scales)]
    mode = {"bilinear": "linear", "trilinear": "linear"}.get(a.get("mode", "nearest"),
                                                             a.get("mode", "nearest"))
    return resize_tensor(x, sizes, scales, {**a, "mode": mode}, ct="asymmetric",
                         nearest_mode="floor")


@op("GridSample")
def grid_sample(args, a, ctx):
    x, grid = args
    mode = {"linear": "bilinear", "cubic": "bicubic"}.get(a.get("mode", "bilinear"),
                                                          a.get("mode", "bilinear"))
    if x.dim() not in (4, 5) or (x.dim() == 5 and mode == "bicubic"):
        raise ctx.unsupported(f"{x.dim() - 2}-d sampling in mode '{mode}' (torch's grid_sample "
                              "does 2-d, and 3-d without cubic)")
    return F.grid_sample(x, grid, mode=mode, padding_mode=a.get("padding_mode", "zeros"),
                         align_corners=bool(a.get("align_corners", 0)))


@op("AffineGrid")
def affine_grid(args, a, ctx):
    theta, size = args
    return F.affine_grid(theta, ints(size), align_corners=bool(a.get("align_corners", 0)))
