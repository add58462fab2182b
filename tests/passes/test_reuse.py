"""The reuse pass: liveness, arena planning near the lower bound, the plan in metadata and its
checker, on random DAGs (hypothesis) and on real models (digits CNN, timm, MiniLM)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from onnxpress import passes
from onnxpress.backends import ort
from onnxpress.data import make_inputs
from onnxpress.errors import InvalidModelError, PassOptionError
from onnxpress.io import load, save
from onnxpress.passes.memory import (
    PLAN_KEY,
    MemoryPlanError,
    MemoryPlanWarning,
    graph_liveness,
    memory_greedy_order,
    plan_offsets,
    read_memory_plan,
    verify_memory_plan,
)
from onnxpress.passes.memory.planner import plan_dict

FLOAT = TensorProto.FLOAT


# -- random DAGs ------------------------------------------------------------------------------
@st.composite
def random_dags(draw):
    """A graph of random ops over random tensor sizes (sizes are given, not inferred)."""
    n_inputs = draw(st.integers(1, 3))
    sizes = {f"in{i}": draw(st.integers(0, 4096)) for i in range(n_inputs)}
    available = list(sizes)
    nodes = []
    for k in range(draw(st.integers(1, 30))):
        op = draw(st.sampled_from(["Relu", "Add", "Mul", "MatMul", "Concat", "Reshape", "Split",
                                   "Custom"]))
        n_in = 1 if op in ("Relu", "Reshape", "Split") else draw(st.integers(1, 3))
        ins = draw(st.lists(st.sampled_from(available), min_size=n_in, max_size=n_in))
        outs = [f"t{k}_{j}" for j in range(2 if op == "Split" else 1)]
        for o in outs:
            same = draw(st.booleans())  # same size as the first input: in-place candidates
            sizes[o] = sizes[ins[0]] if same else draw(st.integers(0, 1 << 16))
        nodes.append(helper.make_node(op, ins, outs, name=draw(st.sampled_from(["", f"n{k}"])),
                                      domain="" if op != "Custom" else "test.custom"))
        available += outs
    produced = [o for n in nodes for o in n.output]
    outputs = draw(st.lists(st.sampled_from(produced), min_size=1, max_size=3, unique=True))
    graph = helper.make_graph(
        nodes, "dag", [helper.make_tensor_value_info(f"in{i}", FLOAT, None)
                       for i in range(n_inputs)],
        [helper.make_tensor_value_info(o, FLOAT, None) for o in outputs])
    types = {name: (FLOAT, [size]) for name, size in sizes.items()}
    alignment = draw(st.sampled_from([1, 4, 64]))
    return graph, types, alignment


@settings(max_examples=150, deadline=None)
@given(random_dags())
def test_random_dag_plans_are_valid_and_between_bounds(case):
    graph, types, alignment = case
    for order in (None, memory_greedy_order(graph, {k: 4 * v[1][0] for k, v in types.items()})):
        for policy in ("oldest", "first"):
            lv = graph_liveness(graph, types, order, inplace_policy=policy)
            offsets = plan_offsets(lv, alignment=alignment)
            plan = json.loads(json.dumps(plan_dict(lv, offsets, alignment=alignment)))
            verify_memory_plan(plan)
            assert plan["lower_bound_bytes"] <= plan["arena_bytes"] <= plan["naive_bytes"]
            # the lower bound is the largest set alive at one step: recompute it by brute force
            steps = max(1, len(lv.order))
            live = [0] * steps
            for t in lv.tensors.values():
                for s in range(t.first, t.last + 1):
                    if not (t.inplace_of is None or s != t.first):
                        continue  # an in-place output shares its input's bytes at hand-over
                    live[s] += t.size
            assert plan["lower_bound_bytes"] == max(live)


def test_checker_rejects_overlap_naming_both_tensors():
    plan = {"arena_bytes": 100, "lower_bound_bytes": 100, "naive_bytes": 110, "order": ["a", "b"],
            "tensors": {"x": {"offset": 0, "size": 60, "first": 0, "last": 1},
                        "y": {"offset": 50, "size": 50, "first": 1, "last": 1}}}
    with pytest.raises(MemoryPlanError, match=r"'x'.*'y'.*step 1 \(node 'b'\)"):
        verify_memory_plan(plan)
    plan["tensors"]["y"].update(offset=60, size=40)
    plan["naive_bytes"] = 100
    verify_memory_plan(plan)  # disjoint bytes: valid
    plan["lower_bound_bytes"] = 90
    with pytest.raises(MemoryPlanError, match="lower_bound_bytes"):
        verify_memory_plan(plan)
    with pytest.raises(MemoryPlanError, match="no 'order'"):
        verify_memory_plan({"arena_bytes": 0, "lower_bound_bytes": 0, "naive_bytes": 0,
                            "tensors": {}})


# -- small hand-made graphs -------------------------------------------------------------------
def _chain_model() -> onnx.ModelProto:
    """x -> Conv -> a -> Relu -> b; two independent branches that a good order interleaves."""
    w = onnx.numpy_helper.from_array(np.random.default_rng(0).standard_normal(
        (8, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["c"], ["d"]),
             helper.make_node("Add", ["b", "d"], ["y"])]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info(
        "x", FLOAT, ["batch", 3, 16, 16])], [helper.make_tensor_value_info("y", FLOAT, ["batch", 8, 16, 16])],
        [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_unbound_dims_fail_with_the_input_and_dim_named():
    # strict: allow_unknown=false refuses what it cannot size, naming the input, dim and remedy
    with pytest.raises(PassOptionError, match=r"'x' axis 0 \(batch\).*reuse:batch=1"):
        passes.apply(_chain_model(), ["reuse:allow_unknown=false"])


def test_inplace_unnamed_nodes_and_order():
    out = passes.run(_chain_model(), ["reuse:batch=2"]).model
    plan = read_memory_plan(out)
    assert plan["order"] == [n.name for n in out.graph.node]
    assert all(n.name for n in out.graph.node) and len(set(plan["order"])) == 5
    t = plan["tensors"]
    assert t["b"]["inplace_of"] == "a" and t["b"]["offset"] == t["a"]["offset"]
    assert t["x"]["kind"] == "input" and t["y"]["kind"] == "output"
    # 2*8*16*16 floats = 16 KiB per activation
    assert t["a"]["size"] == 2 * 8 * 16 * 16 * 4 and t["x"]["size"] == 2 * 3 * 16 * 16 * 4
    verify_memory_plan(out)


def _branchy_model() -> onnx.ModelProto:
    """Two branches that each blow x up to 64 channels then reduce it; stored breadth first, so
    both 64-channel maps are alive at once until a depth-first order is chosen."""
    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(rng.standard_normal((64, 3, 3, 3)).astype(np.float32),
                                          f"w{i}") for i in range(2)]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["a"], pads=[1, 1, 1, 1], name="conv_a"),
             helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1], name="conv_c"),
             helper.make_node("GlobalAveragePool", ["a"], ["sa"], name="pool_a"),
             helper.make_node("GlobalAveragePool", ["c"], ["sc"], name="pool_c"),
             helper.make_node("Add", ["sa", "sc"], ["y"], name="add")]
    graph = helper.make_graph(
        nodes, "branchy", [helper.make_tensor_value_info("x", FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("y", FLOAT, [1, 64, 1, 1])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_memory_aware_order_is_written_into_the_graph():
    model = _branchy_model()
    out = passes.run(model, ["reuse"]).model
    plan = read_memory_plan(out)
    fmap = 64 * 32 * 32 * 4
    assert plan["orders_tried"]["stored"]["lower_bound_bytes"] == 2 * fmap + 3 * 32 * 32 * 4
    assert plan["reordered"] and plan["lower_bound_bytes"] < 1.1 * fmap + 3 * 32 * 32 * 4
    assert [n.name for n in out.graph.node] == plan["order"] == \
        ["conv_a", "pool_a", "conv_c", "pool_c", "add"]
    off = passes.run(model, ["reuse:reorder=false"]).model
    assert [n.name for n in off.graph.node] == [n.name for n in model.graph.node]
    feeds = {"x": np.random.default_rng(2).standard_normal((1, 3, 32, 32)).astype(np.float32)}
    np.testing.assert_array_equal(ort.run(model, feeds)["y"], ort.run(out, feeds)["y"])


def _if_model() -> onnx.ModelProto:
    """y = Relu(If(cond, then: Exp(x)*2 + x, else: Sigmoid(x))): a body reading an outer tensor."""
    two = helper.make_tensor("two", FLOAT, [], [2.0])
    then_g = helper.make_graph(
        [helper.make_node("Exp", ["h"], ["e"]),
         helper.make_node("Mul", ["e", "two"], ["m"]),
         helper.make_node("Add", ["m", "h"], ["then_out"])],
        "then", [], [helper.make_tensor_value_info("then_out", FLOAT, [4, 256])], [two])
    else_g = helper.make_graph(
        [helper.make_node("Sigmoid", ["h"], ["else_out"])],
        "else", [], [helper.make_tensor_value_info("else_out", FLOAT, [4, 256])])
    nodes = [helper.make_node("Neg", ["x"], ["h"]),
             helper.make_node("If", ["cond"], ["z"], then_branch=then_g, else_branch=else_g),
             helper.make_node("Relu", ["z"], ["y"])]
    graph = helper.make_graph(
        nodes, "with_if",
        [helper.make_tensor_value_info("x", FLOAT, [4, 256]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", FLOAT, [4, 256])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_subgraph_bodies_are_planned_and_outer_reads_keep_tensors_alive():
    model = _if_model()
    result = passes.run(model, ["reuse"])
    out = result.model
    plan = read_memory_plan(out)
    names = plan["order"]
    if_name = next(n.name for n in out.graph.node if n.op_type == "If")
    # h is read inside both bodies: it stays alive up to the If node
    assert plan["tensors"]["h"]["last"] == names.index(if_name)
    bodies = plan["subgraphs"][if_name]
    assert set(bodies) == {"then_branch", "else_branch"}
    # then-branch: e, m, then_out are 4 KiB each; e -> m -> then_out in place => one buffer
    assert bodies["then_branch"]["arena_bytes"] == 4096
    ws = plan["tensors"][f"{if_name}::body"]
    assert ws["kind"] == "workspace" and ws["size"] == 4096
    assert ws["first"] == ws["last"] == names.index(if_name)
    verify_memory_plan(out)
    for cond in (True, False):
        feeds = {"x": np.random.default_rng(1).standard_normal((4, 256)).astype(np.float32),
                 "cond": np.array(cond)}
        np.testing.assert_array_equal(ort.run(model, feeds)["y"], ort.run(out, feeds)["y"])


def _loop_model() -> onnx.ModelProto:
    """acc = x; 3 times: scan += [Relu(acc)]; acc = acc * 1.5 + x (x read from the outer scope)."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Mul", ["acc_in", "k"], ["m"]),
         helper.make_node("Add", ["m", "x"], ["acc_out"]),
         helper.make_node("Relu", ["acc_in"], ["scan"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", FLOAT, [4, 64])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", FLOAT, [4, 64]),
         helper.make_tensor_value_info("scan", FLOAT, [4, 64])],
        [helper.make_tensor("k", FLOAT, [], [1.5])])
    nodes = [helper.make_node("Neg", ["x0"], ["x"]),
             helper.make_node("Loop", ["trip", "", "x"], ["acc", "scans"], body=body),
             helper.make_node("Sigmoid", ["acc"], ["y"])]
    graph = helper.make_graph(
        nodes, "loop", [helper.make_tensor_value_info("x0", FLOAT, [4, 64])],
        [helper.make_tensor_value_info("y", FLOAT, [4, 64]),
         helper.make_tensor_value_info("scans", FLOAT, ["trips", 4, 64])],
        [helper.make_tensor("trip", TensorProto.INT64, [], [3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_loop_body_and_scan_outputs():
    model = _loop_model()
    out = passes.apply(model, ["reuse"])
    plan = read_memory_plan(out)
    t = plan["tensors"]
    assert t["scans"]["size"] == 3 * 4 * 64 * 4 and t["scans"]["kind"] == "output"
    assert t["x"]["last"] == plan["order"].index("Loop_1")  # read inside the body
    body = plan["subgraphs"]["Loop_1"]["body"]
    assert body["tensors"]["acc_out"]["inplace_of"] == "m"
    assert t["Loop_1::body"]["size"] == body["arena_bytes"]
    verify_memory_plan(out)
    tight = read_memory_plan(passes.apply(model, ["reuse:alignment=1"]))
    assert tight["tensors"]["Loop_1::body"]["size"] == \
        tight["subgraphs"]["Loop_1"]["body"]["arena_bytes"] <= body["arena_bytes"]
    feeds = {"x0": np.random.default_rng(4).standard_normal((4, 64)).astype(np.float32)}
    expected, actual = ort.run(model, feeds), ort.run(out, feeds)
    for k in expected:
        np.testing.assert_array_equal(expected[k], actual[k])


def test_stale_plan_is_detected(tmp_path):
    out = passes.apply(_chain_model(), ["reuse:batch=1"])
    nodes = list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend([nodes[2], nodes[3], nodes[0], nodes[1], nodes[4]])
    with pytest.raises(MemoryPlanError, match="stale"):
        verify_memory_plan(out)
    stripped = onnx.ModelProto()
    stripped.CopyFrom(out)
    del stripped.metadata_props[:]
    with pytest.raises(MemoryPlanError, match="no 'onnxpress.memory_plan'"):
        verify_memory_plan(stripped)


# -- real models ------------------------------------------------------------------------------
def _check_real(path, spec: str, shapes: dict, tmp_path, *, compare: bool) -> dict:
    model = load(path)
    result = passes.run(model, [spec])
    out = result.model
    figures = result.reports[0].figures
    plan = read_memory_plan(out)
    assert figures["memory_plan"] == plan
    assert plan["arena_bytes"] <= 1.05 * plan["lower_bound_bytes"]
    assert plan["arena_bytes"] <= 0.5 * plan["naive_bytes"]
    verify_memory_plan(out)
    # reordering never raises the peak nor the arena
    stored = plan["orders_tried"]["stored"]
    assert plan["lower_bound_bytes"] <= stored["lower_bound_bytes"]
    assert plan["arena_bytes"] <= stored["arena_bytes"]
    # the plan survives save/load and can be verified from the file alone
    dst = tmp_path / "planned.onnx"
    save(out, dst)
    again = load(dst)
    assert read_memory_plan(again) == plan
    verify_memory_plan(str(dst))
    assert [(p.key, p.value) for p in model.metadata_props] == \
        [(p.key, p.value) for p in again.metadata_props if p.key != PLAN_KEY]
    if compare:
        feeds = make_inputs(model, shapes=shapes, seed=3)
        expected, actual = ort.run(model, feeds), ort.run(out, feeds)
        assert expected.keys() == actual.keys()
        for k in expected:
            np.testing.assert_array_equal(expected[k], actual[k])
    return plan


def test_digits_cnn(digits_cnn_path, tmp_path, digits):
    plan = _check_real(digits_cnn_path, "reuse:batch=1", {"batch": 1}, tmp_path, compare=True)
    # input 1x1x8x8 floats; the peak is the second conv: its input (16 channels at 8x8, the
    # ReLU having run in place) and its output (32 channels at 8x8)
    assert plan["tensors"]["input"]["size"] == 256
    assert plan["lower_bound_bytes"] == 16 * 64 * 4 + 32 * 64 * 4 == plan["arena_bytes"]
    out = passes.apply(digits_cnn_path, ["reuse:batch=64"])
    from onnxpress import zoo

    X, y = digits.test
    assert zoo.accuracy(out, X, y) == zoo.accuracy(digits_cnn_path, X, y)


def test_resnet18(timm_path, tmp_path):
    plan = _check_real(timm_path("resnet18"), "reuse", {}, tmp_path, compare=True)
    # the first block's two 64x112x112 float maps (conv1 output, then its ReLU in place) and
    # the max-pool output: 3,211,264 + 802,816 bytes
    assert plan["lower_bound_bytes"] == 64 * 112 * 112 * 4 + 64 * 56 * 56 * 4
    assert plan["arena_bytes"] == plan["lower_bound_bytes"]


def test_minilm_batch1_seq128(minilm_path, tmp_path):
    plan = _check_real(minilm_path, "reuse:batch=1,seq=128", {"batch": 1, "seq": 128},
                       tmp_path, compare=True)
    assert plan["bindings"] == {"batch": 1, "seq": 128}
    # attention probabilities: 12 heads x 128 x 128 floats are alive at the peak
    assert any(plan["tensors"][n]["size"] == 12 * 128 * 128 * 4 for n in plan["peak"]["tensors"])


@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenetv3_small_100", "convnext_atto",
                                  "vit_tiny_patch16_224"])
def test_other_timm_models(timm_path, tmp_path, name):
    _check_real(timm_path(name), "reuse", {}, tmp_path, compare=True)


def test_shapes_from_context_and_liveness_analysis(digits_cnn_path):
    from onnxpress.passes.context import PassContext

    model = load(digits_cnn_path)
    ctx = PassContext(shapes={"input": [4, 1, 8, 8]}, progress=False)
    lv = ctx.analysis("liveness", model)
    assert lv.tensors["input"].size == 4 * 64 * 4
    assert lv.lower_bound_bytes > 0 and lv.order == [n.name or f"{n.op_type}_{i}"
                                                     for i, n in enumerate(model.graph.node)]
    result = passes.run(model, ["reuse"], shapes={"input": [4, 1, 8, 8]})
    assert read_memory_plan(result.model)["tensors"]["input"]["size"] == 4 * 64 * 4


def test_inspect_memory_cli(digits_cnn_path, capsys):
    from onnxpress.cli import main

    assert main(["inspect", str(digits_cnn_path), "--memory", "--top", "1"]) == 0
    text = capsys.readouterr().out
    for needle in ("activation memory", "weights", "activations, naive", "lower bound",
                   "planned arena", "largest live set"):
        assert needle in text


# -- what has no static size is left to the runtime ------------------------------------------
def _run_reuse(model: onnx.ModelProto, spec: str = "reuse") -> tuple[onnx.ModelProto, dict, list]:
    """Run `spec`; (model, figures, MemoryPlanWarning messages). The plan must verify and the
    outputs must be bit-identical on onnxruntime."""
    import warnings

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = passes.run(model, [spec])
    messages = [str(w.message) for w in record if isinstance(w.message, MemoryPlanWarning)]
    out = result.model
    verify_memory_plan(out)
    figures = result.reports[0].figures
    assert figures["memory_plan"] == read_memory_plan(out)
    return out, figures, messages


def _same_outputs(model: onnx.ModelProto, out: onnx.ModelProto, feeds: dict) -> None:
    expected, actual = ort.run(model, feeds), ort.run(out, feeds)
    assert expected.keys() == actual.keys()
    for k in expected:
        np.testing.assert_array_equal(expected[k], actual[k])


def _reasons(plan: dict) -> dict[str, str]:
    return {u["tensor"]: u["reason"] for u in plan["unplanned"]}


def test_unbound_dims_are_left_to_the_runtime_with_a_warning():
    model = _chain_model()
    out, figures, messages = _run_reuse(model)
    plan = figures["memory_plan"]
    # every activation follows x's batch dim: nothing has a static size, the plan is empty
    assert figures["tensors_planned"] == 0 and figures["tensors_unplanned"] == 6
    assert figures["arena_bytes"] == plan["lower_bound_bytes"] == 0 and plan["tensors"] == {}
    assert set(_reasons(plan).values()) == {"unbound_dim"}
    assert "'x' axis 0 (batch)" in plan["unplanned"][0]["detail"]
    assert len(messages) == 1
    assert "6 of 6 tensors are left to the runtime" in messages[0]
    assert "reuse:batch=1" in messages[0] and "the plan is empty" in plan["left_to_runtime"]
    _same_outputs(model, out, {"x": np.ones((2, 3, 16, 16), np.float32)})


def test_partly_bound_model_plans_the_static_part():
    """x is static, z has a dim nothing binds: x's branch is planned, z's left out."""
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Exp", ["a"], ["y"]),
             helper.make_node("Neg", ["z"], ["b"]), helper.make_node("Abs", ["b"], ["w"])]
    graph = helper.make_graph(
        nodes, "partial",
        [helper.make_tensor_value_info("x", FLOAT, [4, 8]),
         helper.make_tensor_value_info("z", FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", FLOAT, [4, 8]),
         helper.make_tensor_value_info("w", FLOAT, ["n"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out, figures, messages = _run_reuse(model)
    plan = figures["memory_plan"]
    assert set(plan["tensors"]) == {"x", "a", "y"}
    assert _reasons(plan) == {"z": "unbound_dim", "b": "unbound_dim", "w": "unbound_dim"}
    assert figures["tensors_planned"] == 3 and figures["tensors_unplanned"] == 3
    assert figures["arena_bytes"] == 2 * 4 * 8 * 4          # x and a (y in place over a)
    assert len(messages) == 1 and "'z' axis 0 (n)" in messages[0]
    # bound, everything is planned and nothing is said
    out2, figures2, messages2 = _run_reuse(model, "reuse:dims=n/16")
    assert figures2["tensors_unplanned"] == 0 and not messages2
    assert "left_to_runtime" not in figures2["memory_plan"]
    feeds = {"x": np.ones((4, 8), np.float32), "z": np.arange(5, dtype=np.float32)}
    _same_outputs(model, out, feeds)


def test_empty_dims_are_static():
    """A dim of size 0 (an empty tensor) is a size, not an unbound dim."""
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    graph = helper.make_graph(nodes, "empty", [helper.make_tensor_value_info("x", FLOAT, [2, 0])],
                              [helper.make_tensor_value_info("y", FLOAT, [2, 0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out, figures, messages = _run_reuse(model)
    assert figures["tensors_planned"] == 2 and figures["tensors_unplanned"] == 0 and not messages
    assert figures["memory_plan"]["tensors"]["x"]["size"] == 0


def test_string_tensors_are_left_to_the_runtime():
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Cast", ["r"], ["s"], to=TensorProto.STRING),
             helper.make_node("Cast", ["s"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "strings", [helper.make_tensor_value_info("x", FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", FLOAT, [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out, figures, messages = _run_reuse(model)
    plan = figures["memory_plan"]
    assert _reasons(plan) == {"s": "string"} and set(plan["tensors"]) == {"x", "r", "y"}
    assert figures["tensors_planned"] == 3 and figures["tensors_unplanned"] == 1
    assert figures["arena_bytes"] == 64 + 24     # x and r (24 bytes each) live at once, aligned
    assert len(messages) == 1 and "1 string" in messages[0]
    _same_outputs(model, out, {"x": np.arange(6, dtype=np.float32).reshape(2, 3) - 2})


def _sequence_model() -> onnx.ModelProto:
    """onnx's test_sequence_model1, which raised a raw ValueError: a sequence built with
    SequenceInsert and read back with SequenceAt at constant positions."""
    nodes = [helper.make_node("SequenceEmpty", [], ["seq0"], dtype=TensorProto.FLOAT),
             helper.make_node("SequenceInsert", ["seq0", "x"], ["seq1"]),
             helper.make_node("SequenceInsert", ["seq1", "y"], ["seq2"]),
             helper.make_node("SequenceInsert", ["seq2", "z", "pos"], ["seq3"]),
             helper.make_node("SequenceAt", ["seq3", "pos_at"], ["out"])]
    graph = helper.make_graph(
        nodes, "sequence",
        [helper.make_tensor_value_info("x", FLOAT, [2, 3, 4]),
         helper.make_tensor_value_info("y", FLOAT, [1, 3, 4]),
         helper.make_tensor_value_info("z", FLOAT, [3, 3, 4])],
        [helper.make_tensor_value_info("out", FLOAT, ["d0", "d1", "d2"])],
        [helper.make_tensor("pos", TensorProto.INT64, [], [-2]),
         helper.make_tensor("pos_at", TensorProto.INT64, [], [-1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])


def test_sequences_are_left_to_the_runtime():
    model = _sequence_model()
    out, figures, messages = _run_reuse(model)
    plan = figures["memory_plan"]
    assert _reasons(plan) == {f"seq{i}": "sequence" for i in range(4)}
    # the sequence's structure is static (constant positions): SequenceAt's output is measured
    assert plan["tensors"]["out"]["size"] == 1 * 3 * 4 * 4
    assert figures["tensors_planned"] == 4 and figures["tensors_unplanned"] == 4
    assert len(messages) == 1 and "4 sequence" in messages[0]
    rng = np.random.default_rng(0)
    feeds = {k: rng.standard_normal(s).astype(np.float32)
             for k, s in (("x", (2, 3, 4)), ("y", (1, 3, 4)), ("z", (3, 3, 4)))}
    _same_outputs(model, out, feeds)


def test_probe_that_returns_a_sequence_does_not_crash():
    """Measuring untyped tensors on onnxruntime: a sequence comes back as a list (the raw
    `ValueError: setting an array element with a sequence` it used to raise)."""
    from onnxpress.passes.memory.liveness import _probe_with_ort

    model = _sequence_model()
    measured, left = _probe_with_ort(model, ["seq3", "out"], {})
    assert left == {"seq3": ("sequence", left["seq3"][1])}
    assert measured["out"] == (FLOAT, [1, 3, 4])


def _data_dependent_model() -> onnx.ModelProto:
    """NonZero(x) and an Expand to a shape read from an input: sizes known only at run time;
    Relu(x) beside them is static."""
    nodes = [helper.make_node("NonZero", ["x"], ["nz"]),
             helper.make_node("Transpose", ["nz"], ["idx"]),
             helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Expand", ["r", "shape"], ["y"]),
             helper.make_node("Sigmoid", ["x"], ["s"])]
    graph = helper.make_graph(
        nodes, "data_dependent",
        [helper.make_tensor_value_info("x", FLOAT, [3, 4]),
         helper.make_tensor_value_info("shape", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["k", 2]),
         helper.make_tensor_value_info("y", FLOAT, ["p", "q"]),
         helper.make_tensor_value_info("s", FLOAT, [3, 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_data_dependent_shapes_are_left_to_the_runtime():
    model = _data_dependent_model()
    out, figures, messages = _run_reuse(model)
    plan = figures["memory_plan"]
    reasons = _reasons(plan)
    assert reasons == {"nz": "data_dependent", "idx": "data_dependent", "y": "data_dependent"}
    details = {u["tensor"]: u["detail"] for u in plan["unplanned"]}
    assert "NonZero" in details["nz"] and "NonZero" in details["idx"]
    assert "Expand" in details["y"] and "'shape'" in details["y"]
    assert set(plan["tensors"]) == {"x", "shape", "r", "s"}
    assert figures["tensors_planned"] == 4 and figures["tensors_unplanned"] == 3
    # x, r (48 bytes each) and shape (24) live at once; s takes r's slot when the Expand is done
    assert figures["arena_bytes"] == 64 + 64 + 24 and figures["lower_bound_bytes"] == 120
    assert len(messages) == 1 and "3 data dependent" in messages[0]
    x = np.array([[0, 1, 0, 2], [3, 0, 0, 4], [0, 0, 5, 0]], np.float32)
    _same_outputs(model, out, {"x": x, "shape": np.array([2, 3, 4], np.int64)})
    # a static shape declared on the output (true for one input only) is not taken on trust
    declared = _data_dependent_model()
    declared.graph.output[0].CopyFrom(helper.make_tensor_value_info("idx", TensorProto.INT64, [5, 2]))
    assert "idx" in _reasons(_run_reuse(declared)[1]["memory_plan"])
    # strict: the first tensor without a static size is an error that says why
    with pytest.raises(InvalidModelError, match=r"'nz'.*NonZero"):
        passes.apply(model, ["reuse:allow_unknown=false"])


def test_user_errors_stay_option_errors():
    for spec in ("reuse:dims=batch/x", "reuse:dims=batch/-1", "reuse:alignment=0",
                 "reuse:strategy=fastest"):
        with pytest.raises(PassOptionError):
            passes.apply(_chain_model(), [spec])
    with pytest.raises(PassOptionError, match="rank"):
        passes.run(_chain_model(), ["reuse"], shapes={"x": [1, 3, 16]})
    with pytest.raises(PassOptionError, match="integers"):
        passes.run(_chain_model(), ["reuse"], shapes={"x": [1, "three", 16, 16]})


def test_reshape_to_a_runtime_shape_keeps_a_static_size():
    """Only the shape of Reshape(x, shape) depends on the values fed as `shape`: its bytes are
    x's, so it is planned (in place over x's Relu), and so is the Sigmoid after it."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Reshape", ["r", "shape"], ["v"]),
             helper.make_node("Sigmoid", ["v"], ["y"]),
             helper.make_node("Tile", ["x", "shape"], ["e"])]
    graph = helper.make_graph(
        nodes, "reshape",
        [helper.make_tensor_value_info("x", FLOAT, [3, 4]),
         helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", FLOAT, [4, 3]),
         helper.make_tensor_value_info("e", FLOAT, [12, 12])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out, figures, messages = _run_reuse(model)
    plan = figures["memory_plan"]
    assert _reasons(plan) == {"e": "data_dependent"}        # Tile's size follows the values
    t = plan["tensors"]
    assert t["v"]["size"] == t["y"]["size"] == 3 * 4 * 4
    assert t["v"]["inplace_of"] == "r" and t["y"]["kind"] == "output"
    _same_outputs(model, out, {"x": np.ones((3, 4), np.float32), "shape": np.array([4, 3])})
