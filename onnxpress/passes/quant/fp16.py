"""fp16 / bf16: half-precision weights and compute, sensitive ops kept in fp32, IO types kept.

    before:  x fp32 -> MatMul(W fp32) -> LayerNorm -> Softmax -> y fp32
    after:   x fp32 -> Cast(fp16) -> MatMul(W fp16) -> Cast(fp32) -> LayerNorm -> Softmax -> y fp32

Every float tensor gets one home precision (fp16 where its producer runs in fp16, fp32 where it
stays in fp32); a Cast is inserted exactly where a reader needs the other one, so no Cast ever
disagrees with its consumer. Cast/ConstantOfShape targets inside fp16 regions follow. Nodes with
subgraphs (If/Loop/Scan) and their bodies stay fp32.

bf16 on onnxruntime's CPU (which has almost no bf16 kernels) stores weights in bf16 and casts
them to fp32 at load ("weights" mode): half the size, fp32 compute.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxpress.passes.context import PassContext
from onnxpress.passes.graph import copy_model_fields, has_subgraphs, infer_shapes
from onnxpress.passes.quant.common import Names
from onnxpress.passes.registry import register
from onnxpress.stats import iter_graphs

FLOAT, FLOAT16, BFLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16

# numerically sensitive (wide dynamic range, long reductions) or without half kernels
SENSITIVE_OPS = ["LayerNormalization", "SimplifiedLayerNormalization", "Softmax", "LogSoftmax",
                 "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp",
                 "ReduceProd", "Pow", "Exp", "Log", "Sqrt", "Reciprocal", "InstanceNormalization",
                 "GroupNormalization", "CumSum", "TopK", "NonMaxSuppression", "RoiAlign", "Range",
                 "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                 "Multinomial", "Upsample", "Einsum"]
# inputs that must stay float32 whatever the node's precision (op -> input indices)
ALWAYS_FP32_INPUTS = {"Resize": (2,), "Upsample": (1,)}
TYPE_ATTR_OPS = ("Cast", "CastLike", "ConstantOfShape", "EyeLike")


def to_bf16_tensor(arr: np.ndarray, name: str) -> onnx.TensorProto:
    """float32 -> bfloat16 TensorProto, round to nearest even."""
    bits = np.ascontiguousarray(arr, np.float32).view(np.uint32).astype(np.uint64)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    t = onnx.TensorProto()
    t.name = name
    t.data_type = BFLOAT16
    t.dims.extend(arr.shape)
    t.raw_data = bits.tobytes()
    return t


def convert_tensor(t: onnx.TensorProto, dtype: int) -> onnx.TensorProto:
    arr = numpy_helper.to_array(t)
    if dtype == BFLOAT16:
        return to_bf16_tensor(arr, t.name)
    if arr.size and np.abs(arr).max() > 65504:
        arr = np.clip(arr, -65504, 65504)
    return numpy_helper.from_array(arr.astype(np.float16), t.name)


def convert_precision(model: onnx.ModelProto, *, dtype: int = FLOAT16, keep_io_types: bool = True,
                      op_block_list: list[str] | None = None,
                      node_block_list: list[str] | None = None) -> tuple[onnx.ModelProto, dict]:
    """Full conversion of the main graph's float compute to `dtype` (see the module docstring)."""
    inferred = infer_shapes(model, strict=False)
    types: dict[str, int] = {}
    for g in iter_graphs(inferred.graph):
        for v in list(g.input) + list(g.output) + list(g.value_info):
            if v.type.HasField("tensor_type"):
                types[v.name] = v.type.tensor_type.elem_type
        for t in g.initializer:
            types[t.name] = t.data_type
    graph = model.graph
    casts_before = sum(1 for n in graph.node if n.op_type == "Cast")
    names = Names(model)
    block = set(SENSITIVE_OPS if op_block_list is None else op_block_list)
    block_nodes = set(node_block_list or ())
    for n in graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = a.t.data_type

    def runs_half(n: onnx.NodeProto) -> bool:
        if n.domain not in ("", "ai.onnx") or n.op_type in block or n.name in block_nodes:
            return False
        if has_subgraphs(n):
            return False
        return any(types.get(t) == FLOAT for t in list(n.input) + list(n.output) if t)

    graph_inputs = {i.name for i in graph.input}
    inits = {t.name: t for t in graph.initializer if t.name not in graph_inputs}
    half_nodes = [n for n in graph.node if runs_half(n)]
    half_ids = {id(n) for n in half_nodes}

    # where each float tensor lives: its producer's precision
    home: dict[str, int] = {}
    for i in graph.input:
        if types.get(i.name) == FLOAT:
            home[i.name] = FLOAT if keep_io_types else dtype
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    for name, t in inits.items():
        if t.data_type == FLOAT:
            rs = readers.get(name, [])
            half_reads = [r for r in rs if id(r) in half_ids and
                          not _always_fp32(r, name)]
            home[name] = dtype if half_reads else FLOAT
    for n in graph.node:
        for o in n.output:
            if types.get(o) == FLOAT:
                home[o] = dtype if id(n) in half_ids else FLOAT

    # convert initializers and constants living in half precision
    converted_inits = 0
    for name, t in list(inits.items()):
        if home.get(name) == dtype:
            new = convert_tensor(t, dtype)
            t.CopyFrom(new)
            converted_inits += 1
    for n in half_nodes:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.t.data_type == FLOAT:
                    a.t.CopyFrom(convert_tensor(a.t, dtype))
        elif n.op_type in ("Cast", "EyeLike"):
            for a in n.attribute:
                if a.name in ("to", "dtype") and a.i == FLOAT:
                    a.i = dtype
        elif n.op_type == "ConstantOfShape":
            for a in n.attribute:
                if a.name == "value" and a.t.data_type == FLOAT:
                    a.t.CopyFrom(convert_tensor(a.t, dtype))

    # Casts where a reader needs the other precision
    casts: dict[tuple[str, int], str] = {}
    after: dict[str, list[onnx.NodeProto]] = {}
    head: list[onnx.NodeProto] = []

    def cast_of(t: str, to: int) -> str:
        key = (t, to)
        if key not in casts:
            out = names(t + ("_fp16" if to == FLOAT16 else "_bf16" if to == BFLOAT16 else "_fp32"))
            node = helper.make_node("Cast", [t], [out], to=to, name=names(out + "_Cast"))
            casts[key] = out
            if t in graph_inputs or t in inits:
                head.append(node)
            else:
                after.setdefault(t, []).append(node)
        return casts[key]

    for n in graph.node:
        want_half = id(n) in half_ids
        for k, t in enumerate(n.input):
            if not t or t not in home:
                continue
            need = dtype if want_half and not _always_fp32(n, t, k) else FLOAT
            if n.op_type in TYPE_ATTR_OPS and n.op_type != "CastLike" and k == 0:
                continue  # Cast/ConstantOfShape accept any input type
            if home[t] != need:
                n.input[k] = cast_of(t, need)
        # subgraph readers of outer tensors get fp32: the node itself stays fp32

    # graph outputs keep their type when asked
    changed_outputs = 0
    for o in graph.output:
        if home.get(o.name) == dtype:
            if keep_io_types:
                prod = next(p for p in graph.node if o.name in p.output)
                inner = names(o.name + "_half")
                for k, x in enumerate(prod.output):
                    if x == o.name:
                        prod.output[k] = inner
                for r in readers.get(o.name, []):
                    for k, x in enumerate(r.input):
                        if x == o.name:
                            r.input[k] = inner
                for key, v in list(casts.items()):
                    if key[0] == o.name:
                        casts[(inner, key[1])] = v
                if o.name in after:
                    after[inner] = after.pop(o.name)
                    for c in after[inner]:
                        c.input[0] = inner
                after.setdefault(inner, []).append(
                    helper.make_node("Cast", [inner], [o.name], to=FLOAT,
                                     name=names(o.name + "_Cast")))
            else:
                o.type.tensor_type.elem_type = dtype
                changed_outputs += 1
    if not keep_io_types:
        for i in graph.input:
            if i.name in home and home[i.name] == dtype:
                i.type.tensor_type.elem_type = dtype

    ordered = list(head)
    for n in graph.node:
        ordered.append(n)
        for o in n.output:
            ordered.extend(after.get(o, []))
    del graph.node[:]
    graph.node.extend(ordered)
    del graph.value_info[:]
    return model, {"nodes_half": len(half_nodes), "nodes_fp32": len(graph.node) - len(half_nodes),
                   "casts_inserted": sum(1 for n in graph.node if n.op_type == "Cast")
                   - casts_before,
                   "initializers_converted": converted_inits,
                   "dtype": "float16" if dtype == FLOAT16 else "bfloat16"}


def _always_fp32(node: onnx.NodeProto, tensor: str, index: int | None = None) -> bool:
    idx = ALWAYS_FP32_INPUTS.get(node.op_type)
    if not idx:
        return False
    if index is None:
        return any(i < len(node.input) and node.input[i] == tensor for i in idx)
    return index in idx


def weights_only(model: onnx.ModelProto, dtype: int, min_elements: int = 16
                 ) -> tuple[onnx.ModelProto, dict]:
    """Store float initializers in `dtype`, cast to float32 at load: half the size, fp32 compute."""
    names = Names(model)
    n_conv = 0
    for g in iter_graphs(model.graph):
        g_inputs = {i.name for i in g.input}
        head = []
        for t in list(g.initializer):
            if t.name in g_inputs or t.data_type != FLOAT or int(np.prod(t.dims)) < min_elements:
                continue
            stored = names(t.name + ("_fp16" if dtype == FLOAT16 else "_bf16"))
            new = convert_tensor(t, dtype)
            new.name = stored
            g.initializer.remove(t)
            g.initializer.append(new)
            head.append(helper.make_node("Cast", [stored], [t.name], to=FLOAT,
                                         name=names(t.name + "_Cast")))
            n_conv += 1
        if head:
            nodes = head + list(g.node)
            del g.node[:]
            g.node.extend(nodes)
    return model, {"initializers_converted": n_conv, "mode": "weights",
                   "dtype": "float16" if dtype == FLOAT16 else "bfloat16"}


def _run(model, ctx, dtype, mode, keep_io_types, op_block_list, node_block_list):
    original = onnx.ModelProto()
    original.CopyFrom(model)
    if mode == "weights":
        out, figures = weights_only(model, dtype)
    else:
        out, figures = convert_precision(model, dtype=dtype, keep_io_types=keep_io_types,
                                         op_block_list=op_block_list,
                                         node_block_list=node_block_list)
    copy_model_fields(original, out)
    if ctx.calib is not None and keep_io_types:
        from onnxpress.errors import BackendError
        from onnxpress.passes.quant.qdq import output_error

        try:
            figures.update(output_error(original, out, ctx.require_calib(original)))
        except BackendError as exc:  # e.g. bf16 compute: onnxruntime's CPU has no kernels
            figures["error_not_measured"] = str(exc)[:200]
    ctx.record(**figures)
    return out


@register("fp16", lossy=True, changes_io=True, uses=("calib",))
def fp16(model: onnx.ModelProto, ctx: PassContext, *, keep_io_types: bool = True,
         mode: Literal["compute", "weights"] = "compute",
         op_block_list: list[str] | None = None,
         node_block_list: list[str] | None = None) -> onnx.ModelProto:
    """float16 weights and compute; sensitive ops in fp32; graph IO types kept (keep_io_types).

    before: x fp32 -> MatMul(W fp32) -> Softmax -> y fp32
    after:  x fp32 -> Cast -> MatMul(W fp16) -> Cast -> Softmax (fp32) -> y fp32
    op_block_list replaces the default list of ops kept in fp32 (LayerNormalization, Softmax,
    reductions, Pow/Exp/Log/Sqrt...); node_block_list keeps named nodes in fp32.
    mode=weights stores weights in fp16 and computes in fp32 (half size, fp32 speed).
    """
    return _run(model, ctx, FLOAT16, mode, keep_io_types, op_block_list, node_block_list)


@register("bf16", lossy=True, changes_io=True, uses=("calib",))
def bf16(model: onnx.ModelProto, ctx: PassContext, *, keep_io_types: bool = True,
         mode: Literal["auto", "compute", "weights"] = "auto",
         op_block_list: list[str] | None = None,
         node_block_list: list[str] | None = None) -> onnx.ModelProto:
    """bfloat16: weights (and compute where the target has bf16 kernels); IO types kept.

    before: y = MatMul(x, W fp32)
    after:  y = MatMul(x, Cast(W bf16 -> fp32))        (mode weights, the default on "ort")
            y = Cast(MatMul(Cast(x, bf16), W bf16))    (mode compute)
    mode=auto: weights on ctx.target "ort" (onnxruntime's CPU has no bf16 kernels), compute else.
    """
    if mode == "auto":
        mode = "weights" if ctx.for_onnxruntime else "compute"
    return _run(model, ctx, BFLOAT16, mode, keep_io_types, op_block_list, node_block_list)
