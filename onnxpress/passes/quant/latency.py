"""Latency-aware precision: keep int8 only where it pays on the target runtime, by measurement.

    candidate groups (e.g. Conv 1x1, Conv kxk, MatMul, Add, pools) -> build, time on onnxruntime
    -> drop the groups whose int8 form is slower than float -> never slower than the input model

onnxruntime's int8 depthwise convolutions and element-wise chains around float-only ops
(LayerNorm, Softmax, SiLU) can lose to its fp32 kernels; the only reliable test is the clock.
"""

from __future__ import annotations

import collections
import time
from typing import Any

import numpy as np
import onnx

from onnxpress.passes.graph import has_subgraphs


def conv_kind(node: onnx.NodeProto, consts: dict) -> str:
    from onnxpress.passes.quant.qdq import is_depthwise

    if node.op_type != "Conv":
        return node.op_type
    if is_depthwise(node, consts):
        return "Conv depthwise"
    w = consts.get(node.input[1])
    if w is not None and len(w.dims) == 4 and w.dims[2] == 1 and w.dims[3] == 1:
        return "Conv 1x1"
    return "Conv kxk"


def node_key(node: onnx.NodeProto) -> str:
    """A key that survives copies of the model: the node name, else its weight's name."""
    return node.name or "weight:" + (node.input[1] if len(node.input) > 1 else node.input[0])


def timing_session(model: onnx.ModelProto, threads: int, profile_prefix: str | None = None):
    """An onnxruntime CPU session for timing; with profile_prefix, onnxruntime's own profiler on
    (per-node kernel times, conv_kernels.py)."""
    import onnxruntime

    from onnxpress.backends import ort

    so = onnxruntime.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # no spin-waiting: CPU time then counts work, not waiting
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    del ort
    return onnxruntime.InferenceSession(model.SerializeToString(), sess_options=so,
                                        providers=["CPUExecutionProvider"])


def time_model(sess, feeds: dict, *, runs: int = 10, clock: str = "cpu") -> float:
    """The fastest of `runs` inferences in ms; clock "cpu" (process CPU time, robust to other
    processes sharing the machine) or "wall"."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    best = float("inf")
    for _ in range(runs):
        t0 = now()
        sess.run(None, feeds)
        best = min(best, (now() - t0) * 1e3)
    return best


def time_models(models: list[onnx.ModelProto], feeds: dict, *, threads: int = 1,
                rounds: int = 3, runs: int = 5, clock: str = "cpu") -> list[float]:
    """Interleaved timing of several models (a, b, c, a, b, c...) so drift hits all alike.

    The decision runs single-threaded on CPU time: on a machine shared with other work, wall
    time swings by tens of percent while the CPU time of one inference stays put."""
    sessions = [timing_session(m, threads) for m in models]
    for s in sessions:
        for _ in range(2):
            s.run(None, feeds)
    best = [float("inf")] * len(models)
    for _ in range(rounds):
        for k, s in enumerate(sessions):
            best[k] = min(best[k], time_model(s, feeds, runs=runs, clock=clock))
    return best


def relative_costs(models: list[onnx.ModelProto], feeds: dict, *, threads: int = 2
                   ) -> tuple[list[float], list[float]]:
    """(cost of each model relative to models[0], models[0]'s CPU ms at 1 thread).

    The cost is the worse of two ratios: process CPU time single-threaded (stable on a shared
    machine) and fastest wall time at `threads` threads (what a user sees; int8 and fp32 kernels
    do not scale alike over threads). Both must favour a model for it to count as faster."""
    cpu = time_models(models, feeds)
    wall = time_models(models, feeds, threads=threads, clock="wall")
    return [max(c / cpu[0], w / wall[0]) for c, w in zip(cpu, wall)], [cpu[0], wall[0]]


def tvm_relative_costs(models: list[onnx.ModelProto], feeds: dict, *, compiled: dict, work: str,
                       threads: int = 2) -> tuple[list[float], list[float]]:
    """relative_costs measured on TVM: each model compiled for this CPU (target x86, default
    schedules, integer kernels where quantized), p50 wall time interleaved over three rounds
    (the best of each). A layer kept float for onnxruntime may pay in integers on TVM and the
    reverse, so the decision for a TVM target has to be taken on TVM's own code. The builds go
    to `work` (the caller removes it) and stay in `compiled` (model fingerprint -> artifact), so
    a model measured again is not built again."""
    from onnxpress.backends import tvm as ox_tvm
    from onnxpress.passes.pipeline import fingerprint

    arts = []
    for m in models:
        key = fingerprint(m)
        if key not in compiled:
            compiled[key] = ox_tvm.compile(m, "x86", output_dir=f"{work}/{key}", progress=False)
        arts.append(compiled[key])
    best = [float("inf")] * len(arts)
    for _ in range(3):
        for k, art in enumerate(arts):
            best[k] = min(best[k], art.benchmark(feeds, runs=10, warmup=2).p50_ms)
    return [b / best[0] for b in best], [best[0], best[0]]


def choose_fastest(original: onnx.ModelProto, quantized: onnx.ModelProto, stats,
                   kwargs: dict[str, Any], calib, ctx, *, margin: float = 0.95,
                   floor_ms: float = 1.0, threads: int = 2, on_tvm: bool = False,
                   post=None) -> tuple[onnx.ModelProto, dict]:
    """Compare the quantized model with float on onnxruntime (on_tvm: on TVM builds for this
    CPU); when it does not pay, drop op groups greedily (the one whose removal helps most first)
    until it does, or give back the float model. Models faster than `floor_ms` in float keep
    int8 (size is what matters there).

    The candidate that wins is measured again, against float, before it is kept: the winner of
    several noisy measurements is the one noise favoured most, so its own figure is biased
    (a mobilenetv3 export kept 1 int8 layer of 54 on a 0.92x "gain" and ran 0.88x in the
    benchmark). It is kept only if the second measurement also beats float by `margin`, and
    the speed-up reported is that measurement's. `post` (model -> model) finishes each
    candidate the search quantizes again as `quantized` was finished (conv_kernels.py's choice
    of onnxruntime's conv kernel), so that int8 is timed with the kernels it will run."""
    import tempfile

    if on_tvm:
        with tempfile.TemporaryDirectory(prefix="onnxpress-latency-tvm-") as work:
            cache: dict = {}
            return _choose(original, quantized, stats, kwargs, calib, margin, floor_ms, threads,
                           lambda models, feeds, threads: tvm_relative_costs(
                               models, feeds, threads=threads, compiled=cache, work=work),
                           "TVM (x86, untuned)", post)
    return _choose(original, quantized, stats, kwargs, calib, margin, floor_ms, threads,
                   lambda models, feeds, threads: relative_costs(models, feeds, threads=threads),
                   "onnxruntime", post)


def _choose(original, quantized, stats, kwargs, calib, margin, floor_ms, threads, costs_of,
            runtime, post) -> tuple[onnx.ModelProto, dict]:
    from onnxpress.passes.quant import qdq
    from onnxpress.passes.quant.qdq import COMPUTE

    def quantize_static(model, stats, **options):
        m, figures = qdq.quantize_static(model, stats, **options)
        return (post(m) if post else m), figures

    feeds = calib.first()
    consts = {t.name: t for t in original.graph.initializer}
    groups: dict[str, set[str]] = {}
    for n in original.graph.node:
        if n.op_type in COMPUTE and not has_subgraphs(n):
            groups.setdefault(conv_kind(n, consts), set()).add(node_key(n))
    models = [original, quantized]
    full_figures: dict[str, Any] = {}
    if kwargs.get("op_types") is None and not kwargs.get("depthwise"):
        # also try the whole chain in int8 (depthwise, SiLU's Sigmoid and Mul): on some models
        # (EfficientNet) only the fully integer chain pays
        from onnxpress.passes.quant.qdq import DEFAULT_OPS

        full, full_figures = quantize_static(_copy(original), stats, **{
            **kwargs, "op_types": DEFAULT_OPS + ["Mul", "Sigmoid"], "depthwise": True})
        if _op_counts(full) != _op_counts(quantized):    # (resnet18: nothing more to quantize)
            models.append(full)
        else:
            full_figures = {}
    cost, (cpu_fp, wall_fp) = costs_of(models, feeds, threads)
    figures: dict[str, Any] = {"latency_fp32_cpu_ms": round(cpu_fp, 3),
                               "latency_fp32_wall_ms": round(wall_fp, 3), "latency_measured_on": runtime}
    if cpu_fp < floor_ms:
        # below floor_ms an inference is too short for latency to be worth a bigger model
        figures["speedup"] = round(1 / cost[1], 3)
        return quantized, figures
    k = 1 + int(np.argmin(cost[1:]))
    chosen, chosen_cost = models[k], cost[k]
    dropped: list[str] = []
    if chosen_cost > margin:
        chosen, chosen_cost = quantized, cost[1]   # the greedy search starts from the default set
        remaining = dict(groups)
        while remaining and len(remaining) > 1:
            trials = []
            for g in remaining:
                off = set().union(*(groups[d] for d in dropped + [g]))
                m, _ = quantize_static(_copy(original), stats, **kwargs,
                                       names_filter=lambda n, off=off: node_key(n) not in off)
                trials.append((g, m))
            costs, _ = costs_of([original] + [m for _, m in trials], feeds, threads)
            k = int(np.argmin(costs[1:]))
            if costs[1 + k] >= chosen_cost:
                break
            dropped.append(trials[k][0])
            chosen, chosen_cost = trials[k][1], costs[1 + k]
            del remaining[trials[k][0]]
            if chosen_cost <= margin:
                break
        figures["int8_dropped_groups"] = ",".join(dropped)
    if chosen_cost <= margin:
        confirmed = costs_of([original, chosen], feeds, threads)[0][1]
        figures["latency_cost_when_chosen"] = round(chosen_cost, 3)
        if confirmed <= margin:
            if full_figures and chosen is models[2]:
                figures["float_reasons"] = full_figures["float_reasons"]
                figures["int8_chain"] = "full (depthwise, Sigmoid, Mul)"
            figures["speedup"] = round(1 / confirmed, 3)
            return chosen, figures
        figures["latency_decision"] = (
            f"int8 does not pay on {runtime} here: kept float (the best int8 candidate ran at "
            f"{chosen_cost:.2f}x float's time, then {confirmed:.2f}x when measured again)")
    else:
        figures["latency_decision"] = f"int8 does not pay on {runtime} here: kept float"
    figures["speedup"] = 1.0
    return _copy(original), figures


def _op_counts(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m
