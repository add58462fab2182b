"""Cleanup passes: semantics-preserving rewrites every pipeline should start with.

    shape_infer     annotate value_info with inferred types and shapes
    fold_constants  x = Shape(W) -> Gather -> Concat ...  =>  x = <constant>   (never grows the model)
    dce             drop nodes, initializers and value_info nothing reads
    simplify        Identity/Dropout, no-op Cast/Reshape/Transpose/Pad/Slice/Expand/Concat removed;
                    Transpose(Transpose(x)) -> Transpose(x); Reshape(Reshape(x)) -> Reshape(x);
                    Unsqueeze(Squeeze(x)) -> x; duplicated nodes and initializers merged (CSE)
    opset           convert to another opset version with onnx's version converter

Subgraphs (If/Loop/Scan bodies) are rewritten too: their outputs are kept like graph outputs.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
import onnx
from onnx import numpy_helper

from onnxpress.errors import InvalidModelError
from onnxpress.io import checker_problem
from onnxpress.passes.context import PassContext
from onnxpress.passes.graph import (
    constants,
    copy_model_fields,
    has_subgraphs,
    infer_shapes,
    initializer_inputs,
    quiet_gs,
    rename_input,
    rename_inputs,
    restore_graph_io,
    subgraph_outer_inputs,
)
from onnxpress.passes.registry import Range, register
from onnxpress.weights import adopt, drop_initializers, is_weight, stub_of

INT64_MAX = np.iinfo(np.int64).max


# --------------------------------------------------------------------------------------------
@register("constant_initializers")
def constant_initializers(model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
    """Initializers that are also graph inputs become plain constants (the graph input goes).

    before: graph inputs [x, conv1.weight, conv1.bias, ...] (IR 3: every weight listed)
    after:  graph inputs [x]; the weights are initializers only, so folding and fusion see them
    passes.run/apply run this first on such models, as onnxslim and onnx-simplifier do, unless
    told keep_initializer_inputs=True (CLI --keep-initializer-inputs) for models whose users do
    feed those tensors. IR version 3 requires every initializer to be an input: the model's IR
    version becomes 4.
    """
    names = set(initializer_inputs(model))
    if names:
        keep = [i for i in model.graph.input if i.name not in names]
        del model.graph.input[:]
        model.graph.input.extend(keep)
        model.ir_version = max(model.ir_version, 4)
    ctx.record(initializer_inputs_made_constant=len(names))
    return model


# --------------------------------------------------------------------------------------------
@register("shape_infer")
def shape_infer(model: onnx.ModelProto, ctx: PassContext, *, strict: bool = False,
                data_prop: bool = True) -> onnx.ModelProto:
    """Infer types and shapes of every tensor (onnx shape inference) into value_info.

    before: value_info empty        after: every inferable tensor typed and shaped
    With strict=true an inference error fails the pass (InvalidModelError naming the node).
    """
    out = infer_shapes(model, strict=strict, data_prop=data_prop)
    copy_model_fields(model, out)
    known = sum(1 for v in out.graph.value_info if v.type.tensor_type.HasField("shape"))
    ctx.record(value_info=len(out.graph.value_info), shaped=known)
    ctx.preserve("shapes")
    return out


# --------------------------------------------------------------------------------------------
def _tensor_bytes(elem_type: int, dims) -> int | None:
    if dims is None or any(not isinstance(d, int) or d < 0 for d in dims):
        return None
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize
    except (KeyError, TypeError):
        itemsize = 8
    return int(np.prod(dims, dtype=np.int64)) * itemsize


NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                    "Multinomial", "Bernoulli"}


@register("fold_constants")
def fold_constants(model: onnx.ModelProto, ctx: PassContext, *,
                   max_bytes: Annotated[int, Range(0)] = 1 << 20,
                   fold_shapes: bool = True) -> onnx.ModelProto:
    """Evaluate every node whose inputs are all constant and store the result as a constant.

    before: s = Shape(x[1,3,8,8]); n = Gather(s, 1); r = Reshape(y, Concat(n, -1))
    after:  r = Reshape(y, [3, -1])
    Shapes known statically are folded too (fold_shapes). A node is not folded when its result
    is larger than `max_bytes` or than its constant inputs, so folding never grows the model
    (DequantizeLinear of int8 weights stays as it is). Runs on onnxruntime via onnx-graphsurgeon.
    """
    shapes = ctx.analysis("shapes", model, symbolic=False)
    n_before = sum(1 for _ in _all_nodes(model.graph))
    conditions = if_condition_cone(model.graph)
    shape_folds = sum(_fold_static_shapes(g, shapes, conditions)
                      for g in list(_graphs(model.graph))) if fold_shapes else 0
    const_bytes = {}
    for g in _graphs(model.graph):
        for name, t in constants(g).items():
            const_bytes[name] = _tensor_bytes(t.data_type, list(t.dims)) or 0

    def exclude(node) -> bool:
        if node.op in NONDETERMINISTIC:
            return True
        if any(t.name in conditions for t in node.outputs):
            return True
        in_bytes = 0
        for t in node.inputs:
            # `_values`, not `values`: reading a weight's values would load it into numpy
            v = getattr(t, "_values", None)
            if v is not None and hasattr(v, "nbytes"):
                in_bytes += int(v.nbytes)
            elif t.name in const_bytes:
                in_bytes += const_bytes[t.name]
        for t in node.outputs:
            info = shapes.get(t.name)
            if info is None:
                continue
            size = _tensor_bytes(info[0], info[1])
            if size is None:
                continue
            if size > max_bytes or size > max(in_bytes, 256):
                return True
        return False

    import onnx_graphsurgeon as gs

    try:
        with quiet_gs():
            graph = gs.import_onnx(model)
            # graphsurgeon's own shape folding ignores Shape's start/end (opset 15): ours ran above
            graph.fold_constants(fold_shapes=False, recurse_subgraphs=True, error_ok=True,
                                 should_exclude_node=exclude, flatten_subgraphs=False)
            graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=True)
            _stub_unfolded_weights(graph, model)
            out = gs.export_onnx(graph, do_type_check=False)
            del graph
    except Exception as exc:  # graphsurgeon gives up on some exotic graphs: keep our shape folds
        eliminate_dead_code(model.graph)
        ctx.record(folded=shape_folds, skipped_reason=f"{type(exc).__name__}: {exc}"[:200])
        return model
    copy_model_fields(model, out)
    restore_graph_io(model, out)
    _hoist_body_weights(model, out)
    problem = checker_problem(out)
    if problem is not None:
        eliminate_dead_code(model.graph)
        ctx.record(folded=shape_folds, skipped_reason=f"folded model failed the checker: {problem}"[:200])
        return model
    n_after = sum(1 for _ in _all_nodes(out.graph))
    ctx.record(folded=n_before - n_after)
    return adopt(model, out)


def _hoist_body_weights(model: onnx.ModelProto, out: onnx.ModelProto) -> int:
    """graphsurgeon writes a main-graph initializer that only If/Loop bodies read into every
    body that reads it: a weight both branches of an If share would be stored twice (a char
    LSTM in both branches went from 140 to 278 KB). Put each back in the main graph, once."""
    from onnxpress.stats import iter_graphs

    main = {t.name for t in model.graph.initializer}
    defined = {t.name for t in out.graph.initializer} | {i.name for i in out.graph.input}
    defined |= {o for n in out.graph.node for o in n.output}
    copies: dict[str, list] = {}
    for sub in iter_graphs(out.graph):
        if sub is not out.graph:
            for t in sub.initializer:
                if t.name in main and t.name not in defined:
                    copies.setdefault(t.name, []).append((sub, t))
    hoisted = 0
    for where in copies.values():
        first = where[0][1].SerializeToString()
        if any(t.SerializeToString() != first for _, t in where):
            continue
        keep = onnx.TensorProto()
        keep.CopyFrom(where[0][1])
        for sub, t in where:
            sub.initializer.remove(t)
        out.graph.initializer.append(keep)
        hoisted += 1
    return hoisted


def _stub_unfolded_weights(graph, model: onnx.ModelProto) -> None:
    """The weights of `model` that graphsurgeon left as they were (still lazily loaded) go out
    as stubs, which `adopt` maps back to `model`'s own tensors: exporting them would copy them."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    own = list(model.graph.initializer)      # held: the ids below stay theirs
    ids = {id(t) for t in own if is_weight(t)}
    for t in graph.tensors().values():
        values = getattr(t, "_values", None)
        if isinstance(values, LazyValues) and id(values.tensor) in ids:
            t._values = LazyValues(stub_of(values.tensor))


def if_condition_cone(graph: onnx.GraphProto) -> set[str]:
    """Tensors an If's condition is computed from (in its own graph, subgraphs included).

    They are left computed: a condition folded to a constant makes onnxruntime inline the
    branch at load time and check it eagerly, and exported ONNX functions (AffineGrid's
    expansion) hold branches valid only for the inputs that take them, so a model it ran would
    no longer load. (Folding them would gain nothing unless the If itself were inlined.)"""
    cone: set[str] = set()
    for g in _graphs(graph):
        producer = {o: n for n in g.node for o in n.output if o}
        stack = [n.input[0] for n in g.node if n.op_type == "If" and n.input]
        while stack:
            t = stack.pop()
            if t in cone:
                continue
            cone.add(t)
            p = producer.get(t)
            if p is not None:
                stack.extend(i for i in p.input if i)
    return cone


def _fold_static_shapes(graph: onnx.GraphProto, shapes: dict, keep: set[str] = frozenset()) -> int:
    """Replace Shape nodes (honouring start/end) and Size nodes whose answer is static, and
    Gather(Shape(x), const) where only the gathered dims need to be static, by Constants
    (outputs in `keep` stay computed)."""
    folded = 0
    consts = constants(graph)
    producer = {o: n for n in graph.node for o in n.output if o}
    new_nodes = []
    for node in graph.node:
        value = None
        if node.domain in ("", "ai.onnx") and node.op_type in ("Shape", "Size") and node.input:
            info = shapes.get(node.input[0])
            dims = None if info is None else info[1]
            if node.input[0] in consts:
                dims = list(consts[node.input[0]].dims)
            if dims is not None:
                rank = len(dims)
                if node.op_type == "Shape":
                    start = next((a.i for a in node.attribute if a.name == "start"), 0)
                    end = next((a.i for a in node.attribute if a.name == "end"), rank)
                    start = min(max(start + rank if start < 0 else start, 0), rank)
                    end = min(max(end + rank if end < 0 else end, 0), rank)
                    part = dims[start:end]
                    if all(isinstance(d, int) and d > 0 for d in part):
                        value = np.array(part, dtype=np.int64)
                elif all(isinstance(d, int) and d > 0 for d in dims):
                    value = np.array(int(np.prod(dims, dtype=np.int64)), dtype=np.int64)
        elif (node.domain in ("", "ai.onnx") and node.op_type == "Gather" and len(node.input) == 2
              and node.input[1] in consts and node.input[0] in producer
              and producer[node.input[0]].op_type == "Shape"):
            shape_node = producer[node.input[0]]
            info = shapes.get(shape_node.input[0])
            has_slice = any(a.name in ("start", "end") for a in shape_node.attribute)
            if info is not None and info[1] is not None and not has_slice:
                dims = info[1]
                idx = numpy_helper.to_array(consts[node.input[1]]).astype(np.int64)
                flat = [int(i) + len(dims) if int(i) < 0 else int(i) for i in np.ravel(idx)]
                if all(0 <= i < len(dims) and isinstance(dims[i], int) and dims[i] > 0 for i in flat):
                    value = np.array([dims[i] for i in flat], dtype=np.int64).reshape(idx.shape)
        if value is not None and node.output[0] not in keep:
            new_nodes.append(onnx.helper.make_node(
                "Constant", [], [node.output[0]], name=(node.name or node.output[0]) + "_folded",
                value=numpy_helper.from_array(value, node.output[0])))
            folded += 1
        else:
            new_nodes.append(node)
    if folded:
        del graph.node[:]
        graph.node.extend(new_nodes)
    return folded


def _graphs(graph: onnx.GraphProto):
    from onnxpress.stats import iter_graphs

    return iter_graphs(graph)


def _all_nodes(graph: onnx.GraphProto):
    for g in _graphs(graph):
        yield from g.node


# --------------------------------------------------------------------------------------------
def eliminate_dead_code(graph: onnx.GraphProto, roots: set[str] | None = None) -> int:
    """Mark-and-sweep on one graph (and, for live nodes, their subgraphs). Returns nodes removed."""
    live = set(roots if roots is not None else (o.name for o in graph.output))
    keep = []
    removed = 0
    for node in reversed(graph.node):
        if any(o in live for o in node.output if o):
            keep.append(node)
            live.update(i for i in node.input if i)
            live.update(subgraph_outer_inputs(node))
        else:
            removed += 1
    if removed:
        keep.reverse()
        del graph.node[:]
        graph.node.extend(keep)
    for node in graph.node:
        for a in node.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                removed += eliminate_dead_code(g)
    used = live | {o.name for o in graph.output} | {i.name for i in graph.input}
    drop_initializers(graph, lambda t: t.name in used)
    produced = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    vis = [v for v in graph.value_info if v.name in produced]
    if len(vis) != len(graph.value_info):
        del graph.value_info[:]
        graph.value_info.extend(vis)
    return removed


@register("dce")
def dce(model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
    """Dead-code elimination: remove nodes, initializers and value_info no output depends on.

    before: a = Relu(x); b = Sigmoid(x) (b unused); y = Neg(a)     after: a = Relu(x); y = Neg(a)
    Graph inputs are kept even when unused (the model's interface does not change).
    """
    inits_before = len(model.graph.initializer)
    removed = eliminate_dead_code(model.graph)
    ctx.record(nodes_removed=removed,
               initializers_removed=inits_before - len(model.graph.initializer))
    ctx.preserve("shapes")
    return model


# --------------------------------------------------------------------------------------------
class _Simplifier:
    """Local rewrites on one graph, to a fixed point. `protected` names (graph or body outputs)
    keep their names: a removed node writing one hands the name to its input's producer."""

    def __init__(self, graph: onnx.GraphProto, shapes: dict, opset: int, outer_consts: dict):
        self.g = graph
        self.shapes = shapes
        self.opset = opset
        self.counts: dict[str, int] = {}
        self.outer_consts = outer_consts

    # -- helpers --------------------------------------------------------------------------
    def refresh(self) -> None:
        self.consts = dict(self.outer_consts)
        self.consts.update(constants(self.g))
        self.producer = {o: n for n in self.g.node for o in n.output if o}
        self.uses: dict[str, int] = {}
        for n in self.g.node:
            for i in list(n.input) + sorted(subgraph_outer_inputs(n)):
                self.uses[i] = self.uses.get(i, 0) + 1
        self.protected = {o.name for o in self.g.output}
        self.inputs = {i.name for i in self.g.input}

    def const(self, name: str) -> np.ndarray | None:
        t = self.consts.get(name)
        return None if t is None else numpy_helper.to_array(t)

    def dims(self, name: str):
        info = self.shapes.get(name)
        return None if info is None else info[1]

    def elem_type(self, name: str) -> int | None:
        info = self.shapes.get(name)
        if info is not None:
            return info[0]
        t = self.consts.get(name)
        return t.data_type if t is not None else None

    def static(self, name: str) -> list[int] | None:
        d = self.dims(name)
        if d is None or any(not isinstance(x, int) or x <= 0 for x in d):
            if name in self.consts:
                return list(self.consts[name].dims)
            return None
        return list(d)

    def bump(self, rule: str) -> None:
        self.counts[rule] = self.counts.get(rule, 0) + 1

    def bypass(self, node: onnx.NodeProto, src: str, rule: str) -> bool:
        """Remove `node` (single output) so readers of its output read `src` instead."""
        dst = node.output[0]
        if dst in self.protected:
            # the output name must survive: hand it to src's producer when that is safe
            if (src in self.protected or src in self.inputs or src in self.consts
                    or src not in self.producer or self.uses.get(src, 0) > 1):
                return False
            prod = self.producer[src]
            if has_subgraphs(prod) and prod.op_type != "If":
                return False
            for i, o in enumerate(prod.output):
                if o == src:
                    prod.output[i] = dst
            self.g.node.remove(node)
            for vi in self.g.value_info:
                if vi.name == src:
                    vi.name = dst
        else:
            self.g.node.remove(node)
            for n in self.g.node:
                rename_input(n, dst, src)
        self.bump(rule)
        return True

    # -- rules ----------------------------------------------------------------------------
    def try_node(self, node: onnx.NodeProto) -> bool:
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            return False
        if op == "Identity" and len(node.input) == 1:
            return self.bypass(node, node.input[0], "identity")
        if op == "Dropout":
            if len(node.output) > 1 and node.output[1] and self.uses.get(node.output[1], 0):
                return False
            if len(node.output) > 1 and node.output[1] in self.protected:
                return False
            if len(node.input) >= 3 and node.input[2]:
                mode = self.const(node.input[2])
                if mode is None or bool(mode):
                    return False
            del node.output[1:]
            return self.bypass(node, node.input[0], "dropout")
        if op == "Cast":
            to = next((a.i for a in node.attribute if a.name == "to"), None)
            if to is not None and self.elem_type(node.input[0]) == to:
                return self.bypass(node, node.input[0], "noop_cast")
            return False
        if op == "Transpose":
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            if perm is not None and perm == list(range(len(perm))):
                return self.bypass(node, node.input[0], "noop_transpose")
            prev = self.producer.get(node.input[0])
            if (perm is not None and prev is not None and prev.op_type == "Transpose"
                    and prev.domain in ("", "ai.onnx")):
                p1 = next((list(a.ints) for a in prev.attribute if a.name == "perm"), None)
                if p1 is not None and len(p1) == len(perm):
                    composed = [p1[p] for p in perm]
                    node.input[0] = prev.input[0]
                    for a in node.attribute:
                        if a.name == "perm":
                            del a.ints[:]
                            a.ints.extend(composed)
                    self.bump("transpose_chain")
                    return True
            return False
        if op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Expand"):
            return self.try_shape_op(node)
        if op == "Pad":
            pads = self.const(node.input[1]) if len(node.input) > 1 and node.input[1] else None
            if pads is None:
                pads_attr = next((list(a.ints) for a in node.attribute if a.name == "pads"), None)
                pads = np.array(pads_attr) if pads_attr is not None else None
            if pads is not None and pads.size and not np.any(pads):
                return self.bypass(node, node.input[0], "noop_pad")
            return False
        if op == "Slice" and self.opset >= 10 and len(node.input) >= 3:
            return self.try_slice(node)
        if op == "Concat" and len(node.input) == 1:
            return self.bypass(node, node.input[0], "single_concat")
        return False

    def try_shape_op(self, node: onnx.NodeProto) -> bool:
        x, y = node.input[0], node.output[0]
        in_shape, out_shape = self.static(x), self.static(y)
        if node.op_type == "Reshape":
            prev = self.producer.get(x)
            target = self.const(node.input[1]) if len(node.input) > 1 else None
            allowzero = next((a.i for a in node.attribute if a.name == "allowzero"), 0)
            if (prev is not None and prev.op_type in ("Reshape", "Flatten", "Squeeze", "Unsqueeze")
                    and prev.domain in ("", "ai.onnx") and target is not None
                    and (allowzero or not np.any(target == 0))):
                node.input[0] = prev.input[0]
                self.bump("reshape_chain")
                return True
        if in_shape is not None and out_shape is not None and in_shape == out_shape \
                and node.op_type in ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Expand"):
            return self.bypass(node, x, f"noop_{node.op_type.lower()}")
        if node.op_type in ("Squeeze", "Unsqueeze"):
            prev = self.producer.get(x)
            other = "Unsqueeze" if node.op_type == "Squeeze" else "Squeeze"
            if prev is not None and prev.op_type == other and prev.domain in ("", "ai.onnx"):
                a1, a2 = self.axes(prev), self.axes(node)
                if a1 is not None and a2 is not None and sorted(a1) == sorted(a2) and \
                        all(a >= 0 for a in a1 + a2):
                    return self.bypass(node, prev.input[0], "squeeze_pair")
        return False

    def axes(self, node: onnx.NodeProto) -> list[int] | None:
        if len(node.input) > 1 and node.input[1]:
            v = self.const(node.input[1])
            return None if v is None else [int(a) for a in np.ravel(v)]
        a = next((list(a.ints) for a in node.attribute if a.name == "axes"), None)
        return a

    def try_slice(self, node: onnx.NodeProto) -> bool:
        starts, ends = self.const(node.input[1]), self.const(node.input[2])
        axes = self.const(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        steps = self.const(node.input[4]) if len(node.input) > 4 and node.input[4] else None
        shape = self.static(node.input[0])
        if starts is None or ends is None or shape is None:
            return False
        if (len(node.input) > 3 and node.input[3] and axes is None) or \
                (len(node.input) > 4 and node.input[4] and steps is None):
            return False
        axes = list(range(len(starts))) if axes is None else [int(a) for a in axes]
        steps = [1] * len(starts) if steps is None else [int(s) for s in steps]
        for s, e, a, st in zip(starts, ends, axes, steps):
            dim = shape[a]
            if st != 1 or int(s) != 0 or int(e) < dim:
                return False
        return self.bypass(node, node.input[0], "noop_slice")

    # -- CSE ------------------------------------------------------------------------------
    def cse(self) -> bool:
        # every duplicate found in this scan is renamed to its first copy in one walk at the end
        # (renaming node by node was quadratic: 80k calls on MiniLM)
        renames: dict[str, str] = {}

        def resolve(name: str) -> str:
            return renames.get(name, name)

        # identical initializers (small ones: hashing big weights costs more than it saves)
        seen: dict[tuple, str] = {}
        graph_inputs = {i.name for i in self.g.input}
        for t in list(self.g.initializer):
            if t.name in graph_inputs or t.name in self.protected:
                continue
            if int(np.prod(t.dims, dtype=np.int64)) > 1 << 16:
                continue
            key = (t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes())
            if key in seen:
                renames[t.name] = seen[key]
                self.g.initializer.remove(t)
                self.bump("cse_initializer")
            else:
                seen[key] = t.name
        # identical nodes (inputs compared after the renames so far: chains collapse in one scan)
        keyed: dict[tuple, onnx.NodeProto] = {}
        dropped: set[int] = set()
        for node in self.g.node:
            if node.op_type in NONDETERMINISTIC or has_subgraphs(node) or not node.output:
                continue
            attrs = tuple(sorted(a.SerializeToString(deterministic=True) for a in node.attribute))
            key = (node.domain, node.op_type, tuple(resolve(i) for i in node.input), attrs,
                   len(node.output))
            first = keyed.get(key)
            if first is None:
                keyed[key] = node
                continue
            if any(o in self.protected for o in node.output):
                continue
            for old, new in zip(node.output, first.output):
                if old:
                    renames[old] = new
            dropped.add(id(node))
            self.bump("cse_node")
        if not renames:
            return False
        keep = [n for n in self.g.node if id(n) not in dropped]
        for n in keep:
            rename_inputs(n, renames)
        del self.g.node[:]
        self.g.node.extend(keep)
        return True

    def run(self, max_rounds: int = 20) -> None:
        for _ in range(max_rounds):
            changed = False
            self.refresh()
            for node in list(self.g.node):
                if node not in self.g.node:
                    continue
                if self.try_node(node):
                    changed = True
                    self.refresh()
            if self.cse():
                changed = True
            eliminate_dead_code(self.g, roots={o.name for o in self.g.output})
            if not changed:
                break


def _simplify_graph(graph: onnx.GraphProto, shapes: dict, opset: int, outer: dict,
                    counts: dict) -> None:
    s = _Simplifier(graph, shapes, opset, outer)
    s.run()
    for k, v in s.counts.items():
        counts[k] = counts.get(k, 0) + v
    scope = dict(outer)
    scope.update(constants(graph))
    for node in graph.node:
        for a in node.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                _simplify_graph(g, shapes, opset, scope, counts)


@register("simplify")
def simplify(model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
    """Remove no-op and redundant nodes; merge duplicates (common-subexpression elimination).

    before: y = Identity(Dropout(Transpose(Transpose(x, [1,0]), [1,0])))   after: y = x-producer
    Rules: Identity, inference Dropout, Cast to the same type, Reshape/Flatten/Squeeze/Unsqueeze/
    Expand to the same static shape, identity Transpose, zero Pad, full Slice, one-input Concat,
    Transpose and Reshape chains, Squeeze/Unsqueeze pairs, duplicate nodes and initializers.
    Graph output names and the model's interface never change.
    """
    shapes = ctx.analysis("shapes", model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    counts: dict[str, int] = {}
    _simplify_graph(model.graph, shapes, opset, {}, counts)
    ctx.record(rewrites=sum(counts.values()), **counts)
    return model


# --------------------------------------------------------------------------------------------
@register("opset")
def convert_opset(model: onnx.ModelProto, ctx: PassContext, *,
                  version: Annotated[int, Range(7, 23)] = 17) -> onnx.ModelProto:
    """Convert the model to another default-domain opset with onnx's version converter.

    before: opset 11, Upsample      after: opset 17, Resize
    Fails with InvalidModelError naming the op when the converter has no adapter for it.
    """
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if current == version:
        ctx.record(converted=False, opset=version)
        return model
    from onnx import version_converter

    try:
        out = version_converter.convert_version(model, version)
    except Exception as exc:
        msg = str(exc).strip().splitlines()
        raise InvalidModelError(
            f"cannot convert from opset {current} to {version}: {msg[0] if msg else exc}"
        ) from None
    meta = list(model.metadata_props)
    del out.metadata_props[:]
    out.metadata_props.extend(meta)
    ctx.record(converted=True, opset_before=current, opset=version)
    return out

