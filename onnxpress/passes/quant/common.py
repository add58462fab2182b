"""Helpers shared by the quant passes: weight quantization, constant lifting, opset, naming."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxpress.stats import iter_graphs
from onnxpress.weights import drop_initializers

FLOAT = onnx.TensorProto.FLOAT


def opset_version(model: onnx.ModelProto, domain: str = "") -> int:
    for o in model.opset_import:
        if o.domain in (domain, "ai.onnx" if domain == "" else domain):
            return o.version
    return 0


def ensure_opset(model: onnx.ModelProto, minimum: int) -> tuple[onnx.ModelProto, bool]:
    """Raise the default-domain opset to `minimum` (onnx's version converter) when it is lower."""
    if opset_version(model) >= minimum:
        return model, False
    from onnx import version_converter

    from onnxpress.passes.graph import copy_model_fields

    converted = version_converter.convert_version(model, minimum)
    keep = [o for o in model.opset_import if o.domain not in ("", "ai.onnx")]
    copy_model_fields(model, converted)
    for o in converted.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = minimum
    have = {o.domain for o in converted.opset_import}
    converted.opset_import.extend(o for o in keep if o.domain not in have)
    return converted, True


def set_opset(model: onnx.ModelProto, domain: str, version: int) -> None:
    """Make sure `domain` is imported at `version` or newer (com.microsoft and friends)."""
    for o in model.opset_import:
        if o.domain == domain:
            o.version = max(o.version, version)
            return
    model.opset_import.append(helper.make_opsetid(domain, version))


def constants_to_initializers(graph: onnx.GraphProto) -> int:
    """Lift tensor-valued Constant nodes into initializers of the graph they live in
    (subgraphs included), so weights held in Constant nodes are quantized like the rest."""
    lifted = 0
    for g in iter_graphs(graph):
        keep = []
        for node in g.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                attr = next((a for a in node.attribute if a.name == "value"
                             and a.type == onnx.AttributeProto.TENSOR), None)
                if attr is not None and attr.t.data_type == FLOAT and _numel(attr.t) > 1:
                    t = onnx.TensorProto()
                    t.CopyFrom(attr.t)
                    t.name = node.output[0]
                    g.initializer.append(t)
                    lifted += 1
                    continue
            keep.append(node)
        if len(keep) != len(g.node):
            del g.node[:]
            g.node.extend(keep)
    return lifted


def resolve_constant_identities(graph: onnx.GraphProto) -> int:
    """Readers of Identity(initializer) read the initializer itself (torch's exporter writes
    such Identity nodes when it deduplicates equal weights or biases), so every layer sees its
    weight as a constant. Identity nodes that feed a graph output stay. Returns how many went."""
    outputs = {o.name for o in graph.output}
    inits = {t.name for t in graph.initializer} - {i.name for i in graph.input}
    alias = {n.output[0]: n.input[0] for n in graph.node
             if n.op_type == "Identity" and n.input and n.input[0] in inits
             and n.output[0] not in outputs}
    if not alias:
        return 0
    for g in iter_graphs(graph):
        for n in g.node:
            for k, i in enumerate(n.input):
                if i in alias:
                    n.input[k] = alias[i]
    keep = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    del graph.node[:]
    graph.node.extend(keep)
    return len(alias)


def replace_graph_nodes(model: onnx.ModelProto, graph: onnx.GraphProto,
                        nodes: list[onnx.NodeProto], keep: set[str]) -> None:
    """Put `nodes` in place of `graph`'s nodes and drop the initializers no node of the model
    (subgraphs included) and no graph output reads any more; names in `keep` always stay."""
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for g in iter_graphs(model.graph) for n in g.node for i in n.input}
    used |= {o.name for o in graph.output}
    drop_initializers(graph, lambda t: t.name in used or t.name in keep)


def _numel(t: onnx.TensorProto) -> int:
    return int(np.prod(t.dims)) if len(t.dims) else 1


def quantize_weight(w: np.ndarray, axis: int | None, *, bits: int = 8
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric signed quantization: (q, scale); per channel along `axis`, per tensor if None.
    The range is +-(2^(bits-1) - 1) so that -q never overflows."""
    qmax = 2 ** (bits - 1) - 1
    w = w.astype(np.float32)
    if axis is None:
        m = np.array(np.abs(w).max() if w.size else 0.0, dtype=np.float32)
        scale = np.where(m > 0, m / qmax, 1.0).astype(np.float32)
        q = np.clip(np.round(w / scale), -qmax, qmax)
    else:
        axes = tuple(i for i in range(w.ndim) if i != axis)
        m = np.abs(w).max(axis=axes) if w.size else np.zeros(w.shape[axis], np.float32)
        scale = np.where(m > 0, m / qmax, 1.0).astype(np.float32)
        shape = [1] * w.ndim
        shape[axis] = -1
        q = np.clip(np.round(w / scale.reshape(shape)), -qmax, qmax)
    return q.astype(np.int8), scale


class Names:
    """Fresh tensor/node names that collide with nothing in the model (subgraphs included)."""

    def __init__(self, model: onnx.ModelProto):
        self.taken: set[str] = set()
        for g in iter_graphs(model.graph):
            self.taken |= {t.name for t in g.initializer}
            self.taken |= {v.name for v in list(g.input) + list(g.output) + list(g.value_info)}
            for n in g.node:
                self.taken |= set(n.output) | set(n.input)
                if n.name:
                    self.taken.add(n.name)

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name = f"{base}_{i}"
            i += 1
        self.taken.add(name)
        return name


def make_dq_weight(graph: onnx.GraphProto, init: onnx.TensorProto, axis: int | None,
                   names: Names, *, bits: int = 8) -> tuple[onnx.NodeProto, np.ndarray]:
    """Replace float initializer `init` in `graph` by int8 + DequantizeLinear producing the same
    name (every reader, in any scope, now reads the dequantized weight). Returns (node, scale)."""
    w = numpy_helper.to_array(init)
    q, scale = quantize_weight(w, axis, bits=bits)
    qname = names(init.name + "_q")
    sname = names(init.name + "_s")
    zname = names(init.name + "_zp")
    graph.initializer.remove(init)
    graph.initializer.extend([numpy_helper.from_array(q, qname),
                              numpy_helper.from_array(scale, sname),
                              numpy_helper.from_array(np.zeros(scale.shape, np.int8), zname)])
    attrs = {"axis": axis} if axis is not None else {}
    # (an explicit zero point: onnxruntime's QGemm fusion wants one)
    node = helper.make_node("DequantizeLinear", [qname, sname, zname], [init.name], **attrs)
    return node, scale


def weight_axis(node: onnx.NodeProto, w_rank: int) -> int | None:
    """The output-channel axis of a Conv/Gemm/MatMul weight (input 1), for per-channel scales."""
    if node.op_type in ("Conv", "ConvTranspose"):
        return 0 if node.op_type == "Conv" else 1
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "MatMul":
        return w_rank - 1 if w_rank >= 2 else None
    return None


def quantize_gather_tables(model: onnx.ModelProto, names: Names, *,
                           min_elements: int = 65536) -> int:
    """Embedding tables read only by Gather(axis 0) become int8 with one scale per row:

        before: y = Gather(E fp32 [V, D], ids)
        after:  y = Cast(Gather(E int8, ids), float) * Gather(s [V, 1], ids)

    Only the gathered rows are dequantized at run time. Returns the number of tables."""
    done = 0
    for g in iter_graphs(model.graph):
        g_inputs = {i.name for i in g.input}
        inits = {t.name: t for t in g.initializer if t.name not in g_inputs}
        readers: dict[str, list[onnx.NodeProto]] = {}
        for g2 in iter_graphs(model.graph):
            for n in g2.node:
                for i in n.input:
                    if i in inits:
                        readers.setdefault(i, []).append(n)
        tables = {}
        for name, nodes in readers.items():
            t = inits[name]
            if (t.data_type != FLOAT or len(t.dims) != 2 or _numel(t) < min_elements
                    or any(n.op_type != "Gather" or n.input[0] != name
                           or helper.get_attribute_value(next(
                               (a for a in n.attribute if a.name == "axis"),
                               helper.make_attribute("axis", 0))) != 0
                           for n in nodes)
                    or any(n not in g.node for n in nodes)):
                continue
            tables[name] = nodes
        if not tables:
            continue
        new_nodes: dict[int, list[onnx.NodeProto]] = {}
        for name, nodes in tables.items():
            init = inits[name]
            w = numpy_helper.to_array(init)
            q, scale = quantize_weight(w, 0)
            qn, sn = names(name + "_quantized"), names(name + "_row_scale")
            g.initializer.remove(init)
            g.initializer.extend([numpy_helper.from_array(q, qn),
                                  numpy_helper.from_array(scale.reshape(-1, 1), sn)])
            for n in nodes:
                out = n.output[0]
                gq, gs, gf = names(out + "_int8"), names(out + "_scale"), names(out + "_float")
                new_nodes[id(n)] = [
                    helper.make_node("Gather", [qn, n.input[1]], [gq], axis=0,
                                     name=names(n.name + "_int8" if n.name else gq)),
                    helper.make_node("Gather", [sn, n.input[1]], [gs], axis=0,
                                     name=names(gs + "_Gather")),
                    helper.make_node("Cast", [gq], [gf], to=FLOAT, name=names(gf + "_Cast")),
                    helper.make_node("Mul", [gf, gs], [out], name=names(out + "_Mul")),
                ]
            done += 1
        rebuilt = []
        for n in g.node:
            rebuilt.extend(new_nodes.get(id(n), [n]))
        del g.node[:]
        g.node.extend(rebuilt)
    return done


# -- fused contrib ops around quantization ------------------------------------------------------
FUSED_BASE = {"FusedConv": "Conv", "FusedGemm": "Gemm"}


def _activation_node(act: str, params: list[float], x: str, y: str, name: str,
                     graph: onnx.GraphProto, names: Names) -> onnx.NodeProto:
    """The standard node computing onnxruntime's fused `activation` (with activation_params)."""
    if act == "Clip":
        lo, hi = (params + [-3.4028234663852886e38, 3.4028234663852886e38])[:2] if params else \
            (-3.4028234663852886e38, 3.4028234663852886e38)
        lo_n, hi_n = names(name + "_min"), names(name + "_max")
        graph.initializer.extend([numpy_helper.from_array(np.array(lo, np.float32), lo_n),
                                  numpy_helper.from_array(np.array(hi, np.float32), hi_n)])
        return helper.make_node("Clip", [x, lo_n, hi_n], [y], name=name)
    attrs = {}
    if act == "LeakyRelu" and params:
        attrs["alpha"] = params[0]
    elif act == "HardSigmoid" and params:
        attrs.update(alpha=params[0], beta=params[1] if len(params) > 1 else 0.5)
    return helper.make_node(act, [x], [y], name=name, **attrs)


@dataclasses.dataclass
class FusedSplit:
    """What `split_fused_ops` did, for `restore_fused_ops`: each fused node with copies of the
    nodes its split made, and the weights only fused nodes read (gone with the split)."""

    splits: dict[str, tuple[onnx.NodeProto, list[onnx.NodeProto]]] = \
        dataclasses.field(default_factory=dict)
    removed_initializers: list[onnx.TensorProto] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.splits)


def _split_conv_or_gemm(n: onnx.NodeProto, graph: onnx.GraphProto, names: Names
                        ) -> list[onnx.NodeProto] | None:
    base = FUSED_BASE[n.op_type]
    act = next((helper.get_attribute_value(a) for a in n.attribute if a.name == "activation"), b"")
    act = act.decode() if isinstance(act, bytes) else act
    if act not in ("", "Relu", "Clip", "LeakyRelu", "HardSigmoid", "Sigmoid", "Tanh"):
        return None
    params = next((list(helper.get_attribute_value(a)) for a in n.attribute
                   if a.name == "activation_params"), [])
    label = n.name or names(base.lower())
    core = helper.make_node(base, list(n.input[:3]), [names(n.output[0] + "_" + base.lower())],
                            name=label)
    core.attribute.extend(a for a in n.attribute if not a.name.startswith("activation"))
    out = [core]
    t = core.output[0]
    if base == "Conv" and len(n.input) > 3 and n.input[3]:
        s = names(n.output[0] + "_sum") if act else n.output[0]
        out.append(helper.make_node("Add", [t, n.input[3]], [s], name=names(label + "_add")))
        t = s
    if act:
        out.append(_activation_node(act, params, t, n.output[0], names(label + "_" + act.lower()),
                                    graph, names))
    else:
        core.output[0] = n.output[0]
    return out


def _split_attention(n: onnx.NodeProto, graph: onnx.GraphProto, names: Names
                     ) -> list[onnx.NodeProto] | None:
    """com.microsoft.Attention(x, W[D, 3H], b[3H], , , bias) back into its Q/K/V MatMuls, so
    they can get integer kernels (onnxruntime has none for Attention with an additive mask)."""
    inits = {t.name: t for t in graph.initializer}
    extra = [a.name for a in n.attribute if a.name not in ("num_heads", "scale")]
    if (extra or len(n.input) < 3 or any(i for i in n.input[3:5]) or len(n.input) > 6
            or n.input[1] not in inits or n.input[2] not in inits or len(n.output) > 1):
        return None
    heads = next(a.i for a in n.attribute if a.name == "num_heads")
    w, b = numpy_helper.to_array(inits[n.input[1]]), numpy_helper.to_array(inits[n.input[2]])
    if w.ndim != 2 or w.shape[1] % 3 or (w.shape[1] // 3) % heads:
        return None
    hidden = w.shape[1] // 3
    d = hidden // heads
    scale = next((a.f for a in n.attribute if a.name == "scale"), 1.0 / np.sqrt(d))
    label = n.name or names("attention")

    def const(arr, base):
        name = names(f"{label}_{base}")
        graph.initializer.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def t(base):
        return names(f"{n.output[0]}_{base}")

    nodes: list[onnx.NodeProto] = []
    split_shape = const(np.array([0, 0, heads, d], np.int64), "split_heads")
    heads_out: dict[str, str] = {}
    for k, (part, perm) in enumerate((("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]),
                                      ("v", [0, 2, 1, 3]))):
        wk = const(w[:, k * hidden:(k + 1) * hidden].copy(), f"{part}_weight")
        bk = const(b[k * hidden:(k + 1) * hidden].copy(), f"{part}_bias")
        mm, add, r4, tr = t(part + "_mm"), t(part + "_add"), t(part + "_4d"), t(part)
        nodes += [helper.make_node("MatMul", [n.input[0], wk], [mm], name=names(f"{label}_{part}")),
                  helper.make_node("Add", [mm, bk], [add], name=names(f"{label}_{part}_bias")),
                  helper.make_node("Reshape", [add, split_shape], [r4], name=names(f"{label}_{part}_heads")),
                  helper.make_node("Transpose", [r4], [tr], perm=perm, name=names(f"{label}_{part}_t"))]
        heads_out[part] = tr
    scores, scaled = t("scores"), t("scaled")
    nodes += [helper.make_node("MatMul", [heads_out["q"], heads_out["k"]], [scores],
                               name=names(f"{label}_scores")),
              helper.make_node("Mul", [scores, const(np.array(scale, np.float32), "scale")],
                               [scaled], name=names(f"{label}_scale"))]
    logits = scaled
    if len(n.input) > 5 and n.input[5]:
        logits = t("masked")
        nodes.append(helper.make_node("Add", [scaled, n.input[5]], [logits], name=names(f"{label}_mask")))
    probs, ctx_, ctx_t = t("probs"), t("context"), t("context_t")
    nodes += [helper.make_node("Softmax", [logits], [probs], axis=-1, name=names(f"{label}_softmax")),
              helper.make_node("MatMul", [probs, heads_out["v"]], [ctx_], name=names(f"{label}_context")),
              helper.make_node("Transpose", [ctx_], [ctx_t], perm=[0, 2, 1, 3],
                               name=names(f"{label}_context_t")),
              helper.make_node("Reshape", [ctx_t, const(np.array([0, 0, hidden], np.int64), "merge_heads")],
                               [n.output[0]], name=names(f"{label}_merge"))]
    return nodes


def split_fused_ops(model: onnx.ModelProto) -> FusedSplit:
    """Rewrite the main graph's com.microsoft FusedConv/FusedGemm/Attention (from `fuse`, or
    any export) back into standard ops, in place, so calibration sees every tensor quantization
    needs and every weight gets its integer kernel:

        FusedConv(x, W, B, z, activation=Relu) -> y    becomes    Relu(Add(Conv(x, W, B), z)) -> y
        Attention(x, Wqkv, bqkv, , , bias)             becomes    the Q/K/V MatMuls + Add, heads
                                                                  split, softmax(QK^T*s + bias) V

    Returns what `restore_fused_ops` needs to fuse back the ones that stay float. The Conv/Gemm
    of a split keeps the fused node's name, so per-layer choices keyed by name still apply."""
    graph = model.graph
    names = Names(model)
    fused = FusedSplit()
    nodes: list[onnx.NodeProto] = []
    for n in graph.node:
        made = None
        if n.domain == "com.microsoft" and n.op_type in FUSED_BASE:
            made = _split_conv_or_gemm(n, graph, names)
        elif n.domain == "com.microsoft" and n.op_type == "Attention":
            made = _split_attention(n, graph, names)
        if made is None:
            nodes.append(n)
            continue
        keep = onnx.NodeProto()
        keep.CopyFrom(n)
        copies = []
        for m in made:
            c = onnx.NodeProto()
            c.CopyFrom(m)
            copies.append(c)
        fused.splits[n.output[0]] = (keep, copies)
        nodes.extend(made)
    if fused:
        del graph.node[:]
        graph.node.extend(nodes)
        # weights only the fused nodes read (Attention's packed QKV) leave with them; restore
        # brings them back
        read = {i for g in iter_graphs(graph) for n in g.node for i in n.input}
        gone = [t for t in graph.initializer if t.name not in read
                and any(t.name in node.input for node, _ in fused.splits.values())]
        for t in gone:
            graph.initializer.remove(t)
        fused.removed_initializers = gone
    return fused


def restore_fused_ops(model: onnx.ModelProto, fused: FusedSplit) -> list[tuple[onnx.NodeProto, list]]:
    """Put back, in place, each fused node of `split_fused_ops` whose split form came through
    quantization untouched (every node it made is still there, as it was: so it stayed float).
    Returns [(fused node, the nodes its split had made)] for those put back."""
    if not fused:
        return []
    graph = model.graph
    by_name = {n.name: n for n in graph.node if n.name}
    drop: set[int] = set()
    put: dict[int, onnx.NodeProto] = {}
    own: set[str] = set()
    restored: list[tuple[onnx.NodeProto, list]] = []
    for node, made in fused.splits.values():
        now = [by_name.get(m.name) for m in made]
        if any(c is None or c.SerializeToString(deterministic=True)
               != m.SerializeToString(deterministic=True) for c, m in zip(now, made)):
            continue
        drop.update(id(c) for c in now)
        put[id(now[-1])] = node
        restored.append((node, made))
        own.update(i for m in made for i in m.input)
    if not put:
        return []
    nodes = [put.get(id(n), n) for n in graph.node if id(n) not in drop or id(n) in put]
    needed = {i for n in put.values() for i in n.input}
    graph.initializer.extend(t for t in fused.removed_initializers if t.name in needed)
    # the split's own constants (Clip bounds, Q/K/V slices...) go when nothing reads them
    keep = {t.name for t in graph.initializer} - (own - {i for n in nodes for i in n.input})
    replace_graph_nodes(model, graph, nodes, keep=keep)
    return restored


def warn_convs_left_float(pass_name: str, model: onnx.ModelProto, figures: dict,
                          min_weight: int, quantized: int) -> None:
    """The MatMul/Gemm-only passes (quant_dynamic, quant_int4) on a model whose weight is in its
    convolutions: record how many convolutions stayed float and say so, with the pass that
    quantizes them."""
    inits = {t.name: t for t in model.graph.initializer}
    convs = sum(1 for n in model.graph.node
                if n.op_type in ("Conv", "ConvTranspose", "FusedConv") and len(n.input) > 1
                and n.input[1] in inits and int(np.prod(inits[n.input[1]].dims)) >= min_weight)
    figures["conv_layers_float"] = convs
    if convs:
        import warnings

        warnings.warn(
            f"{pass_name}: {convs} convolution(s) stayed float ({pass_name} quantizes MatMul/Gemm "
            f"weights; {quantized} quantized). For convolutions use quant_int8 with calibration "
            "data (or quant_auto).", stacklevel=3)
