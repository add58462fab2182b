"""Neural-network ops: convolution, Gemm, pooling, normalisation, softmax, losses."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812

from onnxpress.passes.torch_graph.registry import OPS, arg, ints, op


def _pads_for(x, a: dict, kernel: list[int], strides: list[int], dilations: list[int]) -> list[int]:
    """ONNX pads [b1..bn, e1..en] for Conv/pooling, auto_pad resolved."""
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


def _torch_pads(pads_b: list[int], pads_e: list[int]) -> list[int]:
    """F.pad's order (last dim first) from ONNX's begin/end lists."""
    out = []
    for b, e in zip(reversed(pads_b), reversed(pads_e)):
        out += [b, e]
    return out


def _pad_input(x, pads: list[int], value: float = 0.0):
    """Apply ONNX pads over the spatial dims unless symmetric; return (x, torch padding)."""
    nd = len(pads) // 2
    b, e = pads[:nd], pads[nd:]
    if b == e:
        return x, b
    return F.pad(x, _torch_pads(b, e), value=value), [0] * nd


@op("Conv")
def conv(args, a, ctx):
    x, w, b = args[0], args[1], arg(args, 2)
    nd = w.dim() - 2
    kernel = list(a.get("kernel_shape", w.shape[2:]))
    strides = list(a.get("strides", [1] * nd))
    dil = list(a.get("dilations", [1] * nd))
    x, pads = _pad_input(x, _pads_for(x, a, kernel, strides, dil))
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}.get(nd)
    if fn is None:
        raise ctx.unsupported(f"{nd}-d convolution")
    return fn(x, w, b, stride=strides, padding=pads, dilation=dil, groups=int(a.get("group", 1)))


@op("ConvTranspose")
def conv_transpose(args, a, ctx):
    x, w, b = args[0], args[1], arg(args, 2)
    nd = w.dim() - 2
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}.get(nd)
    if fn is None:
        raise ctx.unsupported(f"{nd}-d transposed convolution")
    strides = list(a.get("strides", [1] * nd))
    dil = list(a.get("dilations", [1] * nd))
    kernel = list(a.get("kernel_shape", w.shape[2:]))
    out_pad = list(a.get("output_padding", [0] * nd))
    group = int(a.get("group", 1))
    auto = a.get("auto_pad", "NOTSET")
    pads = list(a.get("pads", [0] * (2 * nd)))
    if "output_shape" in a or auto in ("SAME_UPPER", "SAME_LOWER"):
        want = list(a["output_shape"])[-nd:] if "output_shape" in a else \
            [x.shape[2 + i] * strides[i] for i in range(nd)]
        pads = [0] * (2 * nd)
        for i in range(nd):
            total = strides[i] * (x.shape[2 + i] - 1) + out_pad[i] + (kernel[i] - 1) * dil[i] + 1 - want[i]
            small = int(total / 2)  # C's truncation: a negative total extends the output
            big = total - small
            pads[i], pads[nd + i] = (big, small) if auto == "SAME_LOWER" else (small, big)
    elif auto == "VALID":
        pads = [0] * (2 * nd)
    if pads[:nd] == pads[nd:] and all(p < max(s, d) for p, s, d in zip(out_pad, strides, dil)):
        return fn(x, w, b, stride=strides, padding=pads[:nd], output_padding=out_pad,
                  groups=group, dilation=dil)
    # general case: the full result, then output_padding zeros at the end, then the pads cut off
    y = fn(x, w, None, stride=strides, groups=group, dilation=dil)
    y = F.pad(y, _torch_pads([0] * nd, out_pad))
    for i in range(nd):
        y = _crop(y, 2 + i, pads[i], pads[nd + i])
    return y if b is None else y + b.reshape([1, -1] + [1] * nd)


def _crop(y, dim: int, before: int, after: int):
    """Cut `before`/`after` cells off one axis; a negative count adds zeros instead."""
    pads = [0] * (2 * y.dim())
    pads[2 * (y.dim() - 1 - dim)], pads[2 * (y.dim() - 1 - dim) + 1] = -before, -after
    return F.pad(y, pads)


@op("Gemm")
def gemm(args, a, ctx):
    x, w, c = args[0], args[1], arg(args, 2)
    if a.get("transA", 0):
        x = x.t()
    if a.get("transB", 0):
        w = w.t()
    y = a.get("alpha", 1.0) * (x @ w)
    if c is not None:
        y = y + a.get("beta", 1.0) * c
    return y


# -- pooling -------------------------------------------------------------------------------------
def _pool_geometry(x, a):
    kernel = list(a["kernel_shape"])
    nd = len(kernel)
    strides = list(a.get("strides", [1] * nd))
    dil = list(a.get("dilations", [1] * nd))
    return kernel, strides, dil, _pads_for(x, a, kernel, strides, dil)


def _out_size(n, k, s, d, pb, pe, ceil) -> int:
    span = n + pb + pe - d * (k - 1) - 1
    if not ceil:
        return span // s + 1
    out = -(-span // s) + 1
    if (out - 1) * s >= n + pb:  # the last window must start inside the input or its left pad
        out -= 1
    return out


def _windows(x, kernel, strides, dil, pads, ceil, fill):
    """[N, C, out..., k...]: every pooling window (dilated), the input padded with `fill`
    (explicit pads, and the ceil-mode overhang)."""
    nd = len(kernel)
    pb, pe = list(pads[:nd]), list(pads[nd:])
    for i in range(nd):
        n = x.shape[2 + i]
        out = _out_size(n, kernel[i], strides[i], dil[i], pb[i], pe[i], ceil)
        need = (out - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1
        pe[i] = need - n - pb[i]
    x = F.pad(x, _torch_pads(pb, pe), value=fill)
    for i in range(nd):
        span = (kernel[i] - 1) * dil[i] + 1
        x = x.unfold(2 + i, span, strides[i])[..., ::dil[i]]
    return x


def _fits_torch(kernel, pads, dil, ceil) -> bool:
    nd = len(kernel)
    return pads[:nd] == pads[nd:] and all(
        p <= ((k - 1) * d + 1) // 2 for p, k, d in zip(pads[:nd], kernel, dil)) and nd <= 3


@op("MaxPool")
def max_pool(args, a, ctx):
    x = args[0]
    kernel, strides, dil, pads = _pool_geometry(x, a)
    nd = len(kernel)
    ceil = bool(a.get("ceil_mode", 0))
    want_indices = len(ctx.node.output) > 1 and ctx.node.output[1]
    if not want_indices and _fits_torch(kernel, pads, dil, ceil) and x.dtype.is_floating_point:
        fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nd]
        return fn(x, kernel, strides, pads[:nd], dil, ceil_mode=ceil)
    low = -math.inf if x.dtype.is_floating_point else torch.iinfo(x.dtype).min
    win = _windows(x, kernel, strides, dil, pads, ceil, low)
    flat = win.reshape(list(win.shape[:2 + nd]) + [-1])
    vals, arg_k = flat.max(dim=-1)
    if not want_indices:
        return vals
    # the window offset back to a position in the (unpadded) input, flattened over N, C, spatial
    spatial = list(x.shape[2:])
    offs = torch.unravel_index(arg_k, kernel)
    coords = []
    for i in range(nd):
        shape = [1] * (2 + nd)
        shape[2 + i] = vals.shape[2 + i]
        start = (torch.arange(vals.shape[2 + i]) * strides[i] - pads[i]).reshape(shape)
        coords.append(start + offs[i] * dil[i])
    if a.get("storage_order", 0):
        coords, spatial = coords[::-1], spatial[::-1]
    lin = torch.zeros_like(arg_k)
    for c, n in zip(coords, spatial):
        lin = lin * n + c
    plane = math.prod(x.shape[2:])
    base = torch.arange(x.shape[0] * x.shape[1]).reshape(x.shape[0], x.shape[1], *[1] * nd) * plane
    return [vals, (lin + base).to(torch.int64)]


@op("AveragePool")
def average_pool(args, a, ctx):
    x = args[0]
    kernel, strides, dil, pads = _pool_geometry(x, a)
    nd = len(kernel)
    ceil = bool(a.get("ceil_mode", 0))
    include = bool(a.get("count_include_pad", 0))
    if _fits_torch(kernel, pads, dil, ceil) and dil == [1] * nd:
        fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
        return fn(x, kernel, strides, pads[:nd], ceil_mode=ceil, count_include_pad=include)
    dims = tuple(range(-nd, 0))
    total = _windows(x, kernel, strides, dil, pads, ceil, 0.0).sum(dim=dims)
    # the divisor: the input's cells (and the explicit pads when counted) inside each window
    ones = torch.ones((1, 1) + tuple(x.shape[2:]), dtype=x.dtype)
    if include:
        ones = F.pad(ones, _torch_pads(pads[:nd], pads[nd:]), value=1.0)
        inner = [0] * (2 * nd)
        count = _windows(ones, kernel, strides, dil, inner, ceil, 0.0).sum(dim=dims)
        count = _match_windows(count, total)
    else:
        count = _windows(ones, kernel, strides, dil, pads, ceil, 0.0).sum(dim=dims)
    return total / count


def _match_windows(count, total):
    """Pads folded into the counting input can leave a different ceil-mode overhang: cut or
    extend with the last count to the result's shape."""
    for i in range(2, total.dim()):
        if count.shape[i] > total.shape[i]:
            count = count.narrow(i, 0, total.shape[i])
        elif count.shape[i] < total.shape[i]:
            extra = count.narrow(i, count.shape[i] - 1, 1)
            count = torch.cat([count] + [extra] * (total.shape[i] - count.shape[i]), dim=i)
    return count


@op("LpPool")
def lp_pool(args, a, ctx):
    x = args[0]
    kernel, strides, dil, pads = _pool_geometry(x, a)
    p = a.get("p", 2)
    win = _windows(x, kernel, strides, dil, pads, bool(a.get("ceil_mode", 0)), 0.0)
    dims = tuple(range(-len(kernel), 0))
    return win.abs().pow(p).sum(dim=dims).pow(1.0 / p)


@op("GlobalAveragePool")
def global_average_pool(args, a, ctx):
    x = args[0]
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@op("GlobalMaxPool")
def global_max_pool(args, a, ctx):
    x = args[0]
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


@op("GlobalLpPool")
def global_lp_pool(args, a, ctx):
    x, p = args[0], a.get("p", 2)
    return x.abs().pow(p).sum(dim=tuple(range(2, x.dim())), keepdim=True).pow(1.0 / p)


@op("MaxUnpool")
def max_unpool(args, a, ctx):
    x, idx = args[0], args[1]
    kernel = list(a["kernel_shape"])
    nd = len(kernel)
    strides = list(a.get("strides", [1] * nd))
    pads = list(a.get("pads", [0] * (2 * nd)))
    if arg(args, 2) is not None:
        shape = ints(args[2])
    else:
        shape = list(x.shape[:2]) + [(x.shape[2 + i] - 1) * strides[i] + kernel[i] - pads[i] - pads[nd + i]
                                     for i in range(nd)]
    out = torch.zeros(math.prod(shape), dtype=x.dtype)
    return out.scatter(0, idx.reshape(-1).to(torch.int64), x.reshape(-1)).reshape(shape)


@op("Col2Im")
def col2im(args, a, ctx):
    x, image, block = args[0], ints(args[1]), ints(args[2])
    nd = len(block)
    if nd != 2:
        raise ctx.unsupported(f"{nd}-d images (torch folds 2-d ones)")
    strides = list(a.get("strides", [1] * nd))
    dil = list(a.get("dilations", [1] * nd))
    pads = list(a.get("pads", [0] * (2 * nd)))
    padded = [image[i] + pads[i] + pads[nd + i] for i in range(nd)]
    y = F.fold(x, padded, block, dilation=dil, stride=strides)
    for i in range(nd):
        y = y.narrow(2 + i, pads[i], image[i])
    return y


# -- normalisation -------------------------------------------------------------------------------
def _channel(v, x):
    return v.reshape([1, -1] + [1] * (x.dim() - 2))


@op("BatchNormalization")
def batch_norm(args, a, ctx):
    x, scale, bias, mean, var = args[:5]
    eps = a.get("epsilon", 1e-5)
    if not a.get("training_mode", 0):
        return F.batch_norm(x, mean, var, scale, bias, training=False, eps=eps)
    dims = [0] + list(range(2, x.dim()))
    bmean = x.mean(dim=dims)
    bvar = x.var(dim=dims, unbiased=False)
    y = (x - _channel(bmean, x)) / torch.sqrt(_channel(bvar, x) + eps) * _channel(scale, x) \
        + _channel(bias, x)
    m = a.get("momentum", 0.9)
    return [y, mean * m + bmean * (1 - m), var * m + bvar * (1 - m)]


@op("InstanceNormalization")
def instance_norm(args, a, ctx):
    return F.instance_norm(args[0], weight=args[1], bias=args[2], eps=a.get("epsilon", 1e-5))


def _stash(x, a):
    """LayerNormalization/RMSNormalization compute in stash_type (float32 by default)."""
    return x.double() if a.get("stash_type", 1) == 11 else x.float()


@op("LayerNormalization")
def layer_norm(args, a, ctx):
    x, scale, bias = args[0], args[1], arg(args, 2)
    axis = a.get("axis", -1) % x.dim()
    eps = a.get("epsilon", 1e-5)
    if len([o for o in ctx.node.output if o]) == 1 and tuple(scale.shape) == tuple(x.shape[axis:]) \
            and (bias is None or bias.shape == scale.shape) and x.dtype == torch.float32:
        return F.layer_norm(x, tuple(x.shape[axis:]), scale, bias, eps=eps)
    xs = _stash(x, a)
    dims = tuple(range(axis, x.dim()))
    mean = xs.mean(dim=dims, keepdim=True)
    inv = torch.rsqrt(((xs - mean) ** 2).mean(dim=dims, keepdim=True) + eps)
    y = ((xs - mean) * inv).to(x.dtype) * scale
    if bias is not None:
        y = y + bias
    return [y, mean, inv]


@op("RMSNormalization")
def rms_norm(args, a, ctx):
    x, scale = args[0], args[1]
    axis = a.get("axis", -1) % x.dim()
    xs = _stash(x, a)
    dims = tuple(range(axis, x.dim()))
    inv = torch.rsqrt((xs * xs).mean(dim=dims, keepdim=True) + a.get("epsilon", 1e-5))
    return (xs * inv).to(x.dtype) * scale


@op("GroupNormalization")
def group_norm(args, a, ctx):
    x, scale, bias = args
    g = a["num_groups"]
    c = x.shape[1]
    if scale.numel() == g and g != c:  # opset 18: one scale and bias per group
        scale, bias = scale.repeat_interleave(c // g), bias.repeat_interleave(c // g)
    xs = _stash(x, a).reshape(x.shape[0], g, -1)
    mean = xs.mean(dim=-1, keepdim=True)
    var = ((xs - mean) ** 2).mean(dim=-1, keepdim=True)
    y = ((xs - mean) / torch.sqrt(var + a.get("epsilon", 1e-5))).reshape(x.shape).to(x.dtype)
    return y * _channel(scale, x) + _channel(bias, x)


@op("LpNormalization")
def lp_norm(args, a, ctx):
    x = args[0]
    norm = x.norm(p=a.get("p", 2), dim=a.get("axis", -1), keepdim=True)
    return torch.where(norm == 0, torch.zeros_like(x), x / norm)


@op("LRN")
def lrn(args, a, ctx):
    x = args[0]
    size = a["size"]
    sq = F.pad((x * x).unsqueeze(1), (0, 0) * (x.dim() - 2) + ((size - 1) // 2, size - 1 - (size - 1) // 2))
    # sum over a channel window: pad the channel axis, then unfold it
    win = sq.squeeze(1).unfold(1, size, 1).sum(dim=-1)
    return x / (a.get("bias", 1.0) + a.get("alpha", 1e-4) / size * win) ** a.get("beta", 0.75)


@op("MeanVarianceNormalization")
def mean_variance_norm(args, a, ctx):
    x = args[0]
    dims = tuple(a.get("axes", [0, 2, 3]))
    mean = x.mean(dim=dims, keepdim=True)
    var = (x * x).mean(dim=dims, keepdim=True) - mean * mean
    return (x - mean) / (torch.sqrt(var) + 1e-9)


# -- softmax family ------------------------------------------------------------------------------
def _softmax_like(fn):
    def run(args, a, ctx):
        x = args[0]
        if ctx.opset >= 13:
            return fn(x, a.get("axis", -1) % max(x.dim(), 1))
        axis = a.get("axis", 1) % max(x.dim(), 1)  # older opsets: flatten to 2-D at axis
        flat = x.reshape(math.prod(x.shape[:axis]), -1)
        return fn(flat, 1).reshape(x.shape)
    return run


def _hardmax(x, dim):
    return F.one_hot(x.argmax(dim=dim), x.shape[dim]).movedim(-1, dim).to(x.dtype)


OPS["Softmax"] = _softmax_like(lambda x, d: torch.softmax(x, d))
OPS["LogSoftmax"] = _softmax_like(lambda x, d: torch.log_softmax(x, d))
OPS["Hardmax"] = _softmax_like(_hardmax)


# -- losses --------------------------------------------------------------------------------------
def _nll(log_prob, target, weight, a):
    ignore = a.get("ignore_index")
    kw = {"ignore_index": ignore} if ignore is not None else {}
    return F.nll_loss(log_prob, target.to(torch.int64), weight,
                      reduction=a.get("reduction", "mean"), **kw)


@op("NegativeLogLikelihoodLoss")
def nll_loss(args, a, ctx):
    return _nll(args[0], args[1], arg(args, 2), a)


@op("SoftmaxCrossEntropyLoss")
def softmax_cross_entropy(args, a, ctx):
    log_prob = torch.log_softmax(args[0], dim=1)
    return [_nll(log_prob, args[1], arg(args, 2), a), log_prob]


@op("CausalConvWithState")
def causal_conv_with_state(args, a, ctx):
    """Depthwise causal conv1d over [past state, input]; the last k-1 steps are the new state."""
    x, w, b, past = args[0], args[1], arg(args, 2), arg(args, 3)
    k = w.shape[2]
    if past is None:
        past = torch.zeros(x.shape[0], x.shape[1], k - 1, dtype=x.dtype)
    padded = torch.cat([past, x], dim=2)
    y = F.conv1d(padded, w, b, groups=x.shape[1])
    if a.get("activation", "none") in ("silu", "swish"):
        y = (y.float() * torch.sigmoid(y.float())).to(x.dtype)
    return [y, padded[:, :, padded.shape[2] - (k - 1):]]


@op("DeformConv")
def deform_conv(args, a, ctx):
    """Each kernel tap samples the input bilinearly at its offset position (zero outside), times
    the mask; the taps then meet the weights as an ordinary grouped convolution."""
    x, w, offset = args[0], args[1], args[2]
    bias, mask = arg(args, 3), arg(args, 4)
    if x.dim() != 4:
        raise ctx.unsupported(f"{x.dim() - 2}-d deformable convolution")
    n, c, h, wd = x.shape
    kh, kw = list(a.get("kernel_shape", w.shape[2:]))
    sh, sw = list(a.get("strides", [1, 1]))
    dh, dw = list(a.get("dilations", [1, 1]))
    pt, pl = list(a.get("pads", [0, 0, 0, 0]))[:2]
    groups, off_groups = a.get("group", 1), a.get("offset_group", 1)
    oh, ow = offset.shape[2], offset.shape[3]
    taps = kh * kw
    off = offset.reshape(n, off_groups, taps, 2, oh, ow)
    msk = mask.reshape(n, off_groups, taps, oh, ow) if mask is not None else None
    # one zero cell around the input keeps grid_sample's normalisation defined for 1-pixel sides
    xp = F.pad(x, (1, 1, 1, 1)).reshape(n * off_groups, c // off_groups, h + 2, wd + 2)
    base_y = (torch.arange(oh) * sh - pt)[:, None].to(x.dtype)
    base_x = (torch.arange(ow) * sw - pl)[None, :].to(x.dtype)
    cols = []
    for t in range(taps):
        i, j = divmod(t, kw)
        y = base_y + i * dh + off[:, :, t, 0] + 1
        xx = base_x + j * dw + off[:, :, t, 1] + 1
        grid = torch.stack([2 * xx / (wd + 1) - 1, 2 * y / (h + 1) - 1], dim=-1)
        sampled = F.grid_sample(xp, grid.reshape(n * off_groups, oh, ow, 2), mode="bilinear",
                                padding_mode="zeros", align_corners=True)
        sampled = sampled.reshape(n, off_groups, c // off_groups, oh, ow)
        if msk is not None:
            sampled = sampled * msk[:, :, t, None]
        cols.append(sampled.reshape(n, c, oh, ow))
    cols = torch.stack(cols, dim=2).reshape(n, groups, (c // groups) * taps, oh * ow)
    wg = w.reshape(groups, w.shape[0] // groups, -1)
    y = torch.einsum("gok,ngkp->ngop", wg, cols).reshape(n, w.shape[0], oh, ow)
    return y if bias is None else y + bias.reshape(1, -1, 1, 1)
