"""distill: the torch converter matches onnxruntime (zoo models, onnx's node cases); teacher from a
path; hard labels; errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from onnxpress import passes, zoo  # noqa: E402
from onnxpress.backends import ort  # noqa: E402
from onnxpress.errors import PassOptionError, UnsupportedOpError  # noqa: E402
from onnxpress.passes.torch_graph import OnnxGraphModule  # noqa: E402
from tests.passes import torch_coverage  # noqa: E402


@pytest.mark.parametrize("name", ["digits", "resnet18", "mobilenetv3_small_100", "convnext_atto"])
def test_torch_converter_matches_onnxruntime(name, digits_cnn_path, timm_path):
    path = digits_cnn_path if name == "digits" else timm_path(name)
    model = onnx.load(path)
    x = zoo.digits_data().test[0][:8] if name == "digits" else zoo.photo_batch()[:1]
    with torch.no_grad():
        got = OnnxGraphModule(model)(input=torch.from_numpy(x))
    want = ort.run(model, {"input": x})
    for k, v in want.items():
        np.testing.assert_allclose(got[k].numpy(), v, rtol=1e-4, atol=1e-4 * float(np.abs(v).max()))


def test_torch_converter_covers_onnx_node_cases(capsys):
    """Every onnx node case that onnxruntime runs with a float input, through the converter:
    at least 95% match onnxruntime (rtol 1e-4, atol 1e-5). onnxruntime's outputs are cached
    in-process with test_conformance's; `python -m tests.passes.torch_coverage -v` lists the rest."""
    cov = torch_coverage.measure()
    with capsys.disabled():
        print("\n" + cov.summary())
    assert cov.eligible > 1200
    assert cov.fraction >= 0.95, "\n".join([cov.summary()] + cov.failures[:20])


def test_distill_with_teacher_path_and_labels(digits_cnn_path, digits, tmp_path):
    X, y = digits.train
    calib = [{"input": X[i:i + 64]} for i in range(0, len(X), 64)]
    labels = tmp_path / "labels.npy"
    np.save(labels, y)
    pruned = passes.apply(onnx.load(digits_cnn_path), "prune:0.5,structured=true")
    before = zoo.accuracy(pruned, *digits.test)
    # a fresh pipeline: the teacher comes from the option, the labels add cross-entropy
    result = passes.run(pruned, f"distill:teacher={digits_cnn_path},labels={labels},epochs=10",
                        calib=calib)
    after = zoo.accuracy(result.model, *digits.test)
    assert after > before + 0.5, (before, after)
    fig = result.reports[0].figures
    assert fig["samples"] == len(X) and fig["tensors_trained"] == 8
    assert len(fig["loss_history"]) == 10 and fig["loss_history"][-1] < fig["loss_history"][0]


def test_distill_errors_name_what_is_missing(digits_cnn_path, digits, tmp_path):
    model = onnx.load(digits_cnn_path)
    calib = zoo.digits_calib()
    with pytest.raises(PassOptionError, match="teacher"):
        passes.apply(model, "distill", calib=calib)
    bad = tmp_path / "labels.npy"
    np.save(bad, np.zeros(3, dtype=np.int64))
    with pytest.raises(PassOptionError, match="labels"):
        passes.apply(model, f"distill:teacher={digits_cnn_path},labels={bad},epochs=1", calib=calib)
    node = onnx.helper.make_node("TreeEnsembleRegressor", ["input"], ["logits"], name="my_trees",
                                 domain="ai.onnx.ml")
    odd = onnx.helper.make_model(onnx.helper.make_graph(
        [node], "g", [onnx.helper.make_tensor_value_info("input", 1, [2, 2])],
        [onnx.helper.make_tensor_value_info("logits", 1, [])]))
    with pytest.raises(UnsupportedOpError, match="my_trees"):
        OnnxGraphModule(odd)
