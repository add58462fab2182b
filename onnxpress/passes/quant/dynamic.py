"""quant_dynamic: int8 weights, activations quantized at run time (no calibration needed).

    before:  y = MatMul(x, W fp32) [+ b]
    after:   xq, xs, xz = DynamicQuantizeLinear(x)
             y = Cast(MatMulInteger(xq, W int8 per-column, xz, 0), float) * (xs * w_scale) [+ b]

Standard ONNX ops only; onnxruntime fuses the chain into DynamicQuantizeMatMul (one kernel).
Gemm becomes MatMul (+ Add) first. Embedding tables become int8 with per-row scales.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxpress.passes.context import PassContext
from onnxpress.passes.graph import copy_model_fields
from onnxpress.passes.quant.common import (
    FLOAT,
    Names,
    constants_to_initializers,
    ensure_opset,
    quantize_gather_tables,
    quantize_weight,
    replace_graph_nodes,
    warn_convs_left_float,
)
from onnxpress.passes.registry import Range, register
from onnxpress.stats import iter_graphs


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def matmul_weight(node: onnx.NodeProto, inits: dict) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(W [K, N], bias or None) of a MatMul/Gemm with a constant 2-D weight, else None."""
    if node.op_type == "MatMul":
        t = inits.get(node.input[1])
        if t is None or t.data_type != FLOAT or len(t.dims) != 2:
            return None
        return numpy_helper.to_array(t), None
    if node.op_type == "Gemm":
        if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0 \
                or _attr(node, "beta", 1.0) != 1.0:
            return None
        t = inits.get(node.input[1])
        if t is None or t.data_type != FLOAT or len(t.dims) != 2:
            return None
        w = numpy_helper.to_array(t)
        if _attr(node, "transB", 0):
            w = w.T
        bias = None
        if len(node.input) > 2 and node.input[2]:
            b = inits.get(node.input[2])
            if b is None:
                return None
            bias = numpy_helper.to_array(b)
        return np.ascontiguousarray(w), bias
    return None


def dynamic_matmul_nodes(x: str, out: str, w_int8: str, w_scale: str, w_zero_point: str,
                         bias: str | None, *, names: Names, base: str) -> list[onnx.NodeProto]:
    """out = x @ dequant(W int8) [+ bias], x quantized to uint8 at run time: the chain
    onnxruntime fuses into one DynamicQuantizeMatMul."""
    xq, xs, xz = names(x + "_quantized"), names(x + "_scale"), names(x + "_zero_point")
    mm, mf, sc = names(base + "_int32"), names(base + "_float"), names(base + "_scale")
    y = out if bias is None else names(base + "_nobias")
    nodes = [
        helper.make_node("DynamicQuantizeLinear", [x], [xq, xs, xz],
                         name=names(base + "_DynamicQuantizeLinear")),
        helper.make_node("MatMulInteger", [xq, w_int8, xz, w_zero_point], [mm],
                         name=names(base + "_MatMulInteger")),
        helper.make_node("Cast", [mm], [mf], to=FLOAT, name=names(base + "_Cast")),
        helper.make_node("Mul", [xs, w_scale], [sc], name=names(base + "_ScaleMul")),
        helper.make_node("Mul", [mf, sc], [y], name=names(base + "_Mul")),
    ]
    if bias is not None:
        nodes.append(helper.make_node("Add", [y, bias], [out], name=names(base + "_Add")))
    return nodes


def dynamic_quantize(model: onnx.ModelProto, *, per_channel: bool = True,
                     embeddings: bool = True, min_weight: int = 1024,
                     exclude_nodes: list[str] | None = None,
                     names_filter=None) -> tuple[onnx.ModelProto, dict]:
    model, raised = ensure_opset(model, 11)
    lifted = constants_to_initializers(model.graph)
    names = Names(model)
    exclude = set(exclude_nodes or ())
    count = 0
    for g in iter_graphs(model.graph):
        g_inputs = {i.name for i in g.input}
        inits = {t.name: t for t in g.initializer if t.name not in g_inputs}
        rebuilt: list[onnx.NodeProto] = []
        weights: dict[str, tuple[str, str]] = {}
        changed = False
        for n in g.node:
            wb = matmul_weight(n, inits) if n.op_type in ("MatMul", "Gemm") else None
            if (wb is None or n.name in exclude or wb[0].size < min_weight
                    or (names_filter is not None and not names_filter(n))):
                rebuilt.append(n)
                continue
            w, bias = wb
            key = n.input[1] + (":T" if n.op_type == "Gemm" and _attr(n, "transB", 0) else "")
            if key not in weights:
                q, scale = quantize_weight(w, 1 if per_channel else None)
                qn, sn = names(n.input[1] + "_quantized"), names(n.input[1] + "_scale")
                zn = names(n.input[1] + "_zero_point")
                g.initializer.extend([numpy_helper.from_array(q, qn),
                                      numpy_helper.from_array(scale, sn),
                                      numpy_helper.from_array(np.zeros(scale.shape, np.int8), zn)])
                weights[key] = (qn, sn, zn)
            qn, sn, zn = weights[key]
            bn = None
            if bias is not None:
                bn = names(n.input[2] + "_float")
                g.initializer.append(numpy_helper.from_array(bias.astype(np.float32), bn))
            rebuilt += dynamic_matmul_nodes(n.input[0], n.output[0], qn, sn, zn, bn,
                                            names=names, base=n.name or n.output[0])
            count += 1
            changed = True
        if changed:
            replace_graph_nodes(model, g, rebuilt, g_inputs)
    tables = quantize_gather_tables(model, names) if embeddings else 0
    return model, {"matmuls_quantized": count, "embedding_tables_int8": tables,
                   "constants_lifted": lifted, "opset_raised": raised}


@register("quant_dynamic", lossy=True, uses=("calib",))
def quant_dynamic(model: onnx.ModelProto, ctx: PassContext, *, per_channel: bool = True,
                  embeddings: bool = True,
                  min_weight: Annotated[int, Range(0)] = 1024,
                  exclude_nodes: list[str] | None = None) -> onnx.ModelProto:
    """Dynamic int8: weights int8 (per-column), activations quantized at run time; MatMul/Gemm.

    before: y = MatMul(x, W fp32)
    after:  y = DynamicQuantizeLinear(x) -> MatMulInteger(., W int8) -> * scales
    No calibration needed (its error is reported on calibration data when given). Weights with
    fewer than min_weight elements stay float.
    """
    original = onnx.ModelProto()
    if ctx.calib is not None:
        original.CopyFrom(model)        # the error on calibration data compares with it
    else:                               # model-level fields only: a copy costs the model's bytes
        copy_model_fields(model, original)
    out, figures = dynamic_quantize(model, per_channel=per_channel, embeddings=embeddings,
                                    min_weight=min_weight, exclude_nodes=exclude_nodes)
    copy_model_fields(original, out)
    if ctx.calib is not None:
        from onnxpress.passes.quant.qdq import output_error

        figures.update(output_error(original, out, ctx.require_calib(original)))
    warn_convs_left_float("quant_dynamic", out, figures, min_weight, figures["matmuls_quantized"])
    ctx.record(**figures)
    return out
