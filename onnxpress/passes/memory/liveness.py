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

from onnxpress.errors import InvalidModelError, PassOptionError
from onnxpress.passes.context import PassContext, register_analysis
from onnxpress.passes.graph import infer_shapes, subgraph_outer_inputs

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
    unsized: list[str] = dataclasses.field(default_factory=list)

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
                if len(value) == 1:
                    dim_sizes[str(key)] = int(value[0])
                input_shapes[str(key)] = [int(v) for v in value]
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
    dims = dict(dims or {})
    for alias_group in (BATCH_DIM_NAMES, SEQUENCE_DIM_NAMES):
        given = [dims[a] for a in alias_group if a in dims]
        if given:
            for a in alias_group:
                dims.setdefault(a, given[0])
    input_shapes = dict(input_shapes or {})
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name for t in out.graph.initializer}
    unbound = []
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
            unbound.append(f"'{inp.name}' (no shape at all)")
            continue
        for axis, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                continue
            size = dims.get(d.dim_param) if d.dim_param else None
            if size is None and axis == 0 and "batch" in dims:
                size = dims["batch"]
            if size is None:
                size = default_dim
            if size is None:
                unbound.append(f"'{inp.name}' axis {axis} ({d.dim_param or 'unnamed'})")
                continue
            d.Clear()
            d.dim_value = int(size)
    if unbound:
        raise PassOptionError(
            "memory planning needs static shapes; unbound dims: " + ", ".join(unbound)
            + ". Bind them by name (reuse:batch=1,seq=128 or reuse:dims=NAME/SIZE+NAME/SIZE; "
            "--shape seq=128 on the command line) or by input (shapes={'input': [1, 3, 224, 224]}"
            "; --shape input=1,3,224,224)")
    del out.graph.value_info[:]
    for o in out.graph.output:
        if o.type.HasField("tensor_type") and o.type.tensor_type.HasField("shape"):
            for d in o.type.tensor_type.shape.dim:
                if not d.HasField("dim_value"):
                    d.Clear()
    # non-strict: what inference cannot size, onnxruntime measures (static_types)
    return infer_shapes(out, strict=False, data_prop=True)


def _static_types(graph: onnx.GraphProto) -> dict[str, tuple[int, list[int] | None]]:
    out: dict[str, tuple[int, list[int] | None]] = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        if not vi.type.HasField("tensor_type"):
            continue
        tt = vi.type.tensor_type
        dims = None
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            dims = [int(d.dim_value) for d in tt.shape.dim]
        prev = out.get(vi.name)
        if prev is None or (prev[1] is None and dims is not None):
            out[vi.name] = (tt.elem_type, dims)
    return out


def _probe_with_ort(bound: onnx.ModelProto, names: list[str],
                    dims: Mapping[str, int]) -> dict[str, tuple[int, list[int]]]:
    """Run the bound model once on onnxruntime exposing `names` as outputs: their real shapes."""
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
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(probe.SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
        feeds = {k: np.asarray(v) for k, v in make_inputs(bound, shapes=dict(dims)).items()}
        values = sess.run(names, feeds)
    except Exception as exc:
        raise InvalidModelError(
            f"cannot size {len(names)} tensors (e.g. '{names[0]}'): shape inference left them "
            f"dynamic and running the model on onnxruntime failed ({str(exc).splitlines()[0]})"
        ) from None
    out = {}
    for name, value in zip(names, values):
        arr = np.asarray(value)
        out[name] = (onnx.helper.np_dtype_to_tensor_dtype(arr.dtype), list(arr.shape))
    return out


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
                   allow_unknown: bool = False, where: str = "graph",
                   inplace_policy: str = "oldest", alignment: int = 64,
                   outer_scope: frozenset[str] = frozenset()) -> Liveness:
    """Liveness of `graph` over `order` (indices into graph.node; default: as stored).

    `types` maps tensor names to (elem_type, static dims). Bodies of If/Loop/Scan are analysed
    in their stored order and reserved as a workspace at their node's step.
    """
    names = node_names(graph)
    order = list(range(len(graph.node))) if order is None else list(order)
    if sorted(order) != list(range(len(graph.node))):
        raise InvalidModelError(f"{where}: the execution order is not a permutation of the nodes")
    weights, weights_bytes = _weights(graph)
    # a body's reads of enclosing-scope tensors are the parent's business (they keep the
    # parent's tensor alive up to the node that owns the body)
    weights |= outer_scope
    graph_inputs = [i.name for i in graph.input if i.name not in weights]
    graph_outputs = {o.name for o in graph.output}
    n_steps = len(order)
    last_step = max(0, n_steps - 1)
    tensors: dict[str, TensorLife] = {}
    unsized: list[str] = []

    def size_of(name: str, node_name: str | None) -> int:
        info = types.get(name)
        itemsize = _itemsize(info[0]) if info else None
        if info is None or info[1] is None or itemsize is None:
            if not allow_unknown:
                at = f"output of node '{node_name}'" if node_name else "graph input"
                raise InvalidModelError(
                    f"{where}: the size of tensor '{name}' ({at}) is unknown after binding the "
                    "shapes; bind the remaining dynamic dims or pass allow_unknown=true to leave "
                    "it out of the plan")
            unsized.append(name)
            return 0
        return int(np.prod(info[1], dtype=np.int64)) * itemsize

    for name in graph_inputs:
        tensors[name] = TensorLife(name, size_of(name, None), 0, 0, "input")
    position = {}
    subgraphs: dict[str, dict[str, Liveness]] = {}
    for step, idx in enumerate(order):
        node = graph.node[idx]
        position[names[idx]] = step
        reads = [i for i in node.input if i] + sorted(subgraph_outer_inputs(node))
        for name in reads:
            t = tensors.get(name)
            if t is None:
                if name in weights or name in position:
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
                                     outer_scope=inner_scope)
                for attr, g in bodies}
        for name in node.output:
            if not name or name in weights:
                continue
            if name in tensors:
                raise InvalidModelError(f"{where}: tensor '{name}' is produced twice")
            kind = "output" if name in graph_outputs else "intermediate"
            tensors[name] = TensorLife(name, size_of(name, names[idx]), step, step, kind)
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
                    subgraphs=subgraphs, weights_bytes=weights_bytes, unsized=unsized)


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
                      inplace: bool = True, allow_unknown: bool = False) -> Liveness:
    """Liveness of the main graph in its stored order; shapes bound from `dims` and ctx.shapes."""
    dim_sizes, input_shapes = normalise_bindings(dims, ctx.shapes)
    return model_liveness(model, dim_sizes, input_shapes, default_dim=default_dim,
                          inplace=inplace, allow_unknown=allow_unknown)


def static_types(model: onnx.ModelProto, dims: Mapping[str, int] | None = None,
                 input_shapes: Mapping[str, Sequence[int]] | None = None, *,
                 default_dim: int | None = None) -> dict[str, tuple[int, list[int] | None]]:
    """{tensor: (elem_type, static dims)} for every graph and subgraph, after binding shapes.

    Tensors of the main graph that onnx shape inference leaves dynamic are measured by running
    the bound model once on onnxruntime.
    """
    from onnxpress.stats import iter_graphs

    bound = bind_static_shapes(model, dims, input_shapes, default_dim=default_dim)
    types: dict[str, tuple[int, list[int] | None]] = {}
    for g in iter_graphs(bound.graph):
        for k, v in _static_types(g).items():
            if k not in types or (types[k][1] is None and v[1] is not None):
                types[k] = v
    weights, _ = _weights(bound.graph)
    missing = []
    for n in bound.graph.node:
        for o in n.output:
            if o and o not in weights and (o not in types or types[o][1] is None):
                missing.append(o)
    if missing:
        bound_dims = {k: v for k, v in (dims or {}).items()}
        feeds_shapes = dict(bound_dims)
        for inp in bound.graph.input:
            tt = inp.type.tensor_type
            feeds_shapes[inp.name] = [d.dim_value for d in tt.shape.dim]
        types.update(_probe_with_ort(bound, missing, feeds_shapes))
    return types


def model_liveness(model: onnx.ModelProto, dims: Mapping[str, int] | None = None,
                   input_shapes: Mapping[str, Sequence[int]] | None = None, *,
                   order: Sequence[int] | None = None, default_dim: int | None = None,
                   inplace: bool = True, allow_unknown: bool = False,
                   types: Mapping[str, tuple[int, list[int] | None]] | None = None) -> Liveness:
    """Liveness of `model`'s main graph over `order` (default: the stored node order)."""
    if types is None:
        types = static_types(model, dims, input_shapes, default_dim=default_dim)
    return graph_liveness(model.graph, types, order, inplace=inplace, allow_unknown=allow_unknown)


