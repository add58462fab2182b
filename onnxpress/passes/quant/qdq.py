"""quant_int8: static int8 quantization in QDQ form, placed where onnxruntime runs integer kernels.

    before:  x -> Conv(W fp32, b fp32) -> Relu -> y
    after:   x -> Q -> DQ -> Conv(DQ(W int8, per-channel), DQ(b int32)) -> Q -> DQ -> y
             (Relu absorbed into the output Q's zero point; onnxruntime fuses this into QLinearConv)

    MatMul with a constant weight whose result goes on in float:
             x -> Q -> DQ -> MatMul(DQ(W int8)) -> y    (onnxruntime: MatMulIntegerToFloat)

Weights stored in Constant nodes are lifted to initializers first. If/Loop bodies of the main graph
are calibrated and quantized as models of their own (bodies.py); where a body cannot be calibrated
(nested, never reached) its weights are still int8 (weight-only, DequantizeLinear in the body).
LSTM/GRU/RNN weights are int8 per gate row, their state float (recurrent.py). Per-channel
DequantizeLinear needs opset 13: older models are converted first.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxpress.passes.context import PassContext
from onnxpress.passes.graph import has_subgraphs, rename_input
from onnxpress.passes.quant import calibrate as _calibrate  # noqa: F401  (registers "calib")
from onnxpress.passes.quant.calibrate import CalibrationStats, activation_qparams
from onnxpress.passes.quant.common import (
    FLOAT,
    Names,
    constants_to_initializers,
    ensure_opset,
    make_dq_weight,
    quantize_gather_tables,
    quantize_weight,
    resolve_constant_identities,
    restore_fused_ops,
    set_opset,
    split_fused_ops,
    weight_axis,
)
from onnxpress.passes.quant.latency import node_key
from onnxpress.passes.registry import Range, register
from onnxpress.stats import iter_graphs

COMPUTE = ("Conv", "MatMul", "Gemm")
BINARY = ("Add", "Mul")
OWN_RANGE = ("GlobalAveragePool", "AveragePool", "Sigmoid", "LeakyRelu", "Concat")
PASSTHROUGH = ("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Resize",
               "Slice", "Split")
DEFAULT_OPS = ["Conv", "MatMul", "Gemm", "Add", "GlobalAveragePool", "AveragePool", "MaxPool",
               "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Concat", "Resize",
               "LSTM", "GRU", "RNN"]
# ops whose integer kernel in onnxruntime needs the output quantized too (QLinearConv, QLinearAdd..)
NEEDS_OUTPUT_Q = ("Conv",) + BINARY + OWN_RANGE + PASSTHROUGH


@dataclasses.dataclass
class QuantPlan:
    """Which nodes of the main graph get integer kernels, and which tensors carry Q/DQ pairs."""

    nodes: list[onnx.NodeProto]
    qdq_tensors: dict[str, tuple[np.float32, int]]      # tensor -> (scale, zero point)
    renamed_outputs: set[str]                           # produced tensors quantized at the source


def is_depthwise(node: onnx.NodeProto, consts: dict) -> bool:
    if node.op_type != "Conv":
        return False
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    w = consts.get(node.input[1])
    return group > 1 and w is not None and w.dims[1] == 1


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def quantize_static(
    model: onnx.ModelProto,
    stats: CalibrationStats | None,
    *,
    method: str = "percentile",
    percentile: float = 99.999,
    per_channel: bool = True,
    activation_type: str = "uint8",
    symmetric_activations: bool = False,
    op_types: list[str] | None = None,
    include_nodes: list[str] | None = None,
    exclude_nodes: list[str] | None = None,
    exclude_op_types: list[str] | None = None,
    depthwise: bool = False,
    matmul_activations: bool = False,
    embeddings: bool = True,
    contrib_ops: bool = False,
    weight_bits: int = 8,
    names_filter=None,
) -> tuple[onnx.ModelProto, dict]:
    """The work behind `quant_int8` (also used by quant_auto with a node filter).

    `names_filter(node) -> bool` further restricts which main-graph nodes get integer kernels.
    `contrib_ops` (onnxruntime targets): a MatMul with a constant weight and a float result is
    written directly as com.microsoft.MatMulIntegerToFloat with its bias Add folded in, instead
    of relying on onnxruntime to fuse DQ -> MatMul (its MatMul+Add -> Gemm fusion, which runs
    first on static shapes, would otherwise leave the weights dequantized on every run).
    Returns (model, figures)."""
    model, raised = ensure_opset(model, 13)
    lifted = constants_to_initializers(model.graph)
    resolve_constant_identities(model.graph)
    graph = model.graph
    names = Names(model)
    op_types = set(op_types or DEFAULT_OPS) - set(exclude_op_types or ())
    include = set(include_nodes or ())
    exclude = set(exclude_nodes or ())
    signed = activation_type == "int8"
    graph_outputs = {o.name for o in graph.output}
    graph_inputs = {i.name for i in graph.input}
    inits = {t.name: t for t in graph.initializer if t.name not in graph_inputs}

    def selected(node: onnx.NodeProto) -> bool:
        if node.name in exclude or node.op_type not in op_types:
            return False
        if include and node.name not in include and node.op_type in COMPUTE:
            return False
        return names_filter is None or names_filter(node)

    def has_range(t: str) -> bool:
        return stats is not None and t in stats

    def float_weight(name: str) -> bool:
        t = inits.get(name)
        return t is not None and t.data_type == FLOAT

    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    # (com.microsoft.FusedConv/FusedGemm are split by the passes before calibration, so that
    #  a residual sum and an absorbed Relu get their own ranges: see split_fused_ops)
    absorbed: set[str] = set()

    # 1. Relu/Clip(0, ..) directly after a compute node: absorbed into the output Q (zero point at
    #    the bottom of the range saturates exactly like the Relu).
    absorbed_relus: dict[str, onnx.NodeProto] = {}
    if not symmetric_activations:
        drop = set()
        for n in graph.node:
            if n.op_type not in ("Relu", "Clip") or n.input[0] in graph_outputs:
                continue
            if n.op_type == "Clip":
                lo = inits.get(n.input[1]) if len(n.input) > 1 and n.input[1] else None
                if lo is None or float(numpy_helper.to_array(lo)) != 0.0:
                    continue
            prod = next((p for p in graph.node if n.input[0] in p.output), None)
            if (prod is None or prod.op_type not in ("Conv", "Gemm", "MatMul", "Add")
                    or not selected(prod)
                    or len(consumers.get(n.input[0], [])) != 1 or n.output[0] in graph_outputs
                    or not has_range(n.output[0]) or not has_range(prod.input[0])):
                continue
            if prod.op_type in COMPUTE and (not float_weight(prod.input[1])
                                            or (is_depthwise(prod, inits) and not depthwise)):
                continue
            relu = onnx.NodeProto()
            relu.CopyFrom(n)
            absorbed_relus[n.output[0]] = relu     # put back if prod ends up in float
            prod.output[0] = n.output[0]
            absorbed.add(n.output[0])
            drop.add(id(n))
        if drop:
            keep = [n for n in graph.node if id(n) not in drop]
            del graph.node[:]
            graph.node.extend(keep)
        # (extend copies the messages: the use map must be rebuilt)
        consumers = {}
        for n in graph.node:
            for i in n.input:
                consumers.setdefault(i, []).append(n)

    # 2. decide the quantized nodes in topological order
    left_float: dict[str, str] = {}      # compute node -> why it keeps a float kernel
    for n in graph.node:
        if n.op_type in COMPUTE and not selected(n):
            left_float[node_key(n)] = "excluded by the pass options"
        elif n.op_type == "Attention" and n.domain == "com.microsoft":
            # the passes split fuse's Attention back into its MatMuls (split_fused_ops); one
            # still here has inputs that split does not cover (past state, a mask index)
            left_float[node_key(n)] = ("com.microsoft.Attention with past state or a mask "
                                       "index: not split into MatMuls, no int8 form")
    quantized: list[onnx.NodeProto] = []
    q_outputs: set[str] = set()          # tensors produced by quantized nodes
    producer_q = set()
    for n in graph.node:
        op = n.op_type
        if not selected(n) or has_subgraphs(n):
            continue
        ok: bool = False
        if op in COMPUTE:
            if op == "Conv":
                ok = (float_weight(n.input[1]) and has_range(n.input[0])
                      and (depthwise or not is_depthwise(n, inits)))
            elif op == "Gemm":
                ok = (float_weight(n.input[1]) and has_range(n.input[0])
                      and _attr(n, "alpha", 1.0) == 1.0 and _attr(n, "beta", 1.0) == 1.0
                      and not _attr(n, "transA", 0))
            else:
                ok = has_range(n.input[0]) and (
                    float_weight(n.input[1])
                    or (matmul_activations and has_range(n.input[1])))
            ok = ok and all(has_range(o) for o in n.output) if op == "Conv" else ok
        elif op in BINARY:
            acts = [i for i in n.input if i not in inits]
            ok = (len(acts) == len(n.input) and all(a in q_outputs for a in acts)
                  and has_range(n.output[0]))
        elif op in OWN_RANGE:
            acts = [i for i in n.input if i not in inits]
            ok = acts and all(a in q_outputs for a in acts) and has_range(n.output[0])
        elif op in PASSTHROUGH:
            ok = bool(n.input) and n.input[0] in q_outputs and has_range(n.input[0])
        if op in COMPUTE and not ok:
            left_float[node_key(n)] = _float_reason(n, inits, has_range, depthwise,
                                                              matmul_activations)
        if ok:
            quantized.append(n)
            producer_q.add(id(n))
            if op in NEEDS_OUTPUT_Q:
                q_outputs.update(o for o in n.output[:1])

    # an absorbed Relu whose producer stayed float comes back
    restored: dict[str, list[onnx.NodeProto]] = {}
    q_produced = {o for n in quantized for o in n.output}
    for t, relu in absorbed_relus.items():
        if t in q_produced:
            continue
        prod = next(p for p in graph.node if t in p.output)
        prod.output[list(prod.output).index(t)] = relu.input[0]
        restored[relu.input[0]] = [relu]
        absorbed.discard(t)

    # 3. quantization parameters of every tensor carrying a Q/DQ pair
    range_kw = dict(percentile=percentile, qmax=255, symmetric=symmetric_activations)

    def qparams(t: str) -> tuple[np.float32, int]:
        lo, hi = stats.range(t, method, **range_kw)
        return activation_qparams(lo, hi, signed=signed, symmetric=symmetric_activations)

    qdq: dict[str, tuple[np.float32, int]] = {}
    source_q: set[str] = set()
    for n in quantized:
        op = n.op_type
        if op in PASSTHROUGH:
            src = n.input[0]
            if src not in qdq:
                qdq[src] = qparams(src)
            for o in n.output:
                qdq[o] = qdq[src]
                source_q.add(o)
            continue
        for i, t in enumerate(n.input):
            if not t or t in inits or t in qdq:
                continue
            if op in ("Conv", "Gemm") and i == 2:
                continue
            qdq[t] = qparams(t)
        if op in NEEDS_OUTPUT_Q:
            o = n.output[0]
            qdq.setdefault(o, qparams(o))
            source_q.add(o)
    # an absorbed Relu's output must reach every reader through the Q (which does the clipping)
    for n in quantized:
        for o in n.output:
            if o in absorbed:
                qdq.setdefault(o, qparams(o))
                source_q.add(o)
    # a tensor quantized at its source must not be a graph input
    source_q -= graph_inputs

    # 4. rewrite: weights, biases, Q/DQ pairs
    new_initializers: list[onnx.TensorProto] = []
    weight_scales: dict[str, np.ndarray] = {}
    head_nodes: list[onnx.NodeProto] = []
    after: dict[str, list[onnx.NodeProto]] = dict(restored)
    quantized_ids = {id(n) for n in quantized}

    def add_init(arr: np.ndarray, base: str) -> str:
        name = names(base)
        new_initializers.append(numpy_helper.from_array(arr, name))
        return name

    direct: dict[int, tuple[str, str | None]] = {}   # id(MatMul) -> (input, bias folded in)
    dropped_adds: set[str] = set()           # outputs of bias Adds folded into a MatMul
    if contrib_ops:
        for n in quantized:
            if (n.op_type != "MatMul" or not float_weight(n.input[1])
                    or len(inits[n.input[1]].dims) != 2 or n.input[0] not in qdq
                    or n.output[0] in qdq):
                continue
            bias = None
            readers = consumers.get(n.output[0], [])
            if len(readers) == 1 and readers[0].op_type == "Add" and \
                    n.output[0] not in graph_outputs:
                add = readers[0]
                other = add.input[1] if add.input[0] == n.output[0] else add.input[0]
                b = inits.get(other)
                if b is not None and b.data_type == FLOAT and list(b.dims) == \
                        [inits[n.input[1]].dims[1]]:
                    bias = other
                    n.output[0] = add.output[0]
                    dropped_adds.add(add.output[0])
            direct[id(n)] = (n.input[0], bias)

    # a weight read by several nodes (exporters deduplicate identical tensors) is quantized once
    # when every reader gets an integer kernel with the same channel axis; otherwise the node
    # gets a private copy, so a reader kept float is not silently fed an int8 weight
    weight_readers: dict[str, list[onnx.NodeProto]] = {}
    for g in iter_graphs(graph):
        for r in g.node:
            for i in r.input:
                if i in inits:
                    weight_readers.setdefault(i, []).append(r)

    def shares_weight(n: onnx.NodeProto, r: onnx.NodeProto, rank: int) -> bool:
        return (id(r) in quantized_ids and id(r) not in direct and r.op_type in COMPUTE
                and list(r.input).count(n.input[1]) == 1 and r.input[1] == n.input[1]
                and weight_axis(r, rank) == weight_axis(n, rank))

    weights_quantized = 0
    for n in quantized:
        if n.op_type not in COMPUTE or not float_weight(n.input[1]):
            continue
        if id(n) in direct:
            continue
        wname = n.input[1]
        rank = len(inits[wname].dims)
        if wname not in weight_scales and not all(
                shares_weight(n, r, rank) for r in weight_readers.get(wname, [])):
            private = onnx.TensorProto()
            private.CopyFrom(inits[wname])
            private.name = names(wname + "_" + (n.name or "copy"))
            graph.initializer.append(private)
            inits[private.name] = private
            n.input[1] = wname = private.name
        if wname not in weight_scales:
            init = inits[wname]
            axis = weight_axis(n, len(init.dims)) if per_channel else None
            node, scale = make_dq_weight(graph, init, axis, names, bits=weight_bits)
            head_nodes.append(node)
            weight_scales[wname] = scale
            weights_quantized += 1
        if n.op_type in ("Conv", "Gemm") and len(n.input) > 2 and n.input[2] \
                and float_weight(n.input[2]) and n.input[0] in qdq:
            b = numpy_helper.to_array(inits[n.input[2]]).astype(np.float64)
            if b.ndim == 1:
                sx = float(qdq[n.input[0]][0])
                sw = weight_scales[wname].astype(np.float64)
                s = np.broadcast_to(sx * sw, b.shape).astype(np.float32)
                s = np.where(s > 0, s, np.float32(1e-12)).astype(np.float32)
                bq = np.clip(np.round(b / s), -2**31, 2**31 - 1).astype(np.int32)
                base = n.input[2]
                qn = add_init(bq, base + "_q")
                sn = add_init(s if s.size > 1 else s.reshape(()), base + "_s")
                out = names(base + "_dq")
                attrs = {"axis": 0} if s.size > 1 else {}
                head_nodes.append(helper.make_node("DequantizeLinear", [qn, sn], [out], **attrs))
                n.input[2] = out

    qtype = np.int8 if signed else np.uint8
    shared: dict[tuple, tuple[str, str]] = {}
    qnames: dict[str, tuple[str, str, str]] = {}
    for t, (scale, zp) in qdq.items():
        if (scale, zp) not in shared:        # passthrough ops reuse their input's parameters
            shared[(scale, zp)] = (add_init(np.array(scale, np.float32), t + "_s"),
                                   add_init(np.array(zp, qtype), t + "_zp"))
        sn, zn = shared[(scale, zp)]
        qn = names(t + "_q")
        qnames[t] = (qn, sn, zn)
        if t in source_q:
            src = names(t + "_f")
            prod = next(p for p in graph.node if t in p.output)
            for k, o in enumerate(prod.output):
                if o == t:
                    prod.output[k] = src
            pair = [helper.make_node("QuantizeLinear", [src, sn, zn], [qn]),
                    helper.make_node("DequantizeLinear", [qn, sn, zn], [t])]
            after.setdefault(src, []).extend(pair)
        else:
            dq = names(t + "_dq")
            pair = [helper.make_node("QuantizeLinear", [t, sn, zn], [qn]),
                    helper.make_node("DequantizeLinear", [qn, sn, zn], [dq])]
            for c in consumers.get(t, []):
                if id(c) in quantized_ids:
                    rename_input(c, t, dq)
            if t in graph_inputs:
                head_nodes.extend(pair)
            else:
                after.setdefault(t, []).extend(pair)

    for n in quantized:
        if id(n) not in direct:
            continue
        x, bias = direct[id(n)]
        w = numpy_helper.to_array(inits[n.input[1]])
        q, ws = quantize_weight(w, 1 if per_channel else None, bits=weight_bits)
        base = n.input[1]
        qw = add_init(q, base + "_q")
        sw = add_init(ws, base + "_s")
        zw = add_init(np.zeros(ws.shape, np.int8), base + "_zp")
        xq, xs, xz = qnames[x]
        inputs = [xq, qw, xs, sw, xz, zw]
        if bias:
            inputs.append(bias)
        n.op_type, n.domain = "MatMulIntegerToFloat", "com.microsoft"
        del n.input[:]
        n.input.extend(inputs)
        weights_quantized += 1

    # weights inside subgraphs, and compute nodes of the main graph left without integer kernels
    weight_only = 0
    for g in iter_graphs(graph):
        g_inputs = {i.name for i in g.input}
        g_inits = {t.name: t for t in g.initializer if t.name not in g_inputs}
        done: dict[str, onnx.NodeProto] = {}
        for n in g.node:
            if n.op_type not in COMPUTE or len(n.input) < 2 or n.name in exclude:
                continue
            if g is graph and (id(n) in quantized_ids or not selected(n)):
                continue
            if g is not graph and not (n.op_type in op_types and n.name not in exclude):
                continue
            if n.op_type == "Conv" and is_depthwise(n, g_inits) and not depthwise:
                continue
            w = g_inits.get(n.input[1])
            if w is None or w.data_type != FLOAT or n.input[1] in done or len(w.dims) < 2:
                continue
            if g is graph and n.input[1] in weight_scales:
                continue
            node, _ = make_dq_weight(g, w, weight_axis(n, len(w.dims)) if per_channel else None,
                                     names)
            done[n.input[1]] = node
            weight_only += 1
        if done:
            if g is graph:
                head_nodes.extend(done.values())
            else:
                nodes = list(done.values()) + list(g.node)
                del g.node[:]
                g.node.extend(nodes)

    # LSTM/GRU/RNN anywhere: weight-only int8 per gate row, state float (recurrent.py)
    from onnxpress.passes.quant.recurrent import quantize_recurrent

    left_float.update(quantize_recurrent(model, names, selected=selected))
    tables = quantize_gather_tables(model, names) if embeddings else 0

    ordered = []

    def emit(node: onnx.NodeProto) -> None:
        ordered.append(node)
        for o in node.output:            # Q/DQ pairs, restored Relus (and their Q/DQ pairs)
            for follower in after.get(o, []):
                emit(follower)

    for n in head_nodes:
        emit(n)
    for n in graph.node:
        if n.op_type == "Add" and n.output[0] in dropped_adds:
            continue
        emit(n)
    if direct:
        read = {i for n in ordered for i in n.input} | graph_outputs
        for g in iter_graphs(graph):
            if g is not graph:
                read |= {i for n in g.node for i in n.input}
        ordered = [n for n in ordered
                   if n.op_type != "DequantizeLinear" or n.output[0] in read]
        set_opset(model, "com.microsoft", 1)
    # the float weights and biases that int8 ones replaced (a Conv's bias became int32) are read
    # by nothing now: they go, or every quantized model carries them as dead bytes
    used = {i for n in ordered for i in n.input} | graph_outputs
    for g in iter_graphs(graph):
        if g is not graph:
            used |= {i for n in g.node for i in n.input}
    stale_w = [t for t in graph.initializer if t.name not in used and t.name in inits
               and t.name not in graph_inputs]
    for t in stale_w:
        graph.initializer.remove(t)
    del graph.node[:]
    graph.node.extend(ordered)
    graph.initializer.extend(new_initializers)
    produced = {o for n in graph.node for o in n.output}
    stale = [v for v in graph.value_info if v.name not in produced]
    for v in stale:
        graph.value_info.remove(v)

    figures = {
        "nodes_quantized": len(quantized),
        "int8_compute_nodes": sum(1 for n in quantized
                                  if n.op_type in COMPUTE + ("MatMulIntegerToFloat",)),
        "matmul_integer_to_float": len(direct),
        "weights_quantized": weights_quantized,
        "weights_weight_only": weight_only,
        "embedding_tables_int8": tables,
        "activations_quantized": len(qdq),
        "constants_lifted": lifted,
        "opset_raised": raised,
        "method": method,
        "weight_bits": weight_bits,
        "float_reasons": left_float,
    }
    return model, figures


def _float_reason(node: onnx.NodeProto, inits: dict, has_range, depthwise: bool,
                  matmul_activations: bool) -> str:
    """Why quantize_static leaves a Conv/MatMul/Gemm float, in words a user can act on."""
    w = inits.get(node.input[1]) if len(node.input) > 1 else None
    if w is None or w.data_type != FLOAT:
        if node.op_type == "MatMul" and not matmul_activations:
            return "MatMul of two activations (matmul_activations=false)"
        return "weight is not a float constant"
    if node.op_type == "Conv" and is_depthwise(node, inits) and not depthwise:
        return "depthwise (depthwise=false)"
    if node.op_type == "Gemm" and (_attr(node, "alpha", 1.0) != 1.0
                                   or _attr(node, "beta", 1.0) != 1.0 or _attr(node, "transA", 0)):
        return "Gemm with alpha, beta or transA (no integer kernel)"
    if not all(has_range(t) for t in list(node.input[:1]) + list(node.output[:1])):
        return "no calibration range (activation not float-typed or never computed)"
    return "not supported"


def layer_precisions(model: onnx.ModelProto) -> dict[str, str]:
    """{layer: "int8" | "weight-only int8" | "float"} for every Conv/MatMul/Gemm (and
    MatMulIntegerToFloat) of the main graph, read from the model itself: int8 when its
    activation arrives through Q -> DQ and its weight through DQ (onnxruntime then runs an
    integer kernel), weight-only when only the weight is int8."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}

    def dq_of_q(t: str) -> bool:
        p = producer.get(t)
        return (p is not None and p.op_type == "DequantizeLinear"
                and producer.get(p.input[0]) is not None
                and producer[p.input[0]].op_type == "QuantizeLinear")

    def dq_weight(t: str) -> bool:
        p = producer.get(t)
        return p is not None and p.op_type == "DequantizeLinear" and not dq_of_q(t)

    out = {}
    for n in graph.node:
        if not n.name and not n.input:       # (Constant, Optional: no layer, and no key)
            continue
        key = node_key(n)
        if n.op_type in ("MatMulIntegerToFloat", "QAttention"):
            out[key] = "int8"
        elif n.op_type == "Attention" and n.domain == "com.microsoft":
            out[key] = "float"
        elif n.op_type == "DynamicQuantizeLSTM":
            out[key] = "int8"
        elif n.op_type in ("LSTM", "GRU", "RNN") and len(n.input) > 2:
            out[key] = "weight-only int8" if dq_weight(n.input[1]) or (
                producer.get(n.input[1]) is not None
                and producer[n.input[1]].op_type == "Reshape"
                and dq_weight(producer[n.input[1]].input[0])) else "float"
        elif n.op_type in COMPUTE and len(n.input) > 1:
            if dq_of_q(n.input[0]) and (dq_weight(n.input[1]) or dq_of_q(n.input[1])):
                out[key] = "int8"
            elif dq_weight(n.input[1]):
                out[key] = "weight-only int8"
            else:
                out[key] = "float"
    return out


def model_quant_figures(model: onnx.ModelProto, reasons: dict[str, str]) -> dict:
    """Figures of the model a quant pass returns (never of a candidate it discarded)."""
    prec = layer_precisions(model)
    float_layers = {k: reasons.get(k, "kept float") for k, v in prec.items() if v != "int8"}
    why: dict[str, int] = {}
    for r in float_layers.values():
        why[r] = why.get(r, 0) + 1
    graph = model.graph
    ops = [n.op_type for n in graph.node]
    q_tensors = {n.output[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    dq_acts = {n.output[0] for n in graph.node
               if n.op_type == "DequantizeLinear" and n.input[0] in q_tensors}
    int_weights = {t.name for g in iter_graphs(graph) for t in g.initializer
                   if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
                   and len(t.dims) >= 2}
    weights = sum(1 for g in iter_graphs(graph) for n in g.node
                  if n.op_type == "DequantizeLinear" and n.input[0] in int_weights)
    return {
        "nodes_quantized": sum(1 for n in graph.node
                               if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
                               and (n.op_type == "MatMulIntegerToFloat"
                                    or any(i in dq_acts for i in n.input))),
        "weights_quantized": weights + ops.count("MatMulIntegerToFloat"),
        "matmul_integer_to_float": ops.count("MatMulIntegerToFloat"),
        "layers": len(prec),
        "int8_compute_nodes": sum(v == "int8" for v in prec.values()),
        "layers_weight_only": sum(v == "weight-only int8" for v in prec.values()),
        "layers_float": len(float_layers),
        "float_layers": float_layers,
        "float_why": "; ".join(f"{n} {r}" for r, n in sorted(why.items(), key=lambda kv: -kv[1])),
        "activations_quantized": ops.count("QuantizeLinear"),
    }


def output_error(reference: onnx.ModelProto, candidate: onnx.ModelProto, calib,
                 max_batches: int = 4) -> dict:
    """The standard error figures (passes/error.py) over the first `max_batches` batches."""
    import itertools

    from onnxpress.passes.error import output_error as _output_error

    return _output_error(reference, candidate, itertools.islice(calib, max_batches))


@register("quant_int8", lossy=True, requires=("calib",))
def quant_int8(
    model: onnx.ModelProto,
    ctx: PassContext,
    *,
    method: Literal["minmax", "percentile", "entropy", "mse"] = "percentile",
    percentile: Annotated[float, Range(90, 100)] = 99.999,
    per_channel: bool = True,
    activation_type: Literal["uint8", "int8"] = "uint8",
    symmetric_activations: bool = False,
    op_types: list[str] | None = None,
    include_nodes: list[str] | None = None,
    exclude_nodes: list[str] | None = None,
    exclude_op_types: list[str] | None = None,
    depthwise: bool = False,
    matmul_activations: bool = False,
    embeddings: bool = True,
    latency_aware: bool = True,
    latency_floor_ms: Annotated[float, Range(0)] = 1.0,
    weight_range: Literal["auto", "full", "7bit"] = "auto",
    report_error: bool = True,
    tvm_timing: bool = False,
    smooth: str | float = "off",
    bias_correction: bool = False,
    conv_kernel: Literal["auto", "symmetric", "gemm"] = "auto",
) -> onnx.ModelProto:
    """Static int8 QDQ quantization from calibration data (integer kernels on onnxruntime).

    before: x -> Conv(W fp32, b) -> Relu -> y
    after:  x -> Q -> DQ -> Conv(DQ(W int8 per-channel), DQ(b int32)) -> Q -> DQ -> y
    Weights per-channel symmetric int8, activations uint8 (or int8) from calibrated ranges
    (method: minmax | percentile | entropy | mse); bias int32. Depthwise Conv stays float by
    default (slower in int8 on CPUs). Embedding tables read by Gather become int8 with per-row
    scales (embeddings=false keeps them). latency_aware (target ort): ops whose int8 form does not pay
    on onnxruntime are dropped by measurement; the model is never slower than its input
    (models under latency_floor_ms in float are kept in int8 for their size). tvm_timing (target
    tvm/x86, with latency_aware): the same decision timed on TVM builds for this CPU, integer
    kernels included (each candidate is a TVM compile: minutes on big models, so opt-in).
    weight_range: "7bit" keeps weights within +-63 (onnxruntime's reduce_range) so that x86
    CPUs without VNNI run the u8 x s8 dot product (vpmaddubsw) without saturating; "auto" picks
    it when the CPU the model runs on lacks VNNI (target ort: this machine; tvm/x86: the CPU TVM
    compiles for), "full" otherwise. Quantizing here for a VNNI machine: weight_range=full.
    smooth (SmoothQuant, passes/quant/smooth.py): auto | off | alpha: activation outlier
    channels of MatMul/Gemm inputs are divided by s and the weight rows multiplied by s (exact
    in float); auto searches alpha per layer group on calibration rows. bias_correction: each
    integer layer's bias absorbs its mean output shift on the calibration data.
    conv_kernel (conv_kernels.py): which of onnxruntime's two int8 conv kernels each conv runs,
    its symmetric indirect conv or its integer GEMM (AMX where the CPU has it), by the weight
    zero point (0, or -1 with the weights shifted: the same values). auto: each conv profiled
    in both forms on this machine (latency_aware, target ort), else symmetric; gemm: all.
    """
    fused = split_fused_ops(model)
    if fused:
        ctx.invalidate()              # calibrate the split graph: its sums get their own ranges
    calib = ctx.require_calib(model)
    kwargs = dict(method=method, percentile=percentile, per_channel=per_channel,
                  activation_type=activation_type, symmetric_activations=symmetric_activations,
                  op_types=op_types, include_nodes=include_nodes, exclude_nodes=exclude_nodes,
                  exclude_op_types=exclude_op_types, depthwise=depthwise,
                  matmul_activations=matmul_activations, embeddings=embeddings)
    kwargs["contrib_ops"] = ctx.for_onnxruntime
    kwargs["weight_bits"] = 7 if weight_range == "7bit" or (
        weight_range == "auto" and needs_7_bit_weights(ctx.target)) else 8
    reference = model
    smoothing: dict = {}
    if smooth != "off":      # the smoothed model computes the same function: it is the reference
        from onnxpress.passes.quant.smooth import smooth_model

        model, smoothing = smooth_model(model, ctx, smooth, weight_bits=kwargs["weight_bits"],
                                        signed=activation_type == "int8",
                                        symmetric=symmetric_activations)
    stats = ctx.analysis("calib", model)
    original = onnx.ModelProto()
    original.CopyFrom(model)
    out, figures = quantize_static(model, stats, **kwargs)
    figures.update(smoothing)
    reasons = figures.pop("float_reasons")
    figures.pop("weights_weight_only")    # (model_quant_figures counts every int8 weight)
    on_tvm = bool(tvm_timing) and ctx.target in ("tvm", "x86")
    if tvm_timing and not on_tvm:
        from onnxpress.errors import PassOptionError

        raise PassOptionError(f"tvm_timing times TVM builds for this CPU: it needs target tvm or "
                              f"x86, not '{ctx.target}'")
    from onnxpress.passes.quant.conv_kernels import apply_choice, gemm_figures, gemm_form_of

    # onnxruntime's conv kernel per layer first: int8 is then timed against float as it will run
    out, kernels = apply_choice(out, conv_kernel, calib.first(),
                                measure=latency_aware and ctx.for_onnxruntime)
    figures.update(kernels)
    gemm_keys = set(kernels.get("conv_kernels_gemm_layers", ()))
    if latency_aware and (ctx.for_onnxruntime or on_tvm):
        from onnxpress.passes.quant.latency import choose_fastest

        candidate = layer_precisions(out)
        out, timing = choose_fastest(original, out, stats, kwargs, calib, ctx,
                                    floor_ms=latency_floor_ms, on_tvm=on_tvm,
                                    post=(lambda m: gemm_form_of(m, gemm_keys)) if gemm_keys else None)
        reasons = timing.pop("float_reasons", reasons)
        figures.update(timing)
        where = "TVM" if on_tvm else "onnxruntime"
        for k, v in layer_precisions(out).items():
            if v != "int8" and candidate.get(k) == "int8":
                reasons[k] = f"slower in int8 on {where} here (latency_aware)"
    if gemm_keys:              # (the latency choice may have sent some of them back to float)
        figures.update(gemm_figures(out))
    if bias_correction:
        from onnxpress.passes.quant.smooth import correct_biases

        out, corrected = correct_biases(original, out, ctx)
        figures.update(corrected)
    if smoothing.get("smooth_groups") and not any(v == "int8" for v in layer_precisions(out).values()):
        out = reference          # nothing quantized: give back the model as it came
    figures["fused_ops_split"] = len(fused)
    restored = restore_fused_ops(out, fused)
    figures["fused_ops_restored"] = len(restored)
    for node, made in restored:          # a re-fused layer inherits its split's reason
        why = [reasons[node_key(m)] for m in made if node_key(m) in reasons]
        if why:
            reasons[node_key(node)] = why[0]
    from onnxpress.passes.quant.recurrent import keep_recurrent_int8

    out, recurrent = keep_recurrent_int8(out, kwargs)
    reasons.update(recurrent)
    from onnxpress.passes.quant.bodies import quantize_bodies

    out, bodies = quantize_bodies(original, out, ctx, kwargs, floor_ms=latency_floor_ms,
                                  latency_aware=latency_aware and ctx.for_onnxruntime)
    figures.update(bodies)
    from onnxpress.passes.graph import copy_model_fields

    copy_model_fields(original, out)
    figures.update(model_quant_figures(out, reasons))
    warn_float_layers("quant_int8", figures)
    if report_error:
        figures.update(output_error(original, out, calib))
    figures["calibration_batches"] = stats.batches
    ctx.record(**figures)
    return out


def needs_7_bit_weights(target: str) -> bool:
    """Whether the u8 x s8 dot product that will run this model saturates on full-range int8
    weights: x86 without VNNI multiplies with vpmaddubsw, whose int16 pair sums overflow.
    target tvm/x86: asked of the CPU TVM compiles for (TVM's own target features); target ort:
    of this machine's CPU flags, where onnxruntime runs it (on such a CPU its kernels gave ViT a
    0.960 cosine with full-range weights, 0.999 with 7-bit ones). arm (sdot), cuda (dp4a) and
    VNNI CPUs are exact on full range."""
    if target in ("tvm", "x86"):
        try:
            from onnxpress.backends.tvm.int8_kernels import weights_need_7_bits
        except ImportError:        # no TVM installed: nothing will compile this model here
            return False
        return weights_need_7_bits(target)
    if target == "ort":
        return _host_is_x86_without_vnni()
    return False


def _host_is_x86_without_vnni() -> bool:
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:
        return False                # cannot tell: full range, as onnxruntime's own default
    return bool(flags) and not ({"avx512_vnni", "avx_vnni"} & set(flags))


def warn_float_layers(pass_name: str, figures: dict) -> None:
    """Say so when eligible layers kept float kernels: a user who asked for int8 must not get
    a float model without a word."""
    if not figures.get("layers_float"):
        return
    import warnings

    warnings.warn(
        f"{pass_name}: {figures['int8_compute_nodes']} of {figures['layers']} layers got integer "
        f"kernels; {figures['layers_float']} stayed float ({figures['float_why']}). The report's "
        "'float_layers' names each one.", stacklevel=3)
