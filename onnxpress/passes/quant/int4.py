"""quant_int4: block-wise weight-only int4 for MatMul/Gemm (activations stay float).

    before:  y = MatMul(x, W fp32 [K, N])
    target ort:   y = com.microsoft.MatMulNBits(x, W uint4 packed [N, K/bs, bs/2], scales, zp)
    other targets: y = MatMul(x, DequantizeLinear(W int4, scale [K/bs, N], axis=0, block_size=bs))
                   (opset 21; the model's opset is raised when lower)

Each block of `block_size` consecutive weights along K has its own scale (and zero point when
asymmetric). Embedding tables become int8 with per-row scales.
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
)
from onnxpress.passes.quant.dynamic import matmul_weight
from onnxpress.passes.registry import Range, register
from onnxpress.stats import iter_graphs


def quantize_blocks(w: np.ndarray, block_size: int, symmetric: bool
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w [K, N] -> (q uint4 values 0..15 [Kp, N], scale [nb, N], zero point [nb, N] 0..15),
    K padded with zeros to a multiple of block_size."""
    k, n = w.shape
    nb = -(-k // block_size)
    wp = np.zeros((nb * block_size, n), np.float32)
    wp[:k] = w
    blocks = wp.reshape(nb, block_size, n)
    if symmetric:
        m = np.abs(blocks).max(axis=1)
        scale = np.where(m > 0, m / 7.0, 1.0).astype(np.float32)
        zp = np.full((nb, n), 8, np.int32)
    else:
        lo = np.minimum(blocks.min(axis=1), 0.0)
        hi = np.maximum(blocks.max(axis=1), 0.0)
        scale = np.where(hi > lo, (hi - lo) / 15.0, 1.0).astype(np.float32)
        zp = np.clip(np.round(-lo / scale), 0, 15).astype(np.int32)
    q = np.clip(np.round(blocks / scale[:, None, :]) + zp[:, None, :], 0, 15).astype(np.uint8)
    return q.reshape(nb * block_size, n), scale, zp.astype(np.uint8)


def _pack_nibbles(values: np.ndarray) -> np.ndarray:
    """Pairs of 4-bit values, low nibble first, along the last axis (padded to even)."""
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros(values.shape[:-1] + (1,), values.dtype)], -1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def matmul_nbits_node(x: str, out: str, w: np.ndarray, *, block_size: int, symmetric: bool,
                      accuracy_level: int, names: Names, base: str, bias: np.ndarray | None
                      ) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    k, n = w.shape
    q, scale, zp = quantize_blocks(w, block_size, symmetric)
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
                  names: Names, base: str, bias: np.ndarray | None
                  ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    k, n = w.shape
    q, scale, zp = quantize_blocks(w, block_size, symmetric)
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


def int4_quantize(model: onnx.ModelProto, *, block_size: int = 32, symmetric: bool = False,
                  use_nbits: bool = True, accuracy_level: int = 0, embeddings: bool = True,
                  min_weight: int = 1024, exclude_nodes: list[str] | None = None,
                  names_filter=None) -> tuple[onnx.ModelProto, dict]:
    raised = False
    if not use_nbits:
        model, raised = ensure_opset(model, 21)
    lifted = constants_to_initializers(model.graph)
    names = Names(model)
    exclude = set(exclude_nodes or ())
    count = 0
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
            if use_nbits:
                node, new_inits = matmul_nbits_node(
                    n.input[0], n.output[0], w, block_size=block_size, symmetric=symmetric,
                    accuracy_level=accuracy_level, names=names, base=base, bias=bias)
                rebuilt.append(node)
            else:
                nodes, new_inits = dq_int4_nodes(n.input[0], n.output[0], w,
                                                 block_size=block_size, symmetric=symmetric,
                                                 names=names, base=base, bias=bias)
                rebuilt.extend(nodes)
            g.initializer.extend(new_inits)
            count += 1
            changed = True
        if changed:
            replace_graph_nodes(model, g, rebuilt, g_inputs)
    if use_nbits and count:
        set_opset(model, "com.microsoft", 1)
    tables = quantize_gather_tables(model, names) if embeddings else 0
    return model, {"matmuls_int4": count, "embedding_tables_int8": tables,
                   "constants_lifted": lifted, "opset_raised": raised,
                   "format": "MatMulNBits" if use_nbits else "DequantizeLinear(int4, block_size)"}


@register("quant_int4", lossy=True, uses=("calib",))
def quant_int4(model: onnx.ModelProto, ctx: PassContext, *,
               block_size: Literal[16, 32, 64, 128, 256] = 32,
               symmetric: bool = False,
               format: Literal["auto", "nbits", "qdq"] = "auto",
               accuracy_level: Annotated[int, Range(0, 4)] = 0,
               embeddings: bool = True,
               min_weight: Annotated[int, Range(0)] = 1024,
               exclude_nodes: list[str] | None = None) -> onnx.ModelProto:
    """Block-wise weight-only int4 for MatMul/Gemm (MatMulNBits on onnxruntime, else int4 DQ).

    before: y = MatMul(x, W fp32 [K, N])
    after:  y = MatMulNBits(x, W 4-bit, one scale (+ zero point) per block_size weights along K)
    format=auto picks com.microsoft MatMulNBits when ctx.target is "ort", else the standard
    DequantizeLinear(int4, block_size) of opset 21. accuracy_level 4 lets onnxruntime compute with
    int8 activations (faster, slightly less exact).
    """
    original = onnx.ModelProto()
    original.CopyFrom(model)
    use_nbits = format == "nbits" or (format == "auto" and ctx.for_onnxruntime)
    out, figures = int4_quantize(model, block_size=block_size, symmetric=symmetric,
                                 use_nbits=use_nbits, accuracy_level=accuracy_level,
                                 embeddings=embeddings, min_weight=min_weight,
                                 exclude_nodes=exclude_nodes)
    copy_model_fields(original, out)
    if ctx.calib is not None:
        from onnxpress.passes.quant.qdq import output_error

        figures.update(output_error(original, out, ctx.require_calib(original)))
    ctx.record(**figures)
    return out
