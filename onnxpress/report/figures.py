"""The report's data: every figure the HTML shows, as one JSON-able dict (the report's JSON twin).

Each section is present only when its data exists:

    models        before/after: nodes, params, bytes, weight bytes, MACs, op histogram,
                  peak memory (when metadata_props["onnxpress.memory_plan"] holds a plan)
    passes        one row per pass (PassReport.to_dict()), when a PipelineResult is given
    size_by_op    weight bytes per layer type, before and after
    quality       output error of each lossy pass's model against the input model on the
                  verification inputs (figures["vs_input"], written by passes.error.InputError,
                  which `optimize --report` runs); without those, of the whole pipeline on
                  generated inputs at the bound shapes, when a lossy pass ran
    sensitivity   per-layer quantization sensitivity, from a pass figure named sensitivity,
                  layer_sensitivity or per_layer_sensitivity ({layer: number})
    sparsity      fraction of zero weights per layer (prune's per_layer) or of pruned channels per
                  group (prune's per_group "kept/total")
    memory        live activation bytes at each step of the planned order, arena and lower bound
    latency       milliseconds per model/backend, side by side ({label: ms} from extra["latency"],
                  quant's latency_fp32_ms/latency_int8_ms figures, or a measurement)
    extra         anything else the caller passes (e.g. a TVM compile: target, trials)

The collectors never assume a key exists: a pass that records nothing adds no section.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import onnx

from onnxpress import stats

PLAN_KEY = "onnxpress.memory_plan"
SENSITIVITY_KEYS = ("sensitivity", "layer_sensitivity", "per_layer_sensitivity", "sensitivities")
SPARSITY_KEYS = ("per_layer", "sparsity_per_layer", "per_layer_sparsity")
# Nodes that only reshape or dequantize a weight before the layer that uses it.
_WEIGHT_CARRIERS = {"DequantizeLinear", "Cast", "Transpose", "Reshape", "Identity", "Unsqueeze",
                    "Squeeze", "Constant"}


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float, np.integer, np.floating)):
        f = float(v)
        return f if np.isfinite(f) else None
    if isinstance(v, Mapping):
        for k in ("error", "mse", "drop", "sensitivity", "rel_error", "max_abs", "sqnr_db", "sqnr"):
            if k in v:
                return _number(v[k])
    return None


def read_memory_plan(model: onnx.ModelProto) -> dict[str, Any] | None:
    """The memory plan stored by the `reuse` pass, or None (never raises on a bad entry)."""
    for p in model.metadata_props:
        if p.key == PLAN_KEY:
            try:
                plan = json.loads(p.value)
            except json.JSONDecodeError:
                return None
            return plan if isinstance(plan, dict) else None
    return None


def model_summary(model: onnx.ModelProto, shapes: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Counts, bytes, MACs and (when planned) peak memory of one model; dynamic dims bound by
    `shapes` as `onnxpress inspect --shape` binds them, so both say the same."""
    try:
        if shapes:
            from onnxpress.passes.graph import bind_input_shapes

            st = stats.model_stats(bind_input_shapes(model, dict(shapes)))
        else:
            st = stats.model_stats(model)
        macs, hist = st.macs, st.op_histogram
        unknown = len(st.unknown_shape_layers)
    except Exception:  # MACs need shapes; a model whose shapes cannot be inferred still reports
        macs, hist, unknown = None, {}, None
        from collections import Counter

        hist = dict(Counter(n.op_type for n in stats.iter_nodes(model.graph)).most_common())
    out: dict[str, Any] = {
        "nodes": stats.count_nodes(model),
        "params": stats.count_params(model),
        "bytes": model.ByteSize(),
        "weight_bytes": stats.weight_bytes(model),
        "macs": macs,
        "macs_unknown_layers": unknown,
        "op_histogram": hist,
        "opset": {(o.domain or "ai.onnx"): o.version for o in model.opset_import},
    }
    plan = read_memory_plan(model)
    if plan:
        for key in ("arena_bytes", "lower_bound_bytes", "naive_bytes"):
            if isinstance(plan.get(key), (int, float)):
                out[f"peak_{key}"] = plan[key]
        out["peak_memory_bytes"] = plan.get("arena_bytes")
    return out


def _planned_peak(model: onnx.ModelProto, plan: Mapping[str, Any]) -> dict[str, Any]:
    """Plan the input model's activations with the bindings the after-plan used, so peak memory
    compares like with like (what the reuse pass would give on the unoptimized model)."""
    bindings = plan.get("bindings") or {}
    dims = {k: v for k, v in bindings.items() if isinstance(v, int)}
    shapes = {k: v for k, v in bindings.items() if isinstance(v, list)}
    try:
        from onnxpress.passes.memory import plan_memory

        before_plan, _ = plan_memory(model, dims=dims or None, shapes=shapes or None,
                                     alignment=int(plan.get("alignment", 64)))
    except Exception:  # no memory planner here, or a model it cannot plan: leave the card empty
        return {}
    return {"peak_memory_bytes": before_plan.get("arena_bytes"),
            "peak_arena_bytes": before_plan.get("arena_bytes"),
            "peak_lower_bound_bytes": before_plan.get("lower_bound_bytes"),
            "peak_naive_bytes": before_plan.get("naive_bytes"),
            "peak_memory_note": "planned by onnxpress for comparison (the input held no plan)"}


def _tensor_bytes(t: onnx.TensorProto) -> int:
    n = int(np.prod(t.dims)) if len(t.dims) else 1
    try:
        item = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        item = 1
    if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (n + 1) // 2
    return n * item


def weight_bytes_by_op(model: onnx.ModelProto) -> dict[str, int]:
    """Weight bytes attributed to the layer type that uses them.

    A weight that passes through DequantizeLinear/Transpose/Reshape/Cast first is counted for the
    layer at the end of that chain (a QDQ Conv's int8 weight counts as Conv).
    """
    out: dict[str, int] = defaultdict(int)
    for g in stats.iter_graphs(model.graph):
        weights: dict[str, int] = {t.name: _tensor_bytes(t) for t in g.initializer}
        for node in g.node:
            if node.op_type == "Constant":
                for a in node.attribute:
                    if a.type == onnx.AttributeProto.TENSOR:
                        weights[node.output[0]] = _tensor_bytes(a.t)
        consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in g.node:
            for i in node.input:
                if i:
                    consumers[i].append(node)

        def user_of(name: str, depth: int = 0, g=g, consumers=consumers) -> str:
            users = consumers.get(name, [])
            if not users:
                return "(graph output)" if any(o.name == name for o in g.output) else "(unused initializers)"
            node = users[0]
            if node.op_type in _WEIGHT_CARRIERS and depth < 4 and node.output:
                return user_of(node.output[0], depth + 1)
            return node.op_type

        for name, size in weights.items():
            out[user_of(name)] += size
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def size_by_op(before: onnx.ModelProto, after: onnx.ModelProto) -> dict[str, Any]:
    b, a = weight_bytes_by_op(before), weight_bytes_by_op(after)
    ops = sorted(set(b) | set(a), key=lambda k: -(b.get(k, 0) + a.get(k, 0)))
    return {"op_types": ops, "before": [b.get(k, 0) for k in ops], "after": [a.get(k, 0) for k in ops]}


def _pass_dicts(pipeline_result: Any) -> list[dict[str, Any]]:
    if pipeline_result is None:
        return []
    if isinstance(pipeline_result, Mapping):
        return list(pipeline_result.get("passes", []))
    reports = getattr(pipeline_result, "reports", None)
    if reports is None and isinstance(pipeline_result, Iterable):
        reports = list(pipeline_result)
    out = []
    for r in reports or []:
        out.append(r.to_dict() if hasattr(r, "to_dict") else dict(r))
    return out


def _sensitivity_rows(rows: list[Any]) -> dict[str, Any] | None:
    """quant_auto's table: [{layer, op, params, int8: degradation, int4: ..., chosen}, ...]."""
    skip = {"layer", "op", "params", "chosen", "name"}
    layers: list[str] = []
    series: dict[str, list[float | None]] = {}
    chosen: list[str | None] = []
    for row in rows:
        if not isinstance(row, Mapping) or "layer" not in row:
            continue
        layers.append(str(row["layer"]))
        chosen.append(str(row["chosen"]) if row.get("chosen") is not None else None)
        for k, v in row.items():
            if k in skip:
                continue
            x = _number(v)
            if x is None and v is not None:
                continue
            series.setdefault(str(k), [None] * (len(layers) - 1)).append(x)
        for vals in series.values():
            if len(vals) < len(layers):
                vals.append(None)
    series = {k: v for k, v in series.items() if any(x is not None for x in v)}
    if not layers or not series:
        return None
    main = "int8" if "int8" in series else next(iter(series))
    return {"layers": layers, "values": [x if x is not None else 0.0 for x in series[main]],
            "key": main, "series": series, "chosen": chosen}


def sensitivity(passes: list[dict[str, Any]]) -> dict[str, Any] | None:
    """{pass, key, layers, values[, series, chosen]} from the last pass that recorded per-layer
    sensitivity: a {layer: number} dict, or quant_auto's rows (one degradation per precision)."""
    found = None
    for p in passes:
        figs = p.get("figures") or {}
        for key in SENSITIVITY_KEYS:
            v = figs.get(key)
            if isinstance(v, Mapping):
                pairs = [(str(k), _number(x)) for k, x in v.items()]
                pairs = [(k, x) for k, x in pairs if x is not None]
                if pairs:
                    found = {"pass": p.get("name"), "key": key,
                             "layers": [k for k, _ in pairs], "values": [x for _, x in pairs]}
            elif isinstance(v, list):
                table = _sensitivity_rows(v)
                if table:
                    metric = figs.get("metric")
                    table["key"] = f"{table['key']} degradation" + (f" ({metric})" if metric else "")
                    found = {"pass": p.get("name"), **table}
    return found


def quality(passes: list[dict[str, Any]], before: onnx.ModelProto, after: onnx.ModelProto,
            shapes: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """{rows: [{pass, min_cosine, rel_l2, max_abs[, top1_agreement]}], inputs}: each lossy
    pass's output error against the input model (see the module docstring)."""
    from onnxpress.passes.error import ERROR_KEYS, InputError, is_lossy, outputs_error

    rows = []
    for p in passes:
        v = (p.get("figures") or {}).get(InputError.KEY)
        if isinstance(v, Mapping) and any(k in v for k in ERROR_KEYS):
            rows.append({"pass": str(p.get("name")), **{k: v[k] for k in ERROR_KEYS if k in v}})
    if rows:
        return {"rows": rows, "inputs": "the verification inputs (first calibration batch, "
                "else generated at the bound shapes)"}
    if not any(is_lossy(str(p.get("name"))) or any(is_lossy(str(c.get("name")))
                                                  for c in p.get("children") or [])
               for p in passes):
        return None
    from onnxpress.backends import ort
    from onnxpress.data import make_inputs
    from onnxpress.errors import OnnxPressError

    try:
        feeds = make_inputs(before, shapes=shapes, seed=0)
        ref, got = ort.run(before, feeds), ort.run(after, feeds)
    except OnnxPressError:  # a model onnxruntime cannot run still gets its report
        return None
    names = list(ref)
    return {"rows": [{"pass": "whole pipeline",
                      **outputs_error([ref[n] for n in names], [got.get(n) for n in names])}],
            "inputs": "generated inputs at the bound shapes (no per-pass figures were recorded)"}


def sparsity(passes: list[dict[str, Any]]) -> dict[str, Any] | None:
    """{pass, kind, layers, values}: zero-weight fraction per layer, or pruned-channel fraction."""
    found = None
    for p in passes:
        figs = p.get("figures") or {}
        for key in SPARSITY_KEYS:
            v = figs.get(key)
            if isinstance(v, Mapping):
                pairs = [(str(k), _number(x)) for k, x in v.items()]
                pairs = [(k, x) for k, x in pairs if x is not None]
                if pairs:
                    found = {"pass": p.get("name"), "kind": "zero weights",
                             "layers": [k for k, _ in pairs], "values": [x for _, x in pairs]}
        groups = figs.get("per_group")
        if isinstance(groups, Mapping):
            layers, values = [], []
            for k, v in groups.items():
                try:
                    kept, total = (int(x) for x in str(v).split("/"))
                except ValueError:
                    continue
                if total > 0:
                    layers.append(str(k))
                    values.append(1.0 - kept / total)
            if layers:
                found = {"pass": p.get("name"), "kind": "pruned channels",
                         "layers": layers, "values": values}
    return found


def memory_timeline(plan: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Live activation bytes at each step of the planned order (an in-place pair counted once)."""
    if not plan or not isinstance(plan.get("tensors"), Mapping) or not plan.get("order"):
        return None
    order = list(plan["order"])
    steps = max(1, len(order))
    diff = np.zeros(steps + 1, dtype=np.int64)
    for t in plan["tensors"].values():
        try:
            size, first, last = int(t["size"]), int(t["first"]), int(t["last"])
        except (KeyError, TypeError, ValueError):
            continue
        first, last = max(0, min(first, steps - 1)), max(0, min(last, steps - 1))
        diff[first] += size
        diff[last + 1] -= size
        if t.get("inplace_of"):
            diff[first] -= size
            diff[first + 1] += size
    live = np.cumsum(diff)[:-1]
    return {
        "steps": list(range(steps)), "nodes": order, "live_bytes": [int(x) for x in live],
        "arena_bytes": plan.get("arena_bytes"), "lower_bound_bytes": plan.get("lower_bound_bytes"),
        "naive_bytes": plan.get("naive_bytes"), "algorithm": plan.get("algorithm"),
        "peak_node": (plan.get("peak") or {}).get("node"),
    }


def latency(passes: list[dict[str, Any]], extra: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """{labels, ms, source}: latency side by side from the caller, then from pass figures."""
    labels: list[str] = []
    values: list[float] = []
    sources: list[str] = []

    def add(label: str, ms: Any, source: str) -> None:
        x = _number(ms)
        if x is not None and x > 0 and label not in labels:
            labels.append(label)
            values.append(x)
            sources.append(source)

    given = (extra or {}).get("latency")
    if isinstance(given, Mapping):
        for k, v in given.items():
            add(str(k), v, "measured")
    for p in passes:
        figs = p.get("figures") or {}
        name = p.get("name", "?")
        # what the latency-aware quant passes record: the float model's wall time at 2
        # threads and the speedup of the model they returned
        fp32 = _number(figs.get("latency_fp32_wall_ms"))
        speedup = _number(figs.get("speedup"))
        if fp32:
            add(f"input of {name} (timed by it)", fp32, name)
            if speedup:
                add(f"output of {name} (timed by it)", fp32 / speedup, name)
    if not labels:
        return None
    return {"labels": labels, "ms": values, "source": sources}


def collect(
    *,
    before: onnx.ModelProto,
    after: onnx.ModelProto,
    pipeline_result: Any = None,
    extra: Mapping[str, Any] | None = None,
    title: str | None = None,
    shapes: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Every figure of the report as one JSON-able dict (see the module docstring); `shapes`
    binds dynamic dims for MACs (as `optimize --shape` does)."""
    from onnxpress import __version__
    from onnxpress.passes.pipeline import _jsonable

    passes = _pass_dicts(pipeline_result)
    plan = read_memory_plan(after)
    if plan is None:
        for p in passes:
            cand = (p.get("figures") or {}).get("memory_plan")
            if isinstance(cand, Mapping):
                plan = dict(cand)
    models = {"before": model_summary(before, shapes), "after": model_summary(after, shapes)}
    if plan and "peak_memory_bytes" not in models["before"]:
        models["before"].update(_planned_peak(before, plan))
    data: dict[str, Any] = {
        "title": title or "onnxpress report",
        "generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "onnxpress_version": __version__,
        "models": models,
    }
    if passes:
        # the memory plan can be large; the memory section carries what the report needs of it
        data["passes"] = [{**p, "figures": {k: v for k, v in (p.get("figures") or {}).items()
                                            if k != "memory_plan"}} for p in passes]
    sections = {
        "size_by_op": size_by_op(before, after),
        "quality": quality(passes, before, after, shapes),
        "sensitivity": sensitivity(passes),
        "sparsity": sparsity(passes),
        "memory": memory_timeline(plan),
        "latency": latency(passes, extra),
    }
    for k, v in sections.items():
        if v:
            data[k] = v
    rest = {k: v for k, v in (extra or {}).items() if k != "latency"}
    if rest:
        data["extra"] = rest
    return _jsonable(data)


__all__ = ["collect", "model_summary", "weight_bytes_by_op", "size_by_op", "quality", "sensitivity",
           "sparsity",
           "memory_timeline", "latency", "read_memory_plan", "PLAN_KEY"]
