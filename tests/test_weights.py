"""Weights stay out of copies: the checker and shape inference see weightless copies, the graph
library round trips of fold_constants and fuse leave the model's own tensors where they are,
and save streams them. Identity of the tensor objects, not memory figures (test_scale has those),
shows that nothing was copied."""

from __future__ import annotations

import io as _io

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxpress as ox
from onnxpress import passes
from onnxpress.errors import InvalidModelError
from onnxpress.io import write_serialized
from onnxpress.weights import adopt, is_stub, light_copy, stub_copy, stub_of


def _mlp(n: int = 64) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((n, n), dtype=np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((n, n), dtype=np.float32), "w2")
    b = numpy_helper.from_array(rng.standard_normal(n, dtype=np.float32), "b")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Add", ["h", "b"], ["hb"], name="add"),
             helper.make_node("Identity", ["hb"], ["hi"], name="id"),   # simplify removes it
             helper.make_node("MatMul", ["hi", "w2"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", 1, [1, n])],
                              [helper.make_tensor_value_info("y", 1, [1, n])], [w1, w2, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, {"author": "tests"})
    return model


def test_weightless_copies_hold_no_weight_bytes():
    model = _mlp()
    light, stubbed = light_copy(model, keep=lambda t: False), stub_copy(model)
    assert not light.graph.initializer and {"w1", "w2", "b"} <= {i.name for i in light.graph.input}
    assert [t.name for t in stubbed.graph.initializer] == ["w1", "w2", "b"]
    assert all(is_stub(t) and not t.raw_data for t in stubbed.graph.initializer[:2])
    assert not is_stub(stubbed.graph.initializer[2])         # 256 bytes: small tensors stay
    assert stubbed.ByteSize() < 2048 < model.ByteSize() // 16
    assert {p.key for p in light.metadata_props} == {"author"}


def test_checker_still_catches_a_truncated_weight():
    model = _mlp()
    model.graph.initializer[0].raw_data = model.graph.initializer[0].raw_data[:100]
    with pytest.raises(InvalidModelError, match="raw_data size .* too small"):
        ox.load(model)


def test_adopt_keeps_the_models_own_tensors_and_copies_only_what_it_must():
    model = _mlp()
    w1, w2 = model.graph.initializer[0], model.graph.initializer[1]
    out = onnx.ModelProto()
    out.CopyFrom(stub_copy(model))
    del out.graph.initializer[:]
    renamed = stub_of(w2)
    renamed.name = "w2_renamed"
    new = numpy_helper.from_array(np.ones(3, np.float32), "new")
    out.graph.initializer.extend([new, stub_of(w1), renamed])
    out.graph.node[3].input[1] = "w2_renamed"
    out.graph.node[1].input[1] = "new"
    adopt(model, out)
    assert [t.name for t in model.graph.initializer] == ["new", "w1", "w2_renamed"]
    assert model.graph.initializer[1] is w1, "w1 stayed where it was"
    assert not any(is_stub(t) for t in model.graph.initializer)
    np.testing.assert_array_equal(numpy_helper.to_array(model.graph.initializer[2]),
                                  numpy_helper.to_array(w2))
    assert model.graph.node[3].input[1] == "w2_renamed"


def test_pipeline_rewrites_in_place_without_copying_weights():
    model = _mlp()
    feeds = {"x": np.ones((1, 64), np.float32)}
    expected = ox.backends.ort.run(model, feeds)
    w1, w2 = model.graph.initializer[0], model.graph.initializer[1]
    result = passes.run(model, "cleanup,fuse", inplace=True)
    assert result.model is model
    assert [n.op_type for n in model.graph.node] == ["Gemm", "MatMul"]   # Identity gone, fused
    for w in (w1, w2):
        assert any(t is w for t in model.graph.initializer), f"the passes copied {w.name}"
    np.testing.assert_allclose(ox.backends.ort.run(model, feeds)["y"], expected["y"], rtol=1e-6)


def test_streamed_serialization_parses_back_to_the_same_model(tmp_path):
    model = _mlp()
    buf = _io.BytesIO()
    write_serialized(model, buf)
    back = onnx.ModelProto()
    back.ParseFromString(buf.getvalue())
    assert back == model
    ox.save(model, tmp_path / "m.onnx", external_data=True, size_threshold=1024)
    assert (tmp_path / "m.onnx").stat().st_size < 2048
    loaded = ox.load(tmp_path / "m.onnx")
    for a, b in zip(loaded.graph.initializer, model.graph.initializer):
        assert a.name == b.name
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    assert loaded.graph.node == model.graph.node and loaded.metadata_props == model.metadata_props
