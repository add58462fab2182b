"""Recurrent ops and control flow through cleanup, fuse, quant_int8 and reuse: a char-level LSTM
trained on the Debian descriptions (weights int8 per gate row, state float), a bidirectional
two-layer LSTM and a GRU, an If whose branches hold convolutions and a Loop (activations inside
the bodies calibrated and quantized)."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxpress import passes, zoo
from onnxpress.backends import ort
from onnxpress.stats import iter_graphs

HIDDEN = 64
PIPELINE = ["cleanup", "fuse", "quant_int8:latency_aware=false", "reuse"]


def _run(model, spec, calib):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = passes.run(model, spec, calib=calib, verify=True, progress=False)
    return res, [str(w.message) for w in caught]


def _figures(res, name="quant_int8") -> dict:
    return next(r.figures for r in res.reports if r.name == name)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _session(model, level):
    so = onnxruntime.SessionOptions()
    so.graph_optimization_level = level
    return onnxruntime.InferenceSession(model.SerializeToString(), so,
                                        providers=["CPUExecutionProvider"])


# -- the trained char LSTM -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def char_lstm():
    """A 64-unit LSTM trained for 60 steps (seconds; cached on disk by the zoo)."""
    return onnx.load(zoo.char_rnn("LSTM", hidden=HIDDEN, steps=60))


def test_lstm_weights_int8_per_gate_row_state_float(char_lstm):
    train, test = zoo.debian_chars().train[0], zoo.debian_chars().test[0]
    calib = [zoo.char_feeds(train[i * 2048:], batch=8, seq=256, hidden=HIDDEN) for i in range(3)]
    res, caught = _run(char_lstm, PIPELINE, calib)
    q = res.model
    f = _figures(res)
    # the LSTM is weight-only int8 and says so; the head gets its integer kernel
    assert f["layers"] == 2 and f["int8_compute_nodes"] == 1 and f["layers_weight_only"] == 1
    assert f["float_layers"]["/rnn/LSTM"].startswith("recurrent: int8 weights per gate row")
    assert any("recurrent" in w for w in caught)
    lstm = next(n for n in q.graph.node if n.op_type == "LSTM")
    producers = {o: n for n in q.graph.node for o in n.output}
    inits = {t.name: t for t in q.graph.initializer}
    for k, rows_by_cols in ((1, (4 * HIDDEN, 32)), (2, (4 * HIDDEN, HIDDEN))):
        dq = producers[lstm.input[k]]
        assert dq.op_type == "DequantizeLinear"
        assert inits[dq.input[0]].data_type == TensorProto.INT8
        assert list(inits[dq.input[0]].dims) == [1, *rows_by_cols]
        assert list(inits[dq.input[1]].dims) == [rows_by_cols[0]]          # one scale per row
    assert inits[lstm.input[3]].data_type == TensorProto.FLOAT               # bias stays float
    assert q.ByteSize() <= 0.4 * char_lstm.ByteSize()
    # per-step decisions, state carried from one call to the next
    feeds = zoo.char_feeds(test, batch=8, seq=256, hidden=HIDDEN)
    agree, level = [], onnxruntime.GraphOptimizationLevel
    ref_s, q_s = _session(char_lstm, level.ORT_ENABLE_ALL), _session(q, level.ORT_ENABLE_ALL)
    ref_feeds, q_feeds = dict(feeds), dict(feeds)
    for call in range(2):
        chunk = test[call * 2048:(call + 1) * 2048].reshape(8, 256)
        ref_feeds["chars"] = q_feeds["chars"] = chunk
        ref, got = ref_s.run(None, ref_feeds), q_s.run(None, q_feeds)
        agree.append((ref[0].argmax(-1) == got[0].argmax(-1)).mean())
        assert _cos(ref[2], got[2]) > 0.99                                   # the cell state
        ref_feeds.update(h0=ref[1], c0=ref[2])
        q_feeds.update(h0=got[1], c0=got[2])
    assert min(agree) >= 0.98, agree
    # onnxruntime's graph optimizer runs the weight-only LSTM as it is
    plain = _session(q, level.ORT_DISABLE_ALL).run(None, feeds)
    np.testing.assert_allclose(plain[0], _session(q, level.ORT_ENABLE_ALL).run(None, feeds)[0],
                               rtol=1e-4, atol=1e-4)


def test_lstm_weights_stay_int8_when_the_latency_decision_keeps_float(char_lstm):
    from onnxpress.passes.quant.recurrent import keep_recurrent_int8

    out, why = keep_recurrent_int8(char_lstm, {"exclude_nodes": None})
    assert out is not char_lstm and sum(n.op_type == "DequantizeLinear" for n in out.graph.node) == 2
    assert why == {"/rnn/LSTM": why["/rnn/LSTM"]} and why["/rnn/LSTM"].startswith("recurrent")
    same, why = keep_recurrent_int8(char_lstm, {"exclude_nodes": ["/rnn/LSTM"]})
    assert same is char_lstm and why["/rnn/LSTM"] == "excluded by the pass options"


def test_lstm_inside_if_branches_state_carried(char_lstm):
    """The LSTM in both branches of an If (zoo.char_rnn_with_reset: 'reset' starts from a zero
    state, else the state fed in goes on), the weights in the main graph."""
    model = onnx.load(zoo.char_rnn_with_reset("LSTM", hidden=HIDDEN, steps=60))
    train, test = zoo.debian_chars().train[0], zoo.debian_chars().test[0]
    calib = [dict(zoo.char_feeds(train[i * 2048:], batch=8, seq=256, hidden=HIDDEN),
                  reset=np.array(i % 2 == 0)) for i in range(4)]
    res, caught = _run(model, PIPELINE, calib)
    f = _figures(res)
    assert f["bodies_calibrated"] == 2 and f["body_layers_int8"] == 2        # both heads
    assert set(f["body_float_layers"]) == {"if_reset/then_branch//rnn/LSTM_reset",
                                           "if_reset/else_branch//rnn/LSTM_carry"}
    assert all(v.startswith("recurrent") for v in f["body_float_layers"].values())
    # cleanup keeps the shared weights in the main graph, quant_int8 their int8 forms: one copy
    assert passes.run(model, ["cleanup"]).model.ByteSize() <= model.ByteSize()
    int8 = [t.raw_data for g in iter_graphs(res.model.graph) for t in g.initializer
            if t.data_type == TensorProto.INT8 and len(t.raw_data) >= 1024]
    # W and R once; the head in each branch (onnxruntime's rewrite of DQ -> MatMul into
    # MatMulNBits fails the session when the int8 weight is an outer-scope one)
    assert len(int8) == 4 and len(set(int8)) == 3
    assert res.model.ByteSize() < 0.5 * model.ByteSize()
    # the carry branch never calibrated: weight-only there, and the model still runs
    only_reset = [dict(b, reset=np.array(True)) for b in calib[:2]]
    part, _ = _run(model, ["quant_int8:latency_aware=false"], only_reset)
    assert set(_figures(part)["body_float_layers"]) >= {"if_reset/else_branch//head/MatMul_carry"}
    state = np.random.default_rng(0).standard_normal((1, 8, HIDDEN)).astype(np.float32) * 0.1
    for reset in (True, False):
        feeds = dict(zoo.char_feeds(test, batch=8, seq=256, hidden=HIDDEN), h0=state, c0=state,
                     reset=np.array(reset))
        ref = ort.run(model, feeds)
        for q in (res.model, part.model):
            got = ort.run(q, feeds)
            assert (ref["logits"].argmax(-1) == got["logits"].argmax(-1)).mean() >= 0.98
            assert _cos(ref["cn"], got["cn"]) > 0.99


# -- bidirectional, two layers, GRU: random weights ---------------------------------------------
def _stacked_recurrent_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    h = 16

    def w(*s):
        return numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32))

    inits = []
    for name, shape in (("W1", (2, 4 * h, 8)), ("R1", (2, 4 * h, h)), ("B1", (2, 8 * h)),
                        ("W2", (1, 3 * h, 2 * h)), ("R2", (1, 3 * h, h)), ("B2", (1, 6 * h))):
        t = w(*shape)
        t.name = name
        inits.append(t)
    inits.append(numpy_helper.from_array(np.array([0, 0, -1], np.int64), "merge"))
    nodes = [
        helper.make_node("LSTM", ["x", "W1", "R1", "B1"], ["y1"], hidden_size=h,
                         direction="bidirectional", name="bilstm"),
        helper.make_node("Transpose", ["y1"], ["y1t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["y1t", "merge"], ["y1m"]),
        helper.make_node("GRU", ["y1m", "W2", "R2", "B2"], ["y2", "h2"], hidden_size=h,
                         name="gru"),
    ]
    graph = helper.make_graph(
        nodes, "stacked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [12, 2, 8])],
        [helper.make_tensor_value_info("y2", TensorProto.FLOAT, [12, 1, 2, h]),
         helper.make_tensor_value_info("h2", TensorProto.FLOAT, [1, 2, h])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_bidirectional_lstm_and_gru_weights_per_direction_and_row():
    model = _stacked_recurrent_model()
    rng = np.random.default_rng(1)
    calib = [{"x": rng.standard_normal((12, 2, 8)).astype(np.float32)} for _ in range(2)]
    res, _ = _run(model, PIPELINE, calib)
    f = _figures(res)
    assert f["layers"] == 2 and f["layers_weight_only"] == 2
    q = res.model
    int8 = [t for t in q.graph.initializer if t.data_type == TensorProto.INT8 and len(t.dims) >= 2]
    # both directions' rows stacked: [2 * 4h, in] with 2 * 4h scales; the GRU's [1, 3h, in]
    assert sorted(tuple(t.dims) for t in int8) == [(1, 48, 16), (1, 48, 32), (128, 8), (128, 16)]
    assert q.ByteSize() < 0.5 * model.ByteSize()          # (the small biases stay float)
    x = rng.standard_normal((12, 2, 8)).astype(np.float32)
    ref, got = ort.run(model, {"x": x}), ort.run(q, {"x": x})
    assert _cos(ref["y2"], got["y2"]) > 0.999 and _cos(ref["h2"], got["h2"]) > 0.999


# -- control flow: an If whose branches hold convolutions, a Loop --------------------------------
def _conv_if_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)

    def w(name, *s):
        return numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), name)

    def branch(name, act):
        return helper.make_graph(
            [helper.make_node("Conv", ["h", f"{name}_w", f"{name}_b"], [f"{name}_c"],
                              pads=[1, 1, 1, 1], name=f"{name}_conv"),
             helper.make_node(act, [f"{name}_c"], [f"{name}_a"], name=f"{name}_act"),
             helper.make_node("Conv", [f"{name}_a", f"{name}_w2"], [f"{name}_y"],
                              name=f"{name}_conv2")],
            name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)],
            [w(f"{name}_w", 8, 8, 3, 3), w(f"{name}_b", 8), w(f"{name}_w2", 4, 8, 1, 1)])

    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1], name="conv0"),
             helper.make_node("Relu", ["c0"], ["h"], name="relu0"),
             helper.make_node("ReduceMean", ["x"], ["m"], keepdims=0, name="mean"),
             helper.make_node("Greater", ["m", "zero"], ["cond"], name="gt"),
             helper.make_node("If", ["cond"], ["y"], name="if",
                              then_branch=branch("then", "Relu"),
                              else_branch=branch("else", "Sigmoid"))]
    graph = helper.make_graph(
        nodes, "conv_if", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])],
        [w("w0", 8, 3, 3, 3), w("b0", 8), numpy_helper.from_array(np.array(0, np.float32), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _loop_model() -> onnx.ModelProto:
    rng = np.random.default_rng(1)

    def w(name, *s):
        return numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), name)

    body = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "lw"], ["mm"], name="loop_matmul"),
         helper.make_node("Add", ["mm", "lb"], ["pre"], name="loop_add"),
         helper.make_node("Tanh", ["pre"], ["h_out"], name="loop_tanh"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="loop_cond"),
         helper.make_node("Identity", ["h_out"], ["scan"], name="loop_scan")],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [2, 32])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [2, 32]),
         helper.make_tensor_value_info("scan", TensorProto.FLOAT, [2, 32])],
        [w("lw", 32, 32), w("lb", 32)])
    nodes = [helper.make_node("MatMul", ["x", "w_in"], ["h0"], name="in_matmul"),
             helper.make_node("Loop", ["trip", "", "h0"], ["h_final", "hs"], body=body, name="loop"),
             helper.make_node("MatMul", ["h_final", "w_out"], ["y"], name="out_matmul")]
    graph = helper.make_graph(
        nodes, "loop", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8]),
         helper.make_tensor_value_info("hs", TensorProto.FLOAT, [None, 2, 32])],
        [w("w_in", 16, 32), w("w_out", 32, 8),
         numpy_helper.from_array(np.array(4, np.int64), "trip")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _branch_ops(model: onnx.ModelProto, tmp_path) -> dict[str, list[str]]:
    """Op types inside each body after onnxruntime's own optimizations."""
    path = tmp_path / "optimized.onnx"
    ort.session(model, optimized_model_path=path)
    out = {}
    for n in onnx.load(path).graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                out[a.name] = [m.op_type for m in a.g.node]
    return out


def test_if_branches_with_convolutions_get_integer_kernels(tmp_path):
    model = _conv_if_model()
    rng = np.random.default_rng(2)
    calib = [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32) + (0.5 if i % 2 else -0.5)}
             for i in range(6)]
    res, caught = _run(model, PIPELINE, calib)
    f = _figures(res)
    assert _figures(res, "fuse")["fused"] == {"conv_relu_ort": 2, "conv_sigmoid_ort": 1}
    assert f["bodies_calibrated"] == 2 and f["body_layers_int8"] == 4 and not f["body_float_layers"]
    assert set(f["body_layers"]) == {"if/then_branch/node_FusedConv_0", "if/then_branch/then_conv2",
                                     "if/else_branch/node_FusedConv_0", "if/else_branch/else_conv2"}
    assert not any("If/Loop bodies" in w for w in caught)
    reuse = _figures(res, "reuse")
    assert reuse["tensors_unplanned"] == 0 and reuse["arena_bytes"] < reuse["naive_bytes"]
    ops = _branch_ops(res.model, tmp_path)
    assert ops["then_branch"].count("QLinearConv") == 2 and "Conv" not in ops["then_branch"]
    assert ops["else_branch"].count("QLinearConv") == 2 and "QLinearSigmoid" in ops["else_branch"]
    for x in (calib[0]["x"], calib[1]["x"]):                       # both branches
        ref, got = ort.run(model, {"x": x})["y"], ort.run(res.model, {"x": x})["y"]
        assert _cos(ref, got) > 0.999
        assert np.abs(ref - got).max() < 0.05 * np.abs(ref).max()


def test_branch_no_batch_takes_stays_weight_only_and_says_why():
    model = _conv_if_model()
    rng = np.random.default_rng(3)
    calib = [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32) + 0.5} for _ in range(2)]
    res, caught = _run(model, ["quant_int8:latency_aware=false"], calib)
    f = _figures(res)
    assert f["bodies_calibrated"] == 1
    assert set(f["body_float_layers"]) == {"if/else_branch/else_conv", "if/else_branch/else_conv2"}
    assert all("never taken" in v for v in f["body_float_layers"].values())
    assert any("2 of 4 layers inside If/Loop bodies" in w for w in caught)
    else_branch = next(a.g for a in res.model.graph.node[-1].attribute if a.name == "else_branch")
    assert all(t.data_type != TensorProto.FLOAT or len(t.dims) < 2 for t in else_branch.initializer)
    x = -np.abs(calib[0]["x"])                                     # the else branch, uncalibrated
    assert _cos(ort.run(model, {"x": x})["y"], ort.run(res.model, {"x": x})["y"]) > 0.999


def test_loop_body_is_calibrated_iteration_by_iteration():
    model = _loop_model()
    rng = np.random.default_rng(4)
    calib = [{"x": rng.standard_normal((2, 16)).astype(np.float32)} for _ in range(6)]
    res, _ = _run(model, PIPELINE, calib)
    f = _figures(res)
    assert f["int8_compute_nodes"] == 2 and f["bodies_calibrated"] == 1
    assert f["body_layers"] == {"loop/body/node_FusedGemm_1": "int8"}
    body = next(a.g for n in res.model.graph.node if n.op_type == "Loop" for a in n.attribute)
    assert "QuantizeLinear" in [n.op_type for n in body.node]
    names = [o for g in iter_graphs(res.model.graph) for n in g.node for o in n.output]
    assert len(names) == len(set(names))                          # no name defined twice
    x = rng.standard_normal((2, 16)).astype(np.float32)
    ref, got = ort.run(model, {"x": x}), ort.run(res.model, {"x": x})
    assert _cos(ref["y"], got["y"]) > 0.99 and _cos(ref["hs"], got["hs"]) > 0.99
