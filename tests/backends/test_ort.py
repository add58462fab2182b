"""The onnxruntime backend: run, verify, benchmark."""

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


def test_bad_feeds_are_backend_errors(digits_cnn_path):
    with pytest.raises(BackendError, match="missing input"):
        ort.run(digits_cnn_path, {"x": np.zeros((1, 1, 8, 8), np.float32)})
    with pytest.raises(BackendError, match="unknown optimization level"):
        ort.session(digits_cnn_path, optimization="max")
