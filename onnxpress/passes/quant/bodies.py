"""int8 inside If/Loop bodies: each body is calibrated and quantized as a model of its own.

    calibration batch -> the float model, with every value a body reads from outer scope (and
                         the If condition, the Loop's trip count and initial values) as outputs
    If:   the branch the condition picks runs as a model whose inputs are its outer reads
    Loop: the body runs as a model, iteration after iteration, its carried values fed back
      --> statistics of every float tensor of the body (calibrate.TensorStats)
      --> quantize_static on the body-as-model: the same placement as in the main graph
          (x -> Q -> DQ -> Conv(DQ(W int8)) -> Q -> DQ; onnxruntime fuses QLinearConv in bodies too)
      --> the quantized nodes go back into the body, renamed where they would collide

A body that cannot be calibrated (a branch no calibration batch takes, a body holding another
body, an outer value of unknown type) still gets int8 weights (weight-only), and the figures
say which and why.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxpress.passes.context import PassContext
from onnxpress.passes.graph import has_subgraphs
from onnxpress.passes.quant.calibrate import (
    CalibrationStats,
    TensorStats,
    _augment,
    float_activations,
)
from onnxpress.passes.quant.common import (
    FLOAT,
    Names,
    replace_graph_nodes,
    restore_fused_ops,
    set_opset,
    split_fused_ops,
)
from onnxpress.stats import iter_graphs

MAX_LOOP_ITERATIONS = 10_000


@dataclasses.dataclass
class Body:
    """One body of a main-graph If/Loop: where it sits and what it reads from outer scope."""

    node: onnx.NodeProto
    attr: str                        # then_branch / else_branch / body
    graph: onnx.GraphProto
    reads: list[str]                 # outer-scope names, in first-use order

    @property
    def label(self) -> str:
        return f"{self.node.name or self.node.op_type}/{self.attr}"


def _defined(graph: onnx.GraphProto) -> set[str]:
    out = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    return out | {o for n in graph.node for o in n.output if o}


def main_graph_bodies(model: onnx.ModelProto) -> list[Body]:
    bodies = []
    for n in model.graph.node:
        if n.op_type not in ("If", "Loop") or n.domain not in ("", "ai.onnx"):
            continue
        for a in n.attribute:
            if a.type != onnx.AttributeProto.GRAPH:
                continue
            defined = _defined(a.g)
            reads: list[str] = []
            for i in (i for m in a.g.node for i in m.input):
                if i and i not in defined and i not in reads:
                    reads.append(i)
            bodies.append(Body(n, a.name, a.g, reads))
    return bodies


def _tensor_info(name: str, shapes: dict) -> onnx.ValueInfoProto | None:
    info = shapes.get(name)
    if info is None or not info[0]:
        return None
    return helper.make_tensor_value_info(name, info[0], info[1])


def body_model(model: onnx.ModelProto, body: Body, shapes: dict) -> onnx.ModelProto | None:
    """The body as a model: its own inputs, then its outer reads as inputs (initializers of the
    main graph as initializers, so their weights are quantized too); its outputs. None when an
    outer read has no known type."""
    inits = {t.name: t for t in model.graph.initializer}
    graph = onnx.GraphProto()
    graph.CopyFrom(body.graph)
    graph.name = body.label
    for r in body.reads:
        if r in inits:
            graph.initializer.append(inits[r])
            continue
        vi = _tensor_info(r, shapes)
        if vi is None:
            return None
        graph.input.append(vi)
    m = helper.make_model(graph, opset_imports=list(model.opset_import))
    m.ir_version = model.ir_version
    return m


def _captures(model: onnx.ModelProto, bodies: list[Body], calib, shapes: dict,
              max_batches: int) -> list[dict[str, np.ndarray]]:
    """Per calibration batch, every outer value the bodies need (and each If's condition and
    each Loop's inputs), from the float model."""
    from onnxpress.backends import ort

    inits = {t.name for t in model.graph.initializer}
    inputs = {i.name for i in model.graph.input}
    want: list[str] = []
    for b in bodies:
        for t in list(b.node.input) + b.reads:
            if t and t not in inits and t not in inputs and t not in want and t in shapes:
                want.append(t)
    sess = ort.session(_augment(model, want, shapes), optimization="basic")
    got = []
    for i, batch in enumerate(calib):
        if i >= max_batches:
            break
        values = dict(zip(want, sess.run(want, batch))) if want else {}
        values.update(batch)
        got.append(values)
    return got


def _value(name: str, captured: dict, inits: dict) -> np.ndarray | None:
    if not name:
        return None
    if name in captured:
        return captured[name]
    return numpy_helper.to_array(inits[name]) if name in inits else None


def calibrate_body(model: onnx.ModelProto, body: Body, temp: onnx.ModelProto,
                   captures: list[dict]) -> tuple[CalibrationStats | None, str]:
    """Run `temp` (body_model) on every batch that reaches the body; (stats, "") or
    (None, why not)."""
    from onnxpress.backends import ort

    shapes = PassContext().analysis("shapes", temp)
    names = float_activations(temp, shapes)
    stats = {n: TensorStats(n) for n in names}
    sess = ort.session(_augment(temp, names, shapes), optimization="basic")
    out_names = [o.name for o in sess.get_outputs()]
    formal = [i.name for i in body.graph.input]
    inits = {t.name: t for t in model.graph.initializer}
    batches = runs = 0
    for cap in captures:
        outer = {r: cap[r] for r in body.reads if r in cap}
        feeds_list: list[dict] = []
        if body.node.op_type == "If":
            cond = bool(np.asarray(_value(body.node.input[0], cap, inits)).reshape(-1)[0])
            if cond == (body.attr == "then_branch"):
                feeds_list.append(outer)
        else:
            trip = _value(body.node.input[0], cap, inits)
            cond = _value(body.node.input[1] if len(body.node.input) > 1 else "", cap, inits)
            carried = [_value(t, cap, inits) for t in body.node.input[2:]]
            limit = MAX_LOOP_ITERATIONS if trip is None else min(int(trip), MAX_LOOP_ITERATIONS)
            go = True if cond is None else bool(cond)
            i = 0
            n_carried = len(carried)
            while go and i < limit:
                feeds = dict(outer)
                feeds[formal[0]] = np.array(i, np.int64)
                feeds[formal[1]] = np.array(go)
                feeds.update(zip(formal[2:], carried))
                res = dict(zip(out_names, sess.run(out_names, feeds)))
                for name, v in res.items():
                    if name in stats:
                        stats[name].update(v)
                go = bool(res[body.graph.output[0].name])
                carried = [res[o.name] for o in body.graph.output[1:1 + n_carried]]
                i += 1
                runs += 1
            batches += i > 0
            continue
        for feeds in feeds_list:
            for name, v in zip(out_names, sess.run(out_names, feeds)):
                if name in stats:
                    stats[name].update(v)
            runs += 1
            batches += 1
    if not runs:
        return None, "no calibration batch reaches this body (the branch is never taken)"
    return CalibrationStats(stats, batches, batches), ""


def _rename_in_graph(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    for n in graph.node:
        for k, i in enumerate(n.input):
            if i in mapping:
                n.input[k] = mapping[i]
        for k, o in enumerate(n.output):
            if o in mapping:
                n.output[k] = mapping[o]
    for t in graph.initializer:
        if t.name in mapping:
            t.name = mapping[t.name]
    for v in graph.value_info:
        if v.name in mapping:
            v.name = mapping[v.name]


def put_back(model: onnx.ModelProto, body: Body, quantized: onnx.ModelProto) -> None:
    """Replace the body's nodes and initializers by the quantized body-as-model's; every name
    the quantization made that the rest of the model also uses gets a fresh one, and main-graph
    weights the body read and quantized into its own copy leave the main graph when unread."""
    q = quantized.graph
    own = _defined(body.graph)
    elsewhere: set[str] = set()
    for g in iter_graphs(model.graph):
        if g is body.graph:
            continue
        elsewhere |= _defined(g) | {i for n in g.node for i in n.input}
    outer_inits = {t.name: t for t in model.graph.initializer}
    # the float weights copied in from the main graph and left as they were: read from there
    unchanged = {t.name for t in q.initializer
                 if t.name in outer_inits and t.name not in own and t.data_type == FLOAT
                 and t.SerializeToString() == outer_inits[t.name].SerializeToString()}
    made = ({o for n in q.node for o in n.output if o}
            | {t.name for t in q.initializer if t.name not in unchanged})
    names = Names(model)
    for t in {i for n in q.node for i in n.input} | made:
        names.taken.add(t)
    mapping = {t: names(t) for t in sorted(made - own) if t in elsewhere}
    _rename_in_graph(q, mapping)
    del body.graph.node[:]
    body.graph.node.extend(q.node)
    del body.graph.initializer[:]
    body.graph.initializer.extend(t for t in q.initializer if t.name not in unchanged)
    produced = _defined(body.graph)
    stale = [v for v in body.graph.value_info if v.name not in produced]
    for v in stale:
        body.graph.value_info.remove(v)
    for o in quantized.opset_import:
        if o.domain not in ("", "ai.onnx"):
            set_opset(model, o.domain, o.version)
    read = {i for g in iter_graphs(model.graph) for n in g.node for i in n.input}
    read |= {o.name for o in model.graph.output}
    gone = [t for t in model.graph.initializer
            if t.name in set(body.reads) and t.name not in read]
    for t in gone:
        model.graph.initializer.remove(t)


def quantize_bodies(float_model: onnx.ModelProto, quantized: onnx.ModelProto, ctx: PassContext,
                    options: dict, *, max_batches: int = 16, latency_aware: bool = False,
                    floor_ms: float = 1.0) -> tuple[onnx.ModelProto, dict]:
    """Quantize the If/Loop bodies of `quantized` (the main graph already done by quant_int8)
    from the bodies of `float_model`, calibrated on ctx's calibration data. latency_aware:
    int8 bodies are kept only when they make the model faster on onnxruntime, as quant_int8
    decides for the main graph (5% on both clocks, unless the model is under floor_ms);
    otherwise the bodies keep int8 weights only.

    Returns (model, figures): `body_layers` {body/layer: int8 | weight-only int8 | float},
    `body_layers_int8`, `body_float_layers` {body/layer: why}, `bodies_calibrated`,
    `body_weights_shared`, and with latency_aware `body_latency_decision`."""
    from onnxpress.passes.quant.latency import node_key

    float_bodies = main_graph_bodies(float_model)
    if not float_bodies:
        return quantized, {}
    shapes = ctx.analysis("shapes", float_model)
    calibratable = [b for b in float_bodies if not any(has_subgraphs(n) for n in b.graph.node)]
    captures = _captures(float_model, calibratable, ctx.calib, shapes, max_batches) \
        if calibratable and ctx.calib is not None else []
    plans = []                 # (index, body, split body-as-model, its fused ops, stats, note)
    skipped: dict[str, str] = {}
    for i, body in enumerate(float_bodies):
        temp = body_model(float_model, body, shapes)
        if temp is None:
            for n in body.graph.node:
                if n.op_type in ("Conv", "MatMul", "Gemm", "FusedConv", "FusedGemm"):
                    skipped[f"{body.label}/{node_key(n)}"] = "an outer value of unknown type"
            continue
        # fused ops split first, so their inner sums and activations get ranges too
        fused = split_fused_ops(temp)
        stats, note = None, "holds another If/Loop body (nested control flow is not calibrated)"
        if body in calibratable:
            try:
                stats, note = calibrate_body(float_model, body, temp, captures)
            except Exception as exc:      # weight-only then, and the figures say why
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                note = f"the body does not run as a model of its own: {first}"[:200]
        plans.append((i, body, temp, fused, stats, note))

    def build(calibrated: bool) -> tuple[onnx.ModelProto, dict[str, str], dict[str, str]]:
        out = onnx.ModelProto()
        out.CopyFrom(quantized)
        targets = main_graph_bodies(out)
        layers, why = {}, dict(skipped)
        for i, body, temp, fused, stats, note in plans:
            target = targets[i] if i < len(targets) else None
            if target is None or (target.node.name, target.attr) != (body.node.name, body.attr):
                continue
            work = onnx.ModelProto()
            work.CopyFrom(temp)
            q, figures = quantize_static(work, stats if calibrated else None,
                                         **{k: v for k, v in options.items() if k != "names_filter"})
            reasons = figures.get("float_reasons", {})
            for k, v in layer_precisions(q).items():     # (a split fused op is named as it was)
                key = f"{body.label}/{k}"
                layers[key] = v
                if v != "int8":
                    why[key] = note or reasons.get(k, "kept float")
            restore_fused_ops(q, fused)
            put_back(out, target, q)
        return out, layers, why

    from onnxpress.passes.quant.qdq import layer_precisions, quantize_static

    out, layers, why = build(calibrated=True)
    decision = ""
    if latency_aware and any(v == "int8" for v in layers.values()) and ctx.calib is not None:
        from onnxpress.passes.quant.latency import relative_costs

        weight_only, _, _ = build(calibrated=False)
        costs, (cpu_ms, _) = relative_costs([weight_only, out], next(iter(ctx.calib)))
        speed = f"{1 / costs[1]:.2f}x the speed of weight-only ones on onnxruntime here"
        if cpu_ms >= floor_ms and costs[1] > 0.95:
            decision = f"int8 bodies {speed}: kept weight-only"
            for key, v in layers.items():
                if v == "int8":
                    layers[key] = "weight-only int8"
                    why[key] = "slower in int8 on onnxruntime here (latency_aware)"
            out = weight_only
        else:
            decision = f"int8 bodies kept ({speed})"
    drop_unread_dequantize(out)
    shared = share_body_weights(out)
    if why:
        import warnings

        warnings.warn(
            f"quant_int8: {len(why)} of {len(layers) or len(why)} layers inside If/Loop bodies kept "
            f"float activations ({'; '.join(sorted(set(why.values())))}). The report's "
            "'body_float_layers' names each one.", stacklevel=3)
    return out, {
        "body_layers": layers,
        "body_layers_int8": sum(v == "int8" for v in layers.values()),
        "body_float_layers": why,
        "bodies_calibrated": sum(p[4] is not None for p in plans),
        "body_weights_shared": shared,
        **({"body_latency_decision": decision} if decision else {}),
    }


def drop_unread_dequantize(model: onnx.ModelProto) -> int:
    """Main-graph weights dequantized for bodies that now hold their own int8 copies: the
    DequantizeLinear (and a stacked-direction Reshape) nobody reads goes, with its int8 data."""
    graph = model.graph
    removed = 0
    while True:
        read = {i for g in iter_graphs(graph) for n in g.node for i in n.input}
        read |= {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type in ("DequantizeLinear", "Reshape")
                and not any(o in read for o in n.output)
                and all(i in {t.name for t in graph.initializer} or i in
                        {m.output[0] for m in graph.node if m.op_type == "DequantizeLinear"}
                        for i in n.input if i)]
        if not dead:
            break
        ids = {id(n) for n in dead}
        replace_graph_nodes(model, graph, [n for n in graph.node if id(n) not in ids],
                            keep={i.name for i in graph.input})
        removed += len(dead)
    return removed


def _read_only_by_recurrent_dq(graph: onnx.GraphProto, name: str) -> bool:
    """Whether `name` is read only by DequantizeLinear nodes whose results (through a
    stacked-direction Reshape) only LSTM/GRU/RNN nodes read. onnxruntime's QDQ rewrites of a
    DequantizeLinear feeding MatMul or Conv in a body need its weight in the body itself (an
    outer-scope one fails the session: "Missing required weight"); nothing rewrites those."""
    from onnxpress.passes.quant.recurrent import RECURRENT

    def readers(t: str) -> list[onnx.NodeProto]:
        return [n for n in graph.node if t in n.input]

    def recurrent_only(t: str) -> bool:
        return all(n.op_type in RECURRENT or (n.op_type == "Reshape" and recurrent_only(n.output[0]))
                   for n in readers(t)) and bool(readers(t))

    first = readers(name)
    return bool(first) and all(n.op_type == "DequantizeLinear" and n.input[0] == name
                               and recurrent_only(n.output[0]) for n in first)


def share_body_weights(model: onnx.ModelProto, *, min_bytes: int = 1024) -> int:
    """Bodies that quantized the same main-graph LSTM/GRU weight hold equal int8 copies of it
    (both branches of an If reading one LSTM): keep one, in the main graph, read by every body.
    Returns how many initializers went to the main graph."""
    from onnxpress.weights import tensor_nbytes

    graph = model.graph
    groups: dict[bytes, list[tuple[onnx.GraphProto, onnx.TensorProto]]] = {}
    for g in iter_graphs(graph):
        if g is graph or any(has_subgraphs(n) for n in g.node):
            continue
        outputs = {o.name for o in g.output}
        for t in g.initializer:
            if (tensor_nbytes(t) >= min_bytes and t.HasField("raw_data") and t.name not in outputs
                    and _read_only_by_recurrent_dq(g, t.name)):
                key = onnx.TensorProto(data_type=t.data_type, dims=t.dims,
                                       raw_data=t.raw_data).SerializeToString()
                groups.setdefault(key, []).append((g, t))
    moved = 0
    for copies in groups.values():
        if len({id(g) for g, _ in copies}) < 2 or len(copies) != len({id(g) for g, _ in copies}):
            continue
        keep = onnx.TensorProto()
        keep.CopyFrom(copies[0][1])
        for g, t in copies:
            if t.name != keep.name:
                _rename_in_graph(g, {t.name: keep.name})
            g.initializer.remove(next(x for x in g.initializer if x.name == keep.name))
        graph.initializer.append(keep)
        moved += 1
    return moved
