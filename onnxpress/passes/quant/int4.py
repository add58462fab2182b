"""quant_int4: block-wise int4 weights for MatMul/Gemm (activations float, or int8 with format=int8_kernels).

    before:  y = MatMul(x, W fp32 [K, N])
    target ort:   y = com.microsoft.MatMulNBits(x, W uint4 packed [N, K/bs, bs/2], scales, zp)
    other targets: y = MatMul(x, DequantizeLinear(W int4, scale [K/bs, N], axis=0, block_size=bs))
                   (opset 21; the model's opset is raised when lower)
    int8_kernels:  W8 = Cast(W int4) * multiple per block (constants, folded when loaded)
                   y = DynamicQuantizeLinear(x) -> MatMulInteger(., W8) * scales

Each block of `block_size` consecutive weights along K has its own scale (and zero point when
asymmetric). Embedding tables become int8 with per-row scales.

    method=rtn    each weight rounded to nearest
    method=gptq   rows of W rounded in order, each error fed forward through the inverse Hessian
                  of the layer's calibration inputs (gptq.py)
    accuracy_level=auto   MatMulNBits' 0 (fp32 compute) or 4 (int8 activations), whichever runs
                  faster on this machine's onnxruntime
    int8_above=d  layers whose int4 form alone costs the outputs more than d of min cosine
                  (quant_auto's sensitivity) become dynamic int8 instead
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxpress.passes.context import PassContext
from onnxpress.passes.graph import copy_model_fields
from onnxpress.passes.quant.common import (
    Names,
    constants_to_initializers,
    ensure_opset,
    quantize_gather_tables,
    replace_graph_nodes,
    set_opset,
    warn_convs_left_float,
)
from onnxpress.passes.quant.dynamic import dynamic_quantize, matmul_weight
from onnxpress.passes.registry import Range, register
from onnxpress.stats import iter_graphs


def block_qparams(blocks: np.ndarray, symmetric: bool, grid: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """blocks [nb, block_size, N] -> (scale [nb, N], zero point [nb, N] 0..15) of 4-bit values.
    With a per-column `grid` [N] (format=int8_kernels): symmetric, and each scale the smallest
    multiple 1..16 of its column's grid step that holds the block, so that every weight is an
    int8 (multiple x value in -8..7) times the column's one scale."""
    if grid is not None:
        need = np.abs(blocks).max(axis=1) / 7.0 / grid
        mult = np.clip(np.ceil(need - 1e-6), 1, 16)
        return (mult * grid).astype(np.float32), np.full(mult.shape, 8, np.uint8)
    if symmetric:
        m = np.abs(blocks).max(axis=1)
        scale = np.where(m > 0, m / 7.0, 1.0).astype(np.float32)
        return scale, np.full(scale.shape, 8, np.uint8)
    lo = np.minimum(blocks.min(axis=1), 0.0)
    hi = np.maximum(blocks.max(axis=1), 0.0)
    scale = np.where(hi > lo, (hi - lo) / 15.0, 1.0).astype(np.float32)
    return scale, np.clip(np.round(-lo / scale), 0, 15).astype(np.uint8)


def quantize_blocks(w: np.ndarray, block_size: int, symmetric: bool,
                    grid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w [K, N] -> (q uint4 values 0..15 [Kp, N], scale [nb, N], zero point [nb, N] 0..15),
    K padded with zeros to a multiple of block_size (round-to-nearest)."""
    k, n = w.shape
    nb = -(-k // block_size)
    wp = np.zeros((nb * block_size, n), np.float32)
    wp[:k] = w
    blocks = wp.reshape(nb, block_size, n)
    scale, zp = block_qparams(blocks, symmetric, grid)
    q = np.clip(np.round(blocks / scale[:, None, :]) + zp[:, None, :], 0, 15).astype(np.uint8)
    return q.reshape(nb * block_size, n), scale, zp


def _pack_nibbles(values: np.ndarray) -> np.ndarray:
    """Pairs of 4-bit values, low nibble first, along the last axis (padded to even)."""
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros(values.shape[:-1] + (1,), values.dtype)], -1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def matmul_nbits_node(x: str, out: str, w: np.ndarray, *, block_size: int, symmetric: bool,
                      accuracy_level: int, names: Names, base: str, bias: np.ndarray | None,
                      quantized: tuple | None = None
                      ) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    k, n = w.shape
    q, scale, zp = quantized or quantize_blocks(w, block_size, symmetric)
    nb = scale.shape[0]
    packed = _pack_nibbles(q.T.reshape(n, nb, block_size))          # [N, nb, bs/2]
    bn, sn = names(base + "_B_int4"), names(base + "_scales")
    inits = [numpy_helper.from_array(packed, bn),
             numpy_helper.from_array(scale.T.reshape(-1).astype(np.float32), sn)]
    inputs = [x, bn, sn]
    if not symmetric:
        zn = names(base + "_zero_points")
        inits.append(numpy_helper.from_array(_pack_nibbles(zp.T).reshape(-1), zn))
        inputs.append(zn)
    if bias is not None:
        while len(inputs) < 5:
            inputs.append("")                                    # g_idx unused
        bname = names(base + "_bias")
        inits.append(numpy_helper.from_array(bias.astype(np.float32), bname))
        inputs.append(bname)
    node = helper.make_node("MatMulNBits", inputs, [out], domain="com.microsoft",
                            name=names(base + "_MatMulNBits"), K=k, N=n, bits=4,
                            block_size=block_size, accuracy_level=accuracy_level)
    return node, inits


def dq_int4_nodes(x: str, out: str, w: np.ndarray, *, block_size: int, symmetric: bool,
                  names: Names, base: str, bias: np.ndarray | None, quantized: tuple | None = None
                  ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    k, n = w.shape
    q, scale, zp = quantized or quantize_blocks(w, block_size, symmetric)
    q, zp = q[:k].astype(np.int32) - 8, zp.astype(np.int32) - 8     # signed int4
    qn, sn, zn = names(base + "_W_int4"), names(base + "_scale"), names(base + "_zero_point")
    wf = names(base + "_W")
    inits = [helper.make_tensor(qn, onnx.TensorProto.INT4, [k, n], q.reshape(-1).tolist()),
             numpy_helper.from_array(scale, sn),
             helper.make_tensor(zn, onnx.TensorProto.INT4, list(zp.shape), zp.reshape(-1).tolist())]
    y = out if bias is None else names(base + "_nobias")
    nodes = [helper.make_node("DequantizeLinear", [qn, sn, zn], [wf], axis=0,
                              block_size=block_size, name=names(base + "_DequantizeLinear")),
             helper.make_node("MatMul", [x, wf], [y], name=names(base + "_MatMul"))]
    if bias is not None:
        bn = names(base + "_bias")
        inits.append(numpy_helper.from_array(bias.astype(np.float32), bn))
        nodes.append(helper.make_node("Add", [y, bn], [out], name=names(base + "_Add")))
    return nodes, inits


def column_grid(w: np.ndarray, block_size: int) -> np.ndarray:
    """Per-column step [N] for format=int8_kernels: the largest block scale of the column / 16."""
    k, n = w.shape
    nb = -(-k // block_size)
    wp = np.zeros((nb * block_size, n), np.float32)
    wp[:k] = w
    top = np.abs(wp.reshape(nb, block_size, n)).max(axis=(0, 1)) / 7.0 / 16.0
    return np.where(top > 0, top, 1.0).astype(np.float32)


def _int4_tensor(name: str, values: np.ndarray, *, signed: bool) -> onnx.TensorProto:
    """An INT4/UINT4 initializer, two values a byte (low nibble first), stored raw."""
    packed = _pack_nibbles((values.reshape(-1).astype(np.int16) & 0x0F).astype(np.uint8))
    return helper.make_tensor(name, onnx.TensorProto.INT4 if signed else onnx.TensorProto.UINT4,
                              list(values.shape), packed.tobytes(), raw=True)


def int8_kernel_nodes(x: str, out: str, w: np.ndarray, *, block_size: int, names: Names,
                      base: str, bias: np.ndarray | None, quantized: tuple | None = None
                      ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """W stored as 4-bit values with a 4-bit multiple per block; constant nodes make the int8
    weight W8 = value x multiple (onnxruntime folds them when the session loads), then the
    dynamic int8 chain runs on W8 (onnxruntime's DynamicQuantizeMatMul)."""
    from onnxpress.passes.quant.dynamic import dynamic_matmul_nodes

    k, n = w.shape
    grid = column_grid(w, block_size)
    q, scale, _ = quantized or quantize_blocks(w, block_size, True, grid)
    nb = scale.shape[0]
    mult = np.rint(scale / grid).astype(np.int32)                    # 1..16
    qn, mn, gn = names(base + "_W_int4"), names(base + "_block_multiple"), names(base + "_scale")
    zn, one, shape = names(base + "_zero_point"), names(base + "_one"), names(base + "_shape")
    inits = [_int4_tensor(qn, q.reshape(nb, block_size, n).astype(np.int32) - 8, signed=True),
             _int4_tensor(mn, (mult - 1).reshape(nb, 1, n), signed=False),
             numpy_helper.from_array(grid, gn), numpy_helper.from_array(np.zeros(n, np.int8), zn),
             numpy_helper.from_array(np.array(1, np.int32), one),
             numpy_helper.from_array(np.array([nb * block_size, n], np.int64), shape)]
    qi, mi, m1 = names(base + "_values"), names(base + "_multiple_m1"), names(base + "_multiple")
    prod, flat, w8 = names(base + "_product"), names(base + "_flat"), names(base + "_W_int8")
    nodes = [helper.make_node("Cast", [qn], [qi], to=onnx.TensorProto.INT32, name=names(base + "_CastValues")),
             helper.make_node("Cast", [mn], [mi], to=onnx.TensorProto.INT32, name=names(base + "_CastMultiple")),
             helper.make_node("Add", [mi, one], [m1], name=names(base + "_MultipleAdd")),
             helper.make_node("Mul", [qi, m1], [prod], name=names(base + "_MultipleMul")),
             helper.make_node("Reshape", [prod, shape], [flat], name=names(base + "_Reshape"))]
    if nb * block_size != k:
        starts, ends = names(base + "_starts"), names(base + "_ends")
        inits += [numpy_helper.from_array(np.array([0], np.int64), starts),
                  numpy_helper.from_array(np.array([k], np.int64), ends)]
        cut = names(base + "_rows")
        nodes.append(helper.make_node("Slice", [flat, starts, ends], [cut], name=names(base + "_Slice")))
        flat = cut
    nodes.append(helper.make_node("Cast", [flat], [w8], to=onnx.TensorProto.INT8, name=names(base + "_CastInt8")))
    bn = None
    if bias is not None:
        bn = names(base + "_bias")
        inits.append(numpy_helper.from_array(bias.astype(np.float32), bn))
    nodes += dynamic_matmul_nodes(x, out, w8, gn, zn, bn, names=names, base=base)
    return nodes, inits


def int4_quantize(model: onnx.ModelProto, *, block_size: int = 32, symmetric: bool = False,
                  use_nbits: bool = True, accuracy_level: int = 0, embeddings: bool = True,
                  min_weight: int = 1024, exclude_nodes: list[str] | None = None,
                  names_filter=None, hessians: dict[str, np.ndarray] | None = None,
                  damp: float = 0.01, int8_kernels: bool = False) -> tuple[onnx.ModelProto, dict]:
    """Every MatMul/Gemm with a constant weight of at least min_weight elements to int4; with
    `hessians` ({input tensor: H}) the weights of layers whose input has one are placed by GPTQ,
    the others round to nearest."""
    from onnxpress.passes.quant.gptq import gptq_quantize_blocks

    raised = False
    use_nbits = use_nbits and not int8_kernels
    if not use_nbits:
        model, raised = ensure_opset(model, 21)
    lifted = constants_to_initializers(model.graph)
    names = Names(model)
    exclude = set(exclude_nodes or ())
    count = gptq = 0
    for g in iter_graphs(model.graph):
        g_inputs = {i.name for i in g.input}
        inits = {t.name: t for t in g.initializer if t.name not in g_inputs}
        rebuilt: list[onnx.NodeProto] = []
        changed = False
        for n in g.node:
            wb = matmul_weight(n, inits) if n.op_type in ("MatMul", "Gemm") else None
            if (wb is None or n.name in exclude or wb[0].size < min_weight
                    or (names_filter is not None and not names_filter(n))):
                rebuilt.append(n)
                continue
            w, bias = wb
            base = n.name or n.output[0]
            h = (hessians or {}).get(n.input[0]) if g is model.graph else None
            quantized = None
            if h is not None and h.shape[0] == w.shape[0]:
                grid = column_grid(w, block_size) if int8_kernels else None
                quantized = gptq_quantize_blocks(w, h, block_size, symmetric or int8_kernels,
                                                 damp, grid)
                gptq += quantized is not None
            if int8_kernels:
                nodes, new_inits = int8_kernel_nodes(n.input[0], n.output[0], w,
                                                     block_size=block_size, names=names,
                                                     base=base, bias=bias, quantized=quantized)
                rebuilt.extend(nodes)
            elif use_nbits:
                node, new_inits = matmul_nbits_node(
                    n.input[0], n.output[0], w, block_size=block_size, symmetric=symmetric,
                    accuracy_level=accuracy_level, names=names, base=base, bias=bias,
                    quantized=quantized)
                rebuilt.append(node)
            else:
                nodes, new_inits = dq_int4_nodes(n.input[0], n.output[0], w,
                                                 block_size=block_size, symmetric=symmetric,
                                                 names=names, base=base, bias=bias,
                                                 quantized=quantized)
                rebuilt.extend(nodes)
            g.initializer.extend(new_inits)
            count += 1
            changed = True
        if changed:
            replace_graph_nodes(model, g, rebuilt, g_inputs)
    if use_nbits and count:
        set_opset(model, "com.microsoft", 1)
    tables = quantize_gather_tables(model, names) if embeddings else 0
    return model, {"matmuls_int4": count, "matmuls_gptq": gptq,
                   "embedding_tables_int8": tables,
                   "constants_lifted": lifted, "opset_raised": raised,
                   "format": "int4 weights on int8 kernels (DynamicQuantizeMatMul)"
                   if int8_kernels else "MatMulNBits" if use_nbits
                   else "DequantizeLinear(int4, block_size)"}


def one_sample(batch: dict[str, np.ndarray], model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The first sample of a calibration batch (batch 1, as served), unless the batch dim is fixed."""
    from onnxpress.data import graph_input_specs

    specs = graph_input_specs(model)
    out = {}
    for name, value in batch.items():
        dims = specs.get(name, (None, []))[1]
        fixed = bool(dims) and isinstance(dims[0], int)
        out[name] = value if fixed or np.ndim(value) == 0 else value[:1]
    return out


def set_accuracy_level(model: onnx.ModelProto, level: int) -> None:
    for g in iter_graphs(model.graph):
        for n in g.node:
            if n.op_type == "MatMulNBits" and n.domain == "com.microsoft":
                for a in n.attribute:
                    if a.name == "accuracy_level":
                        a.i = level


def choose_accuracy_level(model: onnx.ModelProto, ctx: PassContext, asked: str
                          ) -> tuple[int, str, dict]:
    """MatMulNBits' accuracy_level: the one asked, else the faster of 0 (fp32 compute) and 4
    (int8 activations) on this machine's onnxruntime, timed on one calibration sample; with
    no calibration data (or for another target) a rule: 4 where the CPU multiplies int8 in one
    instruction (VNNI, Arm), 0 on x86 without VNNI, where onnxruntime's int8 path measured
    slower than fp32 (AVX2 EPYC, onnxruntime 1.32: 0.79x on MiniLM at sequence 128)."""
    if asked != "auto":
        return int(asked), "given", {}
    if not ctx.for_onnxruntime or ctx.calib is None:
        from onnxpress.passes.quant.qdq import _host_is_x86_without_vnni

        level = 0 if _host_is_x86_without_vnni() else 4
        why = "x86 without VNNI" if level == 0 else "VNNI or Arm int8 dot products"
        return level, f"rule: {why} (no calibration sample to time)", {}
    from onnxpress.passes.quant.latency import relative_costs

    feeds = one_sample(next(iter(ctx.require_calib(model))), model)
    candidates = {}
    for level in (0, 4):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        set_accuracy_level(m, level)
        candidates[level] = m
    costs, base = relative_costs(list(candidates.values()), feeds)
    # int8 compute must pay on both clocks (CPU time at 1 thread and wall at 2) to be chosen
    level = 4 if costs[1] < 0.97 else 0
    timing = {"accuracy_level_cost_vs_0": {4: round(costs[1], 3)},
              "accuracy_level_0_ms": {"cpu_1t": round(base[0], 2), "wall_2t": round(base[1], 2)}}
    return level, "measured on this machine (onnxruntime, one calibration sample)", timing


def int4_sensitive_layers(model: onnx.ModelProto, ctx: PassContext, *, threshold: float,
                          block_size: int, int4_options: dict, max_batches: int = 4
                          ) -> tuple[set[str], dict[str, float]]:
    """Layers whose int4 form alone costs the model's outputs more than `threshold` in min
    cosine on calibration data (quant_auto's per-layer sensitivity)."""
    import itertools

    from onnxpress.passes.quant.auto import Scorer, layer_sensitivity

    batches = list(itertools.islice(ctx.require_calib(model), max_batches))
    _, table = layer_sensitivity(model, ctx, precisions=["int4"],
                                 scorer=Scorer(model, batches, "cosine", None), int8_options={},
                                 int4_options=dict(block_size=block_size, **int4_options))
    drops = {key: round(row["int4"], 5) for key, row in table.items() if "int4" in row}
    return {key for key, d in drops.items() if d > threshold}, drops


@register("quant_int4", lossy=True, uses=("calib",))
def quant_int4(model: onnx.ModelProto, ctx: PassContext, *,
               block_size: Literal[16, 32, 64, 128, 256] = 32,
               symmetric: bool = False,
               format: Literal["auto", "nbits", "qdq", "int8_kernels"] = "auto",
               method: Literal["rtn", "gptq"] = "rtn",
               awq: bool = False,
               accuracy_level: Literal["auto", "0", "1", "2", "3", "4"] = "auto",
               damp: Annotated[float, Range(0, 1, lo_inclusive=False)] = 0.01,
               int8_above: Annotated[float, Range(0, 1, lo_inclusive=False)] | None = None,
               embeddings: bool = True,
               min_weight: Annotated[int, Range(0)] = 1024,
               exclude_nodes: list[str] | None = None) -> onnx.ModelProto:
    """Block-wise weight-only int4 for MatMul/Gemm (MatMulNBits on onnxruntime, else int4 DQ).

    before: y = MatMul(x, W fp32 [K, N])
    after:  y = MatMulNBits(x, W 4-bit, one scale (+ zero point) per block_size weights along K)
    format=auto picks com.microsoft MatMulNBits when ctx.target is "ort", else the standard
    DequantizeLinear(int4, block_size) of opset 21. format=int8_kernels keeps 4-bit weights in
    the file (symmetric, block scales multiples 1..16 of a column scale), multiplied out to int8
    by constant nodes onnxruntime folds at load, and runs them on its dynamic int8 kernel (on
    x86 without VNNI MatMulNBits is no faster than fp32 beyond a few rows; that kernel is).
    method=rtn rounds each weight to nearest; method=gptq (needs calibration data) quantizes
    the rows of W in order and feeds each rounding error forward through the inverse Hessian
    of the layer's input (damped by damp * its mean diagonal), so the layer's output on the
    calibration inputs stays closest to fp32.
    awq=true (needs calibration data; with either method): AWQ-style scaling first. Each
    activation channel j read by int4 layers is divided by s_j = mean|x_j|^alpha and the
    weights' row j multiplied by it (exact in float; 1/s goes into the LayerNorm before, or a
    Mul), alpha searched per tensor on calibration rows against the int4 simulation, so the
    channels with the largest activations get the finest 4-bit steps.
    accuracy_level (MatMulNBits): 4 computes with int8 activations, 0 in fp32; auto times both
    on one calibration sample on this machine and keeps the faster (a CPU rule without data).
    int8_above: layers whose int4 form alone lowers the outputs' min cosine on calibration data
    by more than this become dynamic int8 instead (quant_auto's per-layer sensitivity).
    """
    from onnxpress.passes.quant.latency import node_key

    original = onnx.ModelProto()
    original.CopyFrom(model)
    use_nbits = format == "nbits" or (format == "auto" and ctx.for_onnxruntime)
    int8_kernels = format == "int8_kernels"
    extra: dict = {"method": method}
    int8: set[str] = set()
    if int8_above is not None:
        int8, drops = int4_sensitive_layers(
            original, ctx, threshold=int8_above, block_size=block_size,
            int4_options=dict(use_nbits=use_nbits, int8_kernels=int8_kernels))
        extra.update(int4_sensitivity=drops, int8_layers=sorted(int8))
    if awq:
        from onnxpress.passes.quant.smooth import smooth_model

        ctx.require_calib(original)
        excluded = set(exclude_nodes or ())
        model, f_awq = smooth_model(
            model, ctx, "auto", method="awq", block_size=block_size, symmetric=symmetric,
            layer_filter=lambda n: node_key(n) not in int8 and n.name not in excluded)
        extra.update(awq_groups=f_awq["smooth_groups"], awq_layers=f_awq["smooth_layers"],
                     awq_groups_searched=f_awq.get("smooth_groups_searched", 0),
                     awq_alphas=f_awq.get("smooth_alphas", {}),
                     awq_error_reduction=f_awq.get("smooth_error_reduction"),
                     awq_mul_inserted=f_awq["smooth_mul_inserted"])
    hessians = None
    if method == "gptq":
        from onnxpress.passes.quant.gptq import input_hessians

        inits = {t.name: t for t in model.graph.initializer}
        hessians = input_hessians(model, ctx, [
            n.input[0] for n in model.graph.node if n.op_type in ("MatMul", "Gemm")
            and n.input[0] not in inits and matmul_weight(n, inits) is not None])
    out, figures = int4_quantize(model, block_size=block_size, symmetric=symmetric,
                                 use_nbits=use_nbits, accuracy_level=0,
                                 embeddings=embeddings, min_weight=min_weight,
                                 exclude_nodes=exclude_nodes, hessians=hessians, damp=damp,
                                 int8_kernels=int8_kernels,
                                 names_filter=(lambda n: node_key(n) not in int8) if int8 else None)
    if int8:
        out, f8 = dynamic_quantize(out, embeddings=False, min_weight=min_weight,
                                   names_filter=lambda n: node_key(n) in int8)
        extra["matmuls_int8"] = f8["matmuls_quantized"]
    if use_nbits and not int8_kernels and figures["matmuls_int4"]:
        level, how, timing = choose_accuracy_level(out, ctx, accuracy_level)
        set_accuracy_level(out, level)
        extra.update(accuracy_level=level, accuracy_level_chosen_by=how, **timing)
    else:
        extra.update(accuracy_level=None, accuracy_level_chosen_by="no MatMulNBits")
    if method == "gptq":            # layers in subgraphs, or whose Hessian would not factor
        extra["matmuls_rtn_fallback"] = figures["matmuls_int4"] - figures["matmuls_gptq"]
    copy_model_fields(original, out)
    figures.update(extra)
    if ctx.calib is not None:
        from onnxpress.passes.quant.qdq import output_error

        figures.update(output_error(original, out, ctx.require_calib(original)))
    warn_convs_left_float("quant_int4", out, figures, min_weight,
                          figures["matmuls_int4"] + figures.get("matmuls_int8", 0))
    ctx.record(**figures)
    return out
