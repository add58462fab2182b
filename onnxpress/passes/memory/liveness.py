"""Liveness of activation tensors over an execution order, with static (or bound) shapes.

A step is one node of the order. A tensor is live from the step that produces it (graph inputs:
step 0) to the last step that reads it (graph outputs: the last step); a node whose subgraphs read
an outer tensor counts as reading it. Weights (initializers, Constant nodes) are not activations.

    x ──Conv──> a ──Relu──> b ──Add(b, x)──> y          order: [Conv, Relu, Add]
    x: [0, 2]   a: [0, 1]   b: [1, 2]  (in place over a)  y: [2, 2]

In-place: an elementwise or view op may write its output over an input that dies at that node
(same element count and item size, not a graph input or output). Such a pair shares one buffer;
the plan marks the output with `inplace_of`.

Subgraphs (If/Loop/Scan bodies) are planned on their own; the node that runs them gets a
workspace tensor `<node>::body` live at its step only, as large as its largest body's arena.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnxpress.errors import InvalidModelError, PassOptionError
from onnxpress.passes.context import PassContext, register_analysis
from onnxpress.passes.graph import infer_shapes, subgraph_outer_inputs
from onnxpress.weights import is_stub, stub_copy

# Ops whose output element i depends only on input element i (after broadcasting the others):
# writing the output over an input of the same shape is safe.
ELEMENTWISE_OPS = frozenset("""
Abs Acos Acosh Add And Asin Asinh Atan Atanh BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor
Cast Ceil Celu Clip Cos Cosh Div Dropout Elu Equal Erf Exp Floor Gelu Greater GreaterOrEqual
HardSigmoid HardSwish Identity IsInf IsNaN LeakyRelu Less LessOrEqual Log Max Mean Min Mish Mod Mul
Neg Not Or Pow PRelu Reciprocal Relu Round Selu Sigmoid Sign Sin Sinh Softplus Softsign Sqrt Sub
Sum Swish Tan Tanh ThresholdedRelu Where Xor
""".split())
# onnxruntime's contrib activations (what the fuse pass produces for target ort): elementwise too
MS_ELEMENTWISE_OPS = frozenset({"Gelu", "FastGelu", "QuickGelu", "BiasGelu", "BiasAdd"})
# Ops that only reinterpret the shape: the output is the input's bytes.
VIEW_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})
INPLACE_OPS = ELEMENTWISE_OPS | VIEW_OPS

SEQUENCE_DIM_NAMES = ("seq", "sequence", "sequence_length", "seq_len", "seqlen")
BATCH_DIM_NAMES = ("batch", "batch_size", "N", "n")


@dataclasses.dataclass
class TensorLife:
    """One activation: its size in bytes and the steps it is live (inclusive)."""

    name: str
    size: int
    first: int
    last: int
    kind: str = "intermediate"  # input | intermediate | output | workspace
    inplace_of: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"size": self.size, "first": self.first, "last": self.last,
                             "kind": self.kind}
        if self.inplace_of:
            d["inplace_of"] = self.inplace_of
        return d


@dataclasses.dataclass
class Liveness:
    """Liveness of one graph over one order; `subgraphs[node][attr]` for bodies."""

    order: list[str]
    tensors: dict[str, TensorLife]
    node_index: dict[str, int]
    subgraphs: dict[str, dict[str, Liveness]] = dataclasses.field(default_factory=dict)
    weights_bytes: int = 0
    # tensors left to the runtime: {"tensor", "kind", "node", "reason", "detail"} each
    unplanned: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def unsized(self) -> list[str]:
        """Names of the tensors left out of the plan (see `unplanned` for why)."""
        return [u["tensor"] for u in self.unplanned]

    @property
    def planned_count(self) -> int:
        """Activations in the plan, bodies included (workspaces are not counted)."""
        return (sum(1 for t in self.tensors.values() if t.kind != "workspace")
                + sum(sub.planned_count for bodies in self.subgraphs.values()
                      for sub in bodies.values()))

    @property
    def unplanned_count(self) -> int:
        """Activations left to the runtime, bodies included."""
        return len(self.unplanned) + sum(sub.unplanned_count for bodies in self.subgraphs.values()
                                         for sub in bodies.values())

    @property
    def steps(self) -> int:
        return max(1, len(self.order))

    @property
    def naive_bytes(self) -> int:
        """Every activation in its own buffer (no reuse)."""
        return sum(t.size for t in self.tensors.values())

    def live_bytes(self, *, inplace: bool = True) -> np.ndarray:
        """Bytes live at each step; an in-place pair counts once at the step it changes hands."""
        diff = np.zeros(self.steps + 1, dtype=np.int64)
        for t in self.tensors.values():
            diff[t.first] += t.size
            diff[t.last + 1] -= t.size
            if inplace and t.inplace_of is not None:
                diff[t.first] -= t.size
                diff[t.first + 1] += t.size
        return np.cumsum(diff)[:-1]

    @property
    def lower_bound_bytes(self) -> int:
        """The largest total size of tensors alive at one step: no plan can use less."""
        return int(self.live_bytes().max()) if self.tensors else 0

    @property
    def lower_bound_no_inplace_bytes(self) -> int:
        return int(self.live_bytes(inplace=False).max()) if self.tensors else 0

    @property
    def peak_step(self) -> int:
        return int(np.argmax(self.live_bytes())) if self.tensors else 0

    def live_at(self, step: int) -> list[TensorLife]:
        """Tensors live at `step`, largest first (an in-place input ending here left out)."""
        taken = {t.inplace_of for t in self.tensors.values()
                 if t.inplace_of is not None and t.first == step}
        out = [t for t in self.tensors.values()
               if t.first <= step <= t.last and not (t.name in taken and t.last == step)]
        return sorted(out, key=lambda t: (-t.size, t.name))


# -- naming -----------------------------------------------------------------------------------
def node_names(graph: onnx.GraphProto) -> list[str]:
    """A unique, deterministic name per node: its own when unique, else `<op>_<index>`."""
    seen: dict[str, int] = {}
    for n in graph.node:
        if n.name:
            seen[n.name] = seen.get(n.name, 0) + 1
    used = {name for name, count in seen.items() if count == 1}
    out = []
    for i, n in enumerate(graph.node):
        if n.name and seen.get(n.name) == 1:
            out.append(n.name)
            continue
        base = f"{n.name or n.op_type}_{i}"
        name, k = base, 1
        while name in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        out.append(name)
    return out


def name_nodes(graph: onnx.GraphProto, *, recursive: bool = True) -> int:
    """Give every node the name `node_names` assigns it; returns how many were renamed."""
    renamed = 0
    for node, name in zip(graph.node, node_names(graph)):
        if node.name != name:
            node.name = name
            renamed += 1
        if recursive:
            for g in _subgraphs(node):
                renamed += name_nodes(g)
    return renamed


def _subgraphs(node: onnx.NodeProto) -> list[tuple[str, onnx.GraphProto]] | list:
    out = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def _named_subgraphs(node: onnx.NodeProto) -> list[tuple[str, onnx.GraphProto]]:
    out = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append((a.name, a.g))
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend((f"{a.name}[{i}]", g) for i, g in enumerate(a.graphs))
    return out


# -- shapes -----------------------------------------------------------------------------------
def _itemsize(elem_type: int) -> int | None:
    if elem_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    try:
        return int(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize)
    except (KeyError, TypeError, ValueError):
        return None


def normalise_bindings(dims: Mapping[str, Any] | None,
                       shapes: Mapping[str, Any] | None = None) -> tuple[dict[str, int],
                                                                         dict[str, list[int]]]:
    """Split user bindings into {dim name: size} and {input name: full shape}."""
    dim_sizes: dict[str, int] = {}
    input_shapes: dict[str, list[int]] = {}
    for source in (shapes or {}), (dims or {}):
        for key, value in source.items():
            if isinstance(value, (list, tuple)):
                try:
                    sizes = [int(v) for v in value]
                except (TypeError, ValueError):
                    raise PassOptionError(
                        f"shape binding '{key}={value}': sizes must be integers") from None
                if any(v < 0 for v in sizes):
                    raise PassOptionError(
                        f"shape binding '{key}={value}': sizes must not be negative")
                if len(sizes) == 1:
                    dim_sizes[str(key)] = sizes[0]
                input_shapes[str(key)] = sizes
            else:
                try:
                    dim_sizes[str(key)] = int(value)
                except (TypeError, ValueError):
                    raise PassOptionError(
                        f"shape binding '{key}={value}': sizes must be integers") from None
    for key, size in dim_sizes.items():
        if size <= 0:
            raise PassOptionError(f"shape binding '{key}={size}': sizes must be positive")
    return dim_sizes, input_shapes


def bind_static_shapes(model: onnx.ModelProto, dims: Mapping[str, int] | None = None,
                       input_shapes: Mapping[str, Sequence[int]] | None = None, *,
                       default_dim: int | None = None) -> onnx.ModelProto:
    """A copy of `model` with every graph input static, then shape-inferred (onnx, data_prop).

    Dynamic dims are bound by name (`dims={"batch": 1, "seq": 128}`; `batch`/`seq` also bind the
    usual spellings: batch_size, sequence_length...), by input (`input_shapes={"x": [1, 3, 8, 8]}`)
    or, when `default_dim` is given, to that size. An unbound dim raises PassOptionError naming
    the input and the dim.
    """
    bound, unbound = bind_shapes(model, dims, input_shapes, default_dim=default_dim)
    if unbound:
        raise _unbound_error(unbound)
    return bound


def _unbound_error(unbound: Mapping[str, list[str]]) -> PassOptionError:
    return PassOptionError(
        "memory planning needs static shapes; unbound dims: "
        + ", ".join(d for dims in unbound.values() for d in dims) + ". " + BIND_HINT)


BIND_HINT = ("Bind them by name (reuse:batch=1,seq=128 or reuse:dims=NAME/SIZE+NAME/SIZE; "
             "--shape seq=128 on the command line) or by input (shapes={'input': [1, 3, 224, "
             "224]}; --shape input=1,3,224,224)")


def bind_shapes(model: onnx.ModelProto, dims: Mapping[str, int] | None = None,
                input_shapes: Mapping[str, Sequence[int]] | None = None, *,
                default_dim: int | None = None, keep_output_shapes: bool = True,
                weights: bool = True) -> tuple[onnx.ModelProto, dict[str, list[str]]]:
    """As `bind_static_shapes`, but dims nothing binds stay symbolic: (shape-inferred copy,
    {input: ["'x' axis 0 (batch)", ...]} for the inputs left with unbound dims).

    `keep_output_shapes=False` drops the graph outputs' declared shapes before inference, so
    that every static dim is one inference derived (a declared [2, 4] on NonZero's output holds
    for the test input it was written for, not for every input). `weights=False`: the copy's
    weights are stubs (`weights.stub_copy`), for callers that only read its shapes."""
    dims = dict(dims or {})
    for alias_group in (BATCH_DIM_NAMES, SEQUENCE_DIM_NAMES):
        given = [dims[a] for a in alias_group if a in dims]
        if given:
            for a in alias_group:
                dims.setdefault(a, given[0])
    input_shapes = dict(input_shapes or {})
    if weights:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    else:
        out = stub_copy(model)
    inits = {t.name for t in out.graph.initializer}
    unbound: dict[str, list[str]] = {}
    for inp in out.graph.input:
        if inp.name in inits or not inp.type.HasField("tensor_type"):
            continue
        tt = inp.type.tensor_type
        if inp.name in input_shapes:
            full = input_shapes[inp.name]
            if tt.HasField("shape") and len(full) != len(tt.shape.dim):
                raise PassOptionError(
                    f"shape {list(full)} for input '{inp.name}' has rank {len(full)}; the input "
                    f"has rank {len(tt.shape.dim)}")
            tt.ClearField("shape")
            for size in full:
                tt.shape.dim.add().dim_value = int(size)
            continue
        if not tt.HasField("shape"):
            unbound.setdefault(inp.name, []).append(f"'{inp.name}' (no shape at all)")
            continue
        for axis, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value") and d.dim_value >= 0:   # 0 is a size: an empty tensor
                continue
            size = dims.get(d.dim_param) if d.dim_param else None
            if size is None and axis == 0 and "batch" in dims:
                size = dims["batch"]
            if size is None:
                size = default_dim
            if size is None:
                unbound.setdefault(inp.name, []).append(
                    f"'{inp.name}' axis {axis} ({d.dim_param or 'unnamed'})")
                continue
            d.Clear()
            d.dim_value = int(size)
    del out.graph.value_info[:]
    for o in out.graph.output:
        if o.type.HasField("tensor_type") and o.type.tensor_type.HasField("shape"):
            if not keep_output_shapes:
                o.type.tensor_type.ClearField("shape")
                continue
            for d in o.type.tensor_type.shape.dim:
                if not d.HasField("dim_value"):
                    d.Clear()
    # non-strict: what inference cannot size, onnxruntime measures (static_types)
    # `out` is this function's own copy: annotate it in place, a second copy costs its bytes
    inferred = infer_shapes(out, strict=False, data_prop=True, weights=False)
    del out.graph.value_info[:]
    out.graph.value_info.extend(inferred.graph.value_info)
    if [o.name for o in inferred.graph.output] == [o.name for o in out.graph.output]:
        del out.graph.output[:]
        out.graph.output.extend(inferred.graph.output)
    if len(inferred.graph.node) == len(out.graph.node):   # If/Loop/Scan bodies' value_info
        del out.graph.node[:]
        out.graph.node.extend(inferred.graph.node)
    return out, unbound


def _static_types(graph: onnx.GraphProto) -> dict[str, tuple[int, list[int] | None]]:
    out: dict[str, tuple[int, list[int] | None]] = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        if not vi.type.HasField("tensor_type"):
            continue
        tt = vi.type.tensor_type
        dims = None
        # a negative dim_value (an unresolved -1 some inference paths write) is no size
        if tt.HasField("shape") and all(d.HasField("dim_value") and d.dim_value >= 0
                                        for d in tt.shape.dim):
            dims = [int(d.dim_value) for d in tt.shape.dim]
        prev = out.get(vi.name)
        if prev is None or (prev[1] is None and dims is not None):
            out[vi.name] = (tt.elem_type, dims)
    return out


# -- what has a static size, and why the rest has none ----------------------------------------
# Why a tensor is left to the runtime (the plan's `unplanned[].reason`), and what that means.
UNPLANNED_REASONS = {
    "string": "a string tensor: its bytes depend on its contents",
    "sequence": "a sequence: its length and its tensors are decided while the model runs",
    "optional": "an optional value: whether it holds anything is decided while the model runs",
    "map": "a map: its size is decided while the model runs",
    "sparse_tensor": "a sparse tensor: its size depends on how many values are non-zero",
    "unbound_dim": "its shape depends on a graph input dim that nothing binds",
    "data_dependent": "its shape depends on values computed while the model runs",
    "unknown_shape": "shape inference could not size it",
    "unknown_type": "its element type is unknown or has no fixed size",
}
_KINDS = {"sequence_type": "sequence", "optional_type": "optional", "map_type": "map",
          "sparse_tensor_type": "sparse_tensor"}

# Inputs whose *values* decide an op's output shape (indices into node.input). When one of them
# holds values known only at run time, the output's size is data-dependent.
SHAPE_VALUE_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "ConstantOfShape": (0,), "Range": (0, 1, 2),
    "Slice": (1, 2, 3, 4), "Pad": (1, 3), "Resize": (1, 2, 3), "Upsample": (1,), "TopK": (1,),
    "Split": (1,), "OneHot": (1,), "Squeeze": (1,), "Unsqueeze": (1,), "CenterCropPad": (1,),
    "MaxUnpool": (2,), "DFT": (1, 2), "STFT": (1, 3), "MelWeightMatrix": (0, 1, 2, 3, 4),
    "BlackmanWindow": (0,), "HannWindow": (0,), "HammingWindow": (0,), "Col2Im": (1, 2),
    "AffineGrid": (1,), "NonZero": (0,), "Unique": (0,), "Compress": (1,),
    "NonMaxSuppression": (0, 1, 2, 3, 4), "StringSplit": (0,), "ImageDecoder": (0,),
    "If": (0,), "Loop": (0, 1), "SequenceInsert": (2,), "SequenceErase": (1,),
    "SequenceAt": (1,), "SplitToSequence": (1,), "OptionalGetElement": (0,),
    **{op: (1,) for op in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd",
                           "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
                           "ReduceSumSquare")},
}
# ops whose output values depend only on their input's shape (or a sequence's length)
SHAPE_ONLY_OPS = frozenset({"Shape", "Size", "SequenceLength"})
RANDOM_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                        "Bernoulli", "Multinomial"})


@dataclasses.dataclass
class SizeInfo:
    """What `size_info` learns: types with static dims where known, and for tensors that have
    no static size, (reason, detail) with reason a key of UNPLANNED_REASONS."""

    types: dict[str, tuple[int, list[int] | None]]
    reasons: dict[str, tuple[str, str]]
    unbound: dict[str, list[str]]
    # tensors whose shape is not static but whose element count is (a Reshape to a shape read
    # from an input): {name: (elem_type, [count])}
    flat: dict[str, tuple[int, list[int]]] = dataclasses.field(default_factory=dict)

    @property
    def planning_types(self) -> dict[str, tuple[int, list[int] | None]]:
        """`types` with the flat types added: what the planner sizes tensors by."""
        return {**self.types, **self.flat}


def _is_static(info: tuple[int, list[int] | None] | None) -> bool:
    return info is not None and info[1] is not None


def _dependence(graph: onnx.GraphProto, types: Mapping[str, tuple[int, list[int] | None]],
                value_dep: dict[str, tuple[str, str]], shape_dep: dict[str, tuple[str, str]],
                unbound: Mapping[str, list[str]], body_of: str | None = None) -> None:
    """Forward over `graph` (and its bodies): which tensors hold values known only at run time
    (`value_dep`: graph inputs, what is computed from them, Shape of an unbound input) and which
    have sizes that depend on such values or on unbound dims (`shape_dep`). A tensor onnx shape
    inference gave static dims is static, whatever it was computed from."""
    weights = {t.name for t in graph.initializer}
    for inp in graph.input:
        if inp.name in weights:
            continue
        if body_of is None:
            value_dep[inp.name] = ("data_dependent", f"the values of input '{inp.name}'")
            if inp.name in unbound:
                shape_dep[inp.name] = ("unbound_dim", "its shape follows " + ", ".join(
                    unbound[inp.name]) + ", which nothing binds")
        else:
            value_dep[inp.name] = ("data_dependent", f"values computed inside {body_of}")
            if not _is_static(types.get(inp.name)) and inp.type.HasField("tensor_type"):
                shape_dep[inp.name] = (
                    "data_dependent", f"{body_of} passes it in with a shape that can change from "
                    "one run (or iteration) to the next")
    names = node_names(graph)
    for node, name in zip(graph.node, names):
        op = node.op_type if node.domain in ("", "ai.onnx") else None
        bodies = _named_subgraphs(node)
        for attr, g in bodies:
            _dependence(g, types, value_dep, shape_dep, unbound,
                        body_of=f"{node.op_type} '{name}' ({attr})")
        reads = [i for i in node.input if i] + sorted(subgraph_outer_inputs(node))
        if op in SHAPE_ONLY_OPS:
            vdep = shape_dep.get(node.input[0]) if node.input else None
        elif op in RANDOM_OPS:
            vdep = ("data_dependent", f"{op} '{name}' draws random values")
        else:
            vdep = next((value_dep[i] for i in reads if i in value_dep), None)
        sdep = None
        if op not in SHAPE_ONLY_OPS:
            shaped = [i for i in node.input if i] + [o.name for _, g in bodies for o in g.output]
            sdep = next((shape_dep[i] for i in shaped if i in shape_dep), None)
        if sdep is None and op in SHAPE_VALUE_INPUTS:
            for k in SHAPE_VALUE_INPUTS[op]:
                if k < len(node.input) and node.input[k] in value_dep:
                    reason, why = value_dep[node.input[k]]
                    sdep = (reason, f"{op} '{name}' sizes its output from the values of "
                                    f"'{node.input[k]}' ({why})")
                    break
        for o in node.output:
            if not o:
                continue
            if vdep is not None:
                value_dep[o] = vdep
            if sdep is not None and not _is_static(types.get(o)):
                shape_dep[o] = sdep


def _kinds(graph: onnx.GraphProto) -> dict[str, str]:
    """{tensor: reason} for values typed as sequences, optionals, maps, sparse tensors."""
    out = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        which = vi.type.WhichOneof("value") if vi.HasField("type") else None
        if which in _KINDS:
            out[vi.name] = _KINDS[which]
    return out


def _probe_with_ort(bound: onnx.ModelProto, names: list[str], dims: Mapping[str, int],
                    model: onnx.ModelProto | None = None,
                    ) -> tuple[dict[str, tuple[int, list[int]]], dict[str, tuple[str, str]]]:
    """Run the bound model once on onnxruntime exposing `names` as outputs: (their real shapes,
    {name: (reason, detail)} for those that turn out to have no static size, or for all of them
    when the run fails). The weights `bound` holds as stubs come from `model`'s initializers,
    handed to onnxruntime as arrays (no serialized copy of them)."""
    import onnxruntime as ort

    from onnxpress.data import make_inputs

    probe = onnx.ModelProto()
    probe.CopyFrom(bound)
    have = {o.name for o in probe.graph.output}
    for name in names:
        if name not in have:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4
    # prepacked weights would be one more copy of them, for a single run
    opts.add_session_config_entry("session.disable_prepacking", "1")
    stubs = [t.name for t in probe.graph.initializer if is_stub(t)]
    if stubs:
        own = {t.name: t for t in model.graph.initializer}
        arrays = [numpy_helper.to_array(own[n]) for n in stubs]
        opts.add_external_initializers(stubs, [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays])
    try:
        sess = ort.InferenceSession(probe.SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
        feeds = {k: np.asarray(v) for k, v in make_inputs(bound, shapes=dict(dims)).items()}
        values = sess.run(names, feeds)
    except Exception as exc:
        msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        why = ("unknown_shape", "shape inference could not size it and running the model once "
                                f"on onnxruntime to measure it failed ({msg})")
        return {}, {name: why for name in names}
    out: dict[str, tuple[int, list[int]]] = {}
    left: dict[str, tuple[str, str]] = {}
    for name, value in zip(names, values):
        if isinstance(value, list):
            left[name] = ("sequence", UNPLANNED_REASONS["sequence"])
        elif value is None:
            left[name] = ("optional", UNPLANNED_REASONS["optional"])
        elif isinstance(value, dict):
            left[name] = ("map", UNPLANNED_REASONS["map"])
        elif not isinstance(value, np.ndarray):
            left[name] = ("unknown_type", f"onnxruntime returned a {type(value).__name__}")
        elif value.dtype == object:
            out[name] = (onnx.TensorProto.STRING, list(value.shape))
        else:
            try:
                out[name] = (onnx.helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape))
            except (KeyError, TypeError, ValueError):
                left[name] = ("unknown_type", f"onnxruntime returned {value.dtype} values")
    return out, left


def _same_element_count(graph: onnx.GraphProto, types: Mapping[str, tuple[int, list[int] | None]],
                        reasons: dict[str, tuple[str, str]]) -> dict[str, tuple[int, list[int]]]:
    """A view (Reshape, Flatten, Squeeze, Unsqueeze) or a one-input elementwise op keeps its
    input's element count whatever its shape: where only the shape depends on run-time values
    (a Reshape to a shape read from an input), the byte size is still static. Such tensors leave
    `reasons`; returns {tensor: (elem_type, [element count])}, a flat type for planning only."""
    from onnxpress.stats import iter_graphs

    flat: dict[str, tuple[int, list[int]]] = {}
    for g in iter_graphs(graph):
        for n in g.node:
            if n.domain not in ("", "ai.onnx") or not n.output or not n.output[0] or not n.input:
                continue
            if not (n.op_type in VIEW_OPS or (n.op_type in ELEMENTWISE_OPS
                                              and sum(1 for i in n.input if i) == 1)):
                continue
            src, out = n.input[0], n.output[0]
            why = reasons.get(out)
            info, out_info = flat.get(src) or types.get(src), types.get(out)
            if (why is None or why[0] not in ("data_dependent", "unbound_dim") or src in reasons
                    or not _is_static(info) or out_info is None or _itemsize(out_info[0]) is None):
                continue
            flat[out] = (out_info[0], [int(np.prod(info[1], dtype=np.int64))])
            del reasons[out]
    return flat


def size_info(model: onnx.ModelProto, dims: Mapping[str, int] | None = None,
              input_shapes: Mapping[str, Sequence[int]] | None = None, *,
              default_dim: int | None = None, strict: bool = False) -> SizeInfo:
    """Types with static dims for every graph and subgraph after binding shapes, and the reason
    each tensor without a static size has none.

    Tensors of the main graph that onnx shape inference leaves dynamic are measured by running
    the bound model once on onnxruntime, unless their size depends on unbound dims or on values
    known only at run time (NonZero's output, a Reshape to a shape read from an input...): a
    measurement would hold for the random inputs of that one run only. The graph outputs'
    declared shapes are not taken on trust (they may describe one test input). `strict`: unbound dims
    raise PassOptionError (as bind_static_shapes) and a failed measurement InvalidModelError.
    """
    from onnxpress.stats import iter_graphs

    bound, unbound = bind_shapes(model, dims, input_shapes, default_dim=default_dim,
                                 keep_output_shapes=False, weights=False)
    if strict and unbound:
        raise _unbound_error(unbound)
    types: dict[str, tuple[int, list[int] | None]] = {}
    kinds: dict[str, str] = {}
    for g in iter_graphs(bound.graph):
        for k, v in _static_types(g).items():
            if k not in types or (types[k][1] is None and v[1] is not None):
                types[k] = v
        kinds.update(_kinds(g))
    value_dep: dict[str, tuple[str, str]] = {}
    shape_dep: dict[str, tuple[str, str]] = {}
    _dependence(bound.graph, types, value_dep, shape_dep, unbound)
    reasons: dict[str, tuple[str, str]] = dict(shape_dep)
    for name, kind in kinds.items():
        reasons[name] = (kind, UNPLANNED_REASONS[kind])
    flat = _same_element_count(bound.graph, types, reasons)
    weights, _ = _weights(bound.graph)
    missing = []
    for n in bound.graph.node:
        for o in n.output:
            if (o and o not in weights and o not in reasons and o not in flat
                    and not _is_static(types.get(o))):
                missing.append(o)
    if missing:
        feeds_shapes = dict(dims or {})
        for inp in bound.graph.input:
            tt = inp.type.tensor_type
            if inp.name not in unbound:
                feeds_shapes[inp.name] = [d.dim_value for d in tt.shape.dim]
        measured, left = _probe_with_ort(bound, missing, feeds_shapes, model)
        if strict and left and all(r == "unknown_shape" for r, _ in left.values()):
            raise InvalidModelError(
                f"cannot size {len(missing)} tensors (e.g. '{missing[0]}'): "
                + next(iter(left.values()))[1]) from None
        types.update(measured)
        reasons.update(left)
    return SizeInfo(types, reasons, unbound, flat)


# -- liveness ---------------------------------------------------------------------------------
def _weights(graph: onnx.GraphProto) -> tuple[set[str], int]:
    names = {t.name for t in graph.initializer}
    total = 0
    for t in graph.initializer:
        size = _itemsize(t.data_type) or 0
        total += int(np.prod(t.dims, dtype=np.int64)) * size
    for n in graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            names.update(o for o in n.output if o)
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    total += int(np.prod(a.t.dims, dtype=np.int64)) * (_itemsize(a.t.data_type) or 0)
    return names, total


def graph_liveness(graph: onnx.GraphProto, types: Mapping[str, tuple[int, list[int] | None]],
                   order: Sequence[int] | None = None, *, inplace: bool = True,
                   allow_unknown: bool = True, where: str = "graph",
                   inplace_policy: str = "oldest", alignment: int = 64,
                   outer_scope: frozenset[str] = frozenset(),
                   reasons: Mapping[str, tuple[str, str]] | None = None) -> Liveness:
    """Liveness of `graph` over `order` (indices into graph.node; default: as stored).

    `types` maps tensor names to (elem_type, static dims). Bodies of If/Loop/Scan are analysed
    in their stored order and reserved as a workspace at their node's step. A tensor without a
    static size (`reasons` says why, see `size_info`) is an error, or with `allow_unknown` left
    out of the liveness and listed in `unplanned`: the runtime allocates it.
    """
    names = node_names(graph)
    order = list(range(len(graph.node))) if order is None else list(order)
    if sorted(order) != list(range(len(graph.node))):
        raise InvalidModelError(f"{where}: the execution order is not a permutation of the nodes")
    reasons = reasons or {}
    weights, weights_bytes = _weights(graph)
    # a body's reads of enclosing-scope tensors are the parent's business (they keep the
    # parent's tensor alive up to the node that owns the body)
    weights |= outer_scope
    graph_inputs = [i.name for i in graph.input if i.name not in weights]
    graph_outputs = {o.name for o in graph.output}
    n_steps = len(order)
    last_step = max(0, n_steps - 1)
    tensors: dict[str, TensorLife] = {}
    unplanned: list[dict[str, Any]] = []
    left: set[str] = set()

    def why_unsized(name: str) -> tuple[str, str] | None:
        info = types.get(name)
        if name in reasons:
            return reasons[name]
        if info is None:
            return ("unknown_type", "shape inference could not type it")
        if info[0] == onnx.TensorProto.STRING:
            return ("string", UNPLANNED_REASONS["string"])
        if _itemsize(info[0]) is None:
            return ("unknown_type", UNPLANNED_REASONS["unknown_type"])
        if info[1] is None:
            return ("unknown_shape", UNPLANNED_REASONS["unknown_shape"]
                    + (" (inside a subgraph, which is not measured on onnxruntime)"
                       if where != "graph" else ""))
        return None

    def size_of(name: str, node_name: str | None, kind: str) -> int | None:
        why = why_unsized(name)
        if why is None:
            info = types[name]
            return int(np.prod(info[1], dtype=np.int64)) * _itemsize(info[0])
        at = f"output of node '{node_name}'" if node_name else "graph input"
        if not allow_unknown:
            raise InvalidModelError(
                f"{where}: tensor '{name}' ({at}) has no static size: {why[1]}. Bind the "
                "remaining dynamic dims, or pass allow_unknown=true to leave it to the runtime")
        unplanned.append({"tensor": name, "kind": kind, "node": node_name, "reason": why[0],
                          "detail": why[1]})
        left.add(name)
        return None

    for name in graph_inputs:
        size = size_of(name, None, "input")
        if size is not None:
            tensors[name] = TensorLife(name, size, 0, 0, "input")
    position = {}
    subgraphs: dict[str, dict[str, Liveness]] = {}
    for step, idx in enumerate(order):
        node = graph.node[idx]
        position[names[idx]] = step
        reads = [i for i in node.input if i] + sorted(subgraph_outer_inputs(node))
        for name in reads:
            t = tensors.get(name)
            if t is None:
                if name in weights or name in position or name in left:
                    continue
                raise InvalidModelError(
                    f"{where}: node '{names[idx]}' reads '{name}' before any node produces it; "
                    "the order is not topological")
            t.last = max(t.last, step)
        bodies = _named_subgraphs(node)
        if bodies:
            inner_scope = frozenset(weights | {i.name for i in graph.input}
                                    | {o for n in graph.node for o in n.output if o})
            subgraphs[names[idx]] = {
                attr: graph_liveness(g, types, inplace=inplace, allow_unknown=allow_unknown,
                                     where=f"{where}/{names[idx]}.{attr}",
                                     inplace_policy=inplace_policy, alignment=alignment,
                                     outer_scope=inner_scope, reasons=reasons)
                for attr, g in bodies}
        for name in node.output:
            if not name or name in weights:
                continue
            if name in tensors or name in left:
                raise InvalidModelError(f"{where}: tensor '{name}' is produced twice")
            kind = "output" if name in graph_outputs else "intermediate"
            size = size_of(name, names[idx], kind)
            if size is not None:
                tensors[name] = TensorLife(name, size, step, step, kind)
    for name in graph_outputs:
        if name in tensors:
            tensors[name].last = last_step
    # a body's arena is needed while its node runs
    for node_name, bodies in subgraphs.items():
        from onnxpress.passes.memory.planner import plan_offsets

        arena = max((plan_offsets(lv, alignment=alignment).arena_bytes
                     for lv in bodies.values()), default=0)
        if arena:
            step = position[node_name]
            ws = f"{node_name}::body"
            tensors[ws] = TensorLife(ws, arena, step, step, "workspace")
    if inplace:
        _mark_inplace(graph, names, order, tensors, set(graph_inputs), graph_outputs, types,
                      inplace_policy)
    return Liveness(order=[names[i] for i in order], tensors=tensors,
                    node_index={names[i]: i for i in range(len(names))},
                    subgraphs=subgraphs, weights_bytes=weights_bytes, unplanned=unplanned)


INPLACE_POLICIES = ("oldest", "first")


def _mark_inplace(graph, names, order, tensors, inputs, outputs, types,
                  policy: str = "oldest") -> None:
    """Pair outputs with a dying input to write over. `oldest` prefers the input whose buffer
    has lived longest (keeps a residual stream in one buffer), `first` the first eligible one."""
    taken: set[str] = set()
    born: dict[str, int] = {}  # tensor -> first step of the buffer it belongs to
    for step, idx in enumerate(order):
        node = graph.node[idx]
        if not ((node.domain in ("", "ai.onnx") and node.op_type in INPLACE_OPS)
                or (node.domain == "com.microsoft" and node.op_type in MS_ELEMENTWISE_OPS)):
            continue
        out = node.output[0] if node.output else ""
        y = tensors.get(out)
        if y is None or y.size == 0 or y.first != step:
            continue
        candidates = node.input[:1] if node.op_type in VIEW_OPS else node.input
        eligible = []
        for name in dict.fromkeys(candidates):
            x = tensors.get(name)
            if (x is None or name in taken or name in inputs or name in outputs
                    or x.kind == "workspace" or x.last != step or x.size != y.size):
                continue
            tx, ty = types.get(name), types.get(out)
            if tx is None or ty is None or _itemsize(tx[0]) != _itemsize(ty[0]):
                continue
            eligible.append(name)
        if not eligible:
            continue
        if policy == "oldest":
            name = min(eligible, key=lambda n: born.get(n, tensors[n].first))
        else:
            name = eligible[0]
        y.inplace_of = name
        taken.add(name)
        born[out] = born.get(name, tensors[name].first)


@register_analysis("liveness")
def liveness_analysis(model: onnx.ModelProto, ctx: PassContext, *,
                      dims: Mapping[str, int] | None = None, default_dim: int | None = None,
                      inplace: bool = True, allow_unknown: bool = True) -> Liveness:
    """Liveness of the main graph in its stored order; shapes bound from `dims` and ctx.shapes.
    Tensors without a static size are left out (`unplanned`) unless `allow_unknown=False`."""
    dim_sizes, input_shapes = normalise_bindings(dims, ctx.shapes)
    return model_liveness(model, dim_sizes, input_shapes, default_dim=default_dim,
                          inplace=inplace, allow_unknown=allow_unknown)


def static_types(model: onnx.ModelProto, dims: Mapping[str, int] | None = None,
                 input_shapes: Mapping[str, Sequence[int]] | None = None, *,
                 default_dim: int | None = None) -> dict[str, tuple[int, list[int] | None]]:
    """{tensor: (elem_type, static dims)} for every graph and subgraph, after binding shapes
    (unbound dims raise PassOptionError). Tensors of the main graph that onnx shape inference
    leaves dynamic are measured by running the bound model once on onnxruntime, except those
    whose size depends on run-time values (see `size_info`): their dims stay None."""
    return size_info(model, dims, input_shapes, default_dim=default_dim, strict=True).types


def model_liveness(model: onnx.ModelProto, dims: Mapping[str, int] | None = None,
                   input_shapes: Mapping[str, Sequence[int]] | None = None, *,
                   order: Sequence[int] | None = None, default_dim: int | None = None,
                   inplace: bool = True, allow_unknown: bool = True,
                   types: Mapping[str, tuple[int, list[int] | None]] | None = None) -> Liveness:
    """Liveness of `model`'s main graph over `order` (default: the stored node order)."""
    reasons = None
    if types is None:
        info = size_info(model, dims, input_shapes, default_dim=default_dim,
                         strict=not allow_unknown)
        types, reasons = info.planning_types, info.reasons
    return graph_liveness(model.graph, types, order, inplace=inplace, allow_unknown=allow_unknown,
                          reasons=reasons)
