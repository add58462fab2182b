"""The default schedules' register block is sized from the target's ISA (schedules.vector_isa /
register_tile): lanes and vector registers read from the TVM target's features, never from the
build machine, and the accumulators, the weight vectors and the broadcast register all fit in
the register file. A rule that regressed to one block for every CPU (8 rows x 2 vectors: 16 ymm
accumulators, every register AVX2 has, which spilled) fails here. Then the weight prepacking:
constant weights stored in the order the register block reads them, kernel names unchanged."""

from __future__ import annotations

import pytest

pytest.importorskip("tvm")

from onnxpress.backends.tvm import schedules as S  # noqa: E402
from onnxpress.backends.tvm.targets import resolve_target  # noqa: E402


def _target(spec):
    from tvm.target import Target

    return resolve_target(spec).tvm_target() if isinstance(spec, str) else Target(spec)


@pytest.mark.parametrize("spec, name, lanes, registers", [
    ({"kind": "llvm", "mcpu": "haswell"}, "avx2", 8, 16),
    ({"kind": "llvm", "mcpu": "znver3"}, "avx2", 8, 16),            # the AMD EPYC measured here
    ({"kind": "llvm", "mcpu": "skylake-avx512"}, "avx512", 16, 32),
    ({"kind": "llvm", "mcpu": "znver4"}, "avx512", 16, 32),
    ({"kind": "llvm", "mcpu": "sapphirerapids"}, "avx512", 16, 32),
    ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64"}, "sse", 4, 16),
    ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "sandybridge"}, "avx", 8, 16),
    ("arm", "neon", 4, 32),
])
def test_vector_isa_comes_from_the_target(spec, name, lanes, registers):
    isa = S.vector_isa(_target(spec))
    assert (isa.name, isa.lanes, isa.registers) == (name, lanes, registers)
    assert S.simd_lanes(_target(spec)) == lanes


def test_vector_isa_ignores_llvm_vector_width():
    """TVM 0.27's llvm_get_vector_width says 512 bits for every x86 CPU, AVX2 ones too (it was
    where the lanes came from: 2 x 16 floats = 4 ymm per row x 8 rows on this AVX2 host)."""
    assert S.simd_lanes(_target({"kind": "llvm", "mcpu": "haswell"})) == 8
    assert S.vector_tile(_target({"kind": "llvm", "mcpu": "haswell"})) == 16


ISAS = [S.VectorISA("avx2", 8, 16), S.VectorISA("avx512", 16, 32), S.VectorISA("neon", 4, 32),
        S.VectorISA("sse", 4, 16)]


@pytest.mark.parametrize("isa", ISAS, ids=lambda i: i.name)
@pytest.mark.parametrize("max_vectors", [1, 2])
def test_register_block_fits_the_register_file(isa, max_vectors):
    """accumulators r x V + V weight vectors + 1 broadcast <= vector registers, for every output
    width and channel count a model has; r divides the width, the tile divides the channels."""
    for width in list(range(1, 130)) + [196, 3136]:
        for channels in (3, 4, 8, 10, 16, 24, 32, 40, 64, 72, 96, 128, 384, 512, 1000, 1536):
            r, c = S.register_tile(isa, width, channels, max_vectors=max_vectors)
            vectors = max(1, c // isa.lanes)
            assert width % r == 0 and channels % c == 0, (width, channels, r, c)
            assert 1 <= r <= S.MAX_ROWS and vectors <= max_vectors
            assert r * vectors + vectors + 1 <= isa.registers, (isa, width, channels, r, c)


@pytest.mark.parametrize("isa, width, channels, tile", [
    # AVX2, 16 ymm: 12 accumulators at most; resnet18's layers
    (ISAS[0], 56, 64, (4, 16)),      # 4 x 2 ymm (6 x 2 does not divide 56)
    (ISAS[0], 28, 128, (4, 16)),
    (ISAS[0], 14, 256, (7, 8)),      # width alone: 7 x 1 ymm (2 x 2 = four accumulators)
    (ISAS[0], 7, 512, (7, 8)),
    (ISAS[0], 128, 384, (4, 16)),    # MiniLM's projections (M = 128)
    (ISAS[0], 12, 48, (6, 16)),      # the full 6 x 2 block where 6 divides
    # AVX-512 and NEON, 32 registers: 8 x 2 as measured on AVX-512 (capped at MAX_ROWS)
    (ISAS[1], 56, 64, (8, 32)),
    (ISAS[1], 7, 512, (7, 32)),
    (ISAS[2], 56, 64, (8, 8)),
    (ISAS[2], 7, 512, (7, 8)),
    # channels that do not fill a vector: the narrower vector that divides them, else one
    # partial register
    (ISAS[0], 56, 4, (8, 4)),
    (ISAS[0], 56, 40, (8, 8)),       # 40 = 5 ymm: one vector per row, 8 rows
    (ISAS[1], 56, 40, (8, 8)),       # AVX-512: 5 ymm too, not a 10-lane zmm split in pieces
    (ISAS[1], 7, 1000, (7, 8)),      # a 1000-class head: 125 ymm, not 100 10-lane pieces
    (ISAS[1], 56, 24, (8, 8)),
    (ISAS[0], 14, 20, (7, 4)),       # AVX2: 20 channels in xmm, not 5-lane pieces
    (ISAS[1], 56, 6, (8, 6)),        # no narrower vector divides 6: one partial register
])
def test_register_tile_choices(isa, width, channels, tile):
    assert S.register_tile(isa, width, channels) == tile


@pytest.mark.parametrize("isa, height, width, channels, block", [
    # AVX2: a 14 x 14 output takes 2 x 2 rows x 2 ymm (8 accumulators) where the width alone
    # gives 7 x 1 ymm (measured on resnet18's 256-channel 3x3 conv, this Zen 3: 2.25 -> 1.41-1.67 ms)
    (ISAS[0], 14, 14, 256, (2, 2, 16)),
    (ISAS[0], 56, 56, 64, (1, 4, 16)),     # the width alone already gives the most: unchanged
    (ISAS[0], 28, 28, 128, (1, 4, 16)),
    (ISAS[0], 7, 7, 512, (1, 7, 8)),       # 7 x 7: no product of divisors beats 7
    # 32 registers: 14 x 14 keeps 7 x 2 (14 accumulators); 28 x 28 reaches 8 x 2 as 2 x 4
    (ISAS[1], 14, 14, 256, (1, 7, 32)),
    (ISAS[1], 28, 28, 128, (2, 4, 32)),
    (ISAS[2], 28, 28, 128, (2, 4, 8)),
    (ISAS[0], 14, 14, 20, (1, 7, 4)),      # a partial vector: rows beside one register
])
def test_register_block_takes_rows_from_height_and_width(isa, height, width, channels, block):
    assert S.register_block(isa, height, width, channels) == block


@pytest.mark.parametrize("isa", ISAS, ids=lambda i: i.name)
def test_register_block_over_height_fits_the_register_file(isa):
    for height in (1, 2, 3, 7, 14, 28, 56, 112):
        for width in (1, 2, 3, 5, 7, 14, 28, 56, 112):
            for channels in (3, 16, 24, 40, 64, 256, 512, 1000):
                rh, rw, c = S.register_block(isa, height, width, channels)
                vectors = max(1, c // isa.lanes)
                assert height % rh == 0 and width % rw == 0 and channels % c == 0
                assert rh * rw <= S.MAX_ROWS
                assert rh * rw * vectors + vectors + 1 <= isa.registers
                # never fewer accumulators than the width alone gives
                r1, c1 = S.register_tile(isa, width, channels)
                assert rh * rw * vectors >= r1 * max(1, c1 // isa.lanes)


def test_avx2_block_is_not_the_avx512_one():
    """The defaults were fitted on AVX-512 (8 rows x 2 zmm = 16 of 32 registers); on AVX2 the
    same 8 x 2 block is every ymm register before weights and broadcast, and spilled."""
    avx2, avx512 = ISAS[0], ISAS[1]
    r2, c2 = S.register_tile(avx2, 56, 64)
    r5, c5 = S.register_tile(avx512, 56, 64)
    assert r2 * (c2 // 8) <= 16 - 3 < 8 * 2
    assert r5 * (c5 // 16) == 16


@pytest.fixture(scope="module")
def digits_x86(digits_cnn_path, tmp_path_factory):
    from onnxpress.backends import tvm as ox_tvm

    out = tmp_path_factory.mktemp("sched") / "digits-x86"
    return ox_tvm.compile(digits_cnn_path, "x86", shapes={"input": [8, 1, 8, 8]}, output_dir=out,
                          progress=False)


def test_weights_are_prepacked_and_kernels_keep_their_names(digits_x86, digits_cnn_path, digits):
    sched = digits_x86.manifest["schedules"]
    assert sched["prepacked_weights"] >= 3, sched         # two convs and the dense layers
    assert sched["left_unscheduled"] == 0
    names = {k.name for k in digits_x86.profile({"input": digits.test[0][:8]}, runs=2).kernels}
    assert "fused_conv2d1_add1_relu1" in names and not any("prepacked" in n for n in names), names
    assert digits_x86.verify(digits_cnn_path, {"input": digits.test[0][:8]}).ok


def test_prepacking_can_be_switched_off(digits_cnn_path):
    """Without prepacking the same kernels are scheduled and nothing is folded."""
    from onnxpress.backends.tvm.compiler import lower_to_fused
    from onnxpress.backends.tvm.frontend import bind_shapes, to_relax
    from onnxpress.io import load

    proto = load(digits_cnn_path, check=False)
    resolved = resolve_target("x86")
    target = resolved.tvm_target()
    fused = lower_to_fused(to_relax(proto, bind_shapes(proto, {"input": [8, 1, 8, 8]}), target=target),
                           resolved, target, {})
    plain, info = S.apply_default_schedules(fused, target, prepack_weights=False)
    assert "prepacked_weights" not in info and info["left_unscheduled"] == 0
    fused = lower_to_fused(to_relax(proto, bind_shapes(proto, {"input": [8, 1, 8, 8]}), target=target),
                           resolved, target, {})
    packed, info = S.apply_default_schedules(fused, target)
    assert info["prepacked_weights"] >= 3
    names = lambda m: sorted(gv.name_hint for gv, _f in m.functions_items())  # noqa: E731
    assert names(plain) == names(packed)


def _conv_model(group: int):
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    c = 32
    w = np.random.default_rng(0).standard_normal((c, c // group, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], group=group)
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 14, 14])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 14, 14])],
                              [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("group, broadcasts", [(1, True), (32, False)])
def test_depthwise_convs_broadcast_nothing(group, broadcasts):
    """A dense conv broadcasts each input pixel over a vector of output channels; a depthwise
    conv reads input and weights by the output channel, and gets one vector per row."""
    import tvm

    from onnxpress.backends.tvm.compiler import lower_to_fused
    from onnxpress.backends.tvm.frontend import bind_shapes, to_relax

    model = _conv_model(group)
    resolved = resolve_target("x86")
    target = resolved.tvm_target()
    fused = lower_to_fused(to_relax(model, bind_shapes(model, {"x": [1, 32, 14, 14]}), target=target),
                           resolved, target, {})
    convs = [f for gv, f in fused.functions_items() if "conv" in gv.name_hint]
    assert len(convs) == 1
    assert S.broadcasts_an_input(tvm.IRModule({"main": convs[0]})) is broadcasts
    # a conv's weights, depthwise or not, do not depend on the output row
    assert S.weights_shared_across_height(tvm.IRModule({"main": convs[0]}))


def test_batched_matmul_rows_never_come_from_its_batch_axis():
    """A batched matmul's third axis from the innermost (the heads) indexes its second operand
    too: rows taken from it would each need their own weight vectors."""
    import tvm
    from onnx import TensorProto, helper

    from onnxpress.backends.tvm.compiler import lower_to_fused
    from onnxpress.backends.tvm.frontend import bind_shapes, to_relax

    node = helper.make_node("MatMul", ["a", "b"], ["y"])
    graph = helper.make_graph([node], "bmm", [
        helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 12, 128, 32]),
        helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 12, 32, 128])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 12, 128, 128])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    resolved = resolve_target("x86")
    target = resolved.tvm_target()
    fused = lower_to_fused(to_relax(model, bind_shapes(model, {}), target=target), resolved,
                           target, {})
    mms = [f for gv, f in fused.functions_items() if "matmul" in gv.name_hint]
    assert len(mms) == 1
    assert S.broadcasts_an_input(tvm.IRModule({"main": mms[0]}))
    assert not S.weights_shared_across_height(tvm.IRModule({"main": mms[0]}))


def test_an_input_quantized_into_nhwc_is_one_inlined_pass_parallel_over_rows():
    """The first kernel of a quantized CNN (quantize, pad 3 channels, NCHW -> NHWC): every step
    inlined into one block, parallel over (n, h), the channel loop unrolled; the same artifact
    output as before. Row-wise scheduling computed the seven steps per pixel into seven buffers."""
    import numpy as np
    from onnx import TensorProto

    from onnxpress.backends import ort
    from onnxpress.backends.tvm.compiler import lower_to_fused
    from onnxpress.backends.tvm.frontend import to_relax
    from tests.backends.test_tvm_int8 import QDQ, _vi

    b = QDQ(seed=1)
    x, _ = b.q("x", 0.02, 128)
    w, ws = b.weight((16, 3, 3, 3), qmax=63)
    y, _ = b.q(b.node("Relu", [b.node("Conv", [x, w, b.bias(16, 0.02, ws)], pads=[1] * 4, strides=[2, 2])]), 0.05, 0)
    model = b.model([_vi("x", TensorProto.FLOAT, [1, 3, 32, 32])], [_vi(y, TensorProto.FLOAT, [1, 16, 16, 16])])
    resolved = resolve_target("x86")
    target = resolved.tvm_target()
    fused = lower_to_fused(to_relax(model, {"x": {"shape": [1, 3, 32, 32], "dtype": "float32"}},
                                    integer=True, decisions=[], target=target), resolved, target)
    gv = next(g for g in fused.functions if "pad_transpose" in g.name_hint)
    sch = S.default_schedule(fused[gv], target)
    text = sch.mod["main"].script()
    blocks = text.count('T.sblock("') - text.count('T.sblock("root")')
    assert blocks == 1 and "T.parallel(T.int64(34))" in text and "T.unroll(" in text, text
    # and the whole model, with this kernel in it, still matches onnxruntime's reference
    import tempfile

    from onnxpress.backends import tvm as ox_tvm

    with tempfile.TemporaryDirectory() as tmp:
        art = ox_tvm.compile(model, "x86", output_dir=f"{tmp}/a", progress=False)
        feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)}
        ref = ort.run(model, feeds, optimization="disable")
        got = art.run(feeds)
        for k in ref:
            np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=0.05 + 1e-6)


def test_a_mean_followed_by_its_quantize_is_one_vector_reduction():
    """A global mean fused with the quantize after it (divide by the count, scale, round, add,
    clamp, cast: six elementwise blocks) gets the reduce-outer schedule, the chain inlined into
    one consumer: vectorised over channels and parallel. Left to the generic space, efficientnet's
    int8 squeeze-excite means took 10x fp32's plain means. The model still matches onnxruntime."""
    import tempfile

    import numpy as np
    from onnx import TensorProto

    from onnxpress.backends import ort
    from onnxpress.backends import tvm as ox_tvm
    from onnxpress.backends.tvm.compiler import lower_to_fused
    from onnxpress.backends.tvm.frontend import to_relax
    from tests.backends.test_tvm_int8 import QDQ, _vi

    b = QDQ(seed=2)
    pooled = b.node("GlobalAveragePool", ["x"])
    y, _ = b.q(pooled, 0.01, 128)
    model = b.model([_vi("x", TensorProto.FLOAT, [1, 64, 28, 28])], [_vi(y, TensorProto.FLOAT, [1, 64, 1, 1])])
    resolved = resolve_target("x86")
    target = resolved.tvm_target()
    fused = lower_to_fused(to_relax(model, {"x": {"shape": [1, 64, 28, 28], "dtype": "float32"}},
                                    integer=True, decisions=[], target=target), resolved, target)
    gv = next(g for g in fused.functions if "mean" in g.name_hint and "round" in g.name_hint)
    sch = S.default_schedule(fused[gv], target)
    text = sch.mod["main"].script()
    blocks = text.count('T.sblock("') - text.count('T.sblock("root")')
    # the reduction, its init (decomposed) and one consumer
    assert blocks == 3 and "T.parallel(" in text and "T.vectorized(" in text, text
    x = np.random.default_rng(0).standard_normal((1, 64, 28, 28)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        art = ox_tvm.compile(model, "x86", output_dir=f"{tmp}/a", progress=False)
        got = art.run({"x": x})[y]
    ref = ort.run(model, {"x": x}, optimization="disable")[y]
    assert np.abs(got - ref).max() <= 0.01 + 1e-6      # at most one quantization step


@pytest.mark.parametrize("shape, kind, factored", [
    ((197, 192), "layer_norm", True),       # ViT-tiny's layer norms: 12 vectors a row
    ((12, 128, 128), "softmax", True),      # MiniLM's attention probabilities
    ((3, 197, 197), "softmax", False),      # ViT's: 197 is no whole number of vectors
])
def test_row_reductions_run_in_vector_lanes_where_the_row_is_whole_vectors(shape, kind, factored):
    """Softmax and layer norm reduce along the row (max, sum, mean). Where the row is a whole
    number of vectors the reduction runs `lanes` partial results in one vector accumulator
    (rfactor), then reduces across it; a scalar chain waits on each add's latency (ViT-tiny's
    layer norms took 2.6 ms of 30 at 1 thread, onnxruntime's 1.1). Other rows keep the scalar
    chain. Either way the kernel computes what numpy does."""
    import numpy as np
    import tvm
    from tvm import te, topi

    x = te.placeholder(shape, "float32", name="x")
    args = [x]
    if kind == "softmax":
        y = topi.nn.fast_softmax(x, axis=-1)
    else:
        g = te.placeholder(shape[-1:], "float32", name="g")
        b = te.placeholder(shape[-1:], "float32", name="b")
        y = topi.nn.layer_norm(x, g, b, axis=[-1], epsilon=1e-5)
        args += [g, b]
    sch = S.rowwise_schedule(tvm.IRModule({"main": te.create_prim_func([*args, y])}), 16)
    text = sch.mod["main"].script()
    assert ("_rf" in text) == factored, text
    if factored:       # each step: one 16-lane vector of the row into the vector accumulator
        assert "T.vectorized(16)" in text.split('_rf")')[0][-120:], text
    lib = tvm.compile(sch.mod, target=tvm.target.Target("llvm"))
    lib = lib.jit() if hasattr(lib, "jit") else lib
    rng = np.random.default_rng(0)
    data = [rng.standard_normal([int(d) for d in a.shape]).astype(np.float32) for a in args]
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros(shape, np.float32), dev)
    lib["main"](*[tvm.runtime.tensor(d, dev) for d in data], out)
    v = data[0]
    if kind == "softmax":
        e = np.exp(v - v.max(-1, keepdims=True))
        ref = e / e.sum(-1, keepdims=True)
    else:
        ref = (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True) + 1e-5) * data[1] + data[2]
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-5)


def test_a_softmax_over_rows_of_no_whole_vectors_is_padded_to_whole_vectors(tmp_path):
    """ViT's 197-token softmax: the row is padded with the lowest float to whole vectors (its
    exp is 0), so max and sum run in vector lanes, and the padding is sliced off. The kernel is
    one PrimFunc whose reductions are factored, and the model still matches onnxruntime."""
    import numpy as np
    from onnx import TensorProto, helper

    from onnxpress.backends import ort
    from onnxpress.backends import tvm as ox_tvm
    from onnxpress.backends.tvm.compiler import lower_to_fused
    from onnxpress.backends.tvm.frontend import to_relax

    shape = [1, 3, 37, 37]          # 37: no whole number of vectors on any x86 or NEON target
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "s"], ["xs"]), helper.make_node("Softmax", ["xs"], ["y"], axis=-1)],
        "softmax", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        [helper.make_tensor("s", TensorProto.FLOAT, [], [0.125])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    resolved = resolve_target("x86")
    target = resolved.tvm_target()
    fused = lower_to_fused(to_relax(model, {"x": {"shape": shape, "dtype": "float32"}}, target=target),
                           resolved, target)
    names = [gv.name_hint for gv in fused.functions]
    padded = [gv for gv in fused.functions if "fast_softmax_padded" in gv.name_hint]
    assert padded, names
    sch = S.default_schedule(fused[padded[0]], target)
    assert "_rf" in sch.mod["main"].script()
    art = ox_tvm.compile(model, "x86", output_dir=tmp_path / "a", progress=False)
    feeds = {"x": 8 * np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    np.testing.assert_allclose(art.run(feeds)["y"], ort.run(model, feeds)["y"], rtol=1e-4, atol=1e-6)
