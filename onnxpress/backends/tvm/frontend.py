"""ONNX -> Relax: static shapes, unsupported-op detection, errors that name the node.

    onnx.ModelProto --(shapes bound from options)--> relax IRModule (weights as constants)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from onnxpress.errors import BackendError, OnnxPressError, UnsupportedOpError

from .targets import _first_line


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    init = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in init]


def _dtype_of(vi: onnx.ValueInfoProto) -> str:
    elem = vi.type.tensor_type.elem_type
    return str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)))


def bind_shapes(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int] | int] | None) -> dict[str, dict]:
    """{input name: {"shape": [...], "dtype": str}}, every dim static.

    `shapes` takes what the project's one shape binder takes (memory.liveness.bind_shapes, as
    `--shape` everywhere): an input's full shape ({"input_ids": [1, 128]}) or a dim name's size
    ({"seq": 128}, batch/seq aliases included). What TVM adds: a dynamic batch axis nothing binds
    is 1, a dim the model fixes cannot be changed, and any dim left dynamic is an error, since
    TVM builds static shapes."""
    from onnxpress.passes.memory.liveness import BATCH_DIM_NAMES, SEQUENCE_DIM_NAMES
    from onnxpress.passes.memory.liveness import bind_shapes as bind

    shapes = dict(shapes or {})
    inputs = graph_inputs(model)
    names = [i.name for i in inputs]
    dim_names = {d.dim_param for vi in inputs for d in vi.type.tensor_type.shape.dim if d.dim_param}
    unknown = sorted(set(shapes) - set(names) - dim_names - set(BATCH_DIM_NAMES) - set(SEQUENCE_DIM_NAMES))
    if unknown:
        raise BackendError(f"--shape names unknown input(s) or dim(s) {', '.join(unknown)}; "
                           f"the model's inputs are {', '.join(names)}"
                           + (f", its dims {', '.join(sorted(dim_names))}" if dim_names else ""))
    full = {k: [int(d) for d in v] for k, v in shapes.items() if k in names}
    dims = {k: int(v[0] if isinstance(v, (list, tuple)) else v) for k, v in shapes.items() if k not in names}
    for vi in inputs:
        if vi.name not in full:
            continue
        fixed = vi.type.tensor_type.shape.dim
        if len(full[vi.name]) != len(fixed):
            raise BackendError(f"--shape {vi.name} has {len(full[vi.name])} dims, the model's input has {len(fixed)}")
        for k, (given, d) in enumerate(zip(full[vi.name], fixed)):
            if d.HasField("dim_value") and d.dim_value != given:
                raise BackendError(f"--shape {vi.name}: dim {k} is fixed to {d.dim_value} in the model, got {given}")
    if not any(a in dims for a in BATCH_DIM_NAMES):
        dims["batch"] = 1            # a dynamic batch axis nothing binds runs one sample
    try:
        bound, unbound = bind(model, dims, full)
    except OnnxPressError as exc:
        raise BackendError(str(exc)) from None
    if unbound:
        first = next(iter(unbound))
        raise BackendError(
            f"dynamic dim(s) {'; '.join(d for ds in unbound.values() for d in ds)}: TVM builds "
            f"static shapes: pass shapes={{'{first}': [...]}} or a dim's size (CLI: --shape "
            f"{first}=1,... or --shape seq=128)")
    specs = {}
    for vi in graph_inputs(bound):
        specs[vi.name] = {"shape": [int(d.dim_value) for d in vi.type.tensor_type.shape.dim],
                          "dtype": _dtype_of(vi)}
    return specs


def check_supported_ops(model: onnx.ModelProto, also: tuple[str, ...] = ()) -> None:
    """Raise UnsupportedOpError naming the first node whose op TVM's ONNX frontend lacks
    (`also`: op types taken as supported, e.g. those the integer lowering rewrites)."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    convert_map = _get_convert_map()
    from .int8 import DOMAIN

    bad = [n for n in model.graph.node if n.domain != DOMAIN and n.op_type not in also
           and n.op_type not in convert_map and n.op_type not in ("Constant", "If")]
    for n in model.graph.node:  # ops of non-default domains that share a name are still foreign
        if n.domain not in ("", "ai.onnx", "com.microsoft", DOMAIN) and n not in bad:
            bad.append(n)
    if bad:
        first = bad[0]
        others = sorted({n.op_type for n in bad[1:]} - {first.op_type})
        more = f" (also unsupported: {', '.join(others)})" if others else ""
        domain = f" in domain '{first.domain}'" if first.domain else ""
        hint = ("rewrite or remove it before compiling (onnxruntime can still run this model)")
        if first.domain == "com.microsoft":
            hint = ("it is an onnxruntime contrib op: run the passes for TVM instead "
                    "(passes.apply(..., target='tvm'), which keeps plain ONNX ops)")
        raise UnsupportedOpError(
            f"TVM cannot import op '{first.op_type}'{domain} at node '{first.name or '(unnamed)'}'"
            f"{more}; {hint}")


def has_dynamic_inputs(model: onnx.ModelProto) -> bool:
    return any(not (d.HasField("dim_value") and d.dim_value > 0)
               for vi in graph_inputs(model) for d in vi.type.tensor_type.shape.dim)


def freeze_shape_ops(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None,
                     *, dims: Mapping[str, int] | None = None) -> onnx.ModelProto:
    """A copy of `model` with its inputs bound (by input, `input_shapes`, or by dim name, `dims`,
    as in liveness.bind_static_shapes) and every Shape node whose input then has static dims
    replaced by that value (an initializer). Dims onnx shape inference cannot follow are
    measured by running the bound model once on onnxruntime."""
    from onnxpress.passes.memory.liveness import bind_static_shapes, static_types

    bound = bind_static_shapes(model, dims, input_shapes)
    types = static_types(bound)
    nodes = []
    for n in bound.graph.node:
        info = types.get(n.input[0]) if n.op_type == "Shape" and n.input else None
        if info is not None and info[1] is not None:
            start = next((a.i for a in n.attribute if a.name == "start"), 0)
            end = next((a.i for a in n.attribute if a.name == "end"), len(info[1]))
            value = np.array(info[1][slice(start, end)], dtype=np.int64)
            bound.graph.initializer.append(onnx.numpy_helper.from_array(value, n.output[0]))
            continue
        nodes.append(n)
    del bound.graph.node[:]
    bound.graph.node.extend(nodes)
    return bound


def fold_static_shapes(model: onnx.ModelProto, specs: Mapping[str, dict]) -> onnx.ModelProto:
    """With every input shape bound, shape arithmetic (Shape -> Gather -> Concat -> Reshape ...)
    becomes constant: freeze the Shape nodes and fold the rest with onnxpress's own cleanup
    before TVM sees it. Left symbolic, TVM's importer keeps dims such as MiniLM's `x * 384`
    that no schedule rule accepts (those kernels then run unscheduled, 10x slower) and
    mishandles some chains (MiniLM's attention-mask ConstantOfShape)."""
    import contextlib
    import io

    from onnxpress import passes

    shapes = {k: v["shape"] for k, v in specs.items()}
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            static = freeze_shape_ops(model, shapes)
            return passes.apply(static, ["shape_infer", "fold_constants", "dce", "simplify"], shapes=shapes)
    except Exception:
        pass
    static = onnx.ModelProto()
    static.CopyFrom(model)
    for vi in static.graph.input:
        if vi.name in specs:
            for d, size in zip(vi.type.tensor_type.shape.dim, specs[vi.name]["shape"]):
                d.Clear()
                d.dim_value = int(size)
    del static.graph.value_info[:]          # stale symbolic shapes; shape_infer recomputes them
    try:
        return passes.apply(static, ["shape_infer", "fold_constants", "dce"], shapes=shapes)
    except Exception:
        return static


def to_relax(model: onnx.ModelProto, specs: Mapping[str, dict], *, integer: bool = True,
             decisions: list | None = None, target=None):
    """Import into Relax with weights bound as constants. integer: quantized groups (QDQ and
    QOperator) become integer kernels first (int8.lower_integer); `decisions` receives what
    happened to each candidate node."""
    from .int8 import QOPERATOR_OPS

    check_supported_ops(model, QOPERATOR_OPS if integer else ())
    folded = has_dynamic_inputs(model)
    if folded:
        model = fold_static_shapes(model, specs)
    try:
        return _import(_lowered(model, integer, decisions, target), specs)
    except UnsupportedOpError:
        raise
    except BackendError:
        if folded:
            raise
        return _import(_lowered(fold_static_shapes(model, specs), integer, decisions, target), specs)


def _lowered(model: onnx.ModelProto, integer: bool, decisions: list | None, target=None) -> onnx.ModelProto:
    from .int8 import lower_integer

    if not integer:
        return model
    lowered, found = lower_integer(model, target)
    if decisions is not None:
        decisions[:] = found
    check_supported_ops(lowered)        # a QOperator node the lowering could not take
    return lowered


def _import(model: onnx.ModelProto, specs: Mapping[str, dict]):
    import contextlib
    import io

    from tvm.relax.frontend.onnx import from_onnx

    from .int8 import integer_converters

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    try:
        # the importer prints its own diagnostics to stdout before raising; we raise a clear error
        with contextlib.redirect_stdout(io.StringIO()), integer_converters():
            return from_onnx(model, shape_dict={k: v["shape"] for k, v in specs.items()},
                         dtype_dict={k: v["dtype"] for k, v in specs.items()},
                         opset=opset, keep_params_in_input=False, sanitize_input_names=False)
    except Exception as exc:
        msg = _first_line(exc)
        for n in model.graph.node:
            if n.op_type and n.op_type in msg:
                raise UnsupportedOpError(
                    f"TVM failed to import op '{n.op_type}' (first such node '{n.name}'): {msg}") from None
        raise BackendError(f"TVM's ONNX importer failed: {msg}") from None
