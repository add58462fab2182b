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


@pytest.fixture(scope="session")
def segmenter_path():
    return zoo.digits_segmenter()


@pytest.mark.parametrize("name", ["digits", "segmenter", "resnet18", "mobilenetv3_small_100",
                                  "convnext_atto"])
def test_torch_converter_matches_onnxruntime(name, digits_cnn_path, timm_path, request):
    small = name in ("digits", "segmenter")
    path = {"digits": digits_cnn_path}.get(name) or (
        request.getfixturevalue("segmenter_path") if name == "segmenter" else timm_path(name))
    model = onnx.load(path)
    x = zoo.digits_data().test[0][:8] if small else zoo.photo_batch()[:1]
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
    assert cov.fraction >= torch_coverage.REQUIRED, "\n".join([cov.summary()] + cov.failures[:20])


@pytest.mark.parametrize("mode,transform", [("linear", "half_pixel"), ("cubic", "align_corners"),
                                            ("nearest", "asymmetric")])
def test_resize_matches_onnxruntime_and_passes_gradients(mode, transform):
    """Resize through the converter: onnxruntime's values, and torch's gradient equals the
    finite-difference one (gradcheck in float64), so a decoder's upsampling trains."""
    h = onnx.helper
    node = h.make_node("Resize", ["x", "", "scales"], ["y"], mode=mode,
                       coordinate_transformation_mode=transform)
    graph = h.make_graph([node], "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 3, 4])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                         [onnx.numpy_helper.from_array(np.array([1, 1, 2.0, 1.5], np.float32), "scales")])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 19)])
    x = np.random.default_rng(0).standard_normal((1, 2, 3, 4)).astype(np.float32)
    module = OnnxGraphModule(model)
    want = ort.run(model, {"x": x})["y"]
    got = module(x=torch.from_numpy(x))["y"].detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    xt = torch.from_numpy(x.astype(np.float64)).requires_grad_()  # gradcheck wants float64
    assert torch.autograd.gradcheck(lambda v: module(x=v)["y"], (xt,))


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


def test_distill_recovers_a_pruned_segmenter_with_resize(segmenter_path):
    """The digits segmenter's decoder upsamples with Resize (bilinear, then nearest): structured
    pruning at 50% loses most of its mean IoU, a short distillation (640 unlabeled images, 6
    epochs) wins a large part back. bench/bench_distill.py runs the full-length version."""
    model = onnx.load(segmenter_path)
    assert [n.op_type for n in model.graph.node].count("Resize") == 2
    seg = zoo.digits_segments()
    X, y = seg.test
    teacher = zoo.segment_scores(model, X, y)["miou"]
    pruned = passes.run(model, "prune:sparsity=0.5,structured=true")
    assert pruned.reports[0].figures["macs_ratio"] < 0.4
    before = zoo.segment_scores(pruned.model, X, y)["miou"]
    Xtr = seg.train[0][:640]
    calib = [{"input": Xtr[i:i + 64]} for i in range(0, len(Xtr), 64)]
    result = passes.run(pruned.model, f"distill:teacher={segmenter_path},epochs=6,loss=kl,"
                        "temperature=1,lr=0.01", calib=calib)
    after = zoo.segment_scores(result.model, X, y)["miou"]
    assert teacher > 0.9 and before < 0.3, (teacher, before)
    assert after > before + 0.3, (teacher, before, after)


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


def test_distill_trains_a_plain_export_that_bakes_its_batch_of_one(tmp_path):
    """torch.onnx.export writes a flatten as Reshape(x, [1, -1]) when the module asks for
    x.reshape(1, -1) (a ViT's class token Expand does the same): batches of 8 cannot run through
    that graph, so distill trains at the batch the model fixes and says so."""
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Linear(4 * 8 * 8, 10)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).reshape(1, -1))

    torch.manual_seed(0)
    path = tmp_path / "net.onnx"
    torch.onnx.export(Net().eval(), torch.zeros(1, 1, 8, 8), str(path), input_names=["x"],
                      output_names=["y"], opset_version=17, dynamo=False)
    rng = np.random.default_rng(0)
    calib = [{"x": rng.standard_normal((1, 1, 8, 8)).astype(np.float32)} for _ in range(16)]
    res = passes.run(str(path), ["prune:sparsity=0.7", "distill:epochs=3,batch_size=8,lr=0.001"],
                     calib=calib, progress=False)
    f = res.reports[-1].figures
    assert f["batch_size"].startswith("1 (the model fixes its batch dimension at 1")
    assert f["loss_after"] < f["loss_before"]
