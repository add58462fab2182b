"""SmoothQuant and bias correction (onnxpress/passes/quant/smooth.py) on a model built with
outlier activation channels: LayerNorm whose scale is 50x (and 25x) on two of 64 channels, then
MatMul + bias -> Relu -> MatMul, the shape of a transformer's MLP block."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxpress import passes
from onnxpress.backends import ort
from onnxpress.errors import PassOptionError
from onnxpress.passes.context import PassContext
from onnxpress.passes.quant.smooth import smooth_model

D, H = 64, 128


def outlier_model(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    gamma = np.ones(D, np.float32)
    gamma[3], gamma[17] = 50.0, 25.0
    arrays = {
        "gamma": gamma, "beta": (0.1 * rng.standard_normal(D)).astype(np.float32),
        "w1": (rng.standard_normal((D, H)) / np.sqrt(D)).astype(np.float32),
        "b1": (0.1 * rng.standard_normal(H)).astype(np.float32),
        "w2": (rng.standard_normal((H, D)) / np.sqrt(H)).astype(np.float32),
    }
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], axis=-1, name="ln"),
        helper.make_node("MatMul", ["h", "w1"], ["m1"], name="fc1"),
        helper.make_node("Add", ["m1", "b1"], ["a1"], name="fc1_bias"),
        helper.make_node("Relu", ["a1"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes, "outliers", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16, D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16, D])],
        [numpy_helper.from_array(a, n) for n, a in arrays.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(1)
    calib = [{"x": rng.standard_normal((4, 16, D)).astype(np.float32)} for _ in range(8)]
    held_out = {"x": rng.standard_normal((32, 16, D)).astype(np.float32)}
    model = outlier_model()
    return model, calib, held_out, ort.run(model, held_out)["y"]


def min_cosine(ref: np.ndarray, got: np.ndarray) -> float:
    a = ref.reshape(-1, D).astype(np.float64)
    b = got.reshape(-1, D).astype(np.float64)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def quantized(model, calib, spec):
    return passes.run(model, spec, calib=calib, progress=False)


def test_smoothing_alone_keeps_the_float_function(case):
    model, calib, held_out, ref = case
    for alpha in (0.5, "auto"):
        smoothed, figures = smooth_model(model, PassContext(calib=calib, progress=False), alpha)
        got = ort.run(smoothed, held_out)["y"]
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
        # LayerNorm -> fc1 folds 1/s into the norm; Relu -> fc2 needs a Mul
        assert figures["smooth_folded_into_layernorm"] == 1
        assert [n.op_type for n in smoothed.graph.node].count("Mul") == \
            figures["smooth_mul_inserted"]
    gamma = numpy_helper.to_array(next(t for t in smoothed.graph.initializer
                                       if t.name == smoothed.graph.node[0].input[1]))
    assert gamma[3] < 25.0          # the 50x channel's range moved into fc1's weight row


def test_smoothquant_improves_min_cosine(case):
    model, calib, held_out, ref = case
    base = "quant_int8:latency_aware=false"
    plain = min_cosine(ref, ort.run(quantized(model, calib, base).model, held_out)["y"])
    res = quantized(model, calib, base + ",smooth=auto")
    smooth = min_cosine(ref, ort.run(res.model, held_out)["y"])
    assert plain < 0.96 and smooth > 0.985, (plain, smooth)
    f = res.reports[0].figures
    assert f["int8_compute_nodes"] == 2 and f["smooth_groups"] >= 1
    assert f["smooth_error_reduction"] > 2


def test_bias_correction_reduces_the_mean_output_shift(case):
    model, calib, held_out, ref = case
    base = "quant_int8:latency_aware=false"

    def shift(spec):
        res = quantized(model, calib, spec)
        y = ort.run(res.model, held_out)["y"]
        return float(np.abs((y - ref).mean(axis=(0, 1))).mean()), res.reports[0].figures

    plain, _ = shift(base)
    corrected, f = shift(base + ",bias_correction=true")
    assert f["bias_corrected"] == 2        # fc1's bias, and a bias added to fc2
    assert corrected < 0.85 * plain, (plain, corrected)


def test_quant_auto_smooths_only_when_the_target_needs_it(case):
    """Without smoothing, int8 activations on the outlier LayerNorm miss the target and the
    search has to leave fc1 in float; smoothed, every layer stays int8 and the target is met:
    quant_auto keeps smoothing because the result is smaller. An easy target is met by plain
    int8 (on the held-out calibration batches), and then nothing is smoothed (a smoothing Mul
    would only cost bytes)."""
    model, calib, held_out, ref = case
    spec = "quant_auto:max_batches=2,latency_aware=false,precisions=int8,target=0.999"
    res = quantized(model, calib, spec)
    f = res.reports[0].figures
    assert f["smooth"] == "auto", f.get("smooth_trial")
    assert f["smooth_trial"]["smoothed"] < f["smooth_trial"]["plain"]
    assert f["target_met"] and f["layers_int8"] == 2 and f["layers_fp32"] == 0
    off = quantized(model, calib, spec + ",outliers=false")
    fo = off.reports[0].figures
    assert fo["target_met"] and fo["layers_fp32"] >= 1       # fc1 left float
    assert res.model.ByteSize() < off.model.ByteSize()
    assert min_cosine(ref, ort.run(res.model, held_out)["y"]) > 0.985
    easy = quantized(model, calib, spec.replace("0.999", "0.99")).reports[0].figures
    assert easy["smooth"].startswith("off (target met without it)"), easy["smooth"]


def test_bad_smooth_option(case):
    model, calib, _, _ = case
    with pytest.raises(PassOptionError, match="smooth"):
        quantized(model, calib, "quant_int8:smooth=1.5")


def test_bias_correction_unshares_a_shared_bias():
    """Two layers reading one bias initializer (as exporters deduplicate equal tensors) each get
    their own corrected bias; the shift of both outputs shrinks on the calibration data."""
    rng = np.random.default_rng(2)
    w1, w2 = (rng.standard_normal((2, D, D)) / np.sqrt(D)).astype(np.float32)
    w1[:, :4] *= 8.0               # a few wide columns: int8 rounding shifts their sums
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="a"),
             helper.make_node("Add", ["m1", "b"], ["y1"], name="a_bias"),
             helper.make_node("MatMul", ["x", "w2"], ["m2"], name="b"),
             helper.make_node("Add", ["m2", "b"], ["y2"], name="b_bias")]
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes, "shared_bias", [vi("x", TensorProto.FLOAT, ["n", D])],
        [vi("y1", TensorProto.FLOAT, ["n", D]), vi("y2", TensorProto.FLOAT, ["n", D])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
         numpy_helper.from_array(np.full(D, 0.1, np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    calib = [{"x": (rng.standard_normal((64, D)) + 0.5).astype(np.float32)} for _ in range(4)]
    base = "quant_int8:latency_aware=false"
    plain = quantized(model, calib, base).model
    res = quantized(model, calib, base + ",bias_correction=true")
    assert res.reports[0].figures["bias_corrected"] == 2
    biases = [n.input[6] for n in res.model.graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert len(biases) == 2 and biases[0] != biases[1]
    x = np.concatenate([b["x"] for b in calib])
    ref = ort.run(model, {"x": x})
    for y in ("y1", "y2"):
        shift = [np.abs((ort.run(m, {"x": x})[y] - ref[y]).mean(0)).mean()
                 for m in (plain, res.model)]
        assert shift[1] < 0.01 * shift[0], (y, shift)   # exact on the data it saw


def test_quant_auto_keeps_bias_correction_only_when_both_halves_gain(case):
    """quant_auto judges bias correction on a few held-out batches: it is kept when the corrected
    model scores better on each half of them, not when one half carries the whole gain. The
    scorer is onnxruntime's min cosine on real batches of the seeded data."""
    from onnxpress.passes.quant.auto import Scorer
    from onnxpress.passes.quant.smooth import choose_bias_correction

    model, calib, held_out, _ = case
    ctx = PassContext(calib=calib, progress=False)
    q = quantized(model, calib, "quant_int8:latency_aware=false").model
    fresh = [{"x": held_out["x"][4 * i:4 * i + 4]} for i in range(4)]
    for batches, kept in (([calib[0], calib[1]] + fresh[:2], True), (fresh, False)):
        scorer = Scorer(model, batches, "cosine", None)
        assert scorer.halves() == [[0, 1], [2, 3]]
        out, figures, d = choose_bias_correction(model, q, ctx, scorer=scorer, calib_batches=None)
        trial = figures["bias_correction_trial"]
        assert trial["corrected"] < trial["plain"]           # better overall, both times
        (a0, b0), (a1, b1) = trial["halves"]
        if kept:
            assert b0 < a0 and b1 < a1 and figures["bias_correction"] == "on"
            assert d is not None and out is not q
        else:       # the worse half decides
            assert (b0 < a0) != (b1 < a1) and d is None and out is q
            assert "one half" in figures["bias_correction"]
    # a single evaluation batch cannot be split: the overall score decides alone
    assert Scorer(model, fresh[:1], "cosine", None).halves() == []
