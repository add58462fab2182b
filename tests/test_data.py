"""Calibration data: every accepted form, and clear errors for data that does not fit."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxpress import passes
from onnxpress.data import as_calibration, npz
from onnxpress.errors import CalibrationError


@pytest.fixture
def needs_calib():
    @passes.register("test_needs_calib", requires=("calib",))
    def needs(model, ctx):
        batches = list(ctx.require_calib(model))
        ctx.record(batches=len(batches), samples=sum(b["input"].shape[0] for b in batches))
        return model

    yield
    passes.unregister("test_needs_calib")


def test_calibration_forms(tmp_path, digits_cnn, digits, needs_calib):
    X = digits.train[0][:10]
    path = tmp_path / "c.npz"
    np.savez(path, input=X)
    forms = {
        "list": [{"input": X[:5]}, {"input": X[5:]}],
        "npz": str(path),
        "callable": lambda: iter([{"input": X[:5]}, {"input": X[5:]}]),
        "generator": ({"input": X[i:i + 5]} for i in (0, 5)),
    }
    for name, calib in forms.items():
        r = passes.run(digits_cnn, ["test_needs_calib"], calib=calib)
        assert r.reports[0].figures["samples"] == 10, name
    assert len(npz(path, batch_size=4)) == 3


@pytest.mark.parametrize("calib,message", [
    ([{"pixels": np.zeros((1, 1, 8, 8), np.float32)}], "unknown name\\(s\\) pixels.*inputs are input"),
    ([{"input": np.zeros((1, 1, 8, 8), np.float64)}], "dtype float64, the model expects float32"),
    ([{"input": np.zeros((1, 8, 8), np.float32)}], "rank 3\\), the model expects rank 4"),
    ([{"input": np.zeros((1, 1, 7, 8), np.float32)}], "size 7 on axis 2, the model expects 8"),
    ([], "empty"),
    (["not a dict"], "expected a dict"),
    (42, "calib= got int"),
])
def test_bad_calibration_data(digits_cnn, needs_calib, calib, message):
    with pytest.raises(CalibrationError, match=message):
        passes.run(digits_cnn, ["test_needs_calib"], calib=calib)


def test_missing_calibration_names_the_pass(digits_cnn, needs_calib):
    with pytest.raises(CalibrationError, match="pass 'test_needs_calib' needs calibration data"):
        passes.run(digits_cnn, ["test_needs_calib"])


def test_bad_npz_files(tmp_path):
    with pytest.raises(CalibrationError, match="does not exist"):
        npz(tmp_path / "none.npz")
    (tmp_path / "bad.npz").write_bytes(b"junk")
    with pytest.raises(CalibrationError, match="not a readable .npz"):
        npz(tmp_path / "bad.npz")
    np.savez(tmp_path / "ragged.npz", a=np.zeros((3, 2)), b=np.zeros((4, 2)))
    with pytest.raises(CalibrationError, match="differ in batch size"):
        npz(tmp_path / "ragged.npz")
    assert as_calibration(None) is None


_ = onnx
