"""TensorFlow/Keras frontend: a Keras CNN trained on the digits here, its .keras file and its
SavedModel become ONNX models that match TensorFlow's own outputs, then go through passes and run
on onnxruntime."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from onnxpress import passes
from onnxpress.backends import ort
from onnxpress.errors import FrontendError, MissingExtraError, UnknownPassError
from onnxpress.frontends import tf_frontend

needs_tf = pytest.mark.skipif(not tf_frontend.available(),
                              reason="tensorflow/tf2onnx not installed: pip install 'onnxpress[tf]'")


def _nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def keras_digits(digits):
    """A small Keras CNN (NHWC, Conv-BN-ReLU, pooling, dense) trained on the digits for a few
    epochs: real weights, about 95% test accuracy."""
    tf_frontend._tf()
    import keras

    keras.utils.set_random_seed(0)
    (Xtr, ytr), (Xte, yte) = digits.train, digits.test
    inp = keras.Input((8, 8, 1), name="image")
    x = keras.layers.Conv2D(16, 3, padding="same", use_bias=False)(inp)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(64, activation="relu")(x)
    out = keras.layers.Dense(10, name="logits")(x)
    model = keras.Model(inp, out, name="digits_keras")
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(_nhwc(Xtr), ytr, epochs=6, batch_size=64, verbose=0)
    return model, _nhwc(Xte), yte


def _accuracy(model, X, y) -> float:
    logits = next(iter(ort.run(model, {"image": X}).values()))
    return float((logits.argmax(1) == y).mean())


@needs_tf
def test_keras_model_matches_tensorflow(keras_digits):
    model, X, y = keras_digits
    onnx_model = tf_frontend.from_keras(model)
    assert [i.name for i in onnx_model.graph.input] == ["image"]
    assert [o.name for o in onnx_model.graph.output] == ["logits"]
    batch = onnx_model.graph.input[0].type.tensor_type.shape.dim[0]
    assert not batch.HasField("dim_value"), "the Keras None batch must stay dynamic"
    ref = np.asarray(model(X, training=False))
    got = ort.run(onnx_model, {"image": X})["logits"]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    acc = _accuracy(onnx_model, X, y)
    assert acc > 0.9, f"the Keras CNN should have learnt the digits, got {acc:.3f}"


@needs_tf
def test_keras_file_and_saved_model_match_tensorflow(keras_digits, tmp_path):
    from onnxpress.frontends.auto import import_any, source_kind

    model, X, _ = keras_digits
    keras_file = tmp_path / "digits.keras"
    model.save(keras_file)
    saved = tmp_path / "digits_saved_model"
    model.export(str(saved), format="tf_saved_model", verbose=False)
    assert source_kind(keras_file) == "keras" and source_kind(saved) == "saved_model"

    for src in (keras_file, saved):
        onnx_model = import_any(src)
        ref = tf_frontend.run_reference(src, {"image": X})  # TensorFlow's own outputs
        got = ort.run(onnx_model, {"image": X})
        assert set(got) == set(ref), (src, list(got), list(ref))
        for name in ref:
            np.testing.assert_allclose(got[name], ref[name], rtol=1e-4, atol=1e-5, err_msg=str(src))

    # NCHW on request, as PyTorch-style pipelines feed images
    nchw = tf_frontend.from_saved_model(saved, inputs_as_nchw=["image"])
    dims = [d.dim_value for d in nchw.graph.input[0].type.tensor_type.shape.dim[1:]]
    assert dims == [1, 8, 8]
    got = ort.run(nchw, {"image": np.ascontiguousarray(X.transpose(0, 3, 1, 2))})["output_0"]
    np.testing.assert_allclose(got, np.asarray(model(X, training=False)), rtol=1e-4, atol=1e-5)


@needs_tf
@pytest.mark.parametrize("source", ["keras", "saved_model"])
def test_imported_model_goes_through_passes_and_runs(keras_digits, tmp_path, source):
    from onnxpress import zoo

    model, X, y = keras_digits
    if source == "keras":
        onnx_model = tf_frontend.from_keras(model)
    else:
        model.export(str(tmp_path / "sm"), format="tf_saved_model", verbose=False)
        onnx_model = tf_frontend.from_saved_model(tmp_path / "sm")
    out_name = onnx_model.graph.output[0].name
    fp32_acc = _accuracy(onnx_model, X, y)
    registered = {p.name for p in passes.list_passes()}
    lossless = ["fold_constants", "dce", "simplify"] + (["fuse"] if "fuse" in registered else [])
    result = passes.run(onnx_model, lossless, verify=True)
    np.testing.assert_allclose(ort.run(result.model, {"image": X})[out_name],
                               ort.run(onnx_model, {"image": X})[out_name], rtol=1e-4, atol=1e-5)
    assert result.reports[-1].nodes_after <= result.reports[0].nodes_before
    if "quant_int8" not in registered:
        with pytest.raises(UnknownPassError):
            passes.parse_pipeline("quant_int8")
        pytest.skip("quant_int8 is not registered in this checkout: int8 step not run")
    calib = [{"image": _nhwc(b["input"])} for b in zoo.digits_calib()]
    q = passes.run(result.model, ["quant_int8"], calib=calib, verify=True).model
    assert any(n.op_type == "QuantizeLinear" for n in q.graph.node)
    q_acc = _accuracy(q, X, y)
    assert q_acc >= fp32_acc - 0.02, (fp32_acc, q_acc)


@needs_tf
def test_cli_accepts_saved_model_and_keras_file(keras_digits, tmp_path):
    model, X, _ = keras_digits
    saved = tmp_path / "sm"
    model.export(str(saved), format="tf_saved_model", verbose=False)
    out = tmp_path / "out.onnx"
    proc = subprocess.run([sys.executable, "-m", "onnxpress", "optimize", str(saved), "-p", "cleanup",
                           "-o", str(out), "-q"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = ort.run(str(out), {"image": X})["output_0"]
    np.testing.assert_allclose(got, np.asarray(model(X, training=False)), rtol=1e-4, atol=1e-5)


@needs_tf
def test_bad_inputs_raise_frontend_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FrontendError, match="not a TensorFlow SavedModel"):
        tf_frontend.convert(tmp_path / "empty")
    bad = tmp_path / "broken.keras"
    bad.write_bytes(b"not a zip")
    with pytest.raises(FrontendError, match="Keras could not load"):
        tf_frontend.convert(bad)
    with pytest.raises(FrontendError, match="Keras model"):
        tf_frontend.from_keras(object())


def test_missing_tensorflow_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # import tensorflow -> ImportError
    with pytest.raises(MissingExtraError, match=r"onnxpress\[tf\]"):
        tf_frontend._tf()
    assert tf_frontend.available() is False
