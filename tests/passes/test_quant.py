"""Quantization passes on real models: digits CNN, MiniLM, resnet18; plus small built graphs for
weights in Constant nodes and If branches, and bad calibration data."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxpress import passes, zoo
from onnxpress.backends import ort
from onnxpress.errors import CalibrationError, PassOptionError
from onnxpress.passes.context import PassContext


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _ort_optimized_ops(model: onnx.ModelProto, tmp_path) -> set[str]:
    path = tmp_path / "optimized.onnx"
    ort.session(model, optimized_model_path=path)
    return {n.op_type for n in onnx.load(path).graph.node}


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def digits_calib():
    return zoo.digits_calib(256, 32)


# -- digits CNN ----------------------------------------------------------------------------------
def test_digits_quant_int8_accuracy_size_and_integer_kernels(digits_cnn, digits, digits_calib,
                                                              tmp_path):
    Xte, yte = digits.test
    res = passes.run(digits_cnn, "quant_int8", calib=digits_calib)
    q = res.model
    onnx.checker.check_model(q, full_check=True)
    base, acc = zoo.accuracy(digits_cnn, Xte, yte), zoo.accuracy(q, Xte, yte)
    assert base - acc <= 0.003, (base, acc)
    assert q.ByteSize() <= 0.3 * digits_cnn.ByteSize()
    figures = res.reports[0].figures
    assert figures["int8_compute_nodes"] == 4 and figures["weights_quantized"] == 4
    assert figures["min_cosine"] > 0.98    # worst sample's logits; the digits net retrains per machine
    # onnxruntime turns the QDQ graph into integer kernels, no float Conv/Gemm left
    ops = _ort_optimized_ops(q, tmp_path)
    assert "QLinearConv" in ops and "QGemm" in ops
    assert not ops & {"Conv", "Gemm", "FusedConv", "FusedGemm"}
    assert list(q.metadata_props) == list(digits_cnn.metadata_props)


@pytest.mark.parametrize("method", ["minmax", "entropy", "mse"])
def test_digits_quant_int8_methods_and_int8_activations(digits_cnn, digits, digits_calib, method):
    Xte, yte = digits.test
    q = passes.apply(digits_cnn, f"quant_int8:method={method},activation_type=int8",
                     calib=digits_calib)
    assert zoo.accuracy(digits_cnn, Xte, yte) - zoo.accuracy(q, Xte, yte) <= 0.01


def test_exclude_nodes_and_op_types(digits_cnn, digits_calib):
    conv = next(n.name for n in digits_cnn.graph.node if n.op_type == "Conv")
    q = passes.apply(digits_cnn, {"name": "quant_int8", "exclude_nodes": [conv],
                                  "exclude_op_types": ["Gemm"]}, calib=digits_calib)
    kept = [n for n in q.graph.node if n.name == conv]
    assert kept and kept[0].input[1] in {t.name for t in q.graph.initializer}
    w = next(t for t in q.graph.initializer if t.name == kept[0].input[1])
    assert w.data_type == TensorProto.FLOAT
    inits = {t.name: t for t in q.graph.initializer}
    gemm_w = [inits[n.input[1]] for n in q.graph.node if n.op_type == "Gemm"]
    assert gemm_w and all(t.data_type == TensorProto.FLOAT for t in gemm_w)


def test_opset_raised_for_per_channel():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["y"], name="relu")],
        "old", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])],
        [numpy_helper.from_array(w, "w")])
    old = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    old.ir_version = 7
    calib = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    res = passes.run(old, "quant_int8", calib=calib)
    assert res.reports[0].figures["opset_raised"] is True
    assert next(o.version for o in res.model.opset_import if o.domain == "") >= 13
    assert any(n.op_type == "DequantizeLinear" and n.attribute for n in res.model.graph.node)
    ref, got = ort.run(old, calib[0])["y"], ort.run(res.model, calib[0])["y"]
    assert _cos(ref, got).min() > 0.99


def test_quant_auto_digits_reports_sensitivity_and_calibrates_once(digits_cnn, digits_calib,
                                                                   monkeypatch):
    from onnxpress.passes.quant import calibrate as cal

    calls = []
    real = cal.calibrate
    monkeypatch.setattr(cal, "calibrate", lambda *a, **k: calls.append(1) or real(*a, **k))
    res = passes.run(digits_cnn, "quant_auto:budget=0.999", calib=digits_calib)
    f = res.reports[0].figures
    assert len(calls) == 1                      # one calibration served every trial
    assert f["min_cosine"] >= 0.999
    assert len(f["sensitivity"]) == 4 and all("int8" in r for r in f["sensitivity"])
    assert f["layers_int8"] >= 1
    assert res.model.ByteSize() < digits_cnn.ByteSize()


def test_quant_auto_figures_describe_the_float_model_it_returns(digits_cnn, digits_calib,
                                                                 monkeypatch):
    """Where the int8 mix runs slower than fp32, quant_auto returns fp32 layers: its speed-up
    and cosine must be that model's, not the mix's (mobilenetv3 on an AVX2 host said
    'speedup 0.842, min_cosine 0.9995' beside 54 fp32 layers)."""
    from onnxpress.passes.quant import latency

    monkeypatch.setattr(latency, "relative_costs",
                        lambda models, feeds, *a, **k: (np.array([1.0] + [1.25] * (len(models) - 1)),
                                                        (2.0, 2.0)))
    res = passes.run(digits_cnn, "quant_auto", calib=digits_calib)
    f = res.reports[0].figures
    assert "int8 slower than fp32" in f["latency_decision"]
    assert f["layers_int8"] == 0 and f["speedup_of_the_int8_mix"] == 0.8
    assert f["speedup"] == 1.0 and f["min_cosine"] == 1.0


def test_quant_auto_user_callback(digits_cnn, digits, digits_calib):
    Xte, yte = digits.test
    score = lambda m: zoo.accuracy(m, Xte[:200], yte[:200])  # noqa: E731
    res = passes.run(digits_cnn, [{"name": "quant_auto", "callback": score, "budget": 0.005,
                                   "objective": "size"}], calib=digits_calib)
    f = res.reports[0].figures
    assert f["metric"] == "callback" and f["degradation"] <= 0.005
    assert score(res.model) >= score(digits_cnn) - 0.005
    # the budget was met by compressing, not by leaving the model as it was
    assert f["layers_fp32"] < f["layers"] and res.model.ByteSize() < 0.5 * digits_cnn.ByteSize()


# -- weights in Constant nodes and If branches ---------------------------------------------------
def _model_with_constant_and_if() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w_const = rng.standard_normal((16, 32)).astype(np.float32)
    w_then = rng.standard_normal((32, 8)).astype(np.float32)
    w_else = rng.standard_normal((32, 8)).astype(np.float32)

    def branch(name, w):
        return helper.make_graph(
            [helper.make_node("Constant", [], [f"{name}_w"],
                              value=numpy_helper.from_array(w, f"{name}_w")),
             helper.make_node("MatMul", ["h", f"{name}_w"], [f"{name}_y"], name=f"{name}_MatMul")],
            name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)])

    nodes = [
        helper.make_node("Constant", [], ["w_const"],
                         value=numpy_helper.from_array(w_const, "w_const")),
        helper.make_node("MatMul", ["x", "w_const"], ["h0"], name="main_MatMul"),
        helper.make_node("Relu", ["h0"], ["h"], name="relu"),
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="sum"),
        helper.make_node("Greater", ["s", "zero"], ["cond"], name="gt"),
        helper.make_node("If", ["cond"], ["y"], name="if",
                         then_branch=branch("then", w_then), else_branch=branch("else", w_else)),
    ]
    graph = helper.make_graph(
        nodes, "const_if", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
        [numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("spec", ["quant_int8", "quant_dynamic:min_weight=0",
                                  "quant_int4:min_weight=0,block_size=16"])
def test_weights_in_constant_nodes_and_if_branches_are_quantized(spec):
    model = _model_with_constant_and_if()
    rng = np.random.default_rng(1)
    calib = [{"x": rng.standard_normal((4, 16)).astype(np.float32)} for _ in range(4)]
    q = passes.apply(model, spec, calib=calib)
    onnx.checker.check_model(q)
    float_weights = []
    low_bit = 0
    from onnxpress.stats import iter_graphs

    for g in iter_graphs(q.graph):
        for t in g.initializer:
            if t.data_type == TensorProto.FLOAT and len(t.dims) == 2:
                float_weights.append(t.name)
            if t.data_type in (TensorProto.INT8, TensorProto.UINT8, TensorProto.INT4):
                low_bit += int(np.prod(t.dims)) >= 16 * 8
        for n in g.node:
            if n.op_type == "Constant":
                assert n.attribute[0].t.data_type != TensorProto.FLOAT or \
                    len(n.attribute[0].t.dims) < 2, "a float weight is left in a Constant node"
    assert not float_weights, float_weights
    assert low_bit >= 3                              # main weight and both branch weights
    for x in (calib[0]["x"], -np.abs(calib[1]["x"])):  # both branches taken
        ref = ort.run(model, {"x": x})["y"]
        got = ort.run(q, {"x": x})["y"]
        assert _cos(ref, got).min() > 0.98


# -- bad calibration data ------------------------------------------------------------------------
def test_bad_calibration_data_gets_clear_errors(digits_cnn):
    X = zoo.digits_data().train[0][:8]
    with pytest.raises(CalibrationError, match="batch 0.*unknown name.*images.*input"):
        passes.apply(digits_cnn, "quant_int8", calib=[{"images": X}])
    with pytest.raises(CalibrationError, match="batch 1.*'input'.*float64.*float32"):
        passes.apply(digits_cnn, "quant_int8", calib=[{"input": X}, {"input": X.astype(np.float64)}])
    with pytest.raises(CalibrationError, match="empty"):
        passes.apply(digits_cnn, "quant_int8", calib=[])
    with pytest.raises(CalibrationError, match="needs calibration data"):
        passes.apply(digits_cnn, "quant_int8")
    with pytest.raises(CalibrationError, match="axis 2"):
        passes.apply(digits_cnn, "quant_auto", calib=[{"input": np.zeros((2, 1, 9, 8), np.float32)}])


# -- calibration statistics ----------------------------------------------------------------------
def test_streaming_histogram_ranges_match_numpy():
    from onnxpress.passes.quant.calibrate import TensorStats

    rng = np.random.default_rng(0)
    st = TensorStats("t")
    chunks = [rng.standard_normal(20000).astype(np.float32) * s for s in (0.1, 1.0, 3.0, 0.5)]
    for c in chunks:                                 # the range grows: bins merge, nothing re-read
        st.update(c)
    data = np.concatenate(chunks)
    assert st.range("minmax") == (float(data.min()), float(data.max()))
    lo, hi = st.range("percentile", percentile=99.9)
    t = np.percentile(np.abs(data), 99.9)
    assert abs(hi - t) / t < 0.02 and abs(-lo - t) / t < 0.02
    for method in ("entropy", "mse"):
        lo, hi = st.range(method)
        assert 0 < hi <= data.max() and data.min() <= lo < 0
    assert st.hist.sum() == data.size and st.hist.size == 2048


# -- fp16 / bf16 ---------------------------------------------------------------------------------
def test_fp16_resnet18_valid_half_size_within_1e2(timm_path):
    model = onnx.load(timm_path("resnet18"))
    feeds = {"input": zoo.photo_batch(224)[:1]}
    res = passes.run(model, "fp16")
    h = res.model
    onnx.checker.check_model(h, full_check=True)
    assert h.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert h.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert h.ByteSize() <= 0.51 * model.ByteSize()
    ref, got = ort.run(model, feeds)["output"], ort.run(h, feeds)["output"]
    assert np.abs(ref - got).max() <= 1e-2 * np.abs(ref).max()


def test_fp16_casts_agree_with_consumers_and_io_option(digits_cnn, digits):
    h = passes.apply(digits_cnn, "fp16:keep_io_types=false")
    onnx.checker.check_model(h, full_check=True)
    assert h.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    inferred = onnx.shape_inference.infer_shapes(h, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    for t in inferred.graph.initializer:
        types[t.name] = t.data_type
    for n in inferred.graph.node:                   # every float input of a node shares one type
        floats = {types[i] for i in n.input if types.get(i) in (TensorProto.FLOAT, TensorProto.FLOAT16)}
        assert len(floats) <= 1, (n.op_type, n.name, floats)
    Xte, yte = digits.test
    out = ort.run(h, {"input": Xte.astype(np.float16)})["logits"]
    assert (out.argmax(1) == yte).mean() >= zoo.accuracy(digits_cnn, Xte, yte) - 0.003
    b = passes.apply(digits_cnn, "bf16")
    assert b.ByteSize() < 0.55 * digits_cnn.ByteSize()
    assert zoo.accuracy(b, Xte, yte) >= zoo.accuracy(digits_cnn, Xte, yte) - 0.003


# -- MiniLM --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm_sentences():
    task = zoo.debian_task()
    tok = zoo.minilm_tokenizer()
    calib = [zoo.minilm_feeds(task.train_texts[i:i + 16], tokenizer=tok) for i in range(0, 64, 16)]
    test = zoo.minilm_feeds(task.test_texts[::25], tokenizer=tok)       # 40 sentences
    return calib, test


def test_minilm_quant_int8_and_int4(minilm_path, minilm_sentences, tmp_path):
    fp32 = onnx.load(minilm_path)
    calib, test = minilm_sentences
    ref = ort.run(fp32, test)["embedding"]
    q8 = passes.run(fp32, "quant_int8:latency_aware=false", calib=calib).model
    assert _cos(ref, ort.run(q8, test)["embedding"]).min() >= 0.95
    assert q8.ByteSize() <= 0.3 * fp32.ByteSize()
    assert "MatMulIntegerToFloat" in _ort_optimized_ops(q8, tmp_path)
    q4 = passes.apply(fp32, "quant_int4")
    assert q4.ByteSize() <= 0.3 * fp32.ByteSize()
    assert sum(op == "MatMulNBits" for op in _ops(q4)) == 36
    assert _cos(ref, ort.run(q4, test)["embedding"]).min() >= 0.9
    q4d = passes.apply(fp32, "quant_int4:format=qdq")
    onnx.checker.check_model(q4d)
    assert _cos(ref, ort.run(q4d, test)["embedding"]).min() >= 0.9


def test_minilm_fp16_and_dynamic(minilm_path, minilm_sentences, tmp_path):
    fp32 = onnx.load(minilm_path)
    _, test = minilm_sentences
    ref = ort.run(fp32, test)["embedding"]
    h = passes.apply(fp32, "fp16")
    got = ort.run(h, test)["embedding"]
    assert np.abs(ref - got).max() <= 1e-2 * np.abs(ref).max()
    assert h.ByteSize() <= 0.51 * fp32.ByteSize()
    d = passes.apply(fp32, "quant_dynamic")
    assert _cos(ref, ort.run(d, test)["embedding"]).min() >= 0.95
    assert "DynamicQuantizeLinear" in _ops(d)
    assert "DynamicQuantizeMatMul" in _ort_optimized_ops(d, tmp_path)   # one fused kernel


def test_calibration_analysis_is_shared(digits_cnn, digits_calib):
    import onnxpress.passes.quant  # noqa: F401  (registers the "calib" analysis)

    ctx = PassContext(calib=digits_calib, progress=False)
    a = ctx.analysis("calib", digits_cnn)
    assert ctx.analysis("calib", digits_cnn) is a
    assert a.batches == len(digits_calib) and a.samples == 256
    assert "input" in a and all(st.hist.size == 2048 for st in a.tensors.values())
    lo, hi = a.channel_range("input")                   # per-channel statistics too
    X = np.concatenate([b["input"] for b in digits_calib])
    assert lo.shape == (1,) and np.isclose(hi[0], X.max())
    conv = next(n.output[0] for n in digits_cnn.graph.node if n.op_type == "Conv")
    assert a.channel_range(conv)[1].shape == (16,)


def test_sensitivity_command(digits_cnn_path, tmp_path, capsys):
    from onnxpress.cli import main

    X = zoo.digits_data().train[0][:32]
    np.savez(tmp_path / "calib.npz", input=X)
    assert main(["sensitivity", str(digits_cnn_path), "--calib", str(tmp_path / "calib.npz"),
                 "--json"]) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    assert len(out["layers"]) == 4 and {"int8", "int4"} <= set(out["layers"][0])
    # a plain torch export fixes its batch at 1: the .npz's 32 samples are fed one at a time
    np.savez(tmp_path / "x.npz", x=X)
    assert main(["sensitivity", str(zoo.plain_export("digits_cnn")), "--calib",
                 str(tmp_path / "x.npz"), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["layers"]) == 4


def test_tvm_frontend_accepts_qdq_dynamic_and_fp16(digits_cnn, digits_calib):
    relax_onnx = pytest.importorskip("tvm.relax.frontend.onnx")
    for spec in ("quant_int8:latency_aware=false", "quant_dynamic:min_weight=0", "fp16"):
        q = passes.apply(digits_cnn, spec, calib=digits_calib, target="tvm")
        mod = relax_onnx.from_onnx(q, shape_dict={"input": [4, 1, 8, 8]})
        assert "main" in [gv.name_hint for gv in mod.get_global_vars()]


def test_quant_int8_after_fuse(digits_cnn, digits, digits_calib):
    """fuse's com.microsoft FusedConv/FusedGemm (Relu) join the integer chain after fusion."""
    res = passes.run(digits_cnn, "fuse,quant_int8", calib=digits_calib)
    f = res.reports[-1].figures
    assert f["int8_compute_nodes"] == 4 and f["fused_ops_split"] >= 2
    Xte, yte = digits.test
    assert zoo.accuracy(digits_cnn, Xte, yte) - zoo.accuracy(res.model, Xte, yte) <= 0.003
    assert res.model.ByteSize() <= 0.3 * digits_cnn.ByteSize()


def test_relu_stays_when_its_producer_stays_float():
    """A Relu is folded into its producer's output Q only when that producer really gets an
    integer kernel: after an Add of float tensors or a Gemm with alpha=2 it must stay."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph([
        helper.make_node("Add", ["x", "x2"], ["a"], name="add"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w"], ["c"], name="conv"),
        helper.make_node("Flatten", ["c"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "wg"], ["g"], name="gemm", alpha=2.0, transB=1),
        helper.make_node("Relu", ["g"], ["y"], name="relu2"),
    ], "relus", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3, 6, 6])
                 for n in ("x", "x2")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
        [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
         numpy_helper.from_array(rng.standard_normal((5, 64)).astype(np.float32), "wg")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    calib = [{n: rng.standard_normal((1, 3, 6, 6)).astype(np.float32) for n in ("x", "x2")}
             for _ in range(4)]
    q = passes.apply(model, "quant_int8", calib=calib)
    assert _ops(q).count("Relu") == 2
    ref, got = ort.run(model, calib[0])["y"], ort.run(q, calib[0])["y"]
    assert (got >= 0).all() and _cos(ref, got).min() > 0.99


def test_quant_auto_accuracy_target_on_held_out_batches(digits_cnn, digits, digits_calib):
    """quant_auto:target=0.99,metric=top1 picks the smallest mix whose top-1 agreement with fp32
    on calibration batches its ranges never saw is at least 0.99, and shows what it explored."""
    res = passes.run(digits_cnn, "quant_auto:target=0.99,metric=top1,objective=size",
                     calib=digits_calib)
    f = res.reports[0].figures
    assert f["target_met"] is True and f["top1_agreement"] >= 0.99
    assert f["evaluated_on"].startswith("4 held-out")
    assert f["explored"] and all(p["bytes"] > 0 for p in f["explored"])
    assert res.model.ByteSize() < 0.35 * digits_cnn.ByteSize()
    Xte, yte = digits.test
    assert zoo.accuracy(res.model, Xte, yte) >= zoo.accuracy(digits_cnn, Xte, yte) - 0.01
    with pytest.raises(PassOptionError, match="target or budget"):
        passes.run(digits_cnn, "quant_auto:budget=0.9,target=0.99", calib=digits_calib)


def test_weight_range_follows_the_cpu_that_runs_the_model(digits_cnn, digits_calib):
    """onnxruntime's u8 x s8 kernels saturate on full-range weights on x86 without VNNI: the
    auto weight range writes 7-bit weights exactly there (onnxruntime's reduce_range)."""
    from onnxpress.passes.quant.qdq import _host_is_x86_without_vnni

    auto = passes.run(digits_cnn, "quant_int8:latency_aware=false", calib=digits_calib)
    assert auto.reports[0].figures["weight_bits"] == (7 if _host_is_x86_without_vnni() else 8)
    for mode, bound in (("7bit", 63), ("full", 127)):
        q = passes.apply(digits_cnn, f"quant_int8:latency_aware=false,weight_range={mode}",
                         calib=digits_calib)
        weights = [numpy_helper.to_array(t) for t in q.graph.initializer
                   if t.data_type == TensorProto.INT8 and len(t.dims) >= 2]
        assert weights and max(int(np.abs(w).max()) for w in weights) == bound, mode


@pytest.mark.parametrize("step", ["quant_dynamic", "quant_int4"])
def test_matmul_only_quantizers_say_the_convolutions_stayed_float(step):
    """quant_dynamic and quant_int4 quantize MatMul/Gemm weights: on a CNN's plain export that is
    the classifier alone (resnet18: 1 of 21 layers, 44.6 -> 43 MiB), so they say so."""
    with pytest.warns(UserWarning, match=r"20 convolution\(s\) stayed float .* 1 quantized"):
        result = passes.run(str(zoo.plain_export("resnet18")), step)
    assert result.reports[-1].figures["conv_layers_float"] == 20
