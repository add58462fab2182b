"""Cleanup on the real models of docs/data.md: outputs within 1e-4, never more nodes or bytes;
MACs from `inspect` match a hand count on the digits CNN."""

from __future__ import annotations

import onnx
import pytest

from onnxpress import passes, stats, zoo
from onnxpress.backends import ort
from onnxpress.data import make_inputs

CLEANUP = ["fold_constants", "dce", "simplify"]


def _path(name):
    if name == "digits_cnn":
        return zoo.digits_cnn()
    if name == "minilm":
        return zoo.minilm()
    return zoo.timm_model(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits_cnn", "minilm", "resnet18", "efficientnet_b0",
                                  "vit_tiny_patch16_224", "convnext_atto", "mobilenetv3_small_100"])
def test_cleanup_preserves_real_models(name, digits):
    model = onnx.load(_path(name))
    result = passes.run(model, CLEANUP)
    out = result.model
    assert len(out.graph.node) <= len(model.graph.node)
    assert out.ByteSize() <= model.ByteSize()
    assert {p.key: p.value for p in out.metadata_props} == {p.key: p.value for p in model.metadata_props}
    if name == "digits_cnn":
        feeds = {"input": digits.test[0][:32]}
    elif name == "minilm":
        feeds = zoo.minilm_feeds(["a terminal emulator for X", "library for numerical integration",
                                  "fonts with wide Unicode coverage and ligatures"])
    else:
        feeds = {"input": zoo.photo_batch()[:1]}
    check = ort.compare_outputs(ort.run(model, feeds), ort.run(out, feeds), rtol=1e-4, atol=1e-5)
    assert check.ok, str(check)
    if name in ("minilm", "vit_tiny_patch16_224"):
        assert len(out.graph.node) < 0.8 * len(model.graph.node), "exports full of shape math shrink"


def test_digits_macs_match_hand_count(digits_cnn):
    # Conv 1->16 3x3 on 8x8: 16*8*8 * 1*9;  Conv 16->32 3x3 on 8x8: 32*8*8 * 16*9
    # FC 512->64;  FC 64->10
    hand = 16 * 64 * 9 + 32 * 64 * 16 * 9 + 512 * 64 + 64 * 10
    st = stats.model_stats(digits_cnn)
    assert abs(st.macs - hand) <= 0.01 * hand
    assert st.params == 38282
    assert [layer.op_type for layer in st.layers] == ["Conv", "Conv", "Gemm", "Gemm"]


def test_minilm_macs_with_bound_shapes(minilm_path):
    from onnxpress.passes.graph import bind_input_shapes

    model = bind_input_shapes(onnx.load(minilm_path), {"batch": 1, "seq": 128})
    st = stats.model_stats(model)
    per_layer = 4 * 128 * 384 * 384 + 2 * 128 * 384 * 1536 + 2 * 12 * 128 * 128 * 32
    assert not st.unknown_shape_layers
    assert abs(st.macs - 6 * per_layer) <= 0.01 * 6 * per_layer


def test_generated_inputs_bind_named_dims(minilm_path):
    feeds = make_inputs(onnx.load(minilm_path), shapes={"batch": 2, "seq": 16})
    assert feeds["input_ids"].shape == (2, 16) and (feeds["attention_mask"] == 1).all()
