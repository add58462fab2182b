"""Loading and saving: every accepted form, external data, metadata kept, bad input, atomicity."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxpress as ox
from onnxpress.errors import InvalidModelError, ModelLoadError, ModelSaveError


def _model_with_weight(n: int = 256) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(n * n, dtype=np.float32).reshape(n, n) / (n * n), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, n])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, n])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.doc_string = "a model with a doc string"
    helper.set_model_props(model, {"author": "onnxpress tests", "license": "MIT"})
    return model


def test_load_accepts_path_bytes_and_proto(tmp_path, digits_cnn_path):
    from_path = ox.load(digits_cnn_path)
    from_str = ox.load(str(digits_cnn_path))
    from_bytes = ox.load(digits_cnn_path.read_bytes())
    assert from_path == from_str == from_bytes
    assert ox.load(from_path) is from_path  # a ModelProto is checked, not copied


def test_external_data_round_trip_keeps_metadata(tmp_path):
    model = _model_with_weight()
    path = ox.save(model, tmp_path / "m.onnx", external_data=True)
    data_file = tmp_path / "m.onnx.data"
    assert data_file.exists() and data_file.stat().st_size >= 256 * 256 * 4
    assert path.stat().st_size < 4096, "weights must live in the external file"
    back = ox.load(path)
    assert {p.key: p.value for p in back.metadata_props} == {"author": "onnxpress tests",
                                                           "license": "MIT"}
    assert back.doc_string == "a model with a doc string"
    assert [(o.domain, o.version) for o in back.opset_import] == [("", 17)]
    np.testing.assert_array_equal(numpy_helper.to_array(back.graph.initializer[0]),
                                  numpy_helper.to_array(model.graph.initializer[0]))
    # and the loaded model runs
    out = ox.backends.ort.run(back, {"x": np.ones((1, 256), np.float32)})
    assert out["y"].shape == (1, 256)
    assert not list(tmp_path.glob(".m.onnx.*")), "no temporary files left behind"


def test_a_model_moved_without_its_data_file_names_the_missing_file(tmp_path):
    """torch's dynamo exporter (torch.onnx.export's default) writes m.onnx + m.onnx.data; a
    model renamed or copied alone still names its old data file: say which, in our words."""
    ox.save(_model_with_weight(), tmp_path / "m.onnx", external_data=True)
    (tmp_path / "m.onnx").rename(tmp_path / "renamed.onnx")
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(ModelLoadError, match=r"'m\.onnx\.data', which is not beside it"):
        ox.load(tmp_path / "renamed.onnx")


def test_auto_external_data_over_threshold(tmp_path, monkeypatch):
    import onnxpress.io as io

    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 1000)
    ox.save(_model_with_weight(), tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").exists()
    assert ox.load(tmp_path / "big.onnx").graph.initializer[0].dims == [256, 256]


@pytest.mark.parametrize("content,message", [
    (b"", "empty"),
    (b"this is not an onnx model at all" * 10, "not an ONNX model|no ONNX graph"),
])
def test_bad_files_get_clear_errors(tmp_path, content, message):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    with pytest.raises(ModelLoadError, match=message) as exc:
        ox.load(bad)
    assert str(bad) in str(exc.value)
    assert bad.read_bytes() == content, "the input file is never touched"


def test_truncated_file(tmp_path, digits_cnn_path):
    data = digits_cnn_path.read_bytes()
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises((ModelLoadError, InvalidModelError), match="truncated|not a valid|checker"):
        ox.load(bad)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        ox.load(tmp_path / "nope.onnx")
    with pytest.raises(ModelLoadError, match="directory"):
        ox.load(tmp_path)
    with pytest.raises(ModelLoadError, match="cannot load a model from int"):
        ox.load(42)


def test_checker_failure_names_the_problem():
    model = _model_with_weight()
    model.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(InvalidModelError, match="NoSuchOp"):
        ox.load(model)


def test_save_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "out.onnx"
    target.write_bytes(b"previous content")

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", explode)
    with pytest.raises(ModelSaveError, match="disk full"):
        ox.save(_model_with_weight(), target)
    assert target.read_bytes() == b"previous content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_save_rejects_bad_destinations(tmp_path):
    with pytest.raises(ModelSaveError, match="directory"):
        ox.save(_model_with_weight(), tmp_path)
    with pytest.raises(ModelSaveError, match="ModelProto"):
        ox.save(b"bytes", tmp_path / "x.onnx")
