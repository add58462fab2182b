"""Cleanup passes on small graphs built here (one rule each), on subgraphs, and as properties:
never mutate the input, idempotent, outputs preserved."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxpress import passes
from onnxpress.backends import ort

F = TensorProto.FLOAT


def make(nodes, inputs, outputs, inits=(), opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(m)
    return m


def vi(name, shape, t=F):
    return helper.make_tensor_value_info(name, t, shape)


def const(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def check_same(a, b, feeds):
    r = ort.compare_outputs(ort.run(a, feeds, optimization="disable"),
                            ort.run(b, feeds, optimization="disable"), rtol=1e-6, atol=1e-7)
    assert r.ok, str(r)


def ops(m):
    return [n.op_type for n in m.graph.node]


X = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)


def test_simplify_removes_noops_and_keeps_output_names():
    m = make([
        helper.make_node("Identity", ["x"], ["a"]),
        helper.make_node("Dropout", ["a"], ["b"]),
        helper.make_node("Cast", ["b"], ["c"], to=F),
        helper.make_node("Transpose", ["c"], ["d"], perm=[0, 1, 2]),
        helper.make_node("Relu", ["d"], ["e"]),
        helper.make_node("Pad", ["e", "zeros"], ["f"]),
        helper.make_node("Reshape", ["f", "same"], ["g"]),
        helper.make_node("Slice", ["g", "s0", "s1"], ["h"]),
        helper.make_node("Concat", ["h"], ["y"], axis=0),
    ], [vi("x", [2, 3, 4])], [vi("y", [2, 3, 4])],
        [const("zeros", np.zeros(6, np.int64)), const("same", np.array([2, 3, 4], np.int64)),
         const("s0", np.array([0], np.int64)), const("s1", np.array([2**62], np.int64))])
    result = passes.run(m, ["simplify"])
    out = result.model
    assert ops(out) == ["Relu"]
    assert out.graph.node[0].output[0] == "y" and out.graph.output[0].name == "y"
    figs = result.reports[0].figures
    for rule in ("identity", "dropout", "noop_cast", "noop_transpose", "noop_pad", "noop_reshape",
                 "noop_slice", "single_concat"):
        assert figs.get(rule) == 1, (rule, figs)
    check_same(m, out, {"x": X})


def test_transpose_and_reshape_chains_collapse():
    m = make([
        helper.make_node("Transpose", ["x"], ["a"], perm=[1, 0, 2]),
        helper.make_node("Transpose", ["a"], ["b"], perm=[2, 0, 1]),
        helper.make_node("Reshape", ["b", "s1"], ["c"]),
        helper.make_node("Reshape", ["c", "s2"], ["y"]),
    ], [vi("x", [2, 3, 4])], [vi("y", [4, 6])],
        [const("s1", np.array([24], np.int64)), const("s2", np.array([4, -1], np.int64))])
    out = passes.apply(m, ["simplify"])
    assert ops(out) == ["Transpose", "Reshape"]
    check_same(m, out, {"x": X})


def test_reshape_chain_with_zero_is_left_alone():
    # 0 copies a dim from the *intermediate* shape: skipping the first Reshape would change it
    m = make([
        helper.make_node("Reshape", ["x", "s1"], ["c"]),
        helper.make_node("Reshape", ["c", "s2"], ["y"]),
    ], [vi("x", [2, 3, 4])], [vi("y", [6, 2, 2])],
        [const("s1", np.array([6, 4], np.int64)), const("s2", np.array([0, 2, -1], np.int64))])
    out = passes.apply(m, ["simplify"])
    assert ops(out) == ["Reshape", "Reshape"]
    check_same(m, out, {"x": X})


def test_squeeze_unsqueeze_pair_and_cse():
    m = make([
        helper.make_node("Unsqueeze", ["x", "ax"], ["u"]),
        helper.make_node("Squeeze", ["u", "ax"], ["s"]),
        helper.make_node("Exp", ["s"], ["e1"]),
        helper.make_node("Exp", ["s"], ["e2"]),
        helper.make_node("Add", ["e1", "e2"], ["y"]),
    ], [vi("x", [2, 3, 4])], [vi("y", [2, 3, 4])], [const("ax", np.array([1], np.int64))])
    result = passes.run(m, ["simplify"])
    assert ops(result.model) == ["Exp", "Add"]
    assert result.reports[0].figures["cse_node"] == 1
    check_same(m, result.model, {"x": X})


def test_fold_constants_shape_chain_and_size_cap():
    m = make([
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "i1"], ["d1"], axis=0),
        helper.make_node("Concat", ["d1", "m1"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["r"]),
        helper.make_node("Shape", ["x"], ["last"], start=-1),
        helper.make_node("ConstantOfShape", ["big"], ["ones"],
                         value=helper.make_tensor("v", F, [1], [1.0])),
        helper.make_node("ReduceSum", ["ones"], ["total"], keepdims=0),
        helper.make_node("Cast", ["last"], ["lastf"], to=F),
        helper.make_node("Add", ["total", "lastf"], ["k"]),
        helper.make_node("Mul", ["r", "k"], ["y"]),
    ], [vi("x", [2, 3, 4])], [vi("y", [3, 8])],
        [const("i1", np.array([1], np.int64)), const("m1", np.array([-1], np.int64)),
         const("big", np.array([512, 1024], np.int64))])
    result = passes.run(m, ["fold_constants", "dce"])
    out = result.model
    # shape math folded; the 2 MiB ConstantOfShape is not materialised (it would bloat the file)
    assert "Shape" not in ops(out) and "Concat" not in ops(out)
    assert "ConstantOfShape" in ops(out)
    assert out.ByteSize() <= m.ByteSize() + 256
    check_same(m, out, {"x": X})


def _if_model():
    then_g = helper.make_graph([
        helper.make_node("Identity", ["x"], ["t0"]),
        helper.make_node("Neg", ["t0"], ["then_out"]),
        helper.make_node("Sigmoid", ["x"], ["unused_in_branch"]),
    ], "then", [], [vi("then_out", [2, 3, 4])])
    else_g = helper.make_graph([
        helper.make_node("Shape", ["x"], ["es"]),
        helper.make_node("Reshape", ["x", "es"], ["else_out"]),
    ], "else", [], [vi("else_out", [2, 3, 4])])
    return make([
        helper.make_node("ReduceSum", ["x"], ["sum"], keepdims=0),
        helper.make_node("Greater", ["sum", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g),
        helper.make_node("Relu", ["x"], ["dead"]),
    ], [vi("x", [2, 3, 4])], [vi("y", [2, 3, 4])], [const("zero", np.array(0.0, np.float32))])


def test_subgraphs_are_cleaned_not_skipped():
    m = _if_model()
    out = passes.apply(m, ["fold_constants", "dce", "simplify"])
    if_node = next(n for n in out.graph.node if n.op_type == "If")
    branches = {a.name: [n.op_type for n in a.g.node] for a in if_node.attribute}
    assert branches["then_branch"] == ["Neg"], "Identity and the dead Sigmoid go inside the branch"
    assert branches["else_branch"] == ["Reshape"], "the Shape inside the branch is folded"
    assert "Relu" not in ops(out)
    for x in (X, -np.abs(X)):
        check_same(m, out, {"x": x})


def test_opset_conversion():
    m = make([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [2, 3, 4])], [vi("y", [2, 3, 4])],
             opset=13)
    result = passes.run(m, ["opset:17"])
    assert next(o.version for o in result.model.opset_import if o.domain == "") == 17
    assert result.reports[0].figures == {"converted": True, "opset_before": 13, "opset": 17}


# -- properties --------------------------------------------------------------------------------
UNARY = ["Relu", "Neg", "Identity", "Sigmoid", "Abs", "Exp"]


@st.composite
def random_graphs(draw):
    """Small random DAGs of unary/binary ops with redundancies cleanup should remove."""
    n = draw(st.integers(2, 12))
    names = ["x"]
    nodes = []
    for i in range(n):
        kind = draw(st.sampled_from(["unary", "binary", "transpose2", "reshape", "dup"]))
        a = draw(st.sampled_from(names))
        out = f"t{i}"
        if kind == "unary":
            nodes.append(helper.make_node(draw(st.sampled_from(UNARY)), [a], [out]))
        elif kind == "binary":
            b = draw(st.sampled_from(names))
            nodes.append(helper.make_node(draw(st.sampled_from(["Add", "Mul", "Sub"])), [a, b], [out]))
        elif kind == "transpose2":
            nodes.append(helper.make_node("Transpose", [a], [out + "_t"], perm=[2, 1, 0]))
            nodes.append(helper.make_node("Transpose", [out + "_t"], [out], perm=[2, 1, 0]))
        elif kind == "reshape":
            nodes.append(helper.make_node("Reshape", [a, "flat"], [out + "_r"]))
            nodes.append(helper.make_node("Reshape", [out + "_r", "shape"], [out]))
        else:
            nodes.append(helper.make_node("Exp", [a], [out]))
            nodes.append(helper.make_node("Exp", [a], [out + "_dup"]))
            names.append(out + "_dup")
        names.append(out)
    outputs = draw(st.lists(st.sampled_from(names[1:]), min_size=1, max_size=3, unique=True))
    return make(nodes, [vi("x", [2, 3, 4])], [vi(o, [2, 3, 4]) for o in outputs],
                [const("flat", np.array([24], np.int64)), const("shape", np.array([2, 3, 4], np.int64))])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_graphs())
def test_cleanup_properties(model):
    original = model.SerializeToString()
    pipeline = ["fold_constants", "dce", "simplify"]
    once = passes.apply(model, pipeline)
    assert model.SerializeToString() == original, "apply() must never mutate its input"
    twice = passes.run(once, pipeline)
    assert not any(r.modified for r in twice.reports), "a second cleanup must change nothing"
    assert len(once.graph.node) <= len(model.graph.node)
    assert [o.name for o in once.graph.output] == [o.name for o in model.graph.output]
    check_same(model, once, {"x": X})


_ = pytest


# -- IR-3 exports: weights listed as graph inputs ------------------------------------------------
@pytest.mark.parametrize("name", ["resnet18", "digits_cnn"])
def test_ir3_export_reaches_the_fresh_exports_node_count(name):
    """Exports before ONNX 1.3 list every weight as a graph input too: the pipeline makes them
    constants first, so cleanup+fuse folds BatchNorm and fuses Conv+Relu as on a fresh export,
    with outputs within 1e-4, and ends at most at onnxslim's node count."""
    import onnxslim

    from onnxpress import zoo

    legacy = onnx.load(zoo.plain_export(name, legacy=True))
    assert legacy.ir_version == 3 and len(legacy.graph.input) > 1
    fresh = onnx.load(zoo.plain_export(name))
    res = passes.run(legacy, "cleanup,fuse")
    assert res.reports[0].name == "constant_initializers"
    assert res.reports[0].figures["initializer_inputs_made_constant"] == len(legacy.graph.input) - 1
    want = len(passes.apply(fresh, "cleanup,fuse").graph.node)
    assert len(res.model.graph.node) == want
    slim_copy = onnx.ModelProto()
    slim_copy.CopyFrom(legacy)                  # (onnxslim edits the model it is given)
    assert len(res.model.graph.node) <= len(onnxslim.slim(slim_copy).graph.node)
    assert [i.name for i in res.model.graph.input] == ["x"]
    shape = [d.dim_value or 1 for d in legacy.graph.input[0].type.tensor_type.shape.dim]
    x = {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    np.testing.assert_allclose(ort.run(res.model, x)["y"], ort.run(legacy, x)["y"],
                               rtol=1e-4, atol=1e-4)
    # the user who does feed those tensors keeps them
    kept = passes.run(legacy, "cleanup", keep_initializer_inputs=True)
    assert len(kept.model.graph.input) == len(legacy.graph.input)
    assert all(r.name != "constant_initializers" for r in kept.reports)


def test_inspect_counts_weights_held_in_constant_nodes(capsys, monkeypatch):
    """Weights in Constant nodes (PaddlePaddle's exporter and others) count as weights and as each
    layer's parameters, and inspect names initializer inputs."""
    from onnxpress import model_stats

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    m = make([helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w")),
              helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
             [vi("x", [1, 3, 8, 8])], [vi("y", [1, 8, 6, 6])])
    st = model_stats(m)
    assert st.params == w.size and st.weight_bytes == w.nbytes
    assert st.layers[0].params == w.size and st.macs == 8 * 6 * 6 * 3 * 3 * 3
