"""quant_auto's w8a16 rung: int8 weights with 16-bit activations (QDQ uint16)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxpress import passes
from onnxpress.backends import ort
from onnxpress.passes.context import PassContext
from onnxpress.passes.quant.auto import apply_assignment, weighted_layers


def _outlier_mlp() -> tuple[onnx.ModelProto, list[dict]]:
    """x[.., 32] -> MatMul -> Tanh -> MatMul -> y, where a few rows (tokens) of x are 300x the
    rest, as in transformers: their range leaves the ordinary rows a couple of uint8 steps, and
    no per-channel rescaling (SmoothQuant) can help, since every channel carries them. Tanh
    bounds what the second layer reads: int8 suits it."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((32, 64)) / 6).astype(np.float32)
    w2 = (rng.standard_normal((64, 32)) / 8).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
         helper.make_node("Tanh", ["h"], ["r"], name="tanh"),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")],
        "outlier_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    batches = []
    for _ in range(8):
        x = rng.standard_normal((32, 32)).astype(np.float32)
        x[:2] = rng.uniform(-300, 300, (2, 32))
        batches.append({"x": x})
    return model, batches


@pytest.fixture(scope="module")
def outlier_mlp():
    return _outlier_mlp()


def _worst_cos(ref: np.ndarray, got: np.ndarray) -> float:
    return float(((ref * got).sum(1) / (np.linalg.norm(ref, axis=1)
                                        * np.linalg.norm(got, axis=1))).min())


@pytest.mark.parametrize("target", ["ort", "x86"])
def test_w8a16_runs_on_onnxruntime_between_int8_and_fp32(outlier_mlp, target):
    """Every layer at w8a16 runs on onnxruntime (com.microsoft Q/DQ for an opset-17 model on
    ort, opset-21 standard Q/DQ elsewhere), has the int8 model's size, and lands between int8
    and fp32 in error."""
    model, batches = outlier_mlp
    ctx = PassContext(calib=batches, target=target, progress=False)
    stats = ctx.analysis("calib", model)
    opts = dict(int8_options=dict(method="percentile", contrib_ops=target == "ort"),
                int4_options={}, embeddings=False)
    keys = [layer.key for layer in weighted_layers(model)]
    int8 = apply_assignment(model, stats, dict.fromkeys(keys, "int8"), **opts)
    a16 = apply_assignment(model, stats, dict.fromkeys(keys, "w8a16"), **opts)
    onnx.checker.check_model(a16, full_check=True)
    q16 = [n for n in a16.graph.node if n.op_type == "QuantizeLinear"]
    assert len(q16) == 2 and all(
        next(t for t in a16.graph.initializer if t.name == n.input[2]).data_type
        == TensorProto.UINT16 for n in q16)
    assert {n.domain for n in q16} == ({"com.microsoft"} if target == "ort" else {""})
    x = np.concatenate([b["x"] for b in batches])
    ref, e8, e16 = (ort.run(m, {"x": x})["y"] for m in (model, int8, a16))
    err8, err16 = 1 - _worst_cos(ref, e8), 1 - _worst_cos(ref, e16)
    assert err8 > 0.3                    # the outlier channel wrecks 8-bit activations
    assert 0 < err16 < 0.01              # 16 bits: little more than the int8 weights' rounding
    assert a16.ByteSize() < int8.ByteSize() + 400 < 0.5 * model.ByteSize()    # (a few nodes)


def test_quant_auto_moves_the_outlier_layer_to_w8a16(outlier_mlp):
    """Where int8 activations break the target, quant_auto keeps the layer's int8 weights and
    widens its activations instead of falling back to fp32: the size stays int8's."""
    model, batches = outlier_mlp
    res = passes.run(model, "quant_auto:target=0.98,latency_aware=false", calib=batches,
                     progress=False)
    f = res.reports[0].figures
    assert f["target_met"] and f["min_cosine"] >= 0.98
    assert f["precision"] == {"fc1": "w8a16", "fc2": "int8"}
    assert f["layers_w8a16"] == 1 and f["layers_fp32"] == 0
    assert res.model.ByteSize() < 0.4 * model.ByteSize()
    x = np.concatenate([b["x"] for b in batches])
    assert _worst_cos(ort.run(model, {"x": x})["y"], ort.run(res.model, {"x": x})["y"]) > 0.97
