"""Structured pruning: remove whole output channels and neurons, and everything that reads them.

    before: Conv(W[32,16,3,3]) -> Relu -> Conv(W[64,32,3,3]) -> Flatten -> Gemm(W[10, 64*16])
    after:  Conv(W[16,16,3,3]) -> Relu -> Conv(W[64,16,3,3]) -> Flatten -> Gemm(W[10, 64*16])
            (50% of the first conv's filters removed; the second conv lost the matching input
            channels; a pruned second conv would shrink the Gemm's columns 16 at a time)

The channel dependency groups (groups.py) say what prunes together. Channels are ranked by the
L2 (or L1) norm of their filters summed over the group's sources, or by the mean |activation| of
the group's tensors on calibration data; the lowest go.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx
from onnx import numpy_helper

from onnxpress.errors import PassError
from onnxpress.passes.context import PassContext
from onnxpress.passes.graph import infer_shapes
from onnxpress.passes.prune.groups import ChannelGroups, Layout, channel_groups, const_values
from onnxpress.weights import drop_initializers

Criterion = Literal["l2", "l1", "activation"]


@dataclasses.dataclass
class GroupResult:
    group: str
    channels: int
    kept: int
    sources: list[str]


def kept_positions(layout: Layout, keep: dict[int, np.ndarray]) -> np.ndarray:
    """Positions along a layout's axis that survive, given kept channel indices per group."""
    out, offset = [], 0
    inner = layout.inner
    for gid, size in layout.segments:
        k = keep.get(gid)
        if k is None:
            k = np.arange(size)
        pos = (offset + k[:, None] * inner + np.arange(inner)[None, :]).reshape(-1)
        out.append(pos)
        offset += size * inner
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def weight_scores(model: onnx.ModelProto, cg: ChannelGroups, norm: str = "l2") -> dict[int, np.ndarray]:
    """Per-group channel importance from the filters of the group's source layers: each
    source's norms are divided by their mean (so big and small layers weigh alike), then averaged."""
    consts = const_values(model.graph)
    nodes = {n.name: n for n in model.graph.node}
    acc: dict[int, list[np.ndarray]] = {}
    for fx in cg.fixups:
        if fx.kind != "out" or fx.index != 1:
            continue
        w = consts.get(nodes[fx.node].input[1])
        if w is None:
            continue
        w = np.moveaxis(w.astype(np.float64), fx.axis, 0).reshape(w.shape[fx.axis], -1)
        per = np.sqrt((w ** 2).sum(1)) if norm == "l2" else np.abs(w).sum(1)
        offset = 0
        for gid, size in fx.layout.segments:
            part = per[offset:offset + size]
            offset += size
            acc.setdefault(gid, []).append(part / max(part.mean(), 1e-12))
    return {gid: np.mean(v, axis=0) for gid, v in acc.items()}


def activation_scores(model: onnx.ModelProto, cg: ChannelGroups, calib) -> dict[int, np.ndarray]:
    """Per-group channel importance = mean |activation| of the tensors the group's sinks read,
    on calibration data (each tensor normalised by its mean, then averaged)."""
    from onnxpress.backends import ort

    nodes = {n.name: n for n in model.graph.node}
    watch = {}
    for fx in cg.fixups:
        if fx.kind == "in":
            name = nodes[fx.node].input[0]
            if name in cg.layouts:
                watch[name] = cg.layouts[name]
    if not watch:
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    for name in watch:
        if name not in have:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    sess = ort.session(probe, threads=1)
    names = list(watch)
    sums = {n: 0.0 for n in names}
    count = 0
    for batch in calib:
        values = sess.run(names, batch)
        for n, v in zip(names, values):
            lay = watch[n]
            a = np.moveaxis(np.abs(v.astype(np.float64)), lay.axis, -1)
            a = a.reshape(-1, lay.size // lay.inner, lay.inner)
            sums[n] = sums[n] + a.mean(axis=(0, 2))
        count += 1
    acc: dict[int, list[np.ndarray]] = {}
    for n in names:
        per = sums[n] / max(count, 1)
        offset = 0
        for gid, size in watch[n].segments:
            part = per[offset:offset + size]
            offset += size
            acc.setdefault(gid, []).append(part / max(part.mean(), 1e-12))
    return {gid: np.mean(v, axis=0) for gid, v in acc.items()}


def group_scores(model: onnx.ModelProto, cg: ChannelGroups, criterion: str,
                 calib=None) -> dict[int, np.ndarray]:
    if criterion == "activation":
        if calib is None:
            raise PassError("structured prune with criterion=activation needs calibration data")
        scores = activation_scores(model, cg, calib)
        fallback = weight_scores(model, cg, "l2")
        return {gid: scores.get(gid, fallback.get(gid)) for gid in fallback}
    return weight_scores(model, cg, criterion)


def choose_keep(cg: ChannelGroups, scores: dict[int, np.ndarray], ratios: dict[int, float], *,
                round_to: int = 1) -> dict[int, np.ndarray]:
    """Kept channel indices (sorted) per group, pruning `ratios[gid]` of its channels."""
    keep = {}
    for gid, ratio in ratios.items():
        g = cg.groups[gid]
        if g.frozen is not None or ratio <= 0:
            continue
        n_keep = int(round(g.size * (1.0 - ratio)))
        grid = int(np.lcm(max(round_to, 1), g.blocks))
        if grid > 1:
            n_keep = int(np.ceil(n_keep / grid) * grid)
        n_keep = min(max(n_keep, g.blocks), g.size)
        if n_keep == g.size:
            continue
        s = scores.get(gid)
        if s is None:
            continue
        if g.blocks > 1:
            # the same number of channels from every block of a grouped conv
            per, width = n_keep // g.blocks, g.size // g.blocks
            order = np.concatenate([b * width + np.argsort(-s[b * width:(b + 1) * width], kind="stable")[:per]
                                    for b in range(g.blocks)])
        else:
            order = np.argsort(-s, kind="stable")[:n_keep]
        keep[gid] = np.sort(order)
    return keep


def global_ratios(cg: ChannelGroups, scores: dict[int, np.ndarray], sparsity: float,
                  max_ratio: float = 0.9) -> dict[int, float]:
    """One threshold over every prunable group's normalised scores: `sparsity` of all channels."""
    prunable = [g for g in cg.prunable() if g.id in scores]
    if not prunable:
        return {}
    allv = np.concatenate([scores[g.id] for g in prunable])
    thr = np.quantile(allv, sparsity)
    return {g.id: min(float((scores[g.id] < thr).mean()), max_ratio) for g in prunable}


def apply_keep(model: onnx.ModelProto, cg: ChannelGroups, keep: dict[int, np.ndarray]) -> onnx.ModelProto:
    """Rewrite the model so only the kept channels remain (in place; returns the model)."""
    graph = model.graph
    consts = const_values(graph)
    nodes = {n.name: n for n in graph.node}
    uses: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    init_names = {t.name for t in graph.initializer}
    edits: dict[tuple[str, int], list] = {}
    group_attr: dict[str, int] = {}
    for fx in cg.fixups:
        if not any(gid in keep for gid, _ in fx.layout.segments):
            continue
        pos = kept_positions(fx.layout, keep)
        if fx.kind == "group":
            group_attr[fx.node] = len(pos)
            continue
        edits.setdefault((fx.node, fx.index), []).append((fx.axis, pos, fx.kind))
    taken = set(init_names) | {o for n in graph.node for o in n.output}
    new_inits = []
    for (node_name, index), ops in edits.items():
        node = nodes[node_name]
        name = node.input[index]
        value = consts.get(name)
        if value is None:
            raise PassError(f"prune: input '{name}' of node '{node_name}' is not a constant")
        for axis, pos, kind in ops:
            if kind == "reshape":
                value = value.copy()
                value[axis] = len(pos)
            elif kind in ("count", "inv_count"):
                value = np.full_like(value, len(pos) if kind == "count" else 1.0 / len(pos))
            else:
                if value.ndim <= axis or (len(pos) and int(pos.max()) >= value.shape[axis]):
                    raise PassError(f"prune: cannot slice '{name}' of node '{node_name}' on axis "
                                    f"{axis}: shape {list(value.shape)}, channel analysis expected more")
                value = np.take(value, pos, axis=axis)
        if name in init_names and uses.get(name, 0) == 1:
            for t in graph.initializer:
                if t.name == name:
                    t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), name))
                    break
        else:
            k = 0
            new = f"{name}.pruned"
            while new in taken:
                k += 1
                new = f"{name}.pruned{k}"
            taken.add(new)
            new_inits.append(numpy_helper.from_array(np.ascontiguousarray(value), new))
            node.input[index] = new
    graph.initializer.extend(new_inits)
    for node_name, groups in group_attr.items():
        for a in nodes[node_name].attribute:
            if a.name == "group":
                a.i = groups
    remove_dead(model)
    del graph.value_info[:]
    return model


def remove_dead(model: onnx.ModelProto) -> None:
    """Drop nodes nothing reads and initializers no node reads (main graph)."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    from onnxpress.passes.graph import subgraph_outer_inputs

    while True:
        used = set(outputs)
        for n in graph.node:
            used.update(i for i in n.input if i)
            used.update(subgraph_outer_inputs(n))
        dead = [n for n in graph.node if not any(o in used for o in n.output if o)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = set(outputs) | {i for n in graph.node for i in n.input}
    for n in graph.node:
        used.update(subgraph_outer_inputs(n))
    removed = {t.name for t in graph.initializer if t.name not in used}
    if removed:
        drop_initializers(graph, lambda t: t.name in used)
        inputs = [i for i in graph.input if i.name not in removed]
        del graph.input[:]
        graph.input.extend(inputs)


def prune_channels(model: onnx.ModelProto, ratios: dict[str, float] | float, *,
                   criterion: Criterion = "l2", calib=None, scope: str = "layer",
                   round_to: int = 1, cg: ChannelGroups | None = None,
                   scores: dict[int, np.ndarray] | None = None,
                   ctx: PassContext | None = None) -> tuple[onnx.ModelProto, list[GroupResult]]:
    """Structured-prune a copy of `model`: `ratios` is one fraction for every prunable group or
    {group name: fraction} (group name = its first source node). Returns (model, per group)."""
    if cg is None:
        cg = channel_groups(model, ctx)
    if scores is None:
        scores = group_scores(model, cg, criterion, calib)
    prunable = cg.prunable()
    if isinstance(ratios, (int, float)):
        if scope == "global":
            by_id = global_ratios(cg, scores, float(ratios))
        else:
            by_id = {g.id: float(ratios) for g in prunable}
    else:
        names = {g.name: g for g in cg.groups.values()}
        by_id = {}
        for key, r in ratios.items():
            if key not in names:
                raise PassError(f"prune: no channel group named '{key}'; groups: "
                                f"{', '.join(g.name for g in prunable)}")
            by_id[names[key].id] = float(r)
    keep = choose_keep(cg, scores, by_id, round_to=round_to)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    apply_keep(out, cg, keep)
    out = infer_shapes(out, strict=False)
    results = [GroupResult(g.name, g.size, int(len(keep[g.id])) if g.id in keep else g.size,
                           list(g.sources)) for g in prunable]
    return out, results
