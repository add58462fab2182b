"""Graph helpers shared by passes: shape inference, onnx-graphsurgeon round trips that keep
model-level fields, constants, and use/def maps."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from onnxpress.errors import InvalidModelError
from onnxpress.io import EXTERNAL_DATA_THRESHOLD
from onnxpress.weights import light_copy


def infer_shapes(model: onnx.ModelProto, *, strict: bool = False, data_prop: bool = True,
                 symbolic: bool = False, weights: bool = True) -> onnx.ModelProto:
    """onnx shape inference; models over 2 GiB go through a temporary file.

    Inference runs on a copy without the big weights (`light_copy`): they are all that makes a
    model big, and serializing them for onnx's C++ inference cost three times the model's bytes
    and most of the time. The result is a copy of `model` with value_info filled in; with
    `weights=False` it is the light copy itself (its big weights are typed graph inputs), for
    callers that only read the shapes.

    With `symbolic=True`, onnxruntime's symbolic shape inference runs afterwards and fills in
    what onnx could not (Reshape targets computed from Shape, e.g. in attention blocks).
    """
    light = light_copy(model)
    proxy = standard_proxy(light)
    src = light if proxy is None else proxy
    out = _onnx_infer(src, strict=strict, data_prop=data_prop)
    if symbolic and _size(src) <= EXTERNAL_DATA_THRESHOLD:
        out = _merge_symbolic(src, out)
    own = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    if weights:   # the caller gets its own graph back, annotated with what inference saw
        result = onnx.ModelProto()
        result.CopyFrom(model)
    else:
        if out is light:
            return light
        result = light
    del result.graph.value_info[:]
    result.graph.value_info.extend(v for v in out.graph.value_info if v.name in own)
    if out is not src and [o.name for o in out.graph.output] == [o.name for o in model.graph.output]:
        del result.graph.output[:]
        result.graph.output.extend(out.graph.output)
    if proxy is None and out is not src and len(out.graph.node) == len(model.graph.node) and \
            any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                for n in model.graph.node for a in n.attribute):
        # If/Loop/Scan bodies carry their own value_info: take the annotated nodes
        del result.graph.node[:]
        result.graph.node.extend(out.graph.node)
    return result


# Contrib ops that neither onnx's shape inference nor onnxruntime's symbolic one types (the fuse
# pass writes FusedConv/FusedGemm, the GELU family, SkipLayerNormalization and Attention,
# quant_int8 MatMulIntegerToFloat). Without their output types everything downstream stays
# untyped: calibration then sees no float activations after the first FusedConv, and memory
# planning has to run the model to size what follows. Inference runs on a proxy graph in which
# each is replaced by standard ops whose outputs have the same types and shapes.
_ACTIVATION_ATTRS = ("activation", "activation_params")
# contrib ops whose output 0 (and SkipLayerNormalization's output 3, the sum) is shaped as input 0
_SHAPED_AS_INPUT = {"Gelu": (0,), "FastGelu": (0,), "BiasGelu": (0,), "QuickGelu": (0,),
                    "SkipLayerNormalization": (0, 3)}


def _proxy_nodes(node: onnx.NodeProto, fresh) -> list[onnx.NodeProto] | None:
    from onnx import helper

    if node.domain != "com.microsoft":
        return None
    if node.op_type in ("FusedConv", "FusedGemm"):
        attrs = [a for a in node.attribute if a.name not in _ACTIVATION_ATTRS]
        base = helper.make_node(node.op_type[len("Fused"):], list(node.input[:3]),
                                node.output[:1], name=node.name)
        base.attribute.extend(attrs)
        return [base]
    if node.op_type == "MatMulIntegerToFloat" and len(node.input) >= 2:
        a, b = fresh(node.output[0] + "_a"), fresh(node.output[0] + "_b")
        to = onnx.TensorProto.FLOAT
        return [helper.make_node("Cast", [node.input[0]], [a], to=to),
                helper.make_node("Cast", [node.input[1]], [b], to=to),
                helper.make_node("MatMul", [a, b], node.output[:1], name=node.name)]
    same = _SHAPED_AS_INPUT.get(node.op_type)
    if same is not None and node.input and node.input[0]:
        if any(o for i, o in enumerate(node.output) if i not in same):
            return None          # SkipLayerNormalization's mean and inv_std_var: not proxied
        return [helper.make_node("Identity", [node.input[0]], [o])
                for i, o in enumerate(node.output) if o]
    if node.op_type == "Attention" and len(node.input) >= 2 and len(node.output) == 1 and \
            not any(a.name == "qkv_hidden_sizes" for a in node.attribute):
        # x [B, S, H_in] @ weights [H_in, 3H] -> [B, S, 3, H] -> output [B, S, H]
        qkv, split, parts, first = (fresh(node.output[0] + s) for s in ("_qkv", "_split", "_parts",
                                                                           "_first"))
        return [helper.make_node("MatMul", list(node.input[:2]), [qkv]),
                helper.make_node("Constant", [], [split], value=helper.make_tensor(
                    split, onnx.TensorProto.INT64, [4], [0, 0, 3, -1])),
                helper.make_node("Reshape", [qkv, split], [parts]),
                helper.make_node("Constant", [], [first], value=helper.make_tensor(
                    first, onnx.TensorProto.INT64, [], [0])),
                helper.make_node("Gather", [parts, first], node.output[:1], axis=2)]
    return None


def standard_proxy(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """A copy of `model` whose untyped contrib ops are replaced by standard equivalents (for
    shape inference only; output names are kept), or None when there are none."""
    from onnxpress.stats import iter_graphs

    if not any(n.domain == "com.microsoft" for g in iter_graphs(model.graph) for n in g.node):
        return None
    proxy = onnx.ModelProto()
    proxy.CopyFrom(model)
    taken = {o for g in iter_graphs(proxy.graph) for n in g.node for o in n.output}
    changed = False

    def fresh(base: str) -> str:
        name, k = base + "_proxy", 0
        while name in taken:
            k += 1
            name = f"{base}_proxy{k}"
        taken.add(name)
        return name

    for g in iter_graphs(proxy.graph):
        nodes = []
        for n in g.node:
            repl = _proxy_nodes(n, fresh)
            changed |= repl is not None
            nodes.extend(repl if repl is not None else [n])
        del g.node[:]
        g.node.extend(nodes)
    return proxy if changed else None


def _merge_symbolic(model: onnx.ModelProto, out: onnx.ModelProto) -> onnx.ModelProto:
    """Run symbolic inference on the un-annotated model (onnx's partial answers would stop it)
    and replace value_info entries onnx left without full dims."""
    import copy

    src = copy.deepcopy(model)
    del src.graph.value_info[:]
    sym = _symbolic_infer(src)
    if sym is src:
        return out
    best = {v.name: v for v in out.graph.value_info}
    for v in sym.graph.value_info:
        if _static_score(v) > _static_score(best.get(v.name)):
            best[v.name] = v
    del out.graph.value_info[:]
    out.graph.value_info.extend(best.values())
    return out


def _static_score(v: onnx.ValueInfoProto | None) -> int:
    """How much a value_info tells: -1 nothing, else 1 + the number of static dims."""
    if v is None or not v.type.HasField("tensor_type") or not v.type.tensor_type.HasField("shape"):
        return -1
    return 1 + sum(1 for d in v.type.tensor_type.shape.dim if d.HasField("dim_value"))


def _symbolic_shape_inference_class():
    """onnxruntime's SymbolicShapeInference, loaded from its file: the package `onnxruntime.tools`
    imports torch in its __init__ (3 s on every first shape analysis of a process) and the
    module itself needs only onnx, numpy and packaging."""
    import importlib.util
    import sys

    name = "onnxpress._ort_symbolic_shape_infer"
    module = sys.modules.get(name)
    if module is None:
        import onnxruntime

        path = Path(onnxruntime.__file__).parent / "tools" / "symbolic_shape_infer.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return module.SymbolicShapeInference


def _symbolic_infer(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        import logging

        SymbolicShapeInference = _symbolic_shape_inference_class()
        logging.getLogger(SymbolicShapeInference.__module__).setLevel(logging.ERROR)
        # when its inference is incomplete it saves sym_shape_infer_temp.onnx plus uuid-named
        # .data files into the working directory: give it a throwaway one
        cwd = os.getcwd()
        with tempfile.TemporaryDirectory(prefix="onnxpress-symshape-") as scratch:
            os.chdir(scratch)
            try:
                sym = SymbolicShapeInference.infer_shapes(model, auto_merge=True,
                                                          guess_output_rank=False)
            finally:
                os.chdir(cwd)
    except Exception:
        return model
    return model if sym is None else sym


def _has_dims(v: onnx.ValueInfoProto) -> bool:
    tt = v.type.tensor_type
    return v.type.HasField("tensor_type") and tt.HasField("shape") and \
        all(d.HasField("dim_value") or d.HasField("dim_param") for d in tt.shape.dim)


def _onnx_infer(model: onnx.ModelProto, *, strict: bool, data_prop: bool) -> onnx.ModelProto:
    try:
        if _size(model) > EXTERNAL_DATA_THRESHOLD:
            from onnxpress.io import load, save

            with tempfile.TemporaryDirectory(prefix="onnxpress-shapes-") as d:
                src, dst = Path(d) / "in.onnx", Path(d) / "out.onnx"
                save(model, src, external_data=True)
                onnx.shape_inference.infer_shapes_path(str(src), str(dst), strict_mode=strict,
                                                       data_prop=data_prop)
                return load(dst, check=False)
        return onnx.shape_inference.infer_shapes(model, strict_mode=strict, data_prop=data_prop)
    except Exception as exc:
        if strict:
            msg = str(exc).strip().splitlines()
            raise InvalidModelError(f"shape inference failed: {msg[0] if msg else exc}") from None
        return model


def _size(model: onnx.ModelProto) -> int:
    from onnxpress.stats import model_bytes

    return model_bytes(model)


def copy_model_fields(src: onnx.ModelProto, dst: onnx.ModelProto) -> onnx.ModelProto:
    """Keep what graph rewriting tools drop: metadata, doc strings, producer, versions, functions."""
    dst.ir_version = src.ir_version
    dst.producer_name = src.producer_name
    dst.producer_version = src.producer_version
    dst.domain = src.domain
    dst.model_version = src.model_version
    dst.doc_string = src.doc_string
    dst.graph.doc_string = src.graph.doc_string
    dst.graph.name = src.graph.name
    del dst.metadata_props[:]
    dst.metadata_props.extend(src.metadata_props)
    have = {o.domain: o for o in dst.opset_import}
    for o in src.opset_import:
        if o.domain not in have:
            dst.opset_import.append(o)
        elif have[o.domain].version < o.version:
            have[o.domain].version = o.version
    if not dst.functions and src.functions:
        dst.functions.extend(src.functions)
    if not dst.training_info and src.training_info:
        dst.training_info.extend(src.training_info)
    return dst


@contextmanager
def quiet_gs() -> Iterator[None]:
    """onnx-graphsurgeon logs warnings for every fold it skips; keep them out of users' faces."""
    from onnx_graphsurgeon.logger import G_LOGGER

    old = G_LOGGER.severity
    G_LOGGER.severity = G_LOGGER.CRITICAL
    try:
        yield
    finally:
        G_LOGGER.severity = old


def initializer_inputs(model: onnx.ModelProto) -> list[str]:
    """Graph inputs that also have an initializer: every weight of an IR-version-3 export (ONNX
    before 1.3 required it), overridable at run time in principle, constants in practice."""
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name in inits]


def constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """{name: TensorProto} for initializers and Constant nodes with a `value` tensor."""
    out = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for a in node.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    out[node.output[0]] = a.t
                elif a.name in ("value_float", "value_int", "value_floats", "value_ints"):
                    arr = np.array(onnx.helper.get_attribute_value(a),
                                   dtype=np.float32 if "float" in a.name else np.int64)
                    out[node.output[0]] = numpy_helper.from_array(arr, node.output[0])
    return out


def subgraph_outer_inputs(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs read from the enclosing scope."""
    names: set[str] = set()
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for g in graphs:
            local = {i.name for i in g.input} | {t.name for t in g.initializer}
            local |= {o for n in g.node for o in n.output}
            for n in g.node:
                for i in list(n.input) + sorted(subgraph_outer_inputs(n)):
                    if i and i not in local:
                        names.add(i)
            names |= {o.name for o in g.output if o.name not in local}
    return names


def has_subgraphs(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for a in node.attribute)


def rename_input(node: onnx.NodeProto, old: str, new: str) -> None:
    """Replace input `old` by `new` on `node` and inside its subgraphs (outer-scope reads)."""
    rename_inputs(node, {old: new})


def rename_inputs(node: onnx.NodeProto, mapping: dict[str, str]) -> None:
    """Replace every input named in `mapping` on `node` and inside its subgraphs (outer-scope
    reads; a name the subgraph defines itself shadows the outer one). One walk for many names."""
    for i, name in enumerate(node.input):
        if name in mapping:
            node.input[i] = mapping[name]
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for g in graphs:
            local = {i.name for i in g.input} | {t.name for t in g.initializer} | \
                {o for n in g.node for o in n.output}
            inner = {k: v for k, v in mapping.items() if k not in local}
            if not inner:
                continue
            for n in g.node:
                rename_inputs(n, inner)
            for o in g.output:
                if o.name in inner:
                    o.name = inner[o.name]  # rare: a body returning an outer value directly


def bind_input_shapes(model: onnx.ModelProto, shapes: dict | None) -> onnx.ModelProto:
    """A shape-inferred copy of `model` with dynamic input dims fixed; dims `shapes` does not
    bind stay symbolic.

    `shapes` maps an input name to its full shape ({"input_ids": [1, 128]}) or a dim name to a
    size ({"batch": 1, "seq": 128}), as `--shape` does on the command line. One binder serves
    the whole project (memory.liveness.bind_shapes: the same names, aliases and errors)."""
    if not shapes:
        return model
    from onnxpress.passes.memory.liveness import bind_shapes

    names = {i.name for i in model.graph.input}
    inputs = {k: list(v) if isinstance(v, (list, tuple)) else [v]
              for k, v in shapes.items() if k in names}
    dims = {k: int(v[0] if isinstance(v, (list, tuple)) else v)
            for k, v in shapes.items() if k not in names}
    bound, _ = bind_shapes(model, dims, inputs, keep_output_shapes=False)
    return bound


def restore_graph_io(original: onnx.ModelProto, out: onnx.ModelProto) -> None:
    """Graph rewriters re-export graph inputs/outputs; keep the original's declarations exactly
    (they may drop shapes or symbolic dim names)."""
    orig_in = {v.name: v for v in original.graph.input}
    orig_out = {v.name: v for v in original.graph.output}
    for v in out.graph.input:
        if v.name in orig_in:
            v.CopyFrom(orig_in[v.name])
    for v in out.graph.output:
        if v.name in orig_out:
            v.CopyFrom(orig_out[v.name])

