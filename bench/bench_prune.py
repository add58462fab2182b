"""Pruning, search and distillation: accuracy, MACs, parameters and onnxruntime latency.

    python -m bench --only prune [--quick]

digits CNN (real weights, real test images): structured 50% (filter norm, activation), unstructured
80%, 2:4, `search` under 50% MACs and uniform pruning at the same MACs; accuracy on the 450 test
images before and after `distill` (unlabeled training images as calibration data), MACs and
parameter ratios, onnxruntime latency of the whole test set against the unpruned model measured
interleaved in the same run. timm models (random non-degenerate weights): structured 30%, MACs,
parameters and single-image latency against the original.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from onnxpress import passes, stats, zoo  # noqa: E402
from onnxpress.backends import ort  # noqa: E402

TIMM = ["resnet18", "efficientnet_b0", "convnext_atto", "mobilenetv3_small_100"]


def _latency_pair(a: onnx.ModelProto, b: onnx.ModelProto, feed: dict, runs: int) -> tuple[float, float]:
    # best of N: the machine is shared, the minimum is what the kernels cost without contention
    ra, rb = ort.benchmark_pair(a, b, feed, threads=1, runs=runs, rounds=3, warmup=3)
    return ra.min_ms, rb.min_ms


def _digits_rows(quick: bool) -> list[dict]:
    model = onnx.load(zoo.digits_cnn())
    data = zoo.digits_data()
    X, y = data.test
    Xtr = data.train[0]
    calib = [{"input": Xtr[i:i + 64]} for i in range(0, len(Xtr), 64)]
    search_calib = zoo.digits_calib(256, 64)
    runs = 30 if quick else 150
    feed = {"input": X}
    base = stats.model_stats(model)
    base_acc = zoo.accuracy(model, X, y)
    rows = [{"model": "digits_cnn", "config": "unpruned fp32", "acc_before_distill": base_acc,
             "acc_after_distill": "", "macs_ratio": 1.0, "params_ratio": 1.0,
             "latency_ms": ort.benchmark(model, feed, threads=1, runs=runs).min_ms,
             "latency_ratio": 1.0, "weight_sparsity": 0.0, "zipped_ratio": 1.0}]
    configs = [
        ("structured 50% (l2)", "prune:sparsity=0.5,structured=true"),
        ("structured 50% (activation)", "prune:sparsity=0.5,structured=true,criterion=activation"),
        ("structured 50% (global ranking)", "prune:sparsity=0.5,structured=true,scope=global"),
        ("uniform 30%, exact counts (MACs as search)", "prune:sparsity=0.3,structured=true,round_to=1"),
        ("search, MACs <= 50%", "search:budget=0.5,metric=macs"),
        ("unstructured 80% global", "prune:sparsity=0.8"),
        ("unstructured 80% per layer", "prune:sparsity=0.8,scope=layer"),
        ("2:4", "prune:nm=2:4"),
    ]
    import zlib

    base_zip = len(zlib.compress(model.SerializeToString(), 6))
    for label, spec in configs:
        t0 = time.time()
        c = search_calib if spec.startswith("search") else calib
        pruned = passes.apply(model, spec, calib=c, seed=0)
        distilled = passes.apply(model, spec + ",distill", calib=c, seed=0)
        s = stats.model_stats(pruned)
        la, lb = _latency_pair(model, pruned, feed, runs)
        weights = [w for w in (onnx.numpy_helper.to_array(t) for t in pruned.graph.initializer)
                   if w.ndim >= 2]
        zeros = sum(int((w == 0).sum()) for w in weights) / max(sum(w.size for w in weights), 1)
        rows.append({
            "model": "digits_cnn", "config": label,
            "acc_before_distill": zoo.accuracy(pruned, X, y),
            "acc_after_distill": zoo.accuracy(distilled, X, y),
            "macs_ratio": s.macs / base.macs, "params_ratio": s.params / base.params,
            "latency_ms": lb, "latency_ratio": lb / la, "weight_sparsity": zeros,
            "zipped_ratio": len(zlib.compress(pruned.SerializeToString(), 6)) / base_zip,
            "seconds": round(time.time() - t0, 1)})
    return rows


def _timm_rows(quick: bool) -> list[dict]:
    rows = []
    x = zoo.photo_batch()[:1]
    runs = 30 if quick else 90
    for name in TIMM:
        t0 = time.time()
        model = onnx.load(zoo.timm_model(name))
        for label, spec in (("structured 30% (l2, round_to=8)", "prune:sparsity=0.3,structured=true"),
                            ("structured 30% (l2, exact counts)",
                             "prune:sparsity=0.3,structured=true,round_to=1")):
            result = passes.run(model, spec)
            pruned = result.model
            fig = result.reports[0].figures
            la, lb = _latency_pair(model, pruned, {"input": x}, runs)
            y0 = ort.run(model, {"input": x})["output"]
            y1 = ort.run(pruned, {"input": x})["output"]
            rows.append({"model": name, "config": label,
                         "groups": f"{fig['prunable_groups']}/{fig['groups']}",
                         "macs_ratio": fig["macs_ratio"], "params_ratio": fig["params_ratio"],
                         "latency_ms": lb, "latency_ratio": lb / la,
                         "output_shape_same": y0.shape == y1.shape,
                         "seconds": round(time.time() - t0, 1)})
    return rows


def run(quick: bool = True) -> dict:
    rows = _digits_rows(quick) + _timm_rows(quick)
    notes = (
        "Accuracy: digits test split (450 images). distill: 30 epochs on the 1,347 unlabeled "
        "training images, teacher = the unpruned model, soft targets at T=4. latency: onnxruntime, "
        "best of N runs (the machine is shared), 1 thread, the unpruned model and the pruned one measured interleaved in one run "
        "(digits: the whole test set per call; timm: one 224x224 photo). Unstructured and 2:4 "
        "models keep dense tensors: onnxruntime runs them at the same speed, their gain is the "
        "compressed size (zipped_ratio). timm weights are random, so only costs are reported. "
        "Channel counts off onnxruntime's 8-channel NCHWc grid (round_to=1) fall back to slower "
        "kernels, which is why round_to defaults to 8.")
    return {"title": "Pruning, search and distillation", "rows": rows, "notes": notes}


if __name__ == "__main__":
    import json

    out = run(quick="--full" not in sys.argv)
    print(json.dumps(out, indent=2, default=lambda v: float(v) if isinstance(v, np.floating) else str(v)))
