"""The onnxruntime backend: run, verify, benchmark, profile."""

from __future__ import annotations

import numpy as np
import pytest

from onnxpress import zoo
from onnxpress.backends import ort
from onnxpress.errors import BackendError


def test_run_matches_the_trained_accuracy(digits_cnn_path, digits):
    X, y = digits.test
    out = ort.run(digits_cnn_path, {"input": X})
    assert out["logits"].shape == (len(X), 10)
    assert (out["logits"].argmax(1) == y).mean() > 0.97
    assert zoo.accuracy(digits_cnn_path, X, y) > 0.97


def test_verify_reports_errors_per_output(digits_cnn, digits):
    import copy

    from onnx import numpy_helper

    other = copy.deepcopy(digits_cnn)
    last_bias = other.graph.node[-1].input[2]  # the final Gemm's bias: adds 0.01 to each logit
    t = next(i for i in other.graph.initializer if i.name == last_bias)
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) + 0.01, t.name))
    feeds = {"input": digits.test[0][:16]}
    same = ort.verify(digits_cnn, digits_cnn, feeds)
    assert same.ok and same.max_abs == 0.0
    diff = ort.verify(digits_cnn, other, feeds)
    assert not diff.ok
    assert diff.max_abs == pytest.approx(0.01, rel=1e-3)
    assert "logits" in str(diff) and "exceeds tolerance" in str(diff)


def test_benchmark_percentiles(digits_cnn_path):
    r = ort.benchmark(digits_cnn_path, threads=1, runs=30, warmup=2)
    assert r.runs == 30 and 0 < r.min_ms <= r.p50_ms <= r.p90_ms
    a, b = ort.benchmark_pair(digits_cnn_path, digits_cnn_path, runs=30, threads=1)
    assert 0.3 < a.p50_ms / b.p50_ms < 3


def test_profile_times_every_node_of_the_optimized_graph(digits_cnn_path):
    prof = ort.profile(digits_cnn_path, {"input": np.zeros((8, 1, 8, 8), np.float32)}, threads=1,
                       runs=10, warmup=2)
    ops = [k.op for k in prof.kernels]
    assert prof.backend == "onnxruntime" and prof.runs == 10
    assert ops.count("Conv") == 2 and "MaxPool" in ops       # the graph as onnxruntime runs it
    assert all(k.calls == 1 and k.total_ms > 0 for k in prof.kernels)
    assert sum(k.share for k in prof.kernels) + 100 * prof.other_ms / prof.total_ms == pytest.approx(100)
    assert 0.1 < prof.kernel_ms / prof.latency_ms <= 1.5      # nodes run inside the timed run


def test_profile_from_trace_skips_warmup_and_takes_medians():
    def run(ts, dur):
        return {"cat": "Session", "name": "model_run", "ts": ts, "dur": dur}

    def node(ts, name, dur, op="Conv"):
        return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur,
                "args": {"op_name": op}}

    events = [run(0, 900), node(1, "conv", 800),                          # warm-up: left out
              run(1000, 100), node(1001, "conv", 60), node(1070, "gemm", 20, "Gemm"),
              run(2000, 110), node(2001, "conv", 70), node(2075, "gemm", 20, "Gemm"),
              run(3000, 400), node(3001, "conv", 350), node(3360, "gemm", 30, "Gemm")]
    prof = ort.profile_from_trace(events, warmup=1)
    assert prof.runs == 3 and prof.latency_ms == pytest.approx(0.110)
    assert [(k.name, k.op, k.total_ms) for k in prof.kernels] == [
        ("conv", "Conv", pytest.approx(0.070)), ("gemm", "Gemm", pytest.approx(0.020))]
    assert prof.other_ms == pytest.approx(0.020) and prof.kernels[0].share == pytest.approx(70 / 1.1)
    with pytest.raises(BackendError, match="no timed run"):
        ort.profile_from_trace(events[:2], warmup=1)


def test_bad_feeds_are_backend_errors(digits_cnn_path):
    with pytest.raises(BackendError, match="missing input"):
        ort.run(digits_cnn_path, {"x": np.zeros((1, 1, 8, 8), np.float32)})
    with pytest.raises(BackendError, match="unknown optimization level"):
        ort.session(digits_cnn_path, optimization="max")
