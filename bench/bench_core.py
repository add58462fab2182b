"""Cleanup (fold_constants, dce, simplify) vs onnxslim: node counts, file size, pass time and
onnxruntime latency (2 threads) of each output against the original fp32 model, side by side."""

from __future__ import annotations

import time

import onnx

from onnxpress import passes, zoo
from onnxpress.backends import ort
from onnxpress.data import make_inputs


def _slim(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    return onnxslim.slim(model)


def run(quick: bool) -> dict:
    names = ["digits_cnn", "resnet18", "minilm"] if quick else \
        ["digits_cnn", "minilm", "resnet18", "mobilenetv3_small_100", "efficientnet_b0",
         "vit_tiny_patch16_224", "convnext_atto"]
    rows = []
    for name in names:
        path = zoo.digits_cnn() if name == "digits_cnn" else zoo.minilm() if name == "minilm" \
            else zoo.timm_model(name)
        model = onnx.load(path)
        t0 = time.perf_counter()
        ours = passes.apply(model, ["fold_constants", "dce", "simplify"])
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        slim = _slim(onnx.load(path))
        t_slim = time.perf_counter() - t0
        shapes = {"batch": 1, "seq": 128}
        feeds = make_inputs(model, shapes=shapes)
        check = ort.compare_outputs(ort.run(model, feeds), ort.run(ours, feeds))
        runs = 30 if quick else 100
        base, mine = ort.benchmark_pair(model, ours, feeds, runs=runs, threads=2)
        _, theirs = ort.benchmark_pair(model, slim, feeds, runs=runs, threads=2)
        rows.append({
            "model": name, "nodes": len(model.graph.node), "nodes onnxpress": len(ours.graph.node),
            "nodes onnxslim": len(slim.graph.node),
            "MB": round(model.ByteSize() / 1e6, 2), "MB onnxpress": round(ours.ByteSize() / 1e6, 2),
            "pass s onnxpress": round(t_ours, 2), "pass s onnxslim": round(t_slim, 2),
            "fp32 ms": round(base.p50_ms, 3),
            "speed-up onnxpress": round(base.p50_ms / mine.p50_ms, 3),
            "speed-up onnxslim": round(base.p50_ms / theirs.p50_ms, 3),
            "max abs err": float(f"{check.max_abs:.2g}"),
        })
    return {"title": "cleanup vs onnxslim (onnxruntime, 2 threads, ORT_ENABLE_ALL)", "rows": rows,
            "notes": "speed-up = original p50 / optimized p50, interleaved runs in one process. "
                     "Cleanup alone is lossless housekeeping; fusion is benchmarked in bench_fuse."}
