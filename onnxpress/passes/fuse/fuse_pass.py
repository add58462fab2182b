"""The `fuse` pass: apply every enabled fusion, by priority, to a fixed point.

    before: y = 0.5 * x * (1 + Erf(x / 1.4142))      after: y = Gelu(x)
    before: LayerNorm(Add(MatMul(x,Wq)+bq ...) -> Reshape -> Transpose -> MatMul -> Softmax ...)
    after:  com.microsoft.Attention(x, Wqkv, bqkv)  (target ort; plain ops kept for tvm)

The model goes through onnx shape inference, becomes an onnx_ir model (weights are shared,
not copied), Constant nodes become initializers so patterns see every constant alike, size-one
constants of element-wise ops become scalars, and then each fusion is tried in priority order;
the list is repeated until no fusion fires (or `max_rounds`). Dead nodes and initializers are
dropped; graph inputs, outputs and model fields (metadata_props...) are kept.
"""

from __future__ import annotations

import time
from typing import Annotated

import numpy as np
import onnx

from onnxpress.errors import PassError, PassOptionError
from onnxpress.passes.context import PassContext
from onnxpress.passes.fuse import api
from onnxpress.passes.graph import copy_model_fields, light_copy, restore_graph_io
from onnxpress.passes.registry import Range, register
from onnxpress.weights import adopt, is_weight, stub_of

SHAPE_FOLD_BYTES = 4096          # shape vectors and scalars, never a weight
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Equal", "Less", "Greater",
                "Where", "And", "Or"}


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _scalarize_constants(model) -> int:
    """Element-wise ops reading a one-element constant of rank r read a rank-0 scalar instead
    when another operand already has rank >= r (the output shape is then unchanged)."""
    from onnxscript import ir

    count = 0
    cache: dict[tuple, ir.Value] = {}
    for node in list(model.graph):
        if node.op_type not in _ELEMENTWISE or node.domain not in ("", "ai.onnx"):
            continue
        for i, v in enumerate(node.inputs):
            if v is None or v.const_value is None or v.is_graph_input():
                continue
            dims = v.const_value.shape
            if len(dims) == 0 or np.prod(list(dims)) != 1:
                continue
            others = [u for j, u in enumerate(node.inputs) if j != i and u is not None]
            if not any(u.shape is not None and len(u.shape) >= len(dims) for u in others):
                continue
            arr = v.const_value.numpy().reshape(())
            key = (arr.dtype.str, arr.tobytes())
            new = cache.get(key)
            if new is None:
                name = f"onnxpress_fuse/scalar_{len(cache)}_{v.name}"
                new = ir.Value(name=name, shape=ir.Shape([]), type=ir.TensorType(v.dtype),
                               const_value=ir.tensor(arr, name=name))
                model.graph.register_initializer(new)
                cache[key] = new
            node.replace_input_with(i, new)
            count += 1
    return count


def _inferred_shapes(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    try:
        inferred = onnx.shape_inference.infer_shapes(light_copy(model), data_prop=True)
    except Exception:  # inference gave up: fusions that need shapes will not fire
        return {}
    return {v.name: v.type for v in inferred.graph.value_info}


def _attach_shapes(work, types: dict[str, onnx.TypeProto]) -> None:
    from onnxscript import ir

    for node in work.graph:
        for v in node.outputs:
            t = types.get(v.name)
            if t is None or not t.HasField("tensor_type"):
                continue
            tt = t.tensor_type
            if v.type is None and tt.elem_type:
                v.type = ir.TensorType(ir.DataType(tt.elem_type))
            if v.shape is None and tt.HasField("shape"):
                v.shape = ir.Shape([d.dim_value if d.HasField("dim_value") else
                                    (d.dim_param or None) for d in tt.shape.dim])


def _fold_shape_arithmetic(model: onnx.ModelProto,
                           ctx: PassContext) -> tuple[onnx.ModelProto, int | None]:
    """Fold what exports compute from static shapes (a plain torch export computes attention's
    scale as Sqrt(Cast(Slice(Shape(q))))), so that patterns see constants where the values are
    known: `fold_constants` (never grows the model; no result over SHAPE_FOLD_BYTES, so no
    weight is rewritten), on graphs that read a Shape or Size."""
    if not any(n.op_type in ("Shape", "Size") and n.domain in ("", "ai.onnx")
               for n in model.graph.node):
        return model, None
    from onnxpress.passes.cleanup import fold_constants

    def computed(m):
        return sum(n.op_type != "Constant" for n in m.graph.node)

    before = computed(model)
    sub = PassContext(target=ctx.target, shapes=ctx.shapes, progress=False)
    out = fold_constants(model, sub, max_bytes=SHAPE_FOLD_BYTES)     # (may fold in place)
    folded = before - computed(out)
    return out, folded if folded or out is not model else None


def _constants_second(model) -> None:
    """Put the constant operand of Add/Mul second, so patterns need not try both orders."""
    for node in model.graph:
        if node.op_type in ("Add", "Mul") and node.domain in ("", "ai.onnx") \
                and len(node.inputs) == 2:
            a, b = node.inputs
            if a is not None and b is not None and a.const_value is not None \
                    and b.const_value is None:
                node.replace_input_with(0, b)
                node.replace_input_with(1, a)


def _eliminate_identities(model) -> int:
    """Drop Identity nodes (fusions that cancel ops leave one) without renaming any graph
    input or output: an Identity between two interface values stays."""
    from onnxscript import ir

    count = 0
    for node in list(model.graph):
        if node.op_type != "Identity" or node.domain not in ("", "ai.onnx") or \
                len(node.inputs) != 1 or node.inputs[0] is None:
            continue
        x, y = node.inputs[0], node.outputs[0]
        if y.is_graph_output():
            if x.is_graph_input() or x.is_initializer() or x.is_graph_output() or \
                    x.producer() is None:
                continue
        was_output = y.is_graph_output()
        ir.convenience.replace_all_uses_with(y, x, replace_graph_outputs=True)
        if was_output:
            x.name = y.name
        model.graph.remove(node, safe=True)
        count += 1
    return count


@register("fuse")
def fuse(model: onnx.ModelProto, ctx: PassContext, *, disable: list[str] = (),
         only: list[str] = (), enable: list[str] = (),
         max_rounds: Annotated[int, Range(1, 20)] = 6) -> onnx.ModelProto:
    """Fuse subgraphs into single ops: BN/Mul/Add/Pad into Conv/Gemm, GELU, LayerNorm, attention...

    before: x -> Div(1.414) -> Erf -> Add(1) -> Mul(x) -> Mul(0.5)      after: x -> Gelu
    Patterns are listed by `onnxpress.passes.fuse.list_fusions()`; switch any off by name or
    family (`fuse:disable=gelu+attention`), run only some (`fuse:only=layout`), or turn on
    one that is off by default (`fuse:enable=skip_layernorm_sum_ort`). Contrib ops
    (com.microsoft) are used only when ctx.target is "ort"; other targets get plain ONNX.
    """
    from onnx_ir.passes.common import LiftConstantsToInitializersPass, RemoveUnusedNodesPass
    from onnxscript import ir


    t0 = time.perf_counter()
    disabled = api.select(disable, option="disable") if disable else set()
    chosen = api.select(only, option="only") if only else None
    extra = api.select(enable, option="enable") if enable else set()
    opset = _default_opset(model)
    target = ctx.target or "ort"
    fusions = [f for f in api.list_fusions()
               if f.name not in disabled and f.applies_to(opset, target)
               and (f.name in chosen if chosen is not None else (f.default or f.name in extra))]
    nodes_before = len(model.graph.node)

    model, folded = _fold_shape_arithmetic(model, ctx)
    types = _inferred_shapes(model)
    try:
        work = ir.serde.deserialize_model(model)
    except Exception as exc:
        raise PassError(f"pass 'fuse' could not read the model into onnx_ir: {exc}") from None
    _attach_shapes(work, types)
    lifted = LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(work).modified
    scalarized = _scalarize_constants(work)
    _constants_second(work)

    counts: dict[str, int] = {}
    rounds = 0
    while rounds < max_rounds:
        rounds += 1
        fired = 0
        for f in fusions:
            try:
                n = f.apply(work, ctx)
            except PassOptionError:
                raise
            except Exception as exc:
                raise PassError(f"pass 'fuse': fusion '{f.name}' failed: "
                                f"{type(exc).__name__}: {exc}") from exc
            if n:
                counts[f.name] = counts.get(f.name, 0) + n
                fired += n
        if not fired:
            break
    identities = _eliminate_identities(work)
    if not counts and not identities and not lifted and folded is None:
        # nothing to fuse: hand the model back as it came (no serialization churn)
        ctx.record(fused={}, fusions_fired=0, rounds=rounds, nodes_before=nodes_before,
                   nodes_after=nodes_before, fuse_seconds=round(time.perf_counter() - t0, 3))
        ctx.preserve("shapes")
        return model
    RemoveUnusedNodesPass()(work)
    _stub_own_weights(work, model)
    out = ir.serde.serialize_model(work)
    del work

    # keep exactly what the caller declared: value_info only for names it had, IO as given
    had = {v.name for v in model.graph.value_info}
    vis = [v for v in out.graph.value_info if v.name in had]
    del out.graph.value_info[:]
    out.graph.value_info.extend(vis)
    restore_graph_io(model, out)
    copy_model_fields(model, out)
    if any(n.domain == api.MS_DOMAIN for n in out.graph.node) and \
            not any(o.domain == api.MS_DOMAIN for o in out.opset_import):
        out.opset_import.append(onnx.helper.make_opsetid(api.MS_DOMAIN, 1))
    ctx.record(fused=dict(sorted(counts.items())), fusions_fired=sum(counts.values()),
               rounds=rounds, shape_arithmetic_folded=folded or 0,
               constants_scalarized=scalarized, identities_removed=identities,
               nodes_before=nodes_before, nodes_after=len(out.graph.node),
               fuse_seconds=round(time.perf_counter() - t0, 3))
    return adopt(model, out)


def _stub_own_weights(work, model: onnx.ModelProto) -> None:
    """The initializers of `work` that are still `model`'s own tensors go out as stubs, which
    `adopt` maps back to those tensors: serializing them would copy them."""
    from onnxscript import ir

    own = list(model.graph.initializer)      # held: the ids below stay theirs
    ids = {id(t) for t in own if is_weight(t)}
    for v in work.graph.initializers.values():
        t = v.const_value
        if isinstance(t, ir.serde.TensorProtoTensor) and id(t.raw) in ids:
            v.const_value = ir.serde.TensorProtoTensor(stub_of(t.raw))
