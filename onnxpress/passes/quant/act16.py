"""16-bit activations for chosen int8 layers (quant_auto's "w8a16" rung).

    int8:   x -> Q(uint8) -> DQ -> MatMul(DQ(W int8)) -> y      (or MatMulIntegerToFloat)
    w8a16:  x -> Q(uint16) -> DQ -> MatMul(Cast(W int8) * s) -> y   (same weights, same size)

The weights keep their int8 bytes; only the activation a layer reads gets 256x finer steps over
its full calibrated range (min/max: at 16 bits clipping outliers buys nothing). A tensor read by
int8 and 16-bit layers alike keeps its 8-bit pair for the int8 readers and gets a second, 16-bit
pair for the others. onnxruntime's CPU has no 16-bit integer kernels: it runs such a layer in
float after DequantizeLinear, so this rung buys accuracy at int8 size, not speed (NPU runtimes
such as QNN run A16W8 natively). A MatMul's int8 weight is written as Cast -> Mul(scale), which
onnxruntime folds into a float weight when it loads the model (see float_weight). Opset 21 QuantizeLinear/DequantizeLinear carry
uint16; older models on onnxruntime get com.microsoft's (onnxruntime's quantizer does the same),
other targets are raised to opset 21.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxpress.passes.quant.calibrate import CalibrationStats
from onnxpress.passes.quant.common import Names, ensure_opset, opset_version, set_opset
from onnxpress.passes.quant.latency import node_key
from onnxpress.stats import iter_graphs

COMPUTE = ("Conv", "MatMul", "Gemm")


def act16_qparams(lo: float, hi: float) -> tuple[np.float32, np.uint16]:
    """(scale, zero point) of an asymmetric uint16 range that holds zero exactly."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 65535.0
    if not scale > 0 or not np.isfinite(scale):
        return np.float32(1.0), np.uint16(0)
    return np.float32(scale), np.uint16(np.clip(round(-lo / scale), 0, 65535))


def widen_activations(model: onnx.ModelProto, layers: dict[str, str], stats: CalibrationStats,
                      *, contrib_ops: bool) -> tuple[onnx.ModelProto, int]:
    """Give the int8 layers in `layers` ({node key: the activation it read before quantization,
    whose calibrated range the 16-bit pair takes}) 16-bit input activations.

    `model` is quantize_static's output; a layer it left float is skipped. Returns (model,
    layers widened)."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    inits = {t.name: t for t in graph.initializer}

    def float_source(q_out: str) -> str | None:
        """The float tensor behind a Q output (renamed when it was quantized at its source)."""
        q = producer.get(q_out)
        return q.input[0] if q is not None and q.op_type == "QuantizeLinear" else None

    targets = []
    for pos, n in enumerate(graph.node):
        key = layers.get(node_key(n))
        if key is None or key not in stats:
            continue
        if n.op_type == "MatMulIntegerToFloat":
            src = float_source(n.input[0])
        elif n.op_type in COMPUTE:
            dq = producer.get(n.input[0])
            src = float_source(dq.input[0]) if dq is not None and \
                dq.op_type == "DequantizeLinear" else None
        else:
            src = None
        if src is not None:
            targets.append((pos, n, src, key))
    if not targets:
        return model, 0

    standard = opset_version(model) >= 21
    if not standard and not contrib_ops:
        model, _ = ensure_opset(model, 21)
        return widen_activations(model, layers, stats, contrib_ops=contrib_ops)
    domain = "" if standard else "com.microsoft"
    if domain:
        set_opset(model, domain, 1)
    names = Names(model)
    pairs: dict[str, str] = {}               # float tensor -> its 16-bit DQ output
    new_inits: list[onnx.TensorProto] = []
    before_of: dict[int, list[onnx.NodeProto]] = {}      # position -> nodes to put before it
    after_of: dict[int, list[onnx.NodeProto]] = {}
    replaced: set[str] = set()           # inputs of rewritten layers: dropped if no longer read

    def add_init(arr: np.ndarray, base: str) -> str:
        name = names(base)
        new_inits.append(numpy_helper.from_array(arr, name))
        return name

    def float_weight(dq: onnx.NodeProto, before: list[onnx.NodeProto]) -> str | None:
        """The int8 weight behind `dq` as Cast -> Mul(scale), which onnxruntime folds into a
        float weight at load: a DequantizeLinear -> MatMul it would fuse into MatMulNBits with
        int8 compute (accuracy_level 4), quantizing the 16-bit activation again, to 8 bits per
        block of 32 (on a test model with an outlier channel that cost 0.41 of cosine)."""
        q, s = inits.get(dq.input[0]), inits.get(dq.input[1])
        zp = inits.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        if q is None or s is None or len(q.dims) != 2 or (len(s.dims) and axis not in (1, -1)) \
                or (zp is not None and numpy_helper.to_array(zp).any()):
            return None
        cast, w = names(dq.input[0] + "_float"), names(dq.output[0] + "_w16")
        before += [helper.make_node("Cast", [dq.input[0]], [cast], to=onnx.TensorProto.FLOAT),
                   helper.make_node("Mul", [cast, dq.input[1]], [w])]
        return w

    for pos, n, src, key in targets:
        before = before_of.setdefault(pos, [])
        if src not in pairs:
            scale, zp = act16_qparams(*stats.range(key, "minmax"))
            sn, zn = add_init(np.array(scale), key + "_s16"), add_init(np.array(zp), key + "_zp16")
            qn, dqn = names(key + "_q16"), names(key + "_dq16")
            before += [helper.make_node("QuantizeLinear", [src, sn, zn], [qn], domain=domain),
                       helper.make_node("DequantizeLinear", [qn, sn, zn], [dqn], domain=domain)]
            pairs[src] = dqn
        if n.op_type != "MatMulIntegerToFloat":
            n.input[0] = pairs[src]
            w_dq = producer.get(n.input[1])
            if n.op_type == "MatMul" and w_dq is not None and w_dq.op_type == "DequantizeLinear":
                n.input[1] = float_weight(w_dq, before) or n.input[1]
            continue
        # MatMulIntegerToFloat(xq, W, xs, ws, xz, wz[, bias]) -> MatMul(x16, W as float) [+ bias]
        inputs = list(n.input)
        replaced.update(inputs[2:6])        # (wz, a zero point per channel, may now be unread)
        w = float_weight(helper.make_node("DequantizeLinear", [inputs[1], inputs[3], inputs[5]],
                                          [inputs[1] + "_dq"], axis=1), before)
        if w is None:
            w = names(inputs[1] + "_dq")
            before.append(helper.make_node("DequantizeLinear", [inputs[1], inputs[3], inputs[5]],
                                           [w], axis=1))
        out = n.output[0]
        mm_out = names(out + "_mm") if len(inputs) > 6 and inputs[6] else out
        layer = helper.make_node("MatMul", [pairs[src], w], [mm_out], name=n.name)
        n.CopyFrom(layer)
        if mm_out != out:
            after_of.setdefault(pos, []).append(
                helper.make_node("Add", [mm_out, inputs[6]], [out], name=names(n.name + "_bias")))
    ordered = []
    for pos, n in enumerate(graph.node):
        ordered += before_of.get(pos, []) + [n] + after_of.get(pos, [])
    del graph.node[:]
    graph.node.extend(ordered)
    widen_outputs(graph, {n.output[0] for _, n, _, _ in targets}, stats, domain, add_init)
    graph.initializer.extend(new_inits)
    # an 8-bit pair that only fed widened layers now feeds nothing
    dropped: set[str] = set(replaced)
    while True:
        used = _read(graph)
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in used for o in n.output)]
        if not dead:
            break
        gone = {n.output[0] for n in dead}
        dropped.update(i for n in dead for i in n.input)
        keep = [n for n in graph.node if not n.output or n.output[0] not in gone]
        del graph.node[:]
        graph.node.extend(keep)
    used = _read(graph)
    keep_inits = [t for t in graph.initializer if t.name in used or t.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(keep_inits)
    return model, len(targets)


def widen_outputs(graph: onnx.GraphProto, outputs: set[str], stats: CalibrationStats, domain: str,
                  add_init) -> None:
    """A widened layer's output quantized at its source (a Conv, or a MatMul with an absorbed
    Relu) goes to 16 bits too, unless an integer kernel reads the 8-bit pair."""
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)

    def from_dq(t: str) -> bool:
        p = producer.get(t)
        return p is not None and p.op_type == "DequantizeLinear"

    def integer_reader(r: onnx.NodeProto) -> bool:
        if r.op_type in COMPUTE:
            return r.name not in widened and len(r.input) > 1 and from_dq(r.input[1])
        acts = [i for i in r.input if i and i in producer]
        return bool(acts) and all(from_dq(i) for i in acts)   # an integer chain (QLinearAdd..)

    widened = {n.name for n in graph.node if n.output and n.output[0] in outputs}
    for q in list(graph.node):
        if q.op_type != "QuantizeLinear" or q.input[0] not in outputs or q.domain != "":
            continue
        dqs = readers.get(q.output[0], [])
        if not dqs or any(d.op_type != "DequantizeLinear" for d in dqs) or any(
                integer_reader(r) for d in dqs for r in readers.get(d.output[0], [])):
            continue
        key = next((d.output[0] for d in dqs if d.output[0] in stats), None)
        if key is None:
            continue
        scale, zp = act16_qparams(*stats.range(key, "minmax"))
        sn, zn = add_init(np.array(scale), key + "_s16"), add_init(np.array(zp), key + "_zp16")
        for node in [q, *dqs]:
            node.input[1], node.input[2] = sn, zn
            node.domain = domain


def _read(graph: onnx.GraphProto) -> set[str]:
    """Every tensor some node reads (subgraphs included) or the graph returns."""
    return {i for g in iter_graphs(graph) for n in g.node for i in n.input} | \
        {o.name for o in graph.output}
