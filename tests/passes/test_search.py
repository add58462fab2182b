"""search: per-group pruning ratios under a budget beat uniform pruning on accuracy."""

from __future__ import annotations

import onnx
import pytest

from onnxpress import passes, stats, zoo


@pytest.fixture(scope="module")
def calib():
    return zoo.digits_calib(256, 64)


def test_search_under_half_the_macs_beats_uniform_50(digits_cnn_path, digits, calib):
    model = onnx.load(digits_cnn_path)
    X, y = digits.test
    found = passes.run(model, "search:budget=0.5,metric=macs", calib=calib, seed=0)
    uniform = passes.apply(model, "prune:sparsity=0.5,structured=true", calib=calib, seed=0)
    fig = found.reports[0].figures
    s0, s1 = stats.model_stats(model), stats.model_stats(found.model)
    assert s1.macs <= 0.5 * s0.macs and fig["budget_met"]
    acc_search = zoo.accuracy(found.model, X, y)
    acc_uniform = zoo.accuracy(uniform, X, y)
    assert acc_search > acc_uniform + 0.2, (acc_search, acc_uniform)
    # the chosen ratio and kept channels of every group are reported, and differ between groups
    assert set(fig["ratios"]) == set(fig["kept"]) == {
        "/features/features.0/Conv", "/features/features.3/Conv", "/classifier/classifier.1/Gemm"}
    assert len(set(fig["ratios"].values())) > 1
    onnx.checker.check_model(found.model)


def test_search_params_budget(digits_cnn_path, calib):
    model = onnx.load(digits_cnn_path)
    out = passes.run(model, "search:budget=0.6,metric=params,step=0.2", calib=calib)
    s0, s1 = stats.model_stats(model), stats.model_stats(out.model)
    assert s1.params <= 0.6 * s0.params
    assert out.reports[0].figures["metric"] == "params"


def test_search_needs_calibration(digits_cnn_path):
    from onnxpress.errors import CalibrationError

    with pytest.raises(CalibrationError, match="search"):
        passes.apply(onnx.load(digits_cnn_path), "search")
