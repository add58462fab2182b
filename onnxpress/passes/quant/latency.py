"""Latency-aware precision: keep int8 only where it pays on the target runtime, by measurement.

    candidate groups (e.g. Conv 1x1, Conv kxk, MatMul, Add, pools) -> build, time on onnxruntime
    -> drop the groups whose int8 form is slower than float -> never slower than the input model

onnxruntime's int8 depthwise convolutions and element-wise chains around float-only ops
(LayerNorm, Softmax, SiLU) can lose to its fp32 kernels; the only reliable test is the clock.
"""

from __future__ import annotations

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


def _session(model: onnx.ModelProto, threads: int):
    import onnxruntime

    from onnxpress.backends import ort

    so = onnxruntime.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # no spin-waiting: CPU time then counts work, not waiting
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
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
    sessions = [_session(m, threads) for m in models]
    for s in sessions:
        for _ in range(2):
            s.run(None, feeds)
    best = [float("inf")] * len(models)
    for _ in range(rounds):
        for k, s in enumerate(sessions):
            best[k] = min(best[k], time_model(s, feeds, runs=runs, clock=clock))
    return best


def choose_fastest(original: onnx.ModelProto, quantized: onnx.ModelProto, stats,
                   kwargs: dict[str, Any], calib, ctx, *, margin: float = 0.95,
                   floor_ms: float = 1.0) -> tuple[onnx.ModelProto, dict]:
    """Compare the fully quantized model with float on onnxruntime; when it does not pay, drop
    op groups greedily (the one whose removal helps most first) until it does, or give back the
    float model. Models faster than `floor_ms` in float keep int8 (size is what matters there)."""
    from onnxpress.passes.quant.qdq import COMPUTE, quantize_static

    feeds = calib.first()
    consts = {t.name: t for t in original.graph.initializer}
    groups: dict[str, set[str]] = {}
    for n in original.graph.node:
        if n.op_type in COMPUTE and not has_subgraphs(n):
            groups.setdefault(conv_kind(n, consts), set()).add(node_key(n))
    models = [original, quantized]
    if kwargs.get("op_types") is None and not kwargs.get("depthwise"):
        # also try the whole chain in int8 (depthwise, SiLU's Sigmoid and Mul): on some models
        # (EfficientNet) only the fully integer chain pays
        from onnxpress.passes.quant.qdq import DEFAULT_OPS

        full, full_figures = quantize_static(_copy(original), stats, **{
            **kwargs, "op_types": DEFAULT_OPS + ["Mul", "Sigmoid"], "depthwise": True})
        models.append(full)
    times = time_models(models, feeds)
    t_fp, t_q = times[0], min(times[1:])
    if len(times) > 2 and times[2] < times[1]:
        quantized = models[2]
        figures_full = {**full_figures, "int8_chain": "full (depthwise, Sigmoid, Mul)"}
    else:
        figures_full = {}
    figures: dict[str, Any] = {"latency_fp32_ms": round(t_fp, 3), "latency_int8_ms": round(t_q, 3),
                               **figures_full}
    if t_q <= t_fp * margin or len(groups) == 0 or t_fp < floor_ms:
        # below floor_ms an inference is too short for latency to be worth a bigger model
        figures["speedup"] = round(t_fp / t_q, 3)
        return quantized, figures
    quantized, t_q = models[1], times[1]      # the greedy search starts from the default set
    dropped: list[str] = []
    best_model, best_t = quantized, t_q
    remaining = dict(groups)
    while remaining:
        trials = []
        for g in remaining:
            off = set().union(*(groups[d] for d in dropped + [g]))
            m, _ = quantize_static(_copy(original), stats, **kwargs,
                                   names_filter=lambda n, off=off: node_key(n) not in off)
            trials.append((g, m))
        times = time_models([m for _, m in trials] + [original], feeds)
        t_fp = min(t_fp, times[-1])
        k = int(np.argmin(times[:-1]))
        if times[k] >= best_t:
            break
        dropped.append(trials[k][0])
        best_model, best_t = trials[k][1], times[k]
        del remaining[trials[k][0]]
        if best_t <= t_fp * margin:
            break
    figures["int8_dropped_groups"] = ",".join(dropped)
    if best_t > t_fp * margin:
        figures["latency_decision"] = "int8 does not pay on onnxruntime here: kept float"
        figures["speedup"] = 1.0
        return _copy(original), figures
    figures["latency_int8_ms"] = round(best_t, 3)
    figures["speedup"] = round(t_fp / best_t, 3)
    return best_model, figures


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m
