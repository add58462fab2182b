"""fuse vs onnxslim on the real models: node counts, onnxruntime latency, fuse's own time.

Per model, side by side in one run with onnxruntime on 2 threads (interleaved rounds):
  (a) onnxruntime graph optimizations disabled: original vs `fold_constants,dce,simplify,fuse`
  (b) ORT_ENABLE_ALL: the same pair
  (c) the same two settings for onnxslim's output
Ratios are original p50 / candidate p50 (above 1: the candidate is faster).
"""

from __future__ import annotations

import time

import onnx

PIPELINE = "fold_constants,dce,simplify,fuse"
MODELS = ["digits_cnn", "minilm", "resnet18", "efficientnet_b0", "mobilenetv3_small_100",
          "vit_tiny_patch16_224", "convnext_atto"]


def _model_and_feeds(name: str):
    from onnxpress import zoo

    if name == "digits_cnn":
        return zoo.digits_cnn(), {"input": zoo.digits_data().test[0][:64]}
    if name == "minilm":
        texts = zoo.debian_task().test_texts[:8]
        return zoo.minilm(), zoo.minilm_feeds(texts, pad_to_max=True)
    return zoo.timm_model(name), {"input": zoo.photo_batch()[:1]}


def _session(model: onnx.ModelProto, optimization: str):
    """An onnxruntime session on 2 threads that does not spin while idle: with two sessions
    alive, a spinning pool steals the other's cores (on this 2-core machine that alone made
    whichever model ran second look 30% slower)."""
    import onnxruntime as rt

    so = rt.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = (rt.GraphOptimizationLevel.ORT_ENABLE_ALL
                                   if optimization == "all"
                                   else rt.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.log_severity_level = 3
    return rt.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _pair(a, b, feeds, optimization: str, runs: int, rounds: int):
    """p50 wall latency (ms) and p50 CPU time (ms, all threads of this process) of a and b,
    runs interleaved a, b, b, a... so load changes hit both. CPU time is the work one inference
    costs; on a machine shared with other jobs it moves far less than wall time."""
    import statistics

    sa, sb = _session(a, optimization), _session(b, optimization)
    for s in (sa, sb):
        for _ in range(3):
            s.run(None, feeds)
    ta, tb, ca, cb = [], [], [], []
    for i in range(runs):
        order = ((sa, ta, ca), (sb, tb, cb)) if i % 2 == 0 else ((sb, tb, cb), (sa, ta, ca))
        for s, t, c in order:
            t0, c0 = time.perf_counter(), time.process_time()
            s.run(None, feeds)
            c.append((time.process_time() - c0) * 1e3)
            t.append((time.perf_counter() - t0) * 1e3)
    med = statistics.median
    return med(ta), med(tb), med(ca), med(cb)


def _fuse_seconds(cleaned: onnx.ModelProto, repeats: int) -> float:
    from onnxpress import passes

    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        passes.run(cleaned, "fuse")
        best = min(best, time.perf_counter() - t0)
    return best


def run(quick: bool = True) -> dict:
    import onnxslim

    from onnxpress import passes
    from onnxpress.backends import ort

    runs, rounds = (20, 1) if quick else (80, 1)
    rows = []
    fuse_time_minilm = None
    for name in MODELS:
        path, feeds = _model_and_feeds(name)
        original = onnx.load(path)
        result = passes.run(original, PIPELINE)
        fused = result.model
        figures = result.reports[-1].figures
        slim = onnxslim.slim(onnx.load(path))
        check = ort.compare_outputs(ort.run(original, feeds), ort.run(fused, feeds),
                                    rtol=1e-3, atol=1e-4)
        o_dis, f_dis, oc_dis, fc_dis = _pair(original, fused, feeds, "disable", runs, rounds)
        o_all, f_all, oc_all, fc_all = _pair(original, fused, feeds, "all", runs, rounds)
        so_dis, s_dis, soc_dis, sc_dis = _pair(original, slim, feeds, "disable", runs, rounds)
        so_all, s_all, soc_all, sc_all = _pair(original, slim, feeds, "all", runs, rounds)
        if name == "minilm":
            cleaned = passes.run(original, "fold_constants,dce,simplify").model
            fuse_time_minilm = _fuse_seconds(cleaned, 2 if quick else 5)
        rows.append({
            "model": name,
            "nodes original": len(original.graph.node),
            "nodes onnxpress": len(fused.graph.node),
            "nodes onnxslim": len(slim.graph.node),
            "fused": figures.get("fusions_fired", 0),
            "max abs err": f"{check.max_abs:.1e}",
            "(a) no-opt ms orig/fused": f"{o_dis:.2f} / {f_dis:.2f}",
            "(a) speedup": round(o_dis / f_dis, 2),
            "(a) cpu-time speedup": round(oc_dis / fc_dis, 2),
            "(b) ALL ms orig/fused": f"{o_all:.2f} / {f_all:.2f}",
            "(b) speedup": round(o_all / f_all, 2),
            "(b) cpu-time speedup": round(oc_all / fc_all, 2),
            "(c) slim speedup no-opt / ALL": f"{so_dis / s_dis:.2f} / {so_all / s_all:.2f}",
            "(c) slim cpu-time no-opt / ALL": f"{soc_dis / sc_dis:.2f} / {soc_all / sc_all:.2f}",
        })
    notes = (
        f"onnxruntime {__import__('onnxruntime').__version__}, CPU, 2 intra-op threads, no "
        f"spinning; each pair measured as {runs} interleaved runs (a,b,b,a...), p50 latency. "
        "Speedup = original / candidate, from wall p50; cpu-time speedup from the p50 CPU time "
        "of this process per inference (all threads). onnxpress = `fold_constants,dce,simplify,fuse` with the "
        "default target (ort: contrib ops Attention, SkipLayerNormalization, BiasGelu, FusedConv, "
        "QuickGelu...). Inputs: digits test images (64), MiniLM 8 Debian descriptions padded to "
        "64 tokens, timm one photo (224x224). "
        f"`fuse` alone on MiniLM (after cleanup): {fuse_time_minilm:.2f} s (best of runs). "
        "The machine is shared: single ratios within about ±10% of 1 are noise.")
    return {"title": "fuse: node counts and onnxruntime latency vs onnxslim", "rows": rows,
            "notes": notes, "fuse_seconds_minilm": fuse_time_minilm}


if __name__ == "__main__":
    import json
    import sys

    out = run(quick="--full" not in sys.argv)
    print(json.dumps(out, indent=1))
