"""prune: structured (channel groups) and unstructured/N:M pruning on the digits CNN and timm models;
distillation recovering the accuracy it costs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxpress import passes, stats, zoo
from onnxpress.backends import ort
from onnxpress.errors import PassOptionError
from onnxpress.passes.context import PassContext
from onnxpress.passes.prune.groups import channel_groups
from onnxpress.passes.prune.structured import (
    apply_keep,
    choose_keep,
    group_scores,
    kept_positions,
)


@pytest.fixture(scope="module")
def digits_train_calib(digits):
    """Unlabeled training images (the test split is never seen), in batches of 64."""
    X = digits.train[0]
    return [{"input": X[i:i + 64]} for i in range(0, len(X), 64)]


@pytest.fixture(scope="module")
def base_accuracy(digits_cnn_path, digits):
    return zoo.accuracy(onnx.load(digits_cnn_path), *digits.test)


def _inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_structured_50_shrinks_digits_cnn_and_distill_recovers(digits_cnn_path, digits,
                                                                digits_train_calib, base_accuracy):
    pytest.importorskip("torch")
    model = onnx.load(digits_cnn_path)
    result = passes.run(model, "prune:sparsity=0.5,structured=true,distill",
                        calib=digits_train_calib)
    pruned_only = passes.apply(model, "prune:sparsity=0.5,structured=true")
    out = result.model
    onnx.checker.check_model(out)
    fig = result.reports[0].figures
    s0, s1 = stats.model_stats(model), stats.model_stats(out)
    assert s1.macs <= 0.55 * s0.macs and fig["macs_ratio"] <= 0.55
    assert s1.params <= 0.55 * s0.params and fig["params_ratio"] <= 0.55
    assert fig["per_group"] == {"/features/features.0/Conv": "8/16", "/features/features.3/Conv": "16/32",
                                "/classifier/classifier.1/Gemm": "32/64"}
    assert "/classifier/classifier.3/Gemm" in fig["frozen_groups"]  # feeds the graph output
    X, y = digits.test
    assert ort.run(out, {"input": X})["logits"].shape == (len(X), 10)
    assert [o.name for o in out.graph.output] == ["logits"]
    assert dict((p.key, p.value) for p in out.metadata_props)["onnxpress.zoo"] == "digits_cnn"
    before = zoo.accuracy(pruned_only, X, y)
    after = zoo.accuracy(out, X, y)
    assert before < base_accuracy - 0.2, (before, base_accuracy)  # visibly lost
    assert after >= base_accuracy - 0.01, (after, base_accuracy)  # within 1 point
    # the distilled model has the pruned structure: same nodes, same initializer shapes
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in pruned_only.graph.node]
    assert {k: v.shape for k, v in _inits(out).items()} == \
        {k: v.shape for k, v in _inits(pruned_only).items()}
    dist = result.reports[1].figures
    assert dist["loss_after"] < 0.1 * dist["loss_before"]


def test_unstructured_80_global_and_distill(digits_cnn_path, digits, digits_train_calib,
                                            base_accuracy):
    pytest.importorskip("torch")
    model = onnx.load(digits_cnn_path)
    result = passes.run(model, "prune:sparsity=0.8,distill:epochs=20", calib=digits_train_calib)
    fig = result.reports[0].figures
    assert fig["mode"] == "unstructured" and fig["scope"] == "global"
    assert abs(fig["sparsity"] - 0.8) < 1e-3
    assert set(fig["per_layer"]) == {n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm")}
    assert fig["sparse_weight_bytes"] < 0.35 * fig["dense_weight_bytes"]
    assert fig["zipped_bytes_after"] < 0.4 * fig["zipped_bytes_before"]
    out = result.model
    # distillation kept every pruned weight at zero
    w0 = _inits(passes.apply(model, "prune:sparsity=0.8"))
    w1 = _inits(out)
    for name, w in w0.items():
        if w.ndim >= 2:
            assert np.all(w1[name][w == 0] == 0), name
    zeros = sum(int((w == 0).sum()) for w in w1.values() if w.ndim >= 2)
    total = sum(w.size for w in w1.values() if w.ndim >= 2)
    assert zeros / total >= 0.8 - 1e-3
    acc = zoo.accuracy(out, *digits.test)
    assert acc >= base_accuracy - 0.01, (acc, base_accuracy)


def test_unstructured_per_layer_scope(digits_cnn_path):
    model = onnx.load(digits_cnn_path)
    fig = passes.run(model, "prune:0.6,scope=layer").reports[0].figures
    assert all(abs(s - 0.6) < 0.01 for s in fig["per_layer"].values()), fig["per_layer"]


def test_nm_2_4(digits_cnn_path):
    model = onnx.load(digits_cnn_path)
    result = passes.run(model, "prune:nm=2:4")
    fig = result.reports[0].figures
    # the first conv reads 1x3x3 = 9 weights per filter: not a multiple of 4, left dense
    assert fig["skipped_layers"] == ["/features/features.0/Conv"]
    w = _inits(result.model)
    fc1 = w["classifier.1.weight"]  # [64, 512], transB=1: groups of 4 along the 512 inputs
    assert (np.count_nonzero(fc1.reshape(64, 128, 4), axis=-1) <= 2).all()
    conv2 = w["onnx::Conv_34"].reshape(32, -1)  # [32, 16*3*3]
    assert (np.count_nonzero(conv2.reshape(32, -1, 4), axis=-1) <= 2).all()
    assert abs(fig["per_layer"]["/classifier/classifier.1/Gemm"] - 0.5) < 1e-6


def test_activation_criterion_needs_and_uses_calibration(digits_cnn_path, digits_train_calib):
    from onnxpress.errors import CalibrationError

    model = onnx.load(digits_cnn_path)
    with pytest.raises(CalibrationError):
        passes.apply(model, "prune:0.5,structured=true,criterion=activation")
    a = passes.apply(model, "prune:0.5,structured=true,criterion=activation", calib=digits_train_calib)
    b = passes.apply(model, "prune:0.5,structured=true")
    assert stats.model_stats(a).macs == stats.model_stats(b).macs
    assert not np.array_equal(_inits(a)["onnx::Conv_34"], _inits(b)["onnx::Conv_34"])


def test_bad_options_name_the_option(digits_cnn_path):
    model = onnx.load(digits_cnn_path)
    with pytest.raises(PassOptionError, match="nm"):
        passes.apply(model, "prune:nm=4:2")
    with pytest.raises(PassOptionError, match="structured"):
        passes.apply(model, "prune:structured=true,nm=2:4")
    with pytest.raises(PassOptionError, match="no channel group: nope"):
        passes.apply(model, "prune:structured=true,exclude=nope")
    with pytest.raises(PassOptionError, match="sparsity"):
        passes.apply(model, "prune:1.5")


def test_exclude_keeps_a_group(digits_cnn_path):
    model = onnx.load(digits_cnn_path)
    out = passes.run(model, "prune:0.5,structured=true,exclude=/features/features.0/Conv")
    assert out.reports[0].figures["per_group"]["/features/features.0/Conv"] == "16/16"


def test_channel_groups_is_a_cached_analysis(digits_cnn_path):
    model = onnx.load(digits_cnn_path)
    ctx = PassContext()
    cg = ctx.analysis("channel_groups", model)
    assert ctx.analysis("channel_groups", model) is cg
    assert [g.name for g in cg.prunable()] == ["/features/features.0/Conv", "/features/features.3/Conv",
                                               "/classifier/classifier.1/Gemm"]
    # Flatten into the Gemm: each conv2 channel owns 4*4 = 16 consecutive Gemm columns
    flat = cg.layouts["/classifier/classifier.0/Flatten_output_0"]
    assert flat.inner == 16 and flat.size == 512


def _masked_equivalent(model: onnx.ModelProto, cg, keep) -> onnx.ModelProto:
    """The original model with every pruned channel's readers (sink weights) zeroed: for graphs
    without cross-channel normalisation it must compute exactly what the pruned model does."""
    masked = onnx.ModelProto()
    masked.CopyFrom(model)
    nodes = {n.name: n for n in masked.graph.node}
    inits = {t.name: t for t in masked.graph.initializer}
    for fx in cg.fixups:
        if fx.kind != "in":
            continue
        name = nodes[fx.node].input[1]
        w = numpy_helper.to_array(inits[name]).copy()
        pos = kept_positions(fx.layout, keep)
        drop = np.setdiff1d(np.arange(w.shape[fx.axis]), pos)
        idx = [slice(None)] * w.ndim
        idx[fx.axis] = drop
        w[tuple(idx)] = 0
        inits[name].CopyFrom(numpy_helper.from_array(w, name))
    return masked


TIMM = ["resnet18", "efficientnet_b0", "convnext_atto", "mobilenetv3_small_100"]


@pytest.mark.slow
@pytest.mark.parametrize("name", TIMM)
def test_timm_structured_30(timm_path, name):
    """Valid, same output shape, fewer MACs/params, faster; groups right for residual adds,
    depthwise convs and squeeze-excite gates."""
    model = onnx.load(timm_path(name))
    cg = channel_groups(model)
    scores = group_scores(model, cg, "l2")
    # round_to=8 as the pass does by default (onnxruntime's NCHWc channel blocks)
    keep = choose_keep(cg, scores, {g.id: 0.3 for g in cg.prunable()}, round_to=8)
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    apply_keep(pruned, cg, keep)
    onnx.checker.check_model(pruned, full_check=True)
    x = zoo.photo_batch()[:1]
    ref = ort.run(model, {"input": x})["output"]
    got = ort.run(pruned, {"input": x})["output"]
    assert got.shape == ref.shape == (1, 1000)
    s0, s1 = stats.model_stats(model), stats.model_stats(pruned)
    assert s1.macs < 0.75 * s0.macs and s1.params < 0.8 * s0.params, (s1.macs / s0.macs, s1.params / s0.params)
    assert len(keep) >= 12 and len(cg.prunable()) >= 12
    # (the latency this buys is measured side by side in bench/bench_prune.py, not asserted here:
    #  a timing assert in a test flakes on a shared machine)

    by_source = {src: g for g in cg.groups.values() for src in g.sources}
    nodes = {n.name: n for n in model.graph.node}
    # depthwise convs join the group of the channels they read (no group of their own) and
    # their `group` attribute follows the kept channel count
    for n in model.graph.node:
        if n.op_type == "Conv" and next(a.i for a in n.attribute if a.name == "group") > 1:
            assert n.name not in by_source
            pn = next(p for p in pruned.graph.node if p.name == n.name)
            g_attr = next(a.i for a in pn.attribute if a.name == "group")
            w = next(t for t in pruned.graph.initializer if t.name == pn.input[1])
            assert g_attr == w.dims[0] and w.dims[1] == 1
    # residual adds: both operands' sources are in one group
    for n in model.graph.node:
        if n.op_type == "Add" and all(i in cg.layouts for i in n.input):
            ga = {gid for gid, _ in cg.layouts[n.input[0]].segments}
            gb = {gid for gid, _ in cg.layouts[n.input[1]].segments}
            assert ga == gb, n.name
    if name == "resnet18":
        stem = by_source["/conv1/Conv"]
        assert set(stem.sources) == {"/conv1/Conv", "/layer1/layer1.0/conv2/Conv",
                                     "/layer1/layer1.1/conv2/Conv"}
        l2 = by_source["/layer2/layer2.0/downsample/downsample.0/Conv"]
        assert set(l2.sources) == {"/layer2/layer2.0/downsample/downsample.0/Conv",
                                   "/layer2/layer2.0/conv2/Conv", "/layer2/layer2.1/conv2/Conv"}
    if name in ("efficientnet_b0", "mobilenetv3_small_100"):
        # squeeze-excite: the expand conv's gate multiplies the depthwise output -> same group
        se = [s for s in by_source if s.endswith("se/conv_expand/Conv")]
        assert se and all(len(by_source[s].sources) >= 2 for s in se)
    if name == "convnext_atto":
        assert nodes  # LayerNorm over the channel axis shrinks with the group
        stage2 = by_source["/stages/stages.2/blocks/blocks.0/mlp/fc2/Conv"]
        assert len(stage2.sources) == 7  # downsample conv + 6 blocks' fc2
    else:
        # without cross-channel normalisation, removing channels == zeroing what reads them
        masked = _masked_equivalent(model, cg, keep)
        want = ort.run(masked, {"input": x})["output"]
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * float(np.abs(want).max()))


def _synthetic_model() -> onnx.ModelProto:
    """BatchNorm, Concat of two prunable convs, ConvTranspose, a grouped (not depthwise) conv,
    and a Reshape with an explicit C*H*W constant into a Gemm: every propagation rule at once."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)

    def init(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, name)

    inits = [init("wa", 8, 3, 3, 3), init("ba", 8), init("wb", 8, 8, 3, 3), init("wc", 6, 8, 4, 4),
             init("wt", 16, 8, 2, 2), init("bt", 8), init("wg", 8, 4, 3, 3),
             init("g1", 5, 8), init("g2", 5, 96), init("gb", 5),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), "bn_s"),
             init("bn_b", 8), init("bn_m", 8),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), "bn_v"),
             numpy_helper.from_array(np.array([1, 96], np.int64), "shape96"),
             numpy_helper.from_array(np.array([1, 8], np.int64), "shape8")]
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["a", "bn_s", "bn_b", "bn_m", "bn_v"], ["a_bn"], name="bn"),
        helper.make_node("Relu", ["a_bn"], ["a_r"], name="relu_a"),
        helper.make_node("Conv", ["a_r", "wb"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["a_r", "b"], ["cat"], name="cat", axis=1),
        helper.make_node("ConvTranspose", ["cat", "wt", "bt"], ["up"], name="up", strides=[2, 2]),
        helper.make_node("Relu", ["up"], ["up_r"], name="relu_up"),
        helper.make_node("Conv", ["up_r", "wg"], ["g"], name="grouped", group=2, pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["g"], ["gp"], name="gap"),
        helper.make_node("Reshape", ["gp", "shape8"], ["gf"], name="flat8"),
        helper.make_node("Gemm", ["gf", "g1"], ["y1"], name="fc1", transB=1),
        helper.make_node("Conv", ["a_r", "wc"], ["c"], name="conv_c", strides=[4, 4]),
        helper.make_node("Relu", ["c"], ["c_r"], name="relu_c"),
        helper.make_node("Reshape", ["c_r", "shape96"], ["cf"], name="flat96"),
        helper.make_node("Gemm", ["cf", "g2", "gb"], ["y2"], name="fc2", transB=1),
        helper.make_node("Add", ["y1", "y2"], ["y"], name="sum"),
    ]
    graph = helper.make_graph(nodes, "synthetic", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def test_synthetic_concat_convtranspose_grouped_reshape():
    model = _synthetic_model()
    cg = channel_groups(model)
    groups = cg.by_name()
    assert [g.name for g in cg.prunable()] == ["conv_a", "conv_b", "grouped", "conv_c"]
    assert "grouped Conv 'grouped'" in groups["up"].frozen  # its input channels stay
    assert groups["grouped"].blocks == 2
    assert cg.layouts["cat"].segments == [(groups["conv_a"].id, 8), (groups["conv_b"].id, 8)]
    keep = choose_keep(cg, group_scores(model, cg, "l2"), {g.id: 0.5 for g in cg.prunable()})
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    apply_keep(pruned, cg, keep)
    onnx.checker.check_model(pruned, full_check=True)
    w = _inits(pruned)
    assert w["wa"].shape == (4, 3, 3, 3) and w["bn_s"].shape == (4,) and w["wb"].shape == (4, 4, 3, 3)
    assert w["wt"].shape == (8, 8, 2, 2)  # ConvTranspose reads 4 + 4 channels of the Concat
    assert w["wc"].shape == (3, 4, 4, 4) and w["g2"].shape == (5, 48)
    assert w["shape96"].tolist() == [1, 48] and w["shape8"].tolist() == [1, 4]
    # grouped conv: 2 of 4 filters kept in each of its 2 blocks; group attribute unchanged
    assert w["wg"].shape == (4, 4, 3, 3) and w["g1"].shape == (5, 4)
    g_keep = keep[groups["grouped"].id]
    assert (g_keep < 4).sum() == 2 and (g_keep >= 4).sum() == 2
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    got = ort.run(pruned, {"x": x})["y"]
    want = ort.run(_masked_equivalent(model, cg, keep), {"x": x})["y"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_structured_prune_that_removes_nothing_fails_and_names_the_blockers():
    """Asked for 30% and able to prune nothing (here every channel reaches a graph output), the
    pass fails naming what blocks each group, instead of returning the model unchanged in
    silence; allow_partial=true accepts it with a warning."""
    import warnings

    from onnx import TensorProto, helper, numpy_helper

    from onnxpress.errors import PassError

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])],
        [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(PassError, match="removed no channel.*graph output"):
        passes.apply(model, "prune:sparsity=0.3,structured=true")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = passes.run(model, "prune:sparsity=0.3,structured=true,allow_partial=true")
    assert res.reports[0].warnings and "removed no channel" in res.reports[0].warnings[0]
    assert any("removed no channel" in str(w.message) for w in caught)


def test_structured_prune_names_the_node_that_keeps_a_group_whole():
    """A max over the channel axis (a CBAM-style spatial map) keeps the first conv's channels
    whole; the second conv's group still prunes. The user asked for 50% of every group: a warning
    says which group stayed whole and why, and how much the model really lost."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = {n: numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
         for n, s in (("wa", (16, 3, 3, 3)), ("wb", (16, 16, 3, 3)), ("wc", (4, 16, 1, 1)))}
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
             helper.make_node("ReduceMax", ["a"], ["mu"], name="channel_max", axes=[1]),
             helper.make_node("Sub", ["a", "mu"], ["centred"], name="centre"),
             helper.make_node("Conv", ["centred", "wb"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["b"], ["rb"]),
             helper.make_node("Conv", ["rb", "wc"], ["y"], name="conv_c")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
                              list(w.values()))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    res = passes.run(model, "prune:sparsity=0.5,structured=true")
    fig = res.reports[0].figures
    assert fig["per_group"] == {"conv_b": "8/16"}
    assert "channel_max" in fig["frozen_groups"]["conv_a"]
    warned = [m for m in res.reports[0].warnings if "kept whole" in m]
    assert len(warned) == 1 and "conv_a" in warned[0] and "channel_max" in warned[0], res.reports[0].warnings
    assert "not 50%" in warned[0]


@pytest.mark.parametrize("mean", ["ReduceMean", "ReduceSum/Div", "ReduceSum*1/N"])
def test_structured_prune_goes_through_a_written_out_layernorm(mean):
    """A LayerNorm written out as statistics over the channel axis (as JAX and TF converters and
    hand-written modules export it) no longer blocks its group: the MatMul's neurons prune, the
    statistics are recomputed over the kept channels (a sum's divisor N becomes the kept count),
    and the result is exactly LayerNormalization over the kept channels."""
    from onnx import TensorProto, helper, numpy_helper

    from onnxpress.backends import ort

    rng = np.random.default_rng(0)
    c = 16
    wa = rng.standard_normal((6, c)).astype(np.float32)
    wc = rng.standard_normal((c, 4)).astype(np.float32)
    gamma = (rng.random(c) + 0.5).astype(np.float32)
    inits = [numpy_helper.from_array(v, n) for n, v in (("wa", wa), ("wc", wc), ("gamma", gamma))]
    inits += [numpy_helper.from_array(np.array(v, np.float32), n)
              for n, v in (("n", float(c)), ("inv_n", 1.0 / c), ("eps", 1e-5))]
    nodes = [helper.make_node("MatMul", ["x", "wa"], ["a"], name="fc_a")]

    def channel_mean(src: str, out: str, tag: str) -> list:
        if mean == "ReduceMean":
            return [helper.make_node("ReduceMean", [src], [out], name=f"mean_{tag}", axes=[-1])]
        s = helper.make_node("ReduceSum", [src, "axes"], [out + "_sum"], name=f"sum_{tag}")
        if mean == "ReduceSum/Div":
            return [s, helper.make_node("Div", [out + "_sum", "n"], [out], name=f"div_{tag}")]
        return [s, helper.make_node("Mul", ["inv_n", out + "_sum"], [out], name=f"mul_{tag}")]

    inits.append(numpy_helper.from_array(np.array([-1], np.int64), "axes"))
    nodes += channel_mean("a", "mu", "mu")
    nodes += [helper.make_node("Sub", ["a", "mu"], ["d"]), helper.make_node("Mul", ["d", "d"], ["d2"])]
    nodes += channel_mean("d2", "var", "var")
    nodes += [helper.make_node("Add", ["var", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["sd"]),
              helper.make_node("Div", ["d", "sd"], ["nrm"]), helper.make_node("Mul", ["nrm", "gamma"], ["g"]),
              helper.make_node("MatMul", ["g", "wc"], ["y"], name="fc_c")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    res = passes.run(model, "prune:sparsity=0.5,structured=true")
    assert res.reports[0].figures["per_group"] == {"fc_a": "8/16"}
    assert not [m for m in res.reports[0].warnings if "kept whole" in m]
    pw = _inits(res.model)
    keep = [int(np.flatnonzero((wa == pw["wa"][:, [j]]).all(axis=0))[0]) for j in range(8)]
    # the reference: LayerNormalization over the kept channels, the same weights sliced
    ref = helper.make_graph(
        [helper.make_node("MatMul", ["x", "wa"], ["a"]),
         helper.make_node("LayerNormalization", ["a", "gamma"], ["g"], axis=-1, epsilon=1e-5),
         helper.make_node("MatMul", ["g", "wc"], ["y"])], "ref", graph.input, graph.output,
        [numpy_helper.from_array(v, n) for n, v in
         (("wa", wa[:, keep]), ("gamma", gamma[keep]), ("wc", wc[keep]))])
    x = rng.standard_normal((1, 5, 6)).astype(np.float32)
    want = ort.run(helper.make_model(ref, opset_imports=[helper.make_opsetid("", 17)]), {"x": x})["y"]
    np.testing.assert_allclose(ort.run(res.model, {"x": x})["y"], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("step", ["prune", "prune:structured=true", "clip", "search:budget=0.7"])
def test_calibrated_passes_run_on_a_plain_export_whose_batch_is_fixed(step, digits):
    """torch.onnx.export fixes the batch dimension (x: [1, 1, 8, 8]); the calibration samples
    these passes score with must reach onnxruntime one at a time, not stacked into 64s."""
    model = onnx.load(zoo.plain_export("digits_cnn"))
    calib = [{"x": digits.train[0][i:i + 1]} for i in range(24)]
    res = passes.run(model, [step], calib=calib, progress=False)
    figures = res.reports[-1].figures
    assert -1.0 <= figures["min_cosine"] < 1.0, figures
    assert figures["rel_l2"] > 0, figures


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_structured_prune_after_fuse_equals_prune_before_it(dynamo):
    """`fuse` (target ort) writes com.microsoft.FusedConv for Conv+residual Add+Relu; the channel
    analysis reads it as the Conv and Add it replaced, so `fuse,prune` removes what
    `prune,fuse` does (it removed nothing: every FusedConv froze its channels)."""
    path = zoo.plain_export("resnet18", dynamo=dynamo)
    after = passes.run(str(path), "cleanup,fuse,prune:0.5,structured=true").model
    before = passes.run(str(path), "cleanup,prune:0.5,structured=true,fuse").model
    assert any(n.op_type == "FusedConv" for n in after.graph.node)
    p_after, p_before = stats.model_stats(after).params, stats.model_stats(before).params
    assert p_after == p_before < 0.3 * stats.model_stats(onnx.load(path)).params, (p_after, p_before)
    x = {"x": zoo.photo_batch()[:1]}
    np.testing.assert_allclose(ort.run(after, x)["y"], ort.run(before, x)["y"], rtol=1e-3, atol=1e-3)
