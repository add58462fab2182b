"""Channel dependency groups: which output channels must be removed together.

A structured prune removes output channels of a layer (Conv filters, Gemm/MatMul neurons). Every
tensor those channels flow into carries them on one axis, and whatever reads that axis must
shrink too. This analysis walks the graph once and labels every tensor's channel axis with the
*groups* it is made of:

    conv_a ──┐                          group G = {conv_a, conv_b}: a residual Add joins the
             Add ── Relu ── conv_c      channels of both sources, so they prune together;
    conv_b ──┘                          conv_c's input channels (a *sink*) follow G.

    conv_pw ── Relu ── conv_dw(group=C) ── Mul(SE gate) ── conv_pwl
               depthwise conv passes the channels through (its filters and `group` shrink),
               the SE gate's expand conv joins the group through the Mul.

    conv ── MaxPool ── Flatten ── Gemm     Flatten keeps the layout with an inner size (H*W):
                                           the Gemm's input columns c*H*W..(c+1)*H*W follow c.

    conv(group=G) ── conv                  a grouped conv's filters prune evenly per block
                                           (`blocks`); its input channels stay.

Concat along the channel axis makes a layout of several segments (one per input group).
A group is *frozen* (never pruned) when its channels reach a graph output or come from a graph
input, or flow into an op this analysis does not understand (it says which, in the reason).
Normalizations over the channel axis do not freeze it: LayerNormalization, a LayerNorm written
out as ReduceMean/ReduceSum statistics (a sum divided by the channel count gets the kept count),
an L2 norm, (Log)Softmax all recompute over the kept channels, so pruning there is approximate
(like pruning any layer) rather than exact.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnxpress.passes.context import PassContext, register_analysis
from onnxpress.passes.graph import constants, has_subgraphs, subgraph_outer_inputs

# ops that act on each element independently (a tracked axis passes through unchanged)
UNARY_OPS = {
    "Relu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf", "Clip", "LeakyRelu", "Elu",
    "Selu", "Gelu", "Identity", "Dropout", "Neg", "Abs", "Sqrt", "Exp", "Log", "Softplus",
    "Softsign", "Cast", "Mish", "Celu", "ThresholdedRelu", "Reciprocal", "Floor", "Ceil", "Round",
    "Sign", "Sin", "Cos", "IsNaN", "Not", "QuickGelu", "FastGelu",
}
BINARY_OPS = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu",
              "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Where"}
POOL_OPS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool",
            "GlobalLpPool", "Resize", "Upsample", "DepthToSpace_"}
SOURCE_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
# reductions over the channel axis that a normalization reads as statistics (mean, variance, a
# norm): pruning renormalizes over the kept channels, as LayerNormalization does
CHANNEL_STATISTICS = {"ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceL1"}
# onnxruntime's contrib ops that `fuse` writes (target ort), read with the same rules as the
# standard ops they stand for: FusedConv = act(Conv(x, W, B) + Z); the Gelus act element-wise
# (BiasGelu and FastGelu add a per-channel bias first)
MS_DOMAIN = "com.microsoft"
MS_UNARY_OPS = {"Gelu", "QuickGelu", "FastGelu", "BiasGelu"}


def const_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node outputs (passes.graph.constants), also through Identity,
    as arrays by name."""
    consts = {name: numpy_helper.to_array(t) for name, t in constants(graph).items()}
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in consts:
            consts[node.output[0]] = consts[node.input[0]]
    return consts


@dataclasses.dataclass
class Layout:
    """The channel axis of one tensor: `segments` [(group id, size)] in order along `axis`,
    each channel repeated over `inner` consecutive positions (after a Flatten)."""

    axis: int
    segments: list[tuple[int, int]]
    inner: int = 1
    rank: int = 0

    @property
    def size(self) -> int:
        return sum(s for _, s in self.segments) * self.inner


@dataclasses.dataclass
class ChannelGroup:
    """Channels that must be pruned together; `sources` create them, the rest follow."""

    id: int
    size: int
    sources: list[str] = dataclasses.field(default_factory=list)
    tensors: list[str] = dataclasses.field(default_factory=list)
    frozen: str | None = None  # why it cannot be pruned, or None
    blocks: int = 1  # a grouped conv's output: keep the same number of channels in each block

    @property
    def name(self) -> str:
        return self.sources[0] if self.sources else f"group{self.id}"


@dataclasses.dataclass
class Fixup:
    """One edit the prune applies: slice input `index` of node `node` along `axis` by the
    kept channels of `layout` (a constant), or rewrite a Reshape shape entry."""

    node: str
    index: int
    axis: int
    layout: Layout
    kind: str  # "out" (source filters), "in" (sink inputs), "param" (per-channel), "reshape", "group",
    #            "count" / "inv_count" (a written-out mean's divisor N or factor 1/N: the kept count)


@dataclasses.dataclass
class ChannelGroups:
    """Result of the analysis: groups (merged), tensor layouts and the edits each group needs."""

    groups: dict[int, ChannelGroup]
    layouts: dict[str, Layout]
    fixups: list[Fixup]
    parent: dict[int, int]

    def root(self, gid: int) -> int:
        while self.parent[gid] != gid:
            gid = self.parent[gid]
        return gid

    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups.values() if g.frozen is None and g.sources and g.size > 1]

    def by_name(self) -> dict[str, ChannelGroup]:
        return {g.name: g for g in self.groups.values()}

    def summary(self) -> list[dict[str, Any]]:
        return [{"group": g.name, "channels": g.size, "sources": len(g.sources),
                 "blocks": g.blocks, "frozen": g.frozen} for g in self.groups.values() if g.sources]


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


class _Builder:
    def __init__(self, model: onnx.ModelProto, shapes: dict[str, tuple[int, list]]):
        self.model = model
        self.graph = model.graph
        self.shapes = shapes
        self.consts: dict[str, np.ndarray] = const_values(self.graph)
        self.groups: dict[int, ChannelGroup] = {}
        self.parent: dict[int, int] = {}
        self.layouts: dict[str, Layout] = {}
        self.fixups: list[Fixup] = []
        self.channel_sums: dict[str, Layout] = {}  # ReduceSum over a group's channels -> its layout

    # -- union-find over groups --------------------------------------------------------------
    def new_group(self, size: int, source: str | None = None, frozen: str | None = None,
                  blocks: int = 1) -> int:
        gid = len(self.parent)
        self.parent[gid] = gid
        self.groups[gid] = ChannelGroup(gid, size, [source] if source else [], [], frozen, blocks)
        return gid

    def find(self, gid: int) -> int:
        while self.parent[gid] != gid:
            self.parent[gid] = self.parent[self.parent[gid]]
            gid = self.parent[gid]
        return gid

    def union(self, a: int, b: int, why: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        ga, gb = self.groups[ra], self.groups[rb]
        if ga.size != gb.size:
            self.freeze_group(ra, f"size mismatch with {gb.name} at {why}")
            self.freeze_group(rb, f"size mismatch with {ga.name} at {why}")
            return
        self.parent[rb] = ra
        ga.sources += gb.sources
        ga.tensors += gb.tensors
        ga.frozen = ga.frozen or gb.frozen
        ga.blocks = math.lcm(ga.blocks, gb.blocks)
        if ga.size % ga.blocks:
            self.freeze_group(ra, f"channel blocks of grouped convs do not divide {ga.size}")
        del self.groups[rb]

    def freeze_group(self, gid: int, why: str) -> None:
        g = self.groups[self.find(gid)]
        if g.frozen is None:
            g.frozen = why

    def freeze(self, layout: Layout | None, why: str) -> None:
        if layout is not None:
            for gid, _ in layout.segments:
                self.freeze_group(gid, why)

    # -- helpers ------------------------------------------------------------------------------
    def const(self, name: str) -> np.ndarray | None:
        return self.consts.get(name)

    def dims(self, name: str) -> list | None:
        info = self.shapes.get(name)
        return None if info is None else info[1]

    def set_layout(self, name: str, layout: Layout) -> None:
        self.layouts[name] = layout
        for gid, _ in layout.segments:
            self.groups[self.find(gid)].tensors.append(name)

    # -- the walk -----------------------------------------------------------------------------
    def run(self) -> ChannelGroups:
        g = self.graph
        for node in g.node:
            if node.op_type == "Constant" and node.output:
                for a in node.attribute:
                    if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                        self.consts[node.output[0]] = numpy_helper.to_array(a.t)
            elif node.op_type == "Identity" and node.input[0] in self.consts:
                self.consts[node.output[0]] = self.consts[node.input[0]]
        inits = set(self.consts)
        for inp in g.input:
            if inp.name in inits:
                continue
            d = self.dims(inp.name)
            if d and len(d) >= 2 and isinstance(d[1], int) and d[1] > 0:
                gid = self.new_group(d[1], frozen=f"graph input '{inp.name}'")
                self.set_layout(inp.name, Layout(1, [(gid, d[1])], 1, len(d)))
        for node in g.node:
            self.visit(node)
        for out in g.output:
            self.freeze(self.layouts.get(out.name), f"graph output '{out.name}'")
        for fx in self.fixups:
            fx.layout = Layout(fx.layout.axis, [(self.find(gid), s) for gid, s in fx.layout.segments],
                               fx.layout.inner, fx.layout.rank)
        layouts = {k: Layout(v.axis, [(self.find(gid), s) for gid, s in v.segments], v.inner, v.rank)
                   for k, v in self.layouts.items()}
        order = {n.name: i for i, n in enumerate(g.node)}
        for grp in self.groups.values():
            grp.tensors = list(dict.fromkeys(grp.tensors))
            grp.sources.sort(key=lambda s: order.get(s, -1))
        return ChannelGroups(dict(self.groups), layouts, self.fixups, dict(self.parent))

    def tracked_inputs(self, node: onnx.NodeProto) -> list[tuple[int, Layout]]:
        return [(i, self.layouts[n]) for i, n in enumerate(node.input) if n in self.layouts]

    def unknown(self, node: onnx.NodeProto, why: str | None = None) -> None:
        reason = why or f"{node.op_type} node '{node.name}' (not understood by the channel analysis)"
        for _, lay in self.tracked_inputs(node):
            self.freeze(lay, reason)
        for n in subgraph_outer_inputs(node):
            self.freeze(self.layouts.get(n), reason)

    def visit(self, node: onnx.NodeProto) -> None:
        op = node.op_type
        tracked = self.tracked_inputs(node)
        if node.domain == MS_DOMAIN and op == "FusedConv" and not has_subgraphs(node):
            self.visit_fused_conv(node)
            return
        if node.domain == MS_DOMAIN and op in MS_UNARY_OPS and tracked:
            self.visit_ms_unary(node, tracked)
            return
        if node.domain not in ("", "ai.onnx") or has_subgraphs(node):
            self.unknown(node)
            return
        if op in ("Constant",):
            return
        if op in SOURCE_OPS:
            self.visit_source(node)
            return
        if not tracked:
            if op in ("Div", "Mul") and any(i in self.channel_sums for i in node.input):
                self.visit_channel_count(node)
            return
        x = tracked[0][1]
        if op in UNARY_OPS:
            if tracked[0][0] != 0:
                self.unknown(node)
                return
            self.set_layout(node.output[0], x)
        elif op in POOL_OPS:
            if tracked[0][0] != 0 or x.axis != 1 or x.inner != 1:
                self.unknown(node)
                return
            self.set_layout(node.output[0], x)
        elif op in BINARY_OPS:
            self.visit_elementwise(node)
        elif op == "BatchNormalization" or op == "InstanceNormalization":
            if tracked[0][0] != 0 or x.axis != 1 or len(tracked) > 1:
                self.unknown(node)
                return
            for i in range(1, len(node.input)):
                if node.input[i]:
                    self.fixups.append(Fixup(node.name, i, 0, Layout(0, x.segments, 1, 1), "param"))
            self.set_layout(node.output[0], x)
        elif op == "LayerNormalization":
            rank = x.rank
            axis = _attr(node, "axis", -1) % rank if rank else None
            if tracked[0][0] != 0 or len(tracked) > 1 or rank == 0 or axis != x.axis \
                    or x.axis != rank - 1:
                self.unknown(node, f"LayerNormalization '{node.name}' normalizes over more than "
                                   "the channel axis")
                return
            for i in range(1, len(node.input)):
                if node.input[i]:
                    self.fixups.append(Fixup(node.name, i, 0, Layout(0, x.segments, x.inner, 1), "param"))
            self.set_layout(node.output[0], x)
        elif op == "Transpose":
            perm = _attr(node, "perm")
            if perm is None:
                perm = list(range(x.rank))[::-1]
            self.set_layout(node.output[0], Layout(list(perm).index(x.axis), x.segments, x.inner, x.rank))
        elif op in ("Softmax", "LogSoftmax", "Hardmax"):
            axis = _attr(node, "axis", -1) % x.rank if x.rank else None
            if axis is None or (axis == x.axis and (op == "Hardmax" or x.inner != 1)):
                self.unknown(node, f"{op} '{node.name}' over the channel axis")
                return
            # over the channel axis, (Log)Softmax renormalizes over the kept channels
            self.set_layout(node.output[0], x)
        elif op in ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL2", "ReduceL1",
                    "ReduceProd", "ReduceLogSumExp", "ReduceSumSquare"):
            self.visit_reduce(node, x)
        elif op in ("Flatten", "Reshape"):
            self.visit_reshape(node, x)
        elif op in ("Squeeze", "Unsqueeze"):
            self.visit_squeeze(node, x)
        elif op == "Concat":
            self.visit_concat(node)
        elif op in ("Slice", "Pad", "Split"):
            self.visit_slice_like(node, x)
        else:
            self.unknown(node)

    # -- sources and sinks --------------------------------------------------------------------
    def visit_source(self, node: onnx.NodeProto) -> None:
        op = node.op_type
        tracked = dict(self.tracked_inputs(node))
        w = self.const(node.input[1]) if len(node.input) > 1 else None
        x = tracked.get(0)
        out = node.output[0]
        if any(i != 0 for i in tracked) or w is None:
            self.unknown(node, f"{op} '{node.name}' without a constant weight")
            return
        if op == "Conv":
            group = _attr(node, "group", 1)
            cout, cin_g = w.shape[0], w.shape[1]
            if group == 1:
                if x is not None:
                    self.sink(node, x, 1, 1)
                gid = self.new_group(cout, node.name)
                self.fixups.append(Fixup(node.name, 1, 0, Layout(0, [(gid, cout)], 1, 1), "out"))
                if len(node.input) > 2 and node.input[2]:
                    self.fixups.append(Fixup(node.name, 2, 0, Layout(0, [(gid, cout)], 1, 1), "out"))
                self.set_layout(out, Layout(1, [(gid, cout)], 1, w.ndim))
            elif cin_g == 1 and cout == group and x is not None and x.axis == 1 and x.inner == 1:
                # depthwise: output channel c reads only input channel c
                seg = Layout(0, x.segments, 1, 1)
                self.fixups.append(Fixup(node.name, 1, 0, seg, "out"))
                if len(node.input) > 2 and node.input[2]:
                    self.fixups.append(Fixup(node.name, 2, 0, seg, "out"))
                self.fixups.append(Fixup(node.name, -1, 0, seg, "group"))
                self.set_layout(out, Layout(1, x.segments, 1, w.ndim))
            else:
                # grouped conv: block k of the output reads only block k of the input. Its input
                # channels stay (they would have to shrink evenly per block); its filters can go,
                # the same number from every block.
                self.freeze(x, f"input of grouped Conv '{node.name}' (group={group}, not depthwise)")
                gid = self.new_group(cout, node.name, blocks=group)
                self.fixups.append(Fixup(node.name, 1, 0, Layout(0, [(gid, cout)], 1, 1), "out"))
                if len(node.input) > 2 and node.input[2]:
                    self.fixups.append(Fixup(node.name, 2, 0, Layout(0, [(gid, cout)], 1, 1), "out"))
                self.set_layout(out, Layout(1, [(gid, cout)], 1, w.ndim))
        elif op == "ConvTranspose":
            if _attr(node, "group", 1) != 1:
                self.unknown(node, f"grouped ConvTranspose '{node.name}'")
                return
            if x is not None:
                self.sink(node, x, 1, 0)
            cout = w.shape[1]
            gid = self.new_group(cout, node.name)
            self.fixups.append(Fixup(node.name, 1, 1, Layout(1, [(gid, cout)], 1, 1), "out"))
            if len(node.input) > 2 and node.input[2]:
                self.fixups.append(Fixup(node.name, 2, 0, Layout(0, [(gid, cout)], 1, 1), "out"))
            self.set_layout(out, Layout(1, [(gid, cout)], 1, w.ndim))
        elif op == "Gemm":
            if _attr(node, "transA", 0) or w.ndim != 2:
                self.unknown(node, f"Gemm '{node.name}' with transA")
                return
            trans_b = _attr(node, "transB", 0)
            n_out = w.shape[0] if trans_b else w.shape[1]
            if x is not None:
                self.sink(node, x, 1, 1 if trans_b else 0)
            gid = self.new_group(n_out, node.name)
            self.fixups.append(Fixup(node.name, 1, 0 if trans_b else 1,
                                     Layout(0, [(gid, n_out)], 1, 1), "out"))
            if len(node.input) > 2 and node.input[2]:
                c = self.const(node.input[2])
                if c is None:
                    self.unknown(node, f"Gemm '{node.name}' with a computed C input")
                    return
                if c.ndim >= 1 and c.shape[-1] == n_out:
                    self.fixups.append(Fixup(node.name, 2, c.ndim - 1,
                                             Layout(c.ndim - 1, [(gid, n_out)], 1, c.ndim), "out"))
            self.set_layout(out, Layout(1, [(gid, n_out)], 1, 2))
        elif op == "MatMul":
            if w.ndim != 2:
                self.unknown(node, f"MatMul '{node.name}' with a batched weight")
                return
            dims = self.dims(node.input[0])
            rank = len(dims) if dims else (x.rank if x else 0)
            if rank < 2:
                self.unknown(node, f"MatMul '{node.name}' on a vector")
                return
            if x is not None:
                self.sink(node, x, rank - 1, 0)
            gid = self.new_group(w.shape[1], node.name)
            self.fixups.append(Fixup(node.name, 1, 1, Layout(1, [(gid, w.shape[1])], 1, 1), "out"))
            self.set_layout(out, Layout(rank - 1, [(gid, w.shape[1])], 1, rank))

    def visit_fused_conv(self, node: onnx.NodeProto) -> None:
        """com.microsoft.FusedConv(X, W, B, Z): a Conv source whose sum input Z (a residual)
        joins the output's channels, as the Add it replaced did."""
        z = self.layouts.get(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        if len(node.input) > 3 and node.input[3] and z is None:
            self.unknown(node, f"FusedConv '{node.name}' with an untracked sum input")
            return
        head = onnx.NodeProto()
        head.CopyFrom(node)
        del head.input[3:]
        head.op_type, head.domain = "Conv", ""
        self.visit_source(head)
        out = self.layouts.get(node.output[0])
        if z is not None and out is not None:
            self.join(out, z, f"FusedConv '{node.name}'")

    def visit_ms_unary(self, node: onnx.NodeProto, tracked: list[tuple[int, Layout]]) -> None:
        index, x = tracked[0]
        if index != 0 or len(tracked) > 1:
            self.unknown(node)
            return
        if len(node.input) > 1 and node.input[1]:       # BiasGelu / FastGelu: a bias [C]
            b = self.const(node.input[1])
            if b is None or b.ndim != 1 or x.axis != x.rank - 1 or b.shape[0] != x.size:
                self.unknown(node, f"{node.op_type} '{node.name}' with a bias not over the channels")
                return
            self.fixups.append(Fixup(node.name, 1, 0, Layout(0, x.segments, x.inner, 1), "param"))
        self.set_layout(node.output[0], x)

    def join(self, ref: Layout, lay: Layout, where: str) -> None:
        """The channels of `lay` meet those of `ref` element-wise at `where` (an Add, a Mul, a
        FusedConv's sum): their groups become one, or both freeze when they do not line up."""
        if lay.rank - lay.axis != ref.rank - ref.axis or lay.inner != ref.inner:
            why = f"{where} combines channels on different axes"
        elif [s for _, s in lay.segments] != [s for _, s in ref.segments]:
            why = f"{where} combines different layouts"
        else:
            for (ga, _), (gb, _) in zip(ref.segments, lay.segments):
                self.union(ga, gb, where)
            return
        self.freeze(lay, why)
        self.freeze(ref, why)

    def sink(self, node: onnx.NodeProto, x: Layout, data_axis: int, weight_axis: int) -> None:
        """`node` mixes the channels of its input on `data_axis` through its weight's `weight_axis`."""
        if x.axis != data_axis:
            self.freeze(x, f"{node.op_type} '{node.name}' reads the channels on another axis")
            return
        self.fixups.append(Fixup(node.name, 1, weight_axis,
                                 Layout(weight_axis, x.segments, x.inner, 1), "in"))

    # -- shape-preserving ops -----------------------------------------------------------------
    def visit_elementwise(self, node: onnx.NodeProto) -> None:
        out_dims = self.dims(node.output[0])
        layouts = []
        for i, name in enumerate(node.input):
            if not name:
                continue
            lay = self.layouts.get(name)
            dims = self.dims(name)
            c = self.const(name)
            rank = len(dims) if dims is not None else (c.ndim if c is not None else None)
            layouts.append((i, name, lay, dims, c, rank))
        ref = next(lay for _, _, lay, _, _, _ in layouts if lay is not None)
        out_rank = len(out_dims) if out_dims is not None else ref.rank
        from_end = ref.rank - ref.axis
        for i, name, lay, dims, c, rank in layouts:
            if lay is not None:
                self.join(ref, lay, f"{node.op_type} '{node.name}'")
                continue
            if rank is None:
                self.freeze(ref, f"{node.op_type} '{node.name}': input '{name}' of unknown rank")
                continue
            ax = rank - from_end
            if ax < 0:
                continue  # broadcast from the right never reaches the channel axis
            size = (c.shape[ax] if c is not None else (dims[ax] if dims else None))
            if size == 1:
                continue
            if c is not None and size == ref.size:
                self.fixups.append(Fixup(node.name, i, ax, Layout(ax, ref.segments, ref.inner, rank),
                                         "param"))
                continue
            self.freeze(ref, f"{node.op_type} '{node.name}': input '{name}' spans the channel axis")
        if out_rank is None:
            self.freeze(ref, f"{node.op_type} '{node.name}' of unknown rank")
            return
        self.set_layout(node.output[0], Layout(out_rank - from_end, ref.segments, ref.inner, out_rank))

    def _axes(self, node: onnx.NodeProto) -> list[int] | None:
        axes = _attr(node, "axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            c = self.const(node.input[1])
            if c is None:
                return None
            axes = c.tolist()
        return list(axes) if axes is not None else None

    def visit_channel_count(self, node: onnx.NodeProto) -> None:
        """sum / N or sum * (1/N) after a ReduceSum over a group's N channels: a mean, so the
        constant becomes the kept count. Any other use of the sum is left as it is."""
        a, b = node.input[0], node.input[1]
        index, total = (1, a) if a in self.channel_sums else (0, b)
        x = self.channel_sums[total]
        c = self.const(node.input[index])
        if c is None or c.size != 1 or (node.op_type == "Div" and index != 1):
            return
        n = sum(size for _, size in x.segments)
        value = float(c.reshape(-1)[0])
        if node.op_type == "Div" and math.isclose(value, n, rel_tol=1e-6):
            kind = "count"
        elif node.op_type == "Mul" and math.isclose(value * n, 1.0, rel_tol=1e-6):
            kind = "inv_count"
        else:
            return
        self.fixups.append(Fixup(node.name, index, 0, Layout(0, x.segments, 1, 1), kind))

    def visit_reduce(self, node: onnx.NodeProto, x: Layout) -> None:
        axes = self._axes(node)
        if axes is None:
            if node.op_type != "ReduceMean" and _attr(node, "noop_with_empty_axes", 0):
                self.set_layout(node.output[0], x)
            else:
                self.unknown(node, f"{node.op_type} '{node.name}' over all axes")
            return
        axes = [a % x.rank for a in axes]
        if x.axis in axes:
            if axes == [x.axis] and x.inner == 1 and _attr(node, "keepdims", 1) \
                    and node.op_type in CHANNEL_STATISTICS:
                # a statistic over the channels (a written-out LayerNorm's mean or variance, an L2
                # norm): one value per position that broadcasts back, recomputed over the kept
                # channels after pruning. A sum divided by the channel count is a mean: the count
                # is rewritten (visit_channel_count).
                if node.op_type in ("ReduceSum", "ReduceSumSquare"):
                    self.channel_sums[node.output[0]] = x
                return
            self.unknown(node, f"{node.op_type} '{node.name}' reduces the channel axis")
            return
        keep = _attr(node, "keepdims", 1)
        axis = x.axis if keep else x.axis - sum(1 for a in axes if a < x.axis)
        self.set_layout(node.output[0], Layout(axis, x.segments, x.inner, x.rank if keep else x.rank - len(axes)))

    def visit_reshape(self, node: onnx.NodeProto, x: Layout) -> None:
        dims = self.dims(node.input[0])
        if dims is None or any(not isinstance(d, int) for d in dims[x.axis + 1:]):
            self.unknown(node, f"{node.op_type} '{node.name}' of unknown input shape")
            return
        trailing = int(np.prod(dims[x.axis + 1:], dtype=np.int64)) if x.axis + 1 < len(dims) else 1
        if node.op_type == "Flatten":
            axis = _attr(node, "axis", 1) % len(dims)
            if axis != x.axis:
                self.unknown(node, f"Flatten '{node.name}' does not start at the channel axis")
                return
            self.set_layout(node.output[0], Layout(1, x.segments, x.inner * trailing, 2))
            return
        shape = self.const(node.input[1]) if len(node.input) > 1 else None
        if shape is None:
            self.unknown(node, f"Reshape '{node.name}' with a computed shape")
            return
        shape = shape.tolist()
        lead = dims[:x.axis]
        # supported: keep the leading dims, merge channel axis and everything after it into one
        if len(shape) == x.axis + 1 and shape.count(-1) <= 1 and all(
                s in (0, -1, d) for s, d in zip(shape[:x.axis], lead)) \
                and shape[x.axis] in (-1, x.size * trailing):
            if shape[x.axis] != -1:
                self.fixups.append(Fixup(node.name, 1, x.axis, Layout(x.axis, x.segments, x.inner * trailing,
                                                                      1), "reshape"))
            self.set_layout(node.output[0], Layout(x.axis, x.segments, x.inner * trailing, x.axis + 1))
            return
        # a reshape that leaves the channel axis and everything before it alone
        out_dims = self.dims(node.output[0])
        if out_dims is not None and len(out_dims) > x.axis and list(out_dims[:x.axis + 1]) == \
                list(dims[:x.axis + 1]) and all(isinstance(d, int) for d in dims[:x.axis + 1]) \
                and x.inner == 1 and all(s in (0,) or s == d for s, d in zip(shape[:x.axis + 1], dims)):
            # the shape constant names the channel count explicitly only when it is not 0
            if shape[x.axis] != 0:
                self.fixups.append(Fixup(node.name, 1, x.axis, Layout(x.axis, x.segments, 1, 1), "reshape"))
            self.set_layout(node.output[0], Layout(x.axis, x.segments, 1, len(out_dims)))
            return
        self.unknown(node, f"Reshape '{node.name}' splits or moves the channel axis")

    def visit_squeeze(self, node: onnx.NodeProto, x: Layout) -> None:
        axes = self._axes(node)
        out_dims = self.dims(node.output[0])
        if axes is None:
            if node.op_type == "Squeeze" and out_dims is not None:
                in_dims = self.dims(node.input[0]) or []
                axes = [i for i, d in enumerate(in_dims) if d == 1]
            else:
                self.unknown(node)
                return
        if node.op_type == "Squeeze":
            axes = [a % x.rank for a in axes]
            if x.axis in axes:
                self.unknown(node, f"Squeeze '{node.name}' removes the channel axis")
                return
            self.set_layout(node.output[0], Layout(x.axis - sum(1 for a in axes if a < x.axis),
                                                   x.segments, x.inner, x.rank - len(axes)))
        else:
            rank = x.rank + len(axes)
            axes = sorted(a % rank for a in axes)
            axis = x.axis
            for a in axes:
                if a <= axis:
                    axis += 1
            self.set_layout(node.output[0], Layout(axis, x.segments, x.inner, rank))

    def visit_concat(self, node: onnx.NodeProto) -> None:
        tracked = dict(self.tracked_inputs(node))
        ref = next(iter(tracked.values()))
        axis = _attr(node, "axis", 0) % ref.rank
        if axis != ref.axis:
            # concat along another axis: every input's channels line up
            layouts = list(tracked.values())
            if len(tracked) != len([i for i in node.input if i]):
                for lay in layouts:
                    self.freeze(lay, f"Concat '{node.name}' with untracked inputs")
                return
            for lay in layouts[1:]:
                if [s for _, s in lay.segments] != [s for _, s in ref.segments] or lay.axis != ref.axis:
                    self.unknown(node, f"Concat '{node.name}' of different layouts")
                    return
                for (ga, _), (gb, _) in zip(ref.segments, lay.segments):
                    self.union(ga, gb, f"Concat '{node.name}'")
            self.set_layout(node.output[0], ref)
            return
        segments: list[tuple[int, int]] = []
        for i, name in enumerate(node.input):
            lay = tracked.get(i)
            if lay is not None:
                if lay.inner != 1 or lay.axis != axis:
                    self.unknown(node, f"Concat '{node.name}' of flattened inputs")
                    return
                segments += lay.segments
            else:
                dims = self.dims(name)
                size = dims[axis] if dims and len(dims) > axis else None
                if not isinstance(size, int) or size <= 0:
                    self.unknown(node, f"Concat '{node.name}': input '{name}' of unknown size")
                    return
                gid = self.new_group(size, frozen=f"untracked input '{name}' of Concat '{node.name}'")
                segments.append((gid, size))
        self.set_layout(node.output[0], Layout(axis, segments, 1, ref.rank))

    def visit_slice_like(self, node: onnx.NodeProto, x: Layout) -> None:
        op = node.op_type
        if op == "Split":
            axis = _attr(node, "axis", 0) % x.rank
            if axis == x.axis:
                self.unknown(node, f"Split '{node.name}' along the channel axis")
                return
            for o in node.output:
                self.set_layout(o, x)
            return
        if op == "Slice":
            axes = None
            if len(node.input) > 3 and node.input[3]:
                c = self.const(node.input[3])
                axes = None if c is None else [a % x.rank for a in c.tolist()]
            elif len(node.input) > 1:
                starts = self.const(node.input[1])
                axes = None if starts is None else list(range(len(starts)))
            if axes is None or x.axis in axes:
                self.unknown(node, f"Slice '{node.name}' along the channel axis")
                return
            self.set_layout(node.output[0], x)
            return
        # Pad
        pads = self.const(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        if pads is None:
            pads = np.array(_attr(node, "pads", []) or [])
        if len(node.input) > 3 and node.input[3]:
            self.unknown(node, f"Pad '{node.name}' with axes")
            return
        if pads.size == 0 or pads[x.axis] != 0 or pads[x.axis + x.rank] != 0:
            self.unknown(node, f"Pad '{node.name}' along the channel axis")
            return
        self.set_layout(node.output[0], x)


def channel_groups(model: onnx.ModelProto, ctx: PassContext | None = None) -> ChannelGroups:
    """Compute the channel dependency groups of `model`'s main graph."""
    if ctx is not None:
        shapes = ctx.analysis("shapes", model)
    else:
        from onnxpress.passes.context import _shapes_analysis

        shapes = _shapes_analysis(model, PassContext())
    return _Builder(model, shapes).run()


@register_analysis("channel_groups")
def _channel_groups_analysis(model: onnx.ModelProto, ctx: PassContext) -> ChannelGroups:
    """Channel dependency groups for structured pruning (see onnxpress.passes.prune.groups)."""
    return channel_groups(model, ctx)
