"""quant_auto: per-layer sensitivity, then the cheapest per-layer precision that meets a budget.

    1. sensitivity   every weighted layer (MatMul/Gemm/Conv, embedding tables) quantized alone to
                     each candidate precision; outputs on calibration data compared with fp32
                     (min cosine, relative L2, or a user callback such as task accuracy)
    2. assignment    all layers start at the preferred precision (int8 for latency, int4 for
                     size); the most sensitive layers move up a level (int8 -> w8a16: int8
                     weights with 16-bit activations, the same size -> fp16 / int4 weight-only
                     -> fp32), the count found by bisection, until the whole model meets
                     the budget
    3. latency       with objective=latency on onnxruntime, int8 groups that do not pay are
                     dropped by measurement (as in quant_int8)

The calibration statistics are computed once (the "calib" analysis) and serve every trial.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Annotated, Any, Literal

import numpy as np
import onnx

from onnxpress.errors import PassOptionError
from onnxpress.passes.context import PassContext
from onnxpress.passes.graph import copy_model_fields, has_subgraphs
from onnxpress.passes.quant.common import FLOAT
from onnxpress.passes.quant.latency import node_key
from onnxpress.passes.registry import Range, register

PRECISIONS = ("int8", "w8a16", "int4", "fp16", "fp32")    # w8a16: int8 weights, 16-bit activations
# objective=latency gives the mix up for fp32 only when it times this much slower: the same model
# timed twice on a shared 2-core machine differs by a few percent (bench/bench_quant.py)
SLOWER = 1.05


@dataclasses.dataclass
class Layer:
    key: str
    op: str
    params: int
    weight: str


def weighted_layers(model: onnx.ModelProto) -> list[Layer]:
    """Main-graph layers with a constant float weight: Conv, MatMul, Gemm."""
    inits = {t.name: t for t in model.graph.initializer}
    consts = {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    out = []
    for n in model.graph.node:
        if n.op_type not in ("Conv", "MatMul", "Gemm", "FusedConv") or has_subgraphs(n) \
                or len(n.input) < 2:
            continue
        t = inits.get(n.input[1])
        if t is None and n.input[1] not in consts:
            continue
        if t is not None and (t.data_type != FLOAT or len(t.dims) < 2):
            continue
        params = int(np.prod(t.dims)) if t is not None else 0
        out.append(Layer(node_key(n), n.op_type, params, n.input[1]))
    return out


def supports(layer: Layer, precision: str) -> bool:
    if precision == "int4":   # quant_int4 leaves weights under min_weight (1024) float
        return layer.op in ("MatMul", "Gemm") and layer.params >= 1024
    return True


class Scorer:
    """Degradation of a candidate vs the fp32 model on calibration batches (lower is better)."""

    def __init__(self, reference: onnx.ModelProto, batches: list[dict], metric: str,
                 callback: Callable | None):
        from onnxpress.backends import ort

        self.batches = batches
        self.metric = metric
        self.callback = callback
        if metric == "callback":
            if callback is None:
                raise PassOptionError("quant_auto: metric=callback needs callback=fn(model)->score")
            self.base = float(callback(reference))
        else:
            sess = ort.session(reference)
            self.ref = [sess.run(None, b) for b in batches]

    def halves(self) -> list[list[int]]:
        """The evaluation batches in two disjoint halves ([] when they cannot be split: one
        batch, or a callback that scores the whole model)."""
        n = len(self.batches)
        if self.metric == "callback" or n < 2:
            return []
        return [list(range(n // 2)), list(range(n // 2, n))]

    def __call__(self, model: onnx.ModelProto) -> float:
        """Degradation on the evaluation batches (lower is better)."""
        return self.scores(model, [None])[0]

    def scores(self, model: onnx.ModelProto, subsets: list[list[int] | None]) -> list[float]:
        """The degradation on each subset of the evaluation batches (None: all of them), from one
        run of the model over the batches."""
        from onnxpress.backends import ort

        if self.metric == "callback":
            if any(sub is not None for sub in subsets):
                raise PassOptionError("quant_auto: a callback scores the whole model only")
            return [self.base - float(self.callback(model))] * len(subsets)
        sess = ort.session(model)
        tallies = []       # per batch: [worst cosine, squared error, squared norm, agree, total]
        for b, ref in zip(self.batches, self.ref):
            got = sess.run(None, b)
            first = np.asarray(ref[0])
            t = [1.0, 0.0, 0.0, 0, 0]
            tallies.append(t)
            if self.metric == "top1":
                if first.ndim < 2 or not np.issubdtype(first.dtype, np.floating):
                    raise PassOptionError("quant_auto: metric=top1 needs a first output of shape "
                                          "[batch, classes, ...]; use cosine or a callback")
                t[3] = int((first.argmax(-1) == np.asarray(got[0]).argmax(-1)).sum())
                t[4] = int(first.argmax(-1).size)
                continue
            for x, y in zip(ref, got):
                x = np.asarray(x)
                if not np.issubdtype(x.dtype, np.floating):
                    continue
                x = x.astype(np.float64).reshape(len(x), -1) if x.ndim else x.reshape(1, 1)
                y = np.asarray(y, np.float64).reshape(x.shape)
                nx, ny = np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1)
                c = (x * y).sum(1) / np.maximum(nx * ny, 1e-30)
                c = np.where((nx == 0) & (ny == 0), 1.0, c)
                t[0] = min(t[0], float(c.min()))
                t[1] += float(((x - y) ** 2).sum())
                t[2] += float((x ** 2).sum())
        return [self._aggregate([tallies[i] for i in (range(len(tallies)) if sub is None else sub)])
                for sub in subsets]

    def _aggregate(self, tallies: list[list]) -> float:
        if self.metric == "top1":
            return 1.0 - sum(t[3] for t in tallies) / max(sum(t[4] for t in tallies), 1)
        if self.metric == "cosine":
            return 1.0 - min([1.0] + [t[0] for t in tallies])
        return float(np.sqrt(sum(t[1] for t in tallies) / max(sum(t[2] for t in tallies), 1e-30)))


def apply_assignment(model: onnx.ModelProto, stats, assignment: dict[str, str], *,
                     int8_options: dict, int4_options: dict,
                     embeddings: bool) -> onnx.ModelProto:
    """Build the model with each layer at its assigned precision (layers absent stay fp32)."""
    from onnxpress.passes.quant.act16 import widen_activations
    from onnxpress.passes.quant.fp16 import FLOAT16, convert_precision
    from onnxpress.passes.quant.int4 import int4_quantize
    from onnxpress.passes.quant.qdq import COMPUTE, quantize_static

    m = onnx.ModelProto()
    m.CopyFrom(model)
    by = {p: {k for k, v in assignment.items() if v == p} for p in PRECISIONS}
    unnamed16 = [n for n in m.graph.node if not n.name and node_key(n) in by["w8a16"]]
    for n in unnamed16:          # (the key of an unnamed layer is its weight, which int8 renames)
        n.name = node_key(n)
    reads16 = {node_key(n): n.input[0] for n in m.graph.node if node_key(n) in by["w8a16"]}
    if by["int4"]:
        m, _ = int4_quantize(m, embeddings=False, names_filter=lambda n: node_key(n) in by["int4"],
                             **int4_options)
    if by["int8"] or by["w8a16"] or embeddings:
        int8 = by["int8"] | by["w8a16"]
        m, _ = quantize_static(
            m, stats, embeddings=embeddings, **int8_options,
            names_filter=lambda n: n.op_type not in COMPUTE or node_key(n) in int8)
    if by["w8a16"]:
        m, _ = widen_activations(m, reads16, stats, contrib_ops=int8_options["contrib_ops"])
        named = {n.name for n in unnamed16}
        for n in m.graph.node:
            if n.name in named:
                n.name = ""
    if by["fp16"]:
        keep = [n.name for n in m.graph.node if node_key(n) not in by["fp16"]]
        unnamed = [n for n in m.graph.node if not n.name]
        for i, n in enumerate(unnamed):
            n.name = f"quant_auto_node_{i}"
            if node_key(n) not in by["fp16"]:
                keep.append(n.name)
        m, _ = convert_precision(m, dtype=FLOAT16, keep_io_types=True, node_block_list=keep)
    copy_model_fields(model, m)
    return m


def layer_sensitivity(model: onnx.ModelProto, ctx: PassContext, *, precisions: list[str],
                      scorer: Scorer, int8_options: dict, int4_options: dict, stats=None,
                      layers: list[Layer] | None = None, table: dict | None = None
                      ) -> tuple[list[Layer], dict[str, dict[str, float]]]:
    """Each layer (all weighted layers, or `layers`) alone at each precision, scored; adds to
    `table` when given (precisions it already holds for a layer are not measured again)."""
    if stats is None and {"int8", "w8a16"} & set(precisions):
        stats = ctx.analysis("calib", model)
    layers = weighted_layers(model) if layers is None else layers
    table = {} if table is None else table
    jobs = [(layer, p) for layer in layers for p in precisions
            if p != "fp32" and supports(layer, p) and p not in table.get(layer.key, {})]
    for layer, p in ctx.progress_bar(jobs, desc="sensitivity", total=len(jobs)):
        cand = apply_assignment(model, stats, {layer.key: p}, int8_options=int8_options,
                                int4_options=int4_options, embeddings=False)
        table.setdefault(layer.key, {})[p] = scorer(cand)
    return layers, table


def choose_precisions(layers: list[Layer], table: dict, levels: list[str], evaluate: Callable,
                      budget_ok: Callable[[float], bool], ctx: PassContext,
                      measure: Callable[[str, list[Layer]], None] | None = None
                      ) -> tuple[dict[str, str], float, int]:
    """Start every layer at levels[0]; move the most sensitive up a level, bisecting how many,
    until the model meets the budget. `measure(level, layers)` fills in sensitivities the table
    lacks, only for a level the search has to leave. Returns (assignment, degradation, models
    evaluated)."""
    assign = {}
    for layer in layers:
        assign[layer.key] = next(p for p in levels if p == "fp32" or supports(layer, p))
    evaluated = 0
    for j, level in enumerate(levels[:-1]):
        at = [layer for layer in layers if assign[layer.key] == level]
        if not at:
            continue

        def moved(k: int, assign=assign, at=at, j=j) -> dict[str, str]:
            a = dict(assign)
            for layer in at[:k]:
                a[layer.key] = next(p for p in levels[j + 1:] if p == "fp32" or supports(layer, p))
            return a

        d0 = evaluate(assign)
        evaluated += 1
        if budget_ok(d0):
            return assign, d0, evaluated
        if measure is not None:
            measure(level, at)
        at.sort(key=lambda layer: -table.get(layer.key, {}).get(level, 0.0))
        lo, hi = 0, len(at)          # budget fails at lo, assume it holds at hi (or next level)
        best_d = None
        while hi - lo > 1:
            mid = (lo + hi) // 2
            d = evaluate(moved(mid))
            evaluated += 1
            if budget_ok(d):
                hi, best_d = mid, d
            else:
                lo = mid
        assign = moved(hi)
        if best_d is not None:
            return assign, best_d, evaluated
    d = evaluate(assign)
    return assign, d, evaluated + 1


@register("quant_auto", lossy=True, requires=("calib",))
def quant_auto(
    model: onnx.ModelProto,
    ctx: PassContext,
    *,
    budget: float | None = None,
    target: float | None = None,
    metric: Literal["cosine", "top1", "rel_l2", "callback"] = "cosine",
    objective: Literal["latency", "size"] = "latency",
    precisions: list[str] | None = None,
    callback: Any = None,
    method: Literal["minmax", "percentile", "entropy", "mse"] = "percentile",
    block_size: Literal[16, 32, 64, 128, 256] = 32,
    embeddings: bool = True,
    max_batches: Annotated[int, Range(1)] = 4,
    latency_aware: bool = True,
    outliers: bool = True,
    conv_kernel: Literal["auto", "symmetric", "gemm"] = "auto",
) -> onnx.ModelProto:
    """Mixed precision: per-layer sensitivity on calibration data, cheapest precisions in budget.

    before: every layer fp32
    after:  e.g. 30 MatMuls int8 (QDQ), 4 int4 weight-only, 2 most sensitive fp32
    target (or budget, the same): min cosine to fp32 (metric cosine, default 0.99), top-1
    agreement with fp32 (top1, default 0.99), max relative L2 (rel_l2, default 0.05), or max drop
    of callback(model) -> score (callback, default 0.005). It is judged on held-out calibration
    batches (the last max_batches, when at least twice as many exist; ranges come from the
    rest), and the report says whether it was met and shows the size/metric points explored.
    objective latency prefers int8 > w8a16 > fp32 (elsewhere > fp16 > int4); size prefers
    int4 > int8 > w8a16 > fp16 > fp32. w8a16 keeps a layer's int8 weights and gives its input
    activation 16-bit Q/DQ (act16.py): int8's size, nearly weight-only error.
    precisions limits the candidates (e.g. int8+fp32). The sensitivity table is in the report.
    outliers: try SmoothQuant (before the sensitivity) and bias correction (on the result), and
    keep each only when it improves the metric on the evaluation batches (smooth.py).
    conv_kernel: onnxruntime's kernel for each int8 conv, as in quant_int8 (conv_kernels.py;
    auto measures with latency_aware and objective latency).
    """
    from onnxpress.backends import ort as _ort  # noqa: F401  (fail early if missing)
    from onnxpress.passes.quant.common import restore_fused_ops, split_fused_ops

    fused = split_fused_ops(model)      # fuse's FusedConv/FusedGemm: each layer measured alone
    if fused:
        ctx.invalidate()
    calib = ctx.require_calib(model)
    if target is not None and budget is not None and target != budget:
        raise PassOptionError("quant_auto: give target or budget (they are the same), not both")
    budget = target if target is not None else budget
    if budget is None:
        budget = {"cosine": 0.99, "top1": 0.99, "rel_l2": 0.05, "callback": 0.005}[metric]
    if callback is not None and metric != "callback":
        metric = "callback"
    cands = [p for p in (precisions or list(PRECISIONS)) if p in PRECISIONS]
    bad = [p for p in (precisions or []) if p not in PRECISIONS]
    if bad:
        raise PassOptionError(f"quant_auto: unknown precision(s) {', '.join(bad)}; "
                              f"use {', '.join(PRECISIONS)}")
    if "fp32" not in cands:
        cands.append("fp32")
    if objective == "latency":
        order = ["int8", "w8a16", "fp32"] if ctx.for_onnxruntime else \
            ["int8", "w8a16", "fp16", "int4", "fp32"]
        levels = [p for p in order if p in cands]
        # on onnxruntime's CPU fp16/int4 are not faster than fp32: they only help size
    else:
        levels = [p for p in ("int4", "int8", "w8a16", "fp16", "fp32") if p in cands]
    measure = [p for p in levels if p != "fp32"]

    # judge on batches the ranges never saw when there are enough of them
    n_batches = calib.length if getattr(calib, "length", None) is not None else None
    held_out = n_batches is not None and n_batches >= 2 * max_batches
    batches = []
    for i, b in enumerate(calib):
        if held_out and i < n_batches - max_batches:
            continue
        if len(batches) >= max_batches:
            break
        batches.append(b)
    scorer = Scorer(model, batches, metric, callback)
    stats = ctx.analysis("calib", model, max_batches=n_batches - max_batches) if held_out \
        else ctx.analysis("calib", model)
    from onnxpress.passes.quant.qdq import needs_7_bit_weights

    # (as quant_int8's weight_range=auto: full-range weights saturate u8 x s8 without VNNI)
    int8_options = dict(method=method, contrib_ops=ctx.for_onnxruntime,
                        weight_bits=7 if needs_7_bit_weights(ctx.target) else 8)
    int4_options = dict(block_size=block_size, use_nbits=ctx.for_onnxruntime)
    calib_batches = n_batches - max_batches if held_out else None
    if metric in ("cosine", "top1"):
        def budget_ok(d: float) -> bool:
            return 1.0 - d >= budget
    else:
        def budget_ok(d: float) -> bool:
            return d <= budget

    explored: list[dict[str, Any]] = []      # the size/metric trade-off the search walked

    def search(m: onnx.ModelProto, st) -> dict[str, Any]:
        """Sensitivity of m's layers, then the cheapest assignment that meets the budget."""
        def evaluate(assign: dict[str, str]) -> float:
            cand = apply_assignment(m, st, assign, int8_options=int8_options,
                                    int4_options=int4_options, embeddings=embeddings)
            d = scorer(cand)
            explored.append({"bytes": cand.ByteSize(), "value": _metric_value(metric, d),
                             "fp32_layers": sum(v == "fp32" for v in assign.values())})
            return d

        # w8a16 is measured only if the search has to move layers on from it
        layers, table = layer_sensitivity(m, ctx, precisions=[p for p in measure if p != "w8a16"],
                                          scorer=scorer, int8_options=int8_options,
                                          int4_options=int4_options, stats=st)

        def measure_level(level: str, at: list[Layer]) -> None:
            layer_sensitivity(m, ctx, precisions=[level], scorer=scorer, stats=st, layers=at,
                              table=table, int8_options=int8_options, int4_options=int4_options)

        assign, d, evaluated = choose_precisions(layers, table, levels, evaluate, budget_ok, ctx,
                                                 measure=measure_level)
        out = apply_assignment(m, st, assign, int8_options=int8_options,
                               int4_options=int4_options, embeddings=embeddings)
        return dict(model=m, stats=st, layers=layers, table=table, assign=assign,
                    degradation=d, evaluated=evaluated + sum(map(len, table.values())),
                    out=out, met=budget_ok(d), bytes=out.ByteSize())

    found = search(model, stats)
    evaluated_total = found["evaluated"]
    outlier_figures: dict[str, Any] = {}
    if outliers and "int8" in levels:
        # SmoothQuant costs a vector (and a Mul) per smoothed tensor that no LayerNorm absorbs.
        # It is tried only when the search without it fell short of the objective's ideal: for
        # size, when it missed the target or left layers in float (int8 and w8a16 cost the same
        # bytes); for latency, when any layer is not int8 (w8a16 computes in float)
        short = [v for v in found["assign"].values()
                 if v != "int8" and (objective == "latency" or v in ("fp16", "fp32"))]
        if found["met"] and not short:
            outlier_figures["smooth"] = "off (target met without it)"
        else:
            from onnxpress.passes.quant.smooth import choose_outlier_fixes

            smoothed, s_stats, outlier_figures = choose_outlier_fixes(
                model, ctx, stats, scorer=scorer, int8_options=int8_options,
                calib_batches=calib_batches)
            if smoothed is not model:
                other = search(smoothed, s_stats)
                evaluated_total += other["evaluated"]
                keep, why = _better(other, found, objective,
                                    {layer.key: layer.params for layer in found["layers"]})
                outlier_figures["smooth_choice"] = why
                if keep:
                    found = other
                else:
                    ctx.invalidate()      # (the cached statistics are the smoothed model's)
                    outlier_figures["smooth"] = "off (the result without it was as good)"
    model, stats, layers, table = found["model"], found["stats"], found["layers"], found["table"]
    assign, degradation, out = found["assign"], found["degradation"], found["out"]
    from onnxpress.passes.quant.conv_kernels import apply_choice, gemm_figures

    timed = latency_aware and objective == "latency" and ctx.for_onnxruntime
    # onnxruntime's kernel for each int8 conv, before the mix is timed against float
    out, figures = apply_choice(out, conv_kernel, batches[0], measure=timed)
    if timed:
        from onnxpress.passes.quant.latency import relative_costs

        cost, (cpu_fp, wall_fp) = relative_costs([model, out], batches[0])
        figures.update(latency_fp32_cpu_ms=round(cpu_fp, 3), latency_fp32_wall_ms=round(wall_fp, 3),
                       speedup=round(1 / cost[1], 3))
        if cost[1] > SLOWER and cpu_fp >= 1.0:
            # the mix does not pay here: keep only what shrinks the model without int8 kernels
            # (w8a16 goes too: it computes in float after 16-bit Q/DQ, never faster than fp32;
            # keeping it while int8 went back to fp32 gave a model both slower and larger)
            assign = {k: ("fp32" if v in ("int8", "w8a16") else v) for k, v in assign.items()}
            out = apply_assignment(model, stats, assign, int8_options=int8_options,
                                   int4_options=int4_options, embeddings=embeddings)
            figures["latency_decision"] = ("int8 slower than fp32 on onnxruntime: int8 and w8a16 "
                                           "layers kept fp32")
            if "conv_kernels_gemm" in figures:
                figures.update(gemm_figures(out))
            # the figures describe the model returned, not the mix that was turned down
            figures["speedup_of_the_int8_mix"] = figures["speedup"]
            degradation = scorer(out)
            figures["speedup"] = 1.0
            if any(v != "fp32" for v in assign.values()):
                figures["speedup"] = round(1 / relative_costs([model, out], batches[0])[0][1], 3)
    figures.update(outlier_figures)
    if outliers and "int8" in assign.values():
        from onnxpress.passes.quant.smooth import choose_bias_correction

        out, corrected, d = choose_bias_correction(model, out, ctx, scorer=scorer,
                                                   calib_batches=calib_batches)
        figures.update(corrected)
        degradation = degradation if d is None else d
    counts = {p: sum(1 for v in assign.values() if v == p) for p in PRECISIONS}
    rows = []
    for layer in layers:
        row = {"layer": layer.key, "op": layer.op, "params": layer.params}
        for p in measure:
            v = table.get(layer.key, {}).get(p)
            row[p] = None if v is None else round(v, 6)
        row["chosen"] = assign[layer.key]
        rows.append(row)
    met = budget_ok(degradation)
    if not met:
        import warnings

        warnings.warn(f"quant_auto: no mix of {', '.join(levels)} reached {metric} {budget} on "
                      f"the evaluation batches; the closest has {metric} "
                      f"{_metric_value(metric, degradation):.4g}", stacklevel=3)
    figures.update({
        "metric": metric, "budget": budget, "objective": objective, "target_met": met,
        "evaluated_on": (f"{len(batches)} held-out calibration batches" if held_out else
                         f"{len(batches)} calibration batches (too few to hold any out: give at "
                         f"least {2 * max_batches})"),
        "explored": explored,
        {"cosine": "min_cosine", "top1": "top1_agreement"}.get(metric, "degradation"):
            round(_metric_value(metric, degradation), 6),
        "layers": len(layers), "models_evaluated": evaluated_total,
        **{f"layers_{p}": c for p, c in counts.items()},
        "precision": {layer.key: assign[layer.key] for layer in layers},
        "sensitivity": rows,
        "calibration_batches": stats.batches,
        "fused_ops_split": len(fused),
        "fused_ops_restored": len(restore_fused_ops(out, fused)),
    })
    ctx.record(**figures)
    return out


def _better(a: dict, b: dict, objective: str, params: dict[str, int]) -> tuple[bool, str]:
    """Is search result a better than b, and why: meeting the target first; then for objective
    size fewer bytes; for latency fewer weights off int8 kernels (w8a16, fp16 and fp32 layers
    compute in float on onnxruntime), then fewer bytes. Not by timing the two: on MiniLM the two
    candidates (all int8 with SmoothQuant's Muls, or 5 layers at w8a16) timed 1.14x vs 1.10x fp32
    in one run and 1.06x vs 1.12x in the next, while the bench measured them at 1.68x and 1.41x
    fp32 in CPU time (one run, interleaved)."""
    if a["met"] != b["met"] or not a["met"]:
        better = a["met"] if a["met"] != b["met"] else a["degradation"] < b["degradation"]
        return better, "target met" if a["met"] or b["met"] else "closer to the target"
    smaller = a["bytes"] < b["bytes"]
    size = f"{a['bytes']} vs {b['bytes']} bytes"
    if objective == "size":
        return smaller, size
    off = [sum(params.get(k, 0) for k, v in r["assign"].items() if v != "int8") for r in (a, b)]
    if off[0] != off[1]:
        return off[0] < off[1], f"{off[0]} vs {off[1]} weights off int8 kernels, {size}"
    return smaller, size


def _metric_value(metric: str, degradation: float) -> float:
    """The metric as users read it: cosine and agreement as similarities, the rest as drops."""
    return 1.0 - degradation if metric in ("cosine", "top1") else degradation


def sensitivity_table(model: onnx.ModelProto, calib: Any, *, metric: str = "cosine",
                      precisions: tuple[str, ...] = ("int8", "int4"), max_batches: int = 4,
                      method: str = "percentile", target: str = "ort",
                      progress: bool = True) -> list[dict]:
    """Per-layer sensitivity rows {layer, op, params, <precision>: degradation} (the CLI's table)."""
    ctx = PassContext(calib=calib, target=target, progress=progress)
    calib_data = ctx.require_calib(model)
    batches = []
    for i, b in enumerate(calib_data):
        if i >= max_batches:
            break
        batches.append(b)
    scorer = Scorer(model, batches, metric, None)
    layers, table = layer_sensitivity(
        model, ctx, precisions=list(precisions), scorer=scorer,
        int8_options=dict(method=method, contrib_ops=target == "ort"),
        int4_options=dict(block_size=32, use_nbits=target == "ort"))
    rows = []
    for layer in layers:
        row = {"layer": layer.key, "op": layer.op, "params": layer.params}
        row.update({p: table.get(layer.key, {}).get(p) for p in precisions})
        rows.append(row)
    return rows
