"""Shape, indexing, reduction and sorting ops (integer results are computed in torch too)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812

from onnxpress.passes.torch_graph.registry import (
    OPS,
    arg,
    as_tensor,
    ints,
    op,
    scalar,
    torch_dtype,
)


def _axis(ax: int, rank: int) -> int:
    return ax + rank if ax < 0 else ax


def _axes(args, a, idx=1) -> list[int] | None:
    """Axes from the attribute (older opsets) or the optional input; None when absent or empty."""
    if "axes" in a:
        return ints(a["axes"])
    x = arg(args, idx)
    if x is not None and x.numel():
        return ints(x)
    return None


# -- creation ------------------------------------------------------------------------------------
@op("Constant")
def constant(args, a, ctx):
    for key in ("value_float", "value_floats"):
        if key in a:
            return torch.tensor(a[key], dtype=torch.float32)
    for key in ("value_int", "value_ints"):
        if key in a:
            return torch.tensor(a[key], dtype=torch.int64)
    if "value" not in a:
        raise ctx.unsupported(f"attribute {sorted(a)} has no torch equivalent")
    return as_tensor(a["value"], ctx.node)


@op("ConstantOfShape")
def constant_of_shape(args, a, ctx):
    value = as_tensor(a["value"], ctx.node).reshape(-1) if "value" in a else torch.zeros(1)
    return torch.full(ints(args[0]), value[0].item(), dtype=value.dtype)


@op("Range")
def range_(args, a, ctx):
    start, limit, delta = (scalar(v) for v in args)
    n = max(math.ceil((limit - start) / delta), 0)
    steps = torch.arange(n, dtype=torch.float64) * delta + start
    return steps.to(args[0].dtype)


@op("EyeLike")
def eye_like(args, a, ctx):
    x = args[0]
    dtype = torch_dtype(a["dtype"], ctx.node) if "dtype" in a else x.dtype
    n, m = x.shape
    k = a.get("k", 0)
    return (torch.arange(n)[:, None] + k == torch.arange(m)[None, :]).to(dtype)


@op("OneHot")
def one_hot(args, a, ctx):
    indices, depth, values = args
    depth = int(scalar(depth))
    idx = indices.to(torch.int64)
    idx = torch.where(idx < 0, idx + depth, idx)
    rank = idx.dim() + 1
    axis = _axis(a.get("axis", -1), rank)
    shape = [depth if i == axis else 1 for i in range(rank)]
    hot = torch.arange(depth).reshape(shape) == idx.unsqueeze(axis)
    return torch.where(hot, values[1], values[0])


# -- shape ---------------------------------------------------------------------------------------
@op("Shape")
def shape(args, a, ctx):
    dims = list(args[0].shape)
    start = a.get("start", 0)
    end = a.get("end", len(dims))
    return torch.tensor(dims[start:end], dtype=torch.int64)


@op("Size")
def size(args, a, ctx):
    return torch.tensor(args[0].numel(), dtype=torch.int64)


@op("Reshape")
def reshape(args, a, ctx):
    x = args[0]
    target = ints(args[1]) if len(args) > 1 else list(a["shape"])
    if not a.get("allowzero", 0):
        target = [x.shape[i] if s == 0 else s for i, s in enumerate(target)]
    return x.reshape(target)


@op("Flatten")
def flatten(args, a, ctx):
    x = args[0]
    axis = _axis(a.get("axis", 1), x.dim())
    lead = math.prod(x.shape[:axis])
    return x.reshape(lead, math.prod(x.shape[axis:]))


@op("Transpose")
def transpose(args, a, ctx):
    x = args[0]
    return x.permute(*(a["perm"] if "perm" in a else range(x.dim() - 1, -1, -1)))


@op("Squeeze")
def squeeze(args, a, ctx):
    x = args[0]
    axes = _axes(args, a)
    if axes is None:
        return x.squeeze()
    for ax in sorted((_axis(ax, x.dim()) for ax in axes), reverse=True):
        x = x.squeeze(ax)
    return x


@op("Unsqueeze")
def unsqueeze(args, a, ctx):
    x = args[0]
    axes = _axes(args, a)
    rank = x.dim() + len(axes)
    for ax in sorted(_axis(ax, rank) for ax in axes):
        x = x.unsqueeze(ax)
    return x


@op("Expand")
def expand(args, a, ctx):
    x = args[0]
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(ints(args[1]))))


@op("Tile")
def tile(args, a, ctx):
    return args[0].repeat(*ints(args[1]))


@op("Concat")
def concat(args, a, ctx):
    return torch.cat([x for x in args if x is not None], dim=a.get("axis", 0))


@op("Split")
def split(args, a, ctx):
    x = args[0]
    axis = a.get("axis", 0)
    sizes = arg(args, 1)
    sizes = ints(sizes) if sizes is not None else a.get("split")
    if sizes:
        return list(torch.split(x, list(sizes), dim=axis))
    n = a.get("num_outputs", len(ctx.node.output))
    return list(torch.split(x, math.ceil(x.shape[axis] / n), dim=axis))


def _slice_index(n: int, start: int, end: int, step: int):
    """ONNX's clamping of one axis of Slice: a slice for positive steps, indices otherwise."""
    start = start + n if start < 0 else start
    end = end + n if end < 0 else end
    if step > 0:
        return slice(max(0, min(n, start)), max(0, min(n, end)), step)
    start, end = max(0, min(n - 1, start)), max(-1, min(n - 1, end))
    return torch.arange(start, end, step, dtype=torch.int64)


@op("Slice")
def slice_(args, a, ctx):
    x = args[0]
    if len(args) == 1:  # opset < 10: attributes
        starts, ends = list(a["starts"]), list(a["ends"])
        axes, steps = list(a.get("axes", range(len(starts)))), [1] * len(starts)
    else:
        starts, ends = ints(args[1]), ints(args[2])
        axes = ints(args[3]) if arg(args, 3) is not None else list(range(len(starts)))
        steps = ints(args[4]) if arg(args, 4) is not None else [1] * len(starts)
    for s, e, ax, st in zip(starts, ends, axes, steps):
        ax = _axis(ax, x.dim())
        idx = _slice_index(x.shape[ax], s, e, st)
        if isinstance(idx, slice):
            x = x[(slice(None),) * ax + (idx,)]
        else:
            x = x.index_select(ax, idx)
    return x


@op("Pad")
def pad(args, a, ctx):
    x = args[0]
    pads = ints(args[1]) if arg(args, 1) is not None else list(a["pads"])
    value = arg(args, 2)
    value = scalar(value) if value is not None and value.numel() else a.get("value", 0.0)
    rank = x.dim()
    axes = [_axis(ax, rank) for ax in ints(args[3])] if arg(args, 3) is not None else list(range(rank))
    k = len(axes)
    mode = a.get("mode", "constant")
    if mode == "constant":
        torch_pads = [0] * (2 * rank)
        for i, ax in enumerate(axes):
            torch_pads[2 * (rank - 1 - ax)] = pads[i]
            torch_pads[2 * (rank - 1 - ax) + 1] = pads[i + k]
        return F.pad(x, torch_pads, value=value)
    for i, ax in enumerate(axes):
        x = _pad_axis(x, ax, pads[i], pads[i + k], mode, ctx)
    return x


def _pad_axis(x, ax: int, before: int, after: int, mode: str, ctx):
    """edge / reflect / wrap padding of one axis by gathering indices (negative pads crop)."""
    n = x.shape[ax]
    pos = torch.arange(-before, n + after)
    if mode == "edge":
        idx = pos.clamp(0, n - 1)
    elif mode == "wrap":
        idx = pos % n
    elif mode == "reflect":
        period = max(2 * (n - 1), 1)
        idx = pos.abs() % period
        idx = torch.where(idx >= n, period - idx, idx)
    else:
        raise ctx.unsupported(f"pad mode '{mode}'")
    return x.index_select(ax, idx)


@op("DepthToSpace")
def depth_to_space(args, a, ctx):
    x, b = args[0], a["blocksize"]
    n, c, h, w = x.shape
    if a.get("mode", "DCR") == "DCR":
        y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
    return y.reshape(n, c // (b * b), h * b, w * b)


@op("SpaceToDepth")
def space_to_depth(args, a, ctx):
    x, b = args[0], a["blocksize"]
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // b, b, w // b, b)
    y = y.permute(0, 1, 3, 5, 2, 4) if a.get("mode", "DCR") == "CRD" else y.permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)


@op("CenterCropPad")
def center_crop_pad(args, a, ctx):
    x, target = args[0], ints(args[1])
    axes = [_axis(ax, x.dim()) for ax in a.get("axes", range(x.dim()))]
    for ax, want in zip(axes, target):
        have = x.shape[ax]
        if want < have:
            x = x.narrow(ax, (have - want) // 2, want)
        elif want > have:
            before = (want - have) // 2
            x = _pad_zero(x, ax, before, want - have - before)
    return x


def _pad_zero(x, ax, before, after):
    torch_pads = [0] * (2 * x.dim())
    torch_pads[2 * (x.dim() - 1 - ax)] = before
    torch_pads[2 * (x.dim() - 1 - ax) + 1] = after
    return F.pad(x, torch_pads)


@op("Trilu")
def trilu(args, a, ctx):
    k = int(scalar(args[1])) if arg(args, 1) is not None else 0
    return torch.triu(args[0], k) if a.get("upper", 1) else torch.tril(args[0], k)


# -- indexing ------------------------------------------------------------------------------------
def _wrap(idx, n):
    idx = idx.to(torch.int64)
    return torch.where(idx < 0, idx + n, idx)


@op("Gather")
def gather(args, a, ctx):
    x, idx = args
    axis = _axis(a.get("axis", 0), x.dim())
    flat = _wrap(idx, x.shape[axis]).reshape(-1)
    out = x.index_select(axis, flat)
    return out.reshape(list(x.shape[:axis]) + list(idx.shape) + list(x.shape[axis + 1:]))


@op("GatherElements")
def gather_elements(args, a, ctx):
    x, idx = args
    axis = _axis(a.get("axis", 0), x.dim())
    return torch.gather(x, axis, _wrap(idx, x.shape[axis]))


@op("GatherND")
def gather_nd(args, a, ctx):
    x, idx = args
    b = a.get("batch_dims", 0)
    k = idx.shape[-1]
    batch = list(x.shape[:b])
    nb = math.prod(batch)
    xf = x.reshape([nb] + list(x.shape[b:]))
    idxf = idx.reshape(nb, -1, k).to(torch.int64)
    cols = [_wrap(idxf[..., j], x.shape[b + j]) for j in range(k)]
    out = xf[(torch.arange(nb)[:, None], *cols)]
    return out.reshape(batch + list(idx.shape[b:-1]) + list(x.shape[b + k:]))


REDUCE_NAMES = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


@op("ScatterElements", "Scatter")
def scatter_elements(args, a, ctx):
    x, idx, upd = args
    axis = _axis(a.get("axis", 0), x.dim())
    idx = _wrap(idx, x.shape[axis])
    red = a.get("reduction", "none")
    if red == "none":
        return x.scatter(axis, idx, upd)
    return x.scatter_reduce(axis, idx, upd, REDUCE_NAMES[red], include_self=True)


@op("ScatterND")
def scatter_nd(args, a, ctx):
    x, idx, upd = args
    k = idx.shape[-1]
    lead = list(x.shape[:k])
    strides = [math.prod(lead[j + 1:]) for j in range(k)]
    idx = idx.reshape(-1, k).to(torch.int64)
    lin = sum(_wrap(idx[:, j], lead[j]) * strides[j] for j in range(k))
    flat = x.reshape([math.prod(lead)] + list(x.shape[k:]))
    updf = upd.reshape([lin.numel()] + list(x.shape[k:]))
    red = a.get("reduction", "none")
    if red == "none":
        out = flat.index_copy(0, lin, updf)
    else:
        index = lin.reshape([-1] + [1] * (flat.dim() - 1)).expand_as(updf)
        out = flat.scatter_reduce(0, index, updf, REDUCE_NAMES[red], include_self=True)
    return out.reshape(x.shape)


@op("Compress")
def compress(args, a, ctx):
    x, cond = args
    keep = torch.nonzero(cond.bool().reshape(-1))[:, 0]
    if "axis" not in a:
        return x.reshape(-1).index_select(0, keep)
    return x.index_select(_axis(a["axis"], x.dim()), keep)


@op("NonZero")
def non_zero(args, a, ctx):
    return torch.nonzero(args[0]).t().contiguous()


@op("ReverseSequence")
def reverse_sequence(args, a, ctx):
    x, lens = args
    t_ax, b_ax = a.get("time_axis", 0), a.get("batch_axis", 1)
    t = torch.arange(x.shape[t_ax])[:, None]
    lens = lens.to(torch.int64)[None, :]
    src = torch.where(t < lens, lens - 1 - t, t)  # [time, batch]
    shape = [1] * x.dim()
    shape[t_ax], shape[b_ax] = src.shape[0], src.shape[1]
    src = src.reshape(shape) if t_ax < b_ax else src.t().reshape(shape)
    return torch.gather(x, t_ax, src.expand(x.shape))


# -- reductions ----------------------------------------------------------------------------------
def _reduce(name):
    def run(args, a, ctx):
        x = args[0]
        axes = _axes(args, a)
        keep = bool(a.get("keepdims", 1))
        if axes is None:
            if a.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        axes = sorted({_axis(ax, x.dim()) for ax in axes})
        if not axes:
            return x
        return REDUCERS[name](x, axes, keep)
    return run


def _extreme(fn, empty):
    def run(x, axes, keep):
        if x.numel() == 0:
            shape = [1 if i in axes else s for i, s in enumerate(x.shape)] if keep else \
                [s for i, s in enumerate(x.shape) if i not in axes]
            return torch.full(shape, empty, dtype=x.dtype)
        return fn(x, dim=axes, keepdim=keep)
    return run


def _prod(x, axes, keep):
    for ax in sorted(axes, reverse=True):
        x = x.prod(dim=ax, keepdim=keep)
    return x


REDUCERS = {
    "ReduceSum": lambda x, ax, k: x.sum(dim=ax, keepdim=k),
    "ReduceMean": lambda x, ax, k: x.mean(dim=ax, keepdim=k),
    "ReduceMax": _extreme(torch.amax, -math.inf),
    "ReduceMin": _extreme(torch.amin, math.inf),
    "ReduceProd": _prod,
    "ReduceL1": lambda x, ax, k: x.abs().sum(dim=ax, keepdim=k),
    "ReduceL2": lambda x, ax, k: torch.sqrt((x * x).sum(dim=ax, keepdim=k)),
    "ReduceSumSquare": lambda x, ax, k: (x * x).sum(dim=ax, keepdim=k),
    "ReduceLogSum": lambda x, ax, k: torch.log(x.sum(dim=ax, keepdim=k)),
    "ReduceLogSumExp": lambda x, ax, k: torch.logsumexp(x, dim=ax, keepdim=k).to(x.dtype),
}
for _name in REDUCERS:
    OPS[_name] = _reduce(_name)


def _arg_extreme(fn):
    def run(args, a, ctx):
        x = args[0]
        axis = _axis(a.get("axis", 0), x.dim())
        keep = bool(a.get("keepdims", 1))
        if a.get("select_last_index", 0):
            idx = x.shape[axis] - 1 - fn(x.flip(axis), dim=axis, keepdim=keep)
        else:
            idx = fn(x, dim=axis, keepdim=keep)
        return idx.to(torch.int64)
    return run


OPS["ArgMax"] = _arg_extreme(torch.argmax)
OPS["ArgMin"] = _arg_extreme(torch.argmin)


def _cumulative(fn, identity):
    def run(args, a, ctx):
        x = args[0]
        axis = _axis(int(scalar(args[1])), x.dim())
        if a.get("reverse", 0):
            x = x.flip(axis)
        y = fn(x, dim=axis)
        if a.get("exclusive", 0):
            first = torch.full_like(x.narrow(axis, 0, 1), identity)
            y = torch.cat([first, y.narrow(axis, 0, x.shape[axis] - 1)], dim=axis)
        return y.flip(axis) if a.get("reverse", 0) else y
    return run


OPS["CumSum"] = _cumulative(torch.cumsum, 0)
OPS["CumProd"] = _cumulative(torch.cumprod, 1)


@op("TopK")
def top_k(args, a, ctx):
    x = args[0]
    k = int(scalar(args[1])) if arg(args, 1) is not None else a["k"]
    axis = _axis(a.get("axis", -1), x.dim())
    vals, idx = torch.sort(x, dim=axis, descending=bool(a.get("largest", 1)), stable=True)
    return [vals.narrow(axis, 0, k), idx.narrow(axis, 0, k)]


@op("Unique")
def unique(args, a, ctx):
    x = args[0]
    axis = a.get("axis")
    if axis is None:
        x = x.reshape(-1)
        axis = 0
    axis = _axis(axis, x.dim())
    vals, inverse, counts = torch.unique(x, sorted=True, return_inverse=True,
                                         return_counts=True, dim=axis)
    n = x.shape[axis]
    first = torch.full((vals.shape[axis],), n, dtype=torch.int64).scatter_reduce(
        0, inverse, torch.arange(n), "amin")
    if not a.get("sorted", 1):  # in order of first occurrence
        order = torch.argsort(first)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order))
        vals, first, counts, inverse = vals.index_select(axis, order), first[order], \
            counts[order], rank[inverse]
    return [vals, first, inverse, counts]


@op("Einsum")
def einsum(args, a, ctx):
    return torch.einsum(a["equation"].replace(" ", ""), *args)


@op("Det")
def det(args, a, ctx):
    return torch.linalg.det(args[0])


@op("MatMul")
def matmul(args, a, ctx):
    return torch.matmul(args[0], args[1])


@op("MatMulInteger")
def matmul_integer(args, a, ctx):
    x, w = args[0].to(torch.int32), args[1].to(torch.int32)
    if arg(args, 2) is not None:
        x = x - args[2].to(torch.int32)
    if arg(args, 3) is not None:
        w = w - args[3].to(torch.int32)
    return torch.matmul(x.to(torch.int64), w.to(torch.int64)).to(torch.int32)



@op("TensorScatter")
def tensor_scatter(args, a, ctx):
    """Write `update` into the cache along `axis` at each batch row's write index (mod the
    cache length when circular)."""
    cache, update, where = args[0], args[1], arg(args, 2)
    axis = _axis(a.get("axis", -2), cache.dim())
    n_batch, steps = cache.shape[0], update.shape[axis]
    start = where.to(torch.int64) if where is not None else torch.zeros(n_batch, dtype=torch.int64)
    pos = start[:, None] + torch.arange(steps)[None, :]
    if a.get("mode", "linear") == "circular":
        pos = pos % cache.shape[axis]
    shape = [1] * cache.dim()
    shape[0] = n_batch
    shape[axis] = steps
    return cache.scatter(axis, pos.reshape(shape).expand(update.shape), update)


@op("BitCast")
def bit_cast(args, a, ctx):
    x, dtype = args[0], torch_dtype(a["to"], ctx.node)
    if x.element_size() != torch.empty((), dtype=dtype).element_size():
        raise ctx.unsupported("BitCast between types of different widths")
    return x.view(dtype)


def _box_corners(boxes, center: bool):
    """[N, 4] -> (x_min, y_min, x_max, y_max) from [y1, x1, y2, x2] or [xc, yc, w, h]."""
    if center:
        xc, yc, w, h = boxes.unbind(-1)
        return xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2
    y1, x1, y2, x2 = boxes.unbind(-1)
    return torch.minimum(x1, x2), torch.minimum(y1, y2), torch.maximum(x1, x2), torch.maximum(y1, y2)


def _iou(boxes, center: bool):
    x0, y0, x1, y1 = _box_corners(boxes.to(torch.float64), center)
    w = (torch.minimum(x1[:, None], x1[None, :]) - torch.maximum(x0[:, None], x0[None, :])).clamp(min=0)
    h = (torch.minimum(y1[:, None], y1[None, :]) - torch.maximum(y0[:, None], y0[None, :])).clamp(min=0)
    inter = w * h
    area = (x1 - x0) * (y1 - y0)
    union = area[:, None] + area[None, :] - inter
    ok = (inter > 0) & (area[:, None] > 0) & (area[None, :] > 0) & (union > 0)
    return torch.where(ok, inter / torch.where(ok, union, torch.ones_like(union)), torch.zeros_like(inter))


@op("NonMaxSuppression")
def non_max_suppression(args, a, ctx):
    """Greedy per batch and class: highest score first (lower index on ties), a box is dropped
    when its IoU with one already kept exceeds the threshold."""
    boxes, scores = args[0], args[1]
    limit = arg(args, 2)
    limit = int(scalar(limit)) if limit is not None and limit.numel() else 0
    iou_thr = arg(args, 3)
    iou_thr = float(scalar(iou_thr)) if iou_thr is not None and iou_thr.numel() else 0.0
    score_thr = arg(args, 4)
    score_thr = float(scalar(score_thr)) if score_thr is not None and score_thr.numel() else None
    center = bool(a.get("center_point_box", 0))
    picked = []
    for b in range(boxes.shape[0]):
        iou = _iou(boxes[b], center)
        for c in range(scores.shape[1]):
            s = scores[b, c]
            order = torch.sort(s, descending=True, stable=True).indices.tolist()
            if score_thr is not None:
                order = [i for i in order if float(s[i]) > score_thr]
            kept: list[int] = []
            for i in order:
                if len(kept) >= limit:
                    break
                if all(float(iou[i, j]) <= iou_thr for j in kept):
                    kept.append(i)
            picked += [[b, c, i] for i in kept]
    return torch.tensor(picked, dtype=torch.int64).reshape(-1, 3)
