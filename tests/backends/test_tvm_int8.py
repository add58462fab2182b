"""Integer lowering of quantized models through TVM (backends/tvm/int8.py, int8_kernels.py): small
QDQ and QOperator graphs of every lowered op, compiled for the host, compared with onnxruntime's
unoptimized session (the QDQ reference): 8-bit outputs equal, or one quantization step apart on
a tiny share of elements; the manifest says which nodes ran as integer kernels."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("tvm")

from onnxpress.backends import ort  # noqa: E402
from onnxpress.backends import tvm as ox_tvm  # noqa: E402
from onnxpress.backends.tvm.int8 import lower_integer, reduce_weight_range  # noqa: E402
from onnxpress.backends.tvm.int8_kernels import int8_isa  # noqa: E402
from onnxpress.backends.tvm.targets import resolve_target  # noqa: E402

MAX_FLIP_SHARE = 0.01


class QDQ:
    """A tiny builder of QDQ graphs: every tensor quantized per-tensor, weights per-channel."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.n = [], [], 0

    def name(self, base):
        self.n += 1
        return f"{base}{self.n}"

    def const(self, arr, base="c"):
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(self, op, inputs, n_out=1, **attrs):
        outs = [self.name(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name(op), **attrs))
        return outs[0] if n_out == 1 else outs

    def q(self, x, scale, zp=0, dtype=np.uint8):
        """x -> Q -> DQ; returns (the dequantized tensor, the 8-bit tensor)."""
        s, z = self.const(np.float32(scale), "s"), self.const(np.array(zp, dtype), "z")
        xq = self.node("QuantizeLinear", [x, s, z])
        return self.node("DequantizeLinear", [xq, s, z]), xq

    def weight(self, shape, qmax=127, axis=0):
        w = self.rng.integers(-qmax, qmax + 1, size=shape).astype(np.int8)
        scales = self.rng.uniform(0.002, 0.01, size=shape[axis]).astype(np.float32)
        return self.node("DequantizeLinear", [self.const(w, "w"), self.const(scales, "ws")], axis=axis), scales

    def bias(self, n, x_scale, w_scales):
        b = self.rng.integers(-2000, 2000, size=n).astype(np.int32)
        return self.node("DequantizeLinear", [self.const(b, "b"),
                                              self.const((np.float32(x_scale) * w_scales).astype(np.float32), "bs")],
                         axis=0)

    def model(self, inputs, outputs):
        g = helper.make_graph(self.nodes, "g", inputs, outputs, self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
        m.ir_version = 9
        onnx.checker.check_model(m)
        return m


def _vi(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


def _compare(model, art, feeds):
    """Reference outputs of onnxruntime's unoptimized session vs the artifact's: 8-bit outputs at
    most one step apart on at most MAX_FLIP_SHARE of elements, float outputs close."""
    ref = ort.run(model, feeds, optimization="disable")
    got = art.run(feeds)
    flips = {}
    for name, r in ref.items():
        g = got[name]
        assert g.dtype == r.dtype and g.shape == r.shape, name
        if r.dtype in (np.uint8, np.int8, np.int32):
            d = np.abs(g.astype(np.int64) - r.astype(np.int64))
            if r.dtype == np.int32:
                assert d.max() == 0, name            # integer outputs: exact
            else:
                assert d.max() <= 1, (name, int(d.max()))
                flips[name] = float((d > 0).mean())
                assert flips[name] <= MAX_FLIP_SHARE, (name, flips[name])
        else:
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * float(np.abs(r).max() + 1e-6))
    return flips


# -- a CNN: conv (dot-product kernel and float fallback), depthwise, grouped, relu/clip, max pool,
#    residual add, global average pool, flatten, gemm --------------------------------------------

def cnn_model():
    b = QDQ(0)
    x, _ = b.q("x", 0.05, 128)
    w1, ws1 = b.weight((32, 8, 3, 3), qmax=64)                # 7-bit: fits vpmaddubsw
    c1 = b.node("Conv", [x, w1, b.bias(32, 0.05, ws1)], pads=[1, 1, 1, 1])
    r1 = b.node("Relu", [c1])
    r1, _ = b.q(r1, 0.04, 0)                                  # Relu folded into the requantize
    mp = b.node("MaxPool", [r1], kernel_shape=[2, 2], strides=[2, 2])
    mp, _ = b.q(mp, 0.04, 0)                                  # same params: max on the integers
    w2, ws2 = b.weight((32, 32, 3, 3))                        # full range: float on AVX2 w/o VNNI
    c2 = b.node("Conv", [mp, w2, b.bias(32, 0.04, ws2)], pads=[1, 1, 1, 1], strides=[1, 1])
    c2, _ = b.q(c2, 0.08, 120)
    wd, wsd = b.weight((32, 1, 3, 3))
    dw = b.node("Conv", [mp, wd, b.bias(32, 0.04, wsd)], pads=[1, 1, 1, 1], group=32)
    six = (b.const(np.float32(0), "lo"), b.const(np.float32(1.5), "hi"))
    dw = b.node("Clip", [dw, *six])
    dw, _ = b.q(dw, 0.01, 0)
    wg, wsg = b.weight((32, 16, 1, 1))
    gc = b.node("Conv", [mp, wg], group=2)
    gc, _ = b.q(gc, 0.05, 130)
    a = b.node("Add", [c2, dw])
    a = b.node("Relu", [a])
    a, _ = b.q(a, 0.06, 0)
    a2 = b.node("Add", [a, gc])
    a2, a2q = b.q(a2, 0.07, 110)
    gap = b.node("GlobalAveragePool", [a2])
    gap, _ = b.q(gap, 0.02, 100)
    fl = b.node("Flatten", [gap], axis=1)
    fl, _ = b.q(fl, 0.02, 100)
    rl = b.node("Relu", [fl])
    rl, rlq = b.q(rl, 0.01, 0)                                # standalone clamp, requantized
    wf, wsf = b.weight((10, 32))
    y = b.node("Gemm", [rl, wf, b.bias(10, 0.01, wsf)], transB=1)
    model = b.model([_vi("x", TensorProto.FLOAT, [1, 8, 12, 12])],
                    [_vi(y, TensorProto.FLOAT, [1, 10]), _vi(a2q, TensorProto.UINT8, [1, 32, 6, 6]),
                     _vi(rlq, TensorProto.UINT8, [1, 32])])
    return model


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    model = cnn_model()
    art = ox_tvm.compile(model, "x86", output_dir=tmp_path_factory.mktemp("int8") / "cnn", progress=False)
    return model, art


def test_cnn_matches_onnxruntime_qdq_reference(cnn):
    model, art = cnn
    rng = np.random.default_rng(1)
    for _ in range(3):
        _compare(model, art, {"x": rng.standard_normal((1, 8, 12, 12)).astype(np.float32) * 2})


def test_cnn_manifest_says_what_runs_in_integers(cnn):
    model, art = cnn
    info = art.manifest["integer"]
    kinds = {n["op"]: [] for n in info["nodes"]}
    for n in info["nodes"]:
        kinds[n["op"]].append(n["kernel"])
    assert info["float"] == 0                                 # nothing fell back to QDQ-in-float
    gemm = [n for n in info["nodes"] if n["op"] == "Gemm"]
    assert len(gemm) == 1 and gemm[0]["kernel"] == "int8" and "float output" in gemm[0]["reason"]
    assert sorted(kinds["Add"]) == ["int8-io", "int8-io"]
    assert kinds["MaxPool"] == ["int8-io"] and kinds["GlobalAveragePool"] == ["int8-io"]
    assert kinds["Flatten"] == ["int8-io"] and kinds["Relu"] == ["int8-io"]   # the standalone one
    convs = [n for n in info["nodes"] if n["op"] == "Conv"]
    assert len(convs) == 4 and all(n["kernel"] in ("int8", "int8-io") for n in convs)
    isa = int8_isa(resolve_target("x86").tvm_target())
    if isa is not None:
        first = convs[0]
        assert first["kernel"] == "int8" and isa[0] in first["reason"], first
        if isa[0] in ("avx2", "avx512bw"):       # full-range weights would saturate vpmaddubsw
            assert convs[1]["kernel"] == "int8-io" and "saturate" in convs[1]["reason"]
    # the lowered graph keeps no DequantizeLinear between quantized ops, only the input's Q
    lowered, _ = lower_integer(model, resolve_target("x86").tvm_target())
    ops = [n.op_type for n in lowered.graph.node]
    assert "DequantizeLinear" not in ops and ops.count("QuantizeLinear") == 1


def test_a_db_tuned_on_int8_kernels_opens_in_a_fresh_process(cnn, tmp_path):
    """Tuning records name the dot-product intrinsics their schedules tensorize with; a new
    process (a second `onnxpress compile --db`) must register them before reading the DB. The
    record here is the int8 conv's default schedule, committed as tuning commits it."""
    import sys

    from tvm.s_tir import meta_schedule as ms

    from onnxpress.backends.tvm import tuning
    from onnxpress.backends.tvm.int8_kernels import has_int8_conv
    from onnxpress.backends.tvm.schedules import default_schedule
    from onnxpress.backends.tvm.targets import db_key

    from .test_tvm import tuning_tasks

    model, _art = cnn
    path = tmp_path / "cnn.onnx"
    onnx.save(model, path)
    if int8_isa(resolve_target("x86").tvm_target()) is None:
        pytest.skip("no u8 x s8 dot product on this CPU")
    resolved, target, tasks = tuning_tasks(path, {})
    task = next(t for t in tasks if has_int8_conv(t.dispatched[0]))
    mod = task.dispatched[0]
    db = tuning.open_database(tmp_path / "db" / db_key(resolved))
    db.commit_tuning_record(ms.database.TuningRecord(
        default_schedule(mod["main"], target).trace, db.commit_workload(mod), [1e-5], target,
        ms.arg_info.ArgInfo.from_prim_func(mod["main"])))
    assert "onnxpress_dot_" in (tmp_path / "db" / db_key(resolved) / "database_tuning_record.json").read_text()
    proc = subprocess.run([sys.executable, "-m", "onnxpress", "compile", str(path), "--db",
                           str(tmp_path / "db"), "-o", str(tmp_path / "b"), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-500:]
    assert ox_tvm.load_artifact(tmp_path / "b").manifest["schedules"]["from_db"] == 1


def test_inspect_and_the_compile_report_name_the_integer_nodes(cnn, tmp_path, capsys):
    """`onnxpress inspect ARTIFACT` and the compile report say which nodes run as integer
    kernels and which do not, and why (read back from the manifest)."""
    from onnxpress.cli import main
    from onnxpress.report import compile_report

    model, art = cnn
    assert main(["inspect", str(art.path)]) == 0
    out = capsys.readouterr().out
    info = art.manifest["integer"]
    assert f"{info['int8_kernels']} integer kernel(s)" in out and "Conv" in out and "Gemm" in out
    for n in info["nodes"]:
        assert n["node"] in out or "(+" in out, n          # every node named (or counted)
    assert main(["inspect", str(art.path), "--json"]) == 0
    assert '"int8_kernels"' in capsys.readouterr().out
    html = compile_report(tmp_path / "r.html", model, art, measure=False).read_text()
    assert "integer kernels" in html and "ops on 8-bit tensors" in html
    others = [n for n in info["nodes"] if n["kernel"] != "int8"]
    assert others and all(n["node"] in html for n in others[:40])


def test_quantized_cnn_stays_channels_last_between_kernels():
    """Requantizations keep the NHWC layout (no clip, which has no layout rule): the only
    transposes are at the graph's edges (the NCHW input, the pooled features, the NCHW 8-bit
    output), none starts a kernel (the old NHWC->NCHW->clip->NHWC after every conv), and every
    requantize is fused into its conv's epilogue (no float32 conv output goes to a second kernel)."""
    import re

    from onnxpress.backends.tvm.compiler import lower_to_fused
    from onnxpress.backends.tvm.frontend import bind_shapes, to_relax

    model = cnn_model()
    resolved = resolve_target("x86")
    target = resolved.tvm_target()
    relax_mod = to_relax(model, bind_shapes(model, None), integer=True, decisions=[], target=target)
    text = lower_to_fused(relax_mod, resolved, target, {})["main"].script()
    kernels = re.findall(r"call_tir\((\w+),", text)
    transposes = [k for k in kernels if "transpose" in k]
    assert len(transposes) <= 3, kernels          # input quantize, pooled features, NCHW output
    assert not any(k.startswith("fused_transpose") for k in kernels), kernels


def silu_model():
    """conv -> Q, then a float SiLU gate between 8-bit tensors (DQ, Sigmoid, Mul, Q: the
    QuantizeLinear/DequantizeLinear left at float boundaries), then conv again."""
    b = QDQ(9)
    x, _ = b.q("x", 0.05, 128)
    w1, ws1 = b.weight((16, 8, 3, 3), qmax=63)
    c1, _ = b.q(b.node("Conv", [x, w1, b.bias(16, 0.05, ws1)], pads=[1, 1, 1, 1]), 0.1, 120)
    gate = b.node("Mul", [c1, b.node("Sigmoid", [c1])])
    gate, _ = b.q(gate, 0.06, 10)
    w2, ws2 = b.weight((16, 16, 1, 1), qmax=63)
    _c2, c2q = b.q(b.node("Conv", [gate, w2, b.bias(16, 0.06, ws2)]), 0.08, 128)
    return b.model([_vi("x", TensorProto.FLOAT, [1, 8, 10, 10])], [_vi(c2q, TensorProto.UINT8, [1, 16, 10, 10])])


def test_float_gates_between_quantized_convs_stay_channels_last(tmp_path):
    """QuantizeLinear/DequantizeLinear at float boundaries become elementwise ops with a layout
    rule (TVM's relax quantize/dequantize have none: NHWC<->NCHW transposes around each gate)."""
    import re

    from onnxpress.backends.tvm.compiler import lower_to_fused
    from onnxpress.backends.tvm.frontend import bind_shapes, to_relax

    model = silu_model()
    art = ox_tvm.compile(model, "x86", output_dir=tmp_path / "silu", progress=False)
    rng = np.random.default_rng(2)
    for _ in range(2):
        _compare(model, art, {"x": rng.standard_normal((1, 8, 10, 10)).astype(np.float32)})
    resolved = resolve_target("x86")
    target = resolved.tvm_target()
    relax_mod = to_relax(model, bind_shapes(model, None), integer=True, decisions=[], target=target)
    kernels = re.findall(r"call_tir\((\w+),", lower_to_fused(relax_mod, resolved, target, {})["main"].script())
    assert sum("transpose" in k for k in kernels) <= 2, kernels          # the input, the output


def test_dot_product_instructions_in_the_library(cnn):
    _model, art = cnn
    isa = int8_isa(resolve_target("x86").tvm_target())
    if isa is None or shutil.which("objdump") is None:
        pytest.skip("no x86 int8 dot-product ISA or no objdump here")
    text = subprocess.run(["objdump", "-d", str(art.library)], capture_output=True, text=True).stdout
    wanted = "vpdpbusd" if "vnni" in isa[0] else "vpmaddubsw"
    assert text.count(wanted) > 0, wanted


def _channels_model(channels=(32, 24), cols=24):
    """x -> conv 3x3 (channels[0]) -> conv 1x1 (channels[1]) -> global pool -> matmul (cols)."""
    b = QDQ(seed=3)
    x, _ = b.q("x", 0.05, 128)
    c_in = 8
    for i, oc in enumerate(channels):
        w, ws = b.weight((oc, c_in, 3 - 2 * i, 3 - 2 * i), qmax=63)
        x, _ = b.q(b.node("Relu", [b.node("Conv", [x, w, b.bias(oc, 0.05 if i == 0 else 0.04, ws)],
                                          pads=[1 - i] * 4)]), 0.04, 0)
        c_in = oc
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x])])
    x, _ = b.q(x, 0.03, 0)
    w, _ = b.weight((c_in, cols), qmax=63, axis=1)
    y = b.node("MatMul", [x, w])
    return b.model([_vi("x", TensorProto.FLOAT, [1, 8, 10, 10])], [_vi(y, TensorProto.FLOAT, [1, cols])])


def test_avx512_output_channels_that_fill_half_a_vector_use_the_256_bit_form(tmp_path):
    """VNNI on AVX-512: 16 int32 lanes, and the same vpdpbusd on ymm (AVX-512 VL) for 24 output
    channels or columns, instead of a float conv between 8-bit tensors. Built for a Cascade Lake
    (not run here: this CPU may lack AVX-512; the device bench runs such builds), and the same
    model on this CPU's own kernels, run against onnxruntime."""
    model = _channels_model()
    art = ox_tvm.compile(model, {"kind": "llvm", "mcpu": "cascadelake", "num-cores": 2},
                         output_dir=tmp_path / "clx", progress=False)
    nodes = art.manifest["integer"]["nodes"]
    reasons = [n["reason"] for n in nodes if n["op"] in ("Conv", "MatMul")]
    assert [("16 lanes" in r, "8 lanes" in r) for r in reasons] == [(True, False), (False, True), (False, True)], reasons
    if shutil.which("objdump"):
        text = subprocess.run(["objdump", "-d", str(art.library)], capture_output=True, text=True).stdout
        dots = [line for line in text.splitlines() if "\tvpdpbusd" in line]
        assert any("%zmm" in line for line in dots) and any("%ymm" in line for line in dots)
    host = ox_tvm.compile(model, "x86", output_dir=tmp_path / "host", progress=False)
    rng = np.random.default_rng(0)
    _compare(model, host, {"x": rng.standard_normal((1, 8, 10, 10)).astype(np.float32)})
    assert all(n["kernel"] == "int8" for n in host.manifest["integer"]["nodes"] if n["op"] in ("Conv", "MatMul"))


def test_seven_bit_weights_put_every_conv_on_the_dot_product(tmp_path):
    isa = int8_isa(resolve_target("x86").tvm_target())
    model = reduce_weight_range(cnn_model())
    lowered, decisions = lower_integer(model, resolve_target("x86").tvm_target())
    dense = [d for d in decisions if d.op == "Conv" and "group" not in d.reason]
    if isa is not None:
        # the 3x3 convs with 8 and 32 input channels (grouped/depthwise stay generic integer)
        assert sum(d.kernel == "int8" and isa[0] in d.reason for d in dense) >= 2, decisions


# -- matmuls: constant weights (per column), two activations, Gemm with alpha/beta --------------

def matmul_model():
    b = QDQ(2)
    x, _ = b.q("x", 0.03, 128)
    w, ws = b.weight((32, 24), qmax=64, axis=1)              # 7-bit: fits vpmaddubsw
    y1 = b.node("MatMul", [x, w])
    y1, y1q = b.q(y1, 0.05, 128)
    t, _ = b.q("t", 0.04, 120)
    s = b.node("MatMul", [y1, t])                             # attention-like: two activations
    _s, sq = b.q(s, 0.23, 128)          # not 0.2: 0.05 * 0.04 / 0.2 puts every 50th sum on a tie
    wg, wsg = b.weight((24, 6), axis=1)
    flat, _ = b.q(b.node("Reshape", [y1, b.const(np.array([8, 24], np.int64), "shape")]), 0.05, 128)
    g = b.node("Gemm", [flat, wg,
                        b.const(np.linspace(-1, 1, 6).astype(np.float32), "gb")], alpha=0.5, beta=2.0)
    f = b.node("MatMul", [x, w])                              # float output
    wa, wsa = b.weight((24, 8), qmax=64, axis=1)              # int32 bias and alpha: bias not scaled
    ga = b.node("Gemm", [flat, wa, b.bias(8, 0.05, wsa)], alpha=0.5)
    wfull, wsfull = b.weight((32, 16), axis=1)                # full range: float on AVX2 w/o VNNI
    full = b.node("MatMul", [x, wfull])
    full = b.node("Add", [full, b.const(np.linspace(-0.5, 0.5, 16).astype(np.float32), "fb")])
    _full, fullq = b.q(full, 0.05, 128)
    z, _ = b.q("z", 0.03, 120)
    wz, _ = b.weight((30, 16), qmax=64, axis=1)               # 30 rows: padded to 32 with zeros
    zy, zyq = b.q(b.node("MatMul", [z, wz]), 0.04, 128)
    return b.model([_vi("x", TensorProto.FLOAT, [2, 4, 32]), _vi("t", TensorProto.FLOAT, [2, 24, 5]),
                    _vi("z", TensorProto.FLOAT, [6, 30])],
                   [_vi(y1q, TensorProto.UINT8, [2, 4, 24]), _vi(sq, TensorProto.UINT8, [2, 4, 5]),
                    _vi(g, TensorProto.FLOAT, [8, 6]), _vi(f, TensorProto.FLOAT, [2, 4, 24]),
                    _vi(fullq, TensorProto.UINT8, [2, 4, 16]), _vi(zyq, TensorProto.UINT8, [6, 16]),
                    _vi(ga, TensorProto.FLOAT, [8, 8])])


def test_matmul_gemm_and_activation_matmul(tmp_path):
    model = matmul_model()
    art = ox_tvm.compile(model, "x86", output_dir=tmp_path / "mm", progress=False)
    rng = np.random.default_rng(3)
    for _ in range(2):
        _compare(model, art, {"x": rng.standard_normal((2, 4, 32)).astype(np.float32),
                              "t": rng.standard_normal((2, 24, 5)).astype(np.float32),
                              "z": rng.standard_normal((6, 30)).astype(np.float32)})
    nodes = art.manifest["integer"]["nodes"]
    kinds = [(n["op"], n["kernel"]) for n in nodes]
    assert kinds.count(("MatMul", "int8")) >= 3 and ("Gemm", "int8") in kinds
    assert ("Reshape", "int8-io") in kinds
    isa = int8_isa(resolve_target("x86").tvm_target())
    if isa is not None:
        # constant weights with a multiple of the vector width of columns: the packed dot product
        packed = [n for n in nodes if n["op"] == "MatMul" and isa[0] in n.get("reason", "")]
        assert len(packed) >= 3, nodes
        if isa[0] in ("avx2", "avx512bw"):
            assert any(n["kernel"] == "int8-io" and "saturate" in n["reason"] for n in nodes), nodes
        if shutil.which("objdump") is not None:
            text = subprocess.run(["objdump", "-d", str(art.library)], capture_output=True, text=True).stdout
            assert text.count("vpdpbusd" if "vnni" in isa[0] else "vpmaddubsw") > 0


def encoder_block_model(seq=16, hidden=64, ffn=128):
    """A transformer encoder's matmul chain at MiniLM's structure, small: quantized input, Q/K/V
    projections with float bias adds, attention scores between two quantized activations, the
    FFN's two projections (GELU between): every constant-weight MatMul on the packed kernel."""
    b = QDQ(7)
    x, _ = b.q("x", 0.05, 128)
    outs = []
    proj = []
    for _k in range(3):
        w, _ = b.weight((hidden, hidden), qmax=63, axis=1)
        p = b.node("Add", [b.node("MatMul", [x, w]), b.const(b.rng.normal(0, 0.1, hidden).astype(np.float32), "pb")])
        proj.append(p)
    q, _ = b.q(proj[0], 0.06, 128)
    kt = b.node("Transpose", [proj[1]], perm=[0, 2, 1])
    kt, _ = b.q(kt, 0.06, 128)
    scores = b.node("MatMul", [q, kt])
    scores, sq = b.q(scores, 0.5, 128)
    outs.append(sq)
    w1, _ = b.weight((hidden, ffn), qmax=63, axis=1)
    v, _ = b.q(proj[2], 0.06, 128)
    h = b.node("MatMul", [v, w1])
    h = b.node("Relu", [b.node("Add", [h, b.const(b.rng.normal(0, 0.1, ffn).astype(np.float32), "hb")])])
    h, _ = b.q(h, 0.04, 0)
    w2, _ = b.weight((ffn, hidden), qmax=63, axis=1)
    y = b.node("MatMul", [h, w2])
    outs.append(y)
    return b.model([_vi("x", TensorProto.FLOAT, [1, seq, hidden])],
                   [_vi(sq, TensorProto.UINT8, [1, seq, seq]), _vi(y, TensorProto.FLOAT, [1, seq, hidden])])


def test_encoder_matmuls_on_the_packed_kernel(tmp_path):
    model = encoder_block_model()
    art = ox_tvm.compile(model, "x86", output_dir=tmp_path / "enc", progress=False)
    rng = np.random.default_rng(5)
    for _ in range(2):
        _compare(model, art, {"x": rng.standard_normal((1, 16, 64)).astype(np.float32)})
    isa = int8_isa(resolve_target("x86").tvm_target())
    nodes = [n for n in art.manifest["integer"]["nodes"] if n["op"] == "MatMul"]
    assert len(nodes) == 6 and all(n["kernel"] == "int8" for n in nodes), nodes
    if isa is not None:
        assert sum(isa[0] in n["reason"] for n in nodes) == 5, nodes


SAPPHIRE_RAPIDS = {"kind": "llvm", "mcpu": "sapphirerapids", "num-cores": 2}


def test_matmuls_that_fill_whole_tiles_run_on_amx(tmp_path):
    """On a target with AMX (sapphirerapids and later) the packed int8 matmuls whose shapes fill
    32 x 32 tile blocks (k a multiple of 64) are scheduled on tdpbusd; the rest stay on vpdpbusd.
    Compiled only: runs on any x86 host."""
    from onnxpress.backends.tvm import amx

    assert amx.has_amx(resolve_target(SAPPHIRE_RAPIDS).tvm_target())
    assert not amx.has_amx(resolve_target({"kind": "llvm", "mcpu": "icelake-server"}).tvm_target())
    assert not amx.has_amx(resolve_target("arm").tvm_target())
    tiles = ox_tvm.compile(encoder_block_model(seq=64), SAPPHIRE_RAPIDS, output_dir=tmp_path / "a",
                           progress=False)
    # Q, K, V (64 x 64 x 64; one kernel twice), the FFN's two (64 -> 128 -> 64); the scores
    # matmul has no constant weight and stays off the packed kernel
    assert tiles.manifest["schedules"]["amx_kernels"] == 4, tiles.manifest["schedules"]
    dump = subprocess.run(["objdump", "-d", str(tiles.library)], capture_output=True, text=True).stdout
    assert "tdpbusd" in dump and "ldtilecfg" in dump
    # 16 rows do not fill a 32-row block: every matmul on vpdpbusd
    short = ox_tvm.compile(encoder_block_model(seq=16), SAPPHIRE_RAPIDS, output_dir=tmp_path / "b",
                           progress=False)
    assert "amx_kernels" not in short.manifest["schedules"]


def amx_conv_model():
    """resnet18's kinds of conv, small: a 3-channel 7x7 stride-2 stem (a kernel row of 7 x 4
    channels in one tile row), 64-channel 3x3 stride 1 on a 14-wide map (two tiles of 7
    rows), 3x3 stride 2 down to 7 wide (one tile of 7), a 1x1 stride-2 shortcut, the residual
    add and requantizations between."""
    b = QDQ(11)
    img, _ = b.q("img", 0.05, 128)
    w0, ws0 = b.weight((64, 3, 7, 7), qmax=127)
    x = b.node("Relu", [b.node("Conv", [img, w0, b.bias(64, 0.05, ws0)], pads=[3, 3, 3, 3], strides=[2, 2])])
    x, _ = b.q(x, 0.05, 0)
    w1, ws1 = b.weight((64, 64, 3, 3), qmax=127)
    h = b.node("Relu", [b.node("Conv", [x, w1, b.bias(64, 0.05, ws1)], pads=[1, 1, 1, 1])])
    h, _ = b.q(h, 0.05, 0)
    w2, ws2 = b.weight((64, 64, 3, 3), qmax=127)
    y = b.node("Conv", [h, w2, b.bias(64, 0.05, ws2)], pads=[1, 1, 1, 1], strides=[2, 2])
    w3, ws3 = b.weight((64, 64, 1, 1), qmax=127)
    sc = b.node("Conv", [x, w3, b.bias(64, 0.05, ws3)], strides=[2, 2])
    y = b.node("Relu", [b.node("Add", [y, sc])])
    _, yq = b.q(y, 0.1, 0)
    return b.model([_vi("img", TensorProto.FLOAT, [1, 3, 28, 28])], [_vi(yq, TensorProto.UINT8, [1, 64, 7, 7])])


def downsample_conv_model(channels=40):
    """convnext's 2x2 stride-2 downsampling conv: a kernel row of 2 x 40 channels is wider than a
    tile row and 40 is no multiple of 64, so no AMX block fits it."""
    b = QDQ(12)
    x, _ = b.q("x", 0.05, 128)
    w, ws = b.weight((64, channels, 2, 2), qmax=127)
    _, yq = b.q(b.node("Conv", [x, w, b.bias(64, 0.05, ws)], strides=[2, 2]), 0.1, 128)
    return b.model([_vi("x", TensorProto.FLOAT, [1, channels, 28, 28])], [_vi(yq, TensorProto.UINT8, [1, 64, 14, 14])])


def test_convs_with_64_channel_groups_run_on_amx(tmp_path):
    """Compiled for sapphirerapids (any x86 host): all four convs on tiles, in four kernels
    (the residual add fused into one of them), none left on generic code."""
    art = ox_tvm.compile(amx_conv_model(), SAPPHIRE_RAPIDS, output_dir=tmp_path / "c", progress=False)
    sched = art.manifest["schedules"]
    assert sched["amx_kernels"] == 4 and sched["left_unscheduled"] == 0, sched
    dump = subprocess.run(["objdump", "-d", str(art.library)], capture_output=True, text=True).stdout
    assert "tdpbusd" in dump and "ldtilecfg" in dump
    narrow = ox_tvm.compile(downsample_conv_model(), SAPPHIRE_RAPIDS, output_dir=tmp_path / "d",
                            progress=False)
    assert "amx_kernels" not in narrow.manifest["schedules"], narrow.manifest["schedules"]


def test_amx_matmuls_match_onnxruntime_where_the_cpu_has_them(tmp_path, capsys):
    from onnxpress.backends.tvm import amx

    target = resolve_target("x86").tvm_target()
    if not amx.has_amx(target) or not amx.request_permission():
        pytest.skip("this CPU (or its Linux) has no AMX tiles")
    model = encoder_block_model(seq=64)
    art = ox_tvm.compile(model, "x86", output_dir=tmp_path / "enc", progress=False)
    assert art.manifest["schedules"]["amx_kernels"] == 4
    rng = np.random.default_rng(5)
    for _ in range(2):
        _compare(model, art, {"x": rng.standard_normal((1, 64, 64)).astype(np.float32)})
    model = amx_conv_model()
    art = ox_tvm.compile(model, "x86", output_dir=tmp_path / "conv", progress=False)
    assert art.manifest["schedules"]["amx_kernels"] == 4
    for _ in range(2):
        _compare(model, art, {"img": rng.standard_normal((1, 3, 28, 28)).astype(np.float32)})
    model = downsample_conv_model()
    art = ox_tvm.compile(model, "x86", output_dir=tmp_path / "down", progress=False)
    _compare(model, art, {"x": rng.standard_normal((1, 40, 28, 28)).astype(np.float32)})
    # the CLI says which kernels run on tiles
    from onnxpress.cli import main

    onnx.save(amx_conv_model(), tmp_path / "convs.onnx")
    assert main(["compile", str(tmp_path / "convs.onnx"), "--target", "x86", "-o", str(tmp_path / "cli"),
                 "--quiet"]) == 0
    assert "AMX tiles: 4 int8 kernel(s)" in capsys.readouterr().out


def test_a_tuning_database_naming_amx_intrinsics_registers_them_from_their_names():
    """MetaSchedule replays every record of a database as it opens it; tuning commits the AMX
    default schedules as records, and a fresh process had not registered their intrinsics
    ("TensorIntrin 'onnxpress_amx_conv_2x7_3x3x16_s1_d1x1' is not registered"). Names used by no
    other test, so only register_named can have registered them."""
    from tvm.s_tir import TensorIntrin

    from onnxpress.backends.tvm import amx

    record = ('["onnxpress_amx_conv_2x14_5x5x8_s2_d1x1", 0], '
              '{"intrin": "onnxpress_amx_96x32x192"}')
    assert amx.register_named(record) == 2
    for name in ("onnxpress_amx_conv_2x14_5x5x8_s2_d1x1", "onnxpress_amx_96x32x192"):
        assert TensorIntrin.get(name) is not None


def test_an_artifact_with_amx_kernels_says_when_linux_refuses_the_tiles(monkeypatch):
    """Without the tile state a tdpbusd stops the process (SIGILL): loading must fail first."""
    from onnxpress.backends.tvm import run_artifact

    manifest = {"target": {"cpu_features": []}, "schedules": {"amx_kernels": 3}}
    monkeypatch.setattr(run_artifact, "request_amx", lambda: False)
    with pytest.raises(RuntimeError, match="AMX tiles.*arch_prctl"):
        run_artifact.check_cpu(manifest)
    monkeypatch.setattr(run_artifact, "request_amx", lambda: True)
    run_artifact.check_cpu(manifest)
    run_artifact.check_cpu({"target": {"cpu_features": []}, "schedules": {}})


# -- QOperator models: QLinearConv, QLinearMatMul, ConvInteger, MatMulInteger -------------------

def qoperator_model():
    rng = np.random.default_rng(4)
    inits = []

    def c(arr, name):
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    # 7-bit weights: onnxruntime's own QLinearConv/QLinearMatMul saturate vpmaddubsw's int16 sums on CPUs
    # without VNNI when weights use the full int8 range (45 steps off the exact result here)
    w = c(rng.integers(-64, 65, (16, 8, 3, 3)).astype(np.int8), "w")
    wm = c(rng.integers(-64, 65, (16, 12)).astype(np.int8), "wm")
    nodes = [
        helper.make_node("QLinearConv", ["x", c(np.float32(0.02), "xs"), c(np.uint8(7), "xz"), w,
                                         c(rng.uniform(0.001, 0.01, 16).astype(np.float32), "ws"),
                                         c(np.int8(0), "wz"), c(np.float32(0.1), "ys"), c(np.uint8(90), "yz"),
                                         c(rng.integers(-500, 500, 16).astype(np.int32), "bias")],
                         ["yc"], pads=[1, 1, 1, 1], name="qlinearconv"),
        helper.make_node("ConvInteger", ["x", w, "xz"], ["ci"], strides=[2, 2], name="convinteger"),
        helper.make_node("QLinearMatMul", ["a", c(np.float32(0.03), "as"), c(np.uint8(100), "az"), wm,
                                           c(np.float32(0.005), "wms"), c(np.int8(0), "wmz"),
                                           c(np.float32(0.2), "ms"), c(np.uint8(128), "mz")],
                         ["ym"], name="qlinearmatmul"),
        helper.make_node("MatMulInteger", ["a", wm, "az"], ["mi"], name="matmulinteger"),
        # a stem: 3 input channels, padded to 4 for the dot product
        helper.make_node("QLinearConv", ["x3", "xs", "xz", c(rng.integers(-64, 65, (16, 3, 7, 7)).astype(np.int8), "w3"),
                                         "ws", "wz", "ys", "yz"], ["y3"], pads=[3, 3, 3, 3], strides=[2, 2],
                         name="stem"),
    ]
    g = helper.make_graph(nodes, "qop", [_vi("x", TensorProto.UINT8, [1, 8, 9, 9]),
                                         _vi("a", TensorProto.UINT8, [3, 16]),
                                         _vi("x3", TensorProto.UINT8, [1, 3, 20, 20])],
                          [_vi("yc", TensorProto.UINT8, [1, 16, 9, 9]), _vi("ci", TensorProto.INT32, [1, 16, 4, 4]),
                           _vi("ym", TensorProto.UINT8, [3, 12]), _vi("mi", TensorProto.INT32, [3, 12]),
                           _vi("y3", TensorProto.UINT8, [1, 16, 10, 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    m.ir_version = 9
    return m


def test_qoperator_models_use_the_same_converters(tmp_path):
    model = qoperator_model()
    art = ox_tvm.compile(model, "x86", output_dir=tmp_path / "qop", progress=False)
    rng = np.random.default_rng(5)
    feeds = {"x": rng.integers(0, 256, (1, 8, 9, 9)).astype(np.uint8),
             "a": rng.integers(0, 256, (3, 16)).astype(np.uint8),
             "x3": rng.integers(0, 256, (1, 3, 20, 20)).astype(np.uint8)}
    # QLinearConv/QLinearMatMul requantize with a precomputed float multiplier in onnxruntime:
    # one-step flips allowed on a few elements
    _compare(model, art, feeds)
    nodes = {n["node"]: n for n in art.manifest["integer"]["nodes"]}
    assert {k: n["kernel"] for k, n in nodes.items()} == {
        "qlinearconv": "int8", "convinteger": "int8", "qlinearmatmul": "int8", "matmulinteger": "int8",
        "stem": "int8"}
    isa = int8_isa(resolve_target("x86").tvm_target())
    if isa is not None:
        assert "dot product" in nodes["stem"]["reason"]


def test_integer_false_keeps_tvms_float_qdq(tmp_path):
    model = matmul_model()
    art = ox_tvm.compile(model, "x86", output_dir=tmp_path / "f", progress=False, integer=False)
    assert art.manifest["integer"] is None


# -- aarch64 with the dot-product extension ----------------------------------------------------

ARM_DOTPROD = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"], "num-cores": 4}
arm_cc = shutil.which("aarch64-linux-gnu-gcc") and shutil.which("aarch64-linux-gnu-objdump")


def _arm_build(tmp_path_factory, model, name: str):
    """(model, its aarch64 +dotprod artifact), cross-compiled."""
    if not arm_cc:
        pytest.skip("aarch64-linux-gnu-gcc / objdump not found")
    return model, ox_tvm.compile(model, ARM_DOTPROD, output_dir=tmp_path_factory.mktemp("arm") / name,
                                 progress=False)


@pytest.fixture(scope="module")
def arm_cnn(tmp_path_factory):
    return _arm_build(tmp_path_factory, cnn_model(), "cnn")


def test_arm_dotprod_convs_disassemble_to_sdot(arm_cnn):
    _model, art = arm_cnn
    convs = [n for n in art.manifest["integer"]["nodes"] if n["op"] == "Conv"]
    assert sum("dotprod dot product" in n["reason"] for n in convs) == 2    # full-range weights too
    text = subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(art.library)], capture_output=True,
                          text=True).stdout
    assert sum(1 for line in text.splitlines() if "\tsdot\t" in line) > 0


@pytest.mark.slow
@pytest.mark.skipif(ox_tvm.arm_runtime_problem() is not None, reason="no emulated aarch64 runtime here")
def test_arm_dotprod_build_matches_onnxruntime_under_qemu(arm_cnn):
    model, art = arm_cnn
    x = np.random.default_rng(1).standard_normal((1, 8, 12, 12)).astype(np.float32) * 2
    _compare(model, art, {"x": x})


@pytest.fixture(scope="module")
def arm_encoder(tmp_path_factory):
    return _arm_build(tmp_path_factory, encoder_block_model(), "enc")


def test_arm_dotprod_matmuls_disassemble_to_sdot(arm_encoder):
    _model, art = arm_encoder
    mms = [n for n in art.manifest["integer"]["nodes"] if n["op"] == "MatMul"]
    assert sum("dotprod dot product" in n["reason"] for n in mms) == 5, mms
    text = subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(art.library)], capture_output=True,
                          text=True).stdout
    assert sum(1 for line in text.splitlines() if "\tsdot\t" in line) > 0


@pytest.mark.slow
@pytest.mark.skipif(ox_tvm.arm_runtime_problem() is not None, reason="no emulated aarch64 runtime here")
def test_arm_dotprod_matmuls_match_onnxruntime_under_qemu(arm_encoder):
    model, art = arm_encoder
    _compare(model, art, {"x": np.random.default_rng(5).standard_normal((1, 16, 64)).astype(np.float32)})


def test_quant_int8_for_tvm_picks_the_weight_range_the_dot_product_needs(tmp_path):
    """quant_int8 with target tvm writes 7-bit weights exactly when the host's TVM dot product is
    vpmaddubsw (no VNNI), so the plain digits CNN gets every conv and Gemm on integer kernels
    either way, matching onnxruntime's QDQ reference within one step."""
    from onnxpress import passes, zoo

    isa = int8_isa(resolve_target("x86").tvm_target())
    if isa is None:
        pytest.skip("no x86 int8 dot-product ISA here")
    model = onnx.load(zoo.plain_export("digits_cnn"))
    calib = [{"x": b["input"][i:i + 1]} for b in zoo.digits_calib(16, 16) for i in range(16)]
    res = passes.run(model, "fuse,quant_int8", calib=calib, target="tvm")
    f = res.reports[-1].figures
    assert f["weight_bits"] == (7 if "vnni" not in isa[0] else 8)
    assert f["int8_compute_nodes"] == 4
    art = ox_tvm.compile(res.model, target="x86", output_dir=tmp_path / "art", progress=False)
    integer = art.manifest["integer"]
    assert integer["int8_kernels"] >= 4 and integer["float"] == 0, integer
    check = art.verify(res.model, calib[0])
    assert check.ok, check


def test_weights_with_a_zero_point_get_integer_kernels_once_centred(tmp_path):
    """onnxruntime's GEMM form of an int8 conv (quant_int8:conv_kernel=gemm: weights - 1, zero
    point -1) still lowers to TVM's integer kernels: the weights minus their zero point fit
    int8, and the kernels take them centred. Before, any nonzero weight zero point sent the
    layer to float."""
    from onnxpress import passes, zoo
    from onnxpress.passes.quant.conv_kernels import candidates

    if int8_isa(resolve_target("x86").tvm_target()) is None:
        pytest.skip("no x86 int8 dot-product ISA here")
    model = onnx.load(zoo.plain_export("digits_cnn"))
    calib = [{"x": b["input"][i:i + 1]} for b in zoo.digits_calib(16, 16) for i in range(16)]
    res = passes.run(model, "quant_int8:conv_kernel=gemm", calib=calib, target="tvm")
    assert res.reports[-1].figures["conv_kernels_gemm"] >= 2 and not candidates(res.model)
    art = ox_tvm.compile(res.model, target="x86", output_dir=tmp_path / "art", progress=False)
    integer = art.manifest["integer"]
    assert integer["int8_kernels"] >= 4 and integer["float"] == 0, integer
    check = art.verify(res.model, calib[0])
    assert check.ok, check


def test_latency_aware_quant_times_tvm_builds_for_a_tvm_target():
    """quant_int8:tvm_timing=true decides what stays int8 by timing TVM builds (integer kernels
    included), not onnxruntime: the figures say so, and the model it returns is never slower
    than float on TVM by the decision's own measurement."""
    from onnxpress import passes, zoo
    from onnxpress.errors import PassOptionError

    model = onnx.load(zoo.plain_export("digits_cnn"))
    calib = [{"x": b["input"][i:i + 1]} for b in zoo.digits_calib(16, 16) for i in range(16)]
    res = passes.run(model, "quant_int8:tvm_timing=true,latency_floor_ms=0", calib=calib, target="tvm")
    f = res.reports[-1].figures
    assert f["latency_measured_on"].startswith("TVM") and f["latency_fp32_wall_ms"] > 0
    if f["int8_compute_nodes"]:
        assert f["speedup"] >= 1 / 0.95, f          # int8 kept only where TVM ran it faster
    else:
        assert "does not pay on TVM" in f["latency_decision"], f
    with pytest.raises(PassOptionError, match="target tvm or x86"):
        passes.run(model, "quant_int8:tvm_timing=true", calib=calib, target="ort")


def test_the_tuning_space_of_an_int8_conv_is_its_register_blocks_on_the_dot_product():
    """MetaSchedule's space for a dot-product conv is the fixed schedule with each register block
    (int8_kernels.tuning_rule), every one on the integer instruction and accepted by the
    postprocessors tuning applies. Before, the conv's custom rule was not registered and the
    space held generic integer tilings, never the dot product."""
    import tvm

    from onnxpress.backends.tvm.compiler import lower_to_fused
    from onnxpress.backends.tvm.frontend import to_relax
    from onnxpress.backends.tvm.int8_kernels import has_int8_conv
    from onnxpress.backends.tvm.schedules import cpu_space_generator, tune_context

    resolved = resolve_target("x86")
    target = resolved.tvm_target()
    if int8_isa(target) is None:
        pytest.skip("no x86 int8 dot-product ISA here")
    model = cnn_model()
    fused = lower_to_fused(to_relax(model, {"x": {"shape": [1, 8, 12, 12], "dtype": "float32"}},
                                    integer=True, decisions=[], target=target), resolved, target)
    func = next(fused[gv] for gv in fused.functions if isinstance(fused[gv], tvm.tirx.PrimFunc)
                and has_int8_conv(tvm.IRModule({"main": fused[gv]})))
    ctx = tune_context(tvm.IRModule({"main": func}), target, cpu_space_generator())
    spaces = ctx.generate_design_space()
    assert len(spaces) >= 2
    for space in spaces:
        assert "onnxpress_dot" in str(space.trace)
        candidate = space.copy()
        assert all(pp.apply(candidate) for pp in ctx.space_generator.postprocs)
