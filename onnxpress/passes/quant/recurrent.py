"""Recurrent ops (LSTM, GRU, RNN) in int8: weights per gate row, state and gates in float.

    before:  Y, Yh, Yc = LSTM(X, W fp32 [D, 4H, I], R fp32 [D, 4H, H], B fp32, ., h0, c0)
    after:   Y, Yh, Yc = LSTM(X, DQ(W int8, one scale per row), DQ(R int8, one scale per row),
                              B fp32, ., h0, c0)

A row of W or R is one output channel of one gate, so each gate gets its own scales. The
recurrent state (h, c) and the bias stay float: an error in the state would be fed back into
every later step. onnxruntime has no static int8 kernel for these ops, so the form is
weight-only: a quarter of the weight bytes, at fp32's speed. (Its com.microsoft
DynamicQuantizeLSTM, which quantizes x and h at every step, is faster but loses per-step
decisions: bench/bench_recurrent.py measures it through onnxruntime's quantize_dynamic.)
Nodes in If/Loop/Scan bodies are handled like the main graph's.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxpress.passes.quant.common import FLOAT, Names, make_dq_weight, quantize_weight
from onnxpress.passes.quant.latency import node_key
from onnxpress.stats import iter_graphs

RECURRENT = ("LSTM", "GRU", "RNN")
WEIGHT_ONLY_WHY = ("recurrent: int8 weights per gate row, float gates and state "
                   "(onnxruntime has no static int8 kernel for it)")


def _float_init(graph: onnx.GraphProto, name: str) -> onnx.TensorProto | None:
    inputs = {i.name for i in graph.input}
    t = next((t for t in graph.initializer if t.name == name), None)
    if t is None or name in inputs or t.data_type != FLOAT or len(t.dims) != 3:
        return None
    return t


def _dq_rows(graph: onnx.GraphProto, init: onnx.TensorProto, names: Names) -> list[onnx.NodeProto]:
    """Replace `init` ([D, rows, cols] float) by int8 with one scale per (direction, row),
    read back under the same name. D == 1: one per-axis DequantizeLinear (axis 1); D > 1: the
    rows of every direction stacked, DequantizeLinear on axis 0, then Reshape back."""
    d, rows, cols = init.dims
    if d == 1:
        node, _ = make_dq_weight(graph, init, 1, names)
        return [node]
    w = numpy_helper.to_array(init).reshape(d * rows, cols)
    q, scale = quantize_weight(w, 0)
    qn, sn, zn = names(init.name + "_q"), names(init.name + "_s"), names(init.name + "_zp")
    flat, shape = names(init.name + "_rows"), names(init.name + "_shape")
    graph.initializer.remove(init)
    graph.initializer.extend([
        numpy_helper.from_array(q, qn), numpy_helper.from_array(scale, sn),
        numpy_helper.from_array(np.zeros(scale.shape, np.int8), zn),
        numpy_helper.from_array(np.array([d, rows, cols], np.int64), shape)])
    return [helper.make_node("DequantizeLinear", [qn, sn, zn], [flat], axis=0),
            helper.make_node("Reshape", [flat, shape], [init.name])]


def _dequantized(graph: onnx.GraphProto) -> set[str]:
    """Names `graph` computes by DequantizeLinear (or its Reshape, for stacked directions)."""
    out = {m.output[0] for m in graph.node if m.op_type == "DequantizeLinear"}
    return out | {m.output[0] for m in graph.node if m.op_type == "Reshape" and m.input[0] in out}


def quantize_recurrent(model: onnx.ModelProto, names: Names, *, selected=None
                       ) -> dict[str, str]:
    """Quantize the W and R weights of every LSTM/GRU/RNN (main graph and bodies) in place,
    weight-only (DequantizeLinear, any runtime); `selected(node) -> bool` limits the nodes.
    A body's node that reads its weights from the main graph (an LSTM in both branches of an
    If) gets them dequantized there, once. Returns {layer: why} for every recurrent layer that
    is not an integer kernel (weight-only ones included), keyed like `float_layers`."""
    main = model.graph
    why: dict[str, str] = {}
    heads: dict[int, list[onnx.NodeProto]] = {}
    done: set[str] = set(_dequantized(main))
    for g in iter_graphs(main):
        local = _dequantized(g)
        for n in g.node:
            if n.op_type not in RECURRENT or n.domain not in ("", "ai.onnx"):
                continue
            key = node_key(n)
            if selected is not None and not selected(n):
                why[key] = "excluded by the pass options"
                continue
            home = g
            w, r = (_float_init(g, n.input[k]) for k in (1, 2))
            if w is None and r is None and g is not main:
                w, r = (_float_init(main, n.input[k]) for k in (1, 2))
                home = main
            if w is None or r is None:
                quantized = {n.input[1], n.input[2]} <= done | local
                why[key] = WEIGHT_ONLY_WHY if quantized else \
                    "W or R is not a float initializer of the node's graph or the main graph"
                continue
            for init in (w, r):
                heads.setdefault(id(home), []).extend(_dq_rows(home, init, names))
                done.add(init.name)
            why[key] = WEIGHT_ONLY_WHY
    for g in iter_graphs(main):
        if heads.get(id(g)):
            nodes = heads[id(g)] + list(g.node)
            del g.node[:]
            g.node.extend(nodes)
    return why


def selector(op_types: list[str] | None, exclude_nodes: list[str] | None,
             exclude_op_types: list[str] | None):
    """The `selected` predicate of quantize_recurrent for quant_int8's options (op_types None:
    every recurrent op)."""
    ops = set(op_types or RECURRENT) - set(exclude_op_types or ())
    excluded = set(exclude_nodes or ())
    return lambda n: n.op_type in ops and n.name not in excluded


def keep_recurrent_int8(model: onnx.ModelProto, options: dict) -> tuple[onnx.ModelProto, dict]:
    """After a latency decision: weight-only recurrent layers cost no time on onnxruntime (it
    dequantizes the weights once, at load), so a candidate that went back to float gets them
    again. Returns (model, {layer: why}); the model is a copy when anything changed."""
    pick = selector(options.get("op_types"), options.get("exclude_nodes"),
                    options.get("exclude_op_types"))
    todo = any(n.op_type in RECURRENT and pick(n) and (_float_init(g, n.input[1]) is not None
                                                       or _float_init(model.graph, n.input[1]))
               for g in iter_graphs(model.graph) for n in g.node)
    if todo:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        model = copy
    return model, quantize_recurrent(model, Names(model), selected=pick)
