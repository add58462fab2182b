"""clip: weight outliers clipped so that int8 quantization afterwards loses less."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxpress import passes, zoo
from onnxpress.backends import ort
from onnxpress.errors import PassOptionError


@pytest.fixture(scope="module")
def outlier_model(digits_cnn_path) -> onnx.ModelProto:
    """The trained digits CNN with 4 weights of conv2 and of fc1 grown 20x: a few outliers that
    stretch a per-tensor int8 range 20-fold, as in real networks with outlier channels."""
    model = onnx.load(digits_cnn_path)
    rng = np.random.default_rng(0)
    for t in model.graph.initializer:
        if t.name in ("onnx::Conv_34", "classifier.1.weight"):
            w = numpy_helper.to_array(t).copy()
            idx = rng.choice(w.size, 4, replace=False)
            w.flat[idx] *= 20.0
            t.CopyFrom(numpy_helper.from_array(w, t.name))
    return model


def fake_quant_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """Per-tensor symmetric int8 quantize-dequantize of every weight (rank >= 2)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        w = numpy_helper.to_array(t)
        if w.ndim >= 2:
            s = np.abs(w).max() / 127.0
            q = (np.clip(np.round(w / s), -127, 127) * s).astype(w.dtype)
            t.CopyFrom(numpy_helper.from_array(q, t.name))
    return out


def _rmse(a: onnx.ModelProto, b: onnx.ModelProto, X: np.ndarray) -> float:
    ya, yb = ort.run(a, {"input": X})["logits"], ort.run(b, {"input": X})["logits"]
    return float(np.sqrt(((ya - yb) ** 2).mean()))


def test_clip_before_fake_int8_lowers_quantization_error(outlier_model, digits):
    X = digits.test[0]
    q_err = _rmse(fake_quant_weights(outlier_model), outlier_model, X)
    clipped = passes.apply(outlier_model, "clip:99.9")
    clip_q_err = _rmse(fake_quant_weights(clipped), clipped, X)
    assert clip_q_err < 0.3 * q_err, (clip_q_err, q_err)


def test_clip_before_quant_int8_lowers_quantization_error(outlier_model, digits):
    X = digits.test[0]
    calib = zoo.digits_calib(256, 64)
    spec = "quant_int8:per_channel=false,latency_aware=false"
    q = passes.apply(outlier_model, spec, calib=calib)
    clipped = passes.apply(outlier_model, "clip:99.9")
    cq = passes.apply(clipped, spec, calib=calib)
    assert any(n.op_type == "DequantizeLinear" for n in cq.graph.node)
    q_err, clip_q_err = _rmse(q, outlier_model, X), _rmse(cq, clipped, X)
    assert clip_q_err < 0.5 * q_err, (clip_q_err, q_err)


def test_clip_methods_bound_the_weights(digits_cnn_path):
    model = onnx.load(digits_cnn_path)
    w0 = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    r = passes.run(model, "clip:method=range,lo=-0.2,hi=0.2")
    w = {t.name: numpy_helper.to_array(t) for t in r.model.graph.initializer}
    for name in ("onnx::Conv_31", "onnx::Conv_34", "classifier.1.weight", "classifier.3.weight"):
        assert w[name].max() <= 0.2 + 1e-7 and w[name].min() >= -0.2 - 1e-7
    assert np.array_equal(w["onnx::Conv_32"], w0["onnx::Conv_32"])  # biases untouched
    fig = r.reports[0].figures
    assert fig["tensors_clipped"] >= 1 and fig["values_clipped"] > 0

    r = passes.run(model, "clip:method=std,k=2,per_channel=true")
    w = {t.name: numpy_helper.to_array(t) for t in r.model.graph.initializer}
    fc1, fc1_0 = w["classifier.1.weight"], w0["classifier.1.weight"].astype(np.float64)
    hi = fc1_0.mean(1) + 2 * fc1_0.std(1)
    assert (fc1.max(1) <= hi + 1e-6).all()

    r = passes.run(model, "clip:99")
    fc1 = {t.name: numpy_helper.to_array(t) for t in r.model.graph.initializer}["classifier.1.weight"]
    t99 = np.percentile(np.abs(w0["classifier.1.weight"]), 99)
    assert np.abs(fc1).max() <= t99 + 1e-6
    assert np.mean(np.abs(fc1) >= t99 - 1e-6) == pytest.approx(0.01, abs=0.002)


def test_clip_reports_error_on_calibration_and_checks_range(digits_cnn_path):
    model = onnx.load(digits_cnn_path)
    fig = passes.run(model, "clip:99.9", calib=zoo.digits_calib()).reports[0].figures
    assert 0.9 < fig["min_cosine"] <= 1.0 and "max_abs" in fig and "rel_l2" in fig
    with pytest.raises(PassOptionError, match="'lo'"):
        passes.apply(model, "clip:method=range,lo=1,hi=-1")
