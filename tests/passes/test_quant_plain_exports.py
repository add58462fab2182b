"""The API's own example, `passes.apply(model, ["fuse", "quant_int8"])`, on models exported the
way users export them (plain torch.onnx.export: no shape annotations, deduplicated weights):
fusing first never costs integer kernels, and a layer left float is named with its reason."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest

from onnxpress import passes, zoo
from onnxpress.backends import ort

QUANT = "quant_int8:latency_aware=false,report_error=false"


def _calib(model: onnx.ModelProto, n: int = 2) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    x = model.graph.input[0]
    shape = [d.dim_value or 1 for d in x.type.tensor_type.shape.dim]
    return [{x.name: rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits_cnn", "resnet18", "mobilenetv3_small_100",
                                  "efficientnet_b0", "convnext_atto", "vit_tiny_patch16_224"])
def test_fuse_then_quant_int8_quantizes_what_quant_int8_alone_does(name):
    model = onnx.load(zoo.plain_export(name))
    calib = _calib(model)
    alone = passes.run(model, QUANT, calib=calib, progress=False)
    fused = passes.run(model, ["fuse", QUANT], calib=calib, progress=False)
    a, f = alone.reports[-1].figures, fused.reports[-1].figures
    assert a["int8_compute_nodes"] > 0, a["float_why"]
    assert f["int8_compute_nodes"] >= a["int8_compute_nodes"], (a["float_why"], f["float_why"])
    assert f["activations_quantized"] >= a["activations_quantized"]
    # every layer is accounted for: integer, weight-only or float with a reason
    assert f["layers"] == f["int8_compute_nodes"] + f["layers_float"]
    assert all(f["float_layers"].values())
    ref = ort.run(model, calib[0])["y"]
    assert _cos(ref, ort.run(fused.model, calib[0])["y"]) > 0.99


def test_resnet18_plain_export_every_conv_integer():
    """The headline call on a plain resnet18: all 20 convs and the Gemm get integer kernels, with
    or without the exporter's deduplicated (Identity-shared) zero biases, and onnxruntime runs
    them as QLinearConv."""
    model = onnx.load(zoo.plain_export("resnet18"))
    calib = _calib(model)
    res = passes.run(model, ["fuse", QUANT], calib=calib, progress=False)
    f = res.reports[-1].figures
    assert f["layers"] == 21 and f["int8_compute_nodes"] == 21 and f["layers_float"] == 0
    assert f["fused_ops_split"] == 17      # fuse's FusedConv (8 with a residual sum) split back
    ops = [n.op_type for n in res.model.graph.node]
    assert "FusedConv" not in ops and ops.count("QuantizeLinear") == 32
    # the float biases the int32 ones replaced are gone, not carried as dead bytes (21 were)
    read = {i for n in res.model.graph.node for i in n.input}
    assert [t.name for t in res.model.graph.initializer if t.name not in read] == []


def _shared_weight_model() -> tuple[onnx.ModelProto, list[dict]]:
    """Two convs reading one weight through Identity, as torch's exporter deduplicates them."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 4, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["w2"], name="dedup"),
         helper.make_node("Conv", ["x", "w"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["a"], ["r"], name="relu"),
         helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])],
        "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    calib = [{"x": rng.standard_normal((1, 4, 6, 6)).astype(np.float32)} for _ in range(4)]
    return model, calib


def test_shared_weight_quantized_for_both_readers_and_kept_float_for_an_excluded_one():
    model, calib = _shared_weight_model()
    both = passes.run(model, QUANT, calib=calib, progress=False).reports[-1].figures
    assert both["int8_compute_nodes"] == 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = passes.run(model, {"name": "quant_int8", "latency_aware": False,
                                 "exclude_nodes": ["conv2"]}, calib=calib, progress=False)
    f = res.reports[-1].figures
    assert f["int8_compute_nodes"] == 1
    assert f["float_layers"] == {"conv2": "excluded by the pass options"}
    assert any("1 of 2 layers got integer kernels" in str(w.message) for w in caught)
    assert res.reports[-1].warnings and "1 of 2 layers" in res.reports[-1].warnings[0]
    assert res.to_dict()["passes"][-1]["warnings"] == res.reports[-1].warnings
    # the excluded conv still reads the float weight, not a dequantized int8 copy
    conv2 = next(n for n in res.model.graph.node if n.name == "conv2")
    inits = {t.name: t for t in res.model.graph.initializer}
    assert inits[conv2.input[1]].data_type == onnx.TensorProto.FLOAT


@pytest.mark.slow
def test_minilm_fused_attention_is_split_so_its_qkv_matmuls_get_integer_kernels(minilm_path):
    """fuse packs each layer's Q/K/V MatMuls into com.microsoft.Attention, which has no int8
    form with an additive mask: quant_int8 splits it back, so `fuse,quant_int8` quantizes the
    36 weight MatMuls `quant_int8` alone does; an Attention left float is fused back."""
    model = onnx.load(minilm_path)
    task = zoo.debian_task()
    tok = zoo.minilm_tokenizer()
    calib = [zoo.minilm_feeds(task.train_texts[i:i + 8], tokenizer=tok) for i in range(0, 16, 8)]
    fused = passes.run(model, ["fuse", QUANT], calib=calib, progress=False).reports[-1].figures
    assert fused["fused_ops_split"] == 6 and fused["int8_compute_nodes"] == 36
    assert fused["float_why"] == "12 MatMul of two activations (matmul_activations=false)"
    res = passes.run(model, ["fuse", QUANT + ",op_types=Conv"], calib=calib, progress=False)
    ops = [n.op_type for n in res.model.graph.node]
    assert ops.count("Attention") == 6 and res.reports[-1].figures["fused_ops_restored"] == 6
