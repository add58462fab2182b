"""Offset assignment into one arena, memory-aware execution orders, and the plan checker.

Offsets (Pisarchyk & Lee 2020, "Efficient Memory Management for Deep Neural Net Inference"):

    greedy_by_size     buffers largest first; each goes into the smallest gap between buffers
                       live at the same time that holds it (best fit), else on top of them
    greedy_by_breadth  steps with the most live bytes first; at each, its unplaced buffers
                       largest first, placed the same way

Both run and the smaller arena is kept. In-place pairs (an output written over an input dying at
that node) form one buffer. Orders: the stored one, and a list schedule that at every step runs
the ready node that grows the live set least; the order with the smallest arena is kept, and a
new order is taken only when neither its arena nor its lower bound is above the stored order's.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx

from onnxpress.errors import VerificationError
from onnxpress.passes.graph import subgraph_outer_inputs
from onnxpress.passes.memory.liveness import Liveness

PLAN_KEY = "onnxpress.memory_plan"
PLAN_VERSION = 1


class MemoryPlanError(VerificationError):
    """A memory plan is malformed, stale, or places two live tensors in the same bytes."""


class MemoryPlanWarning(UserWarning):
    """Part of the model is left to the runtime: tensors without a static size are not in the
    plan (the plan's `unplanned` says which and why)."""


@dataclasses.dataclass
class Buffer:
    """Tensors sharing memory through in-place reuse: one interval, one offset."""

    tensors: list[str]
    size: int
    first: int
    last: int


@dataclasses.dataclass
class OffsetPlan:
    offsets: dict[str, int]
    arena_bytes: int
    algorithm: str
    candidates: dict[str, int]


def _align(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment if alignment > 1 else n


def buffers_of(lv: Liveness) -> list[Buffer]:
    """Group in-place chains into buffers (ordered by first step, then name)."""
    root: dict[str, str] = {}
    for t in sorted(lv.tensors.values(), key=lambda t: t.first):
        root[t.name] = root.get(t.inplace_of, t.inplace_of) if t.inplace_of else t.name
    groups: dict[str, list[str]] = {}
    for name, r in root.items():
        groups.setdefault(r, []).append(name)
    out = []
    for names in groups.values():
        ts = [lv.tensors[n] for n in names]
        out.append(Buffer(sorted(names, key=lambda n: lv.tensors[n].first),
                          max(t.size for t in ts), min(t.first for t in ts),
                          max(t.last for t in ts)))
    out.sort(key=lambda b: (b.first, b.tensors[0]))
    return out


class _Placer:
    """Best-fit placement against the buffers already placed that overlap in time."""

    def __init__(self, buffers: list[Buffer], alignment: int):
        self.alignment = alignment
        n = len(buffers)
        self.first = np.array([b.first for b in buffers], dtype=np.int64)
        self.last = np.array([b.last for b in buffers], dtype=np.int64)
        self.size = np.array([_align(b.size, alignment) for b in buffers], dtype=np.int64)
        self.offset = np.full(n, -1, dtype=np.int64)

    def place(self, i: int) -> None:
        placed = (self.offset >= 0) & (self.first <= self.last[i]) & (self.last >= self.first[i])
        idx = np.nonzero(placed)[0]
        need = self.size[i]
        if need == 0:
            self.offset[i] = 0
            return
        best, best_gap = None, None
        top = 0
        if len(idx):
            offs = self.offset[idx]
            ends = offs + self.size[idx]
            srt = np.argsort(offs, kind="stable")
            for o, e in zip(offs[srt].tolist(), ends[srt].tolist()):
                gap = o - top
                if gap >= need and (best_gap is None or gap < best_gap):
                    best, best_gap = top, gap
                top = max(top, e)
        self.offset[i] = best if best is not None else top

    @property
    def arena(self) -> int:
        return int((self.offset + self.size).max()) if len(self.size) else 0


def _greedy_by_size(buffers: list[Buffer], alignment: int) -> np.ndarray:
    p = _Placer(buffers, alignment)
    for i in sorted(range(len(buffers)),
                    key=lambda i: (-buffers[i].size, buffers[i].first, buffers[i].tensors[0])):
        p.place(i)
    return p.offset


def _greedy_by_breadth(buffers: list[Buffer], alignment: int, steps: int) -> np.ndarray:
    p = _Placer(buffers, alignment)
    breadth = np.zeros(steps + 1, dtype=np.int64)
    live: list[list[int]] = [[] for _ in range(steps)]
    for i, b in enumerate(buffers):
        breadth[b.first] += b.size
        breadth[b.last + 1] -= b.size
        for s in range(b.first, b.last + 1):
            live[s].append(i)
    breadth = np.cumsum(breadth)[:-1]
    for s in sorted(range(steps), key=lambda s: (-int(breadth[s]), s)):
        for i in sorted(live[s], key=lambda i: (-buffers[i].size, buffers[i].tensors[0])):
            if p.offset[i] < 0:
                p.place(i)
    for i in range(len(buffers)):  # buffers live at no step (empty order)
        if p.offset[i] < 0:
            p.place(i)
    return p.offset


STRATEGIES = ("greedy_by_size", "greedy_by_breadth")


def plan_offsets(lv: Liveness, *, alignment: int = 64,
                 strategies: tuple[str, ...] = STRATEGIES) -> OffsetPlan:
    """Offsets for every tensor of `lv`, from the strategy giving the smallest arena."""
    buffers = buffers_of(lv)
    results: dict[str, tuple[int, np.ndarray]] = {}
    for name in strategies:
        if name == "greedy_by_size":
            offs = _greedy_by_size(buffers, alignment)
        elif name == "greedy_by_breadth":
            offs = _greedy_by_breadth(buffers, alignment, lv.steps)
        else:
            raise ValueError(f"unknown offset strategy '{name}'; choose from {STRATEGIES}")
        arena = max((int(o) + b.size for o, b in zip(offs.tolist(), buffers)), default=0)
        results[name] = (arena, offs)
    best = min(results, key=lambda k: (results[k][0], strategies.index(k)))
    arena, offs = results[best]
    offsets = {}
    for o, b in zip(offs.tolist(), buffers):
        for name in b.tensors:
            offsets[name] = int(o)
    return OffsetPlan(offsets, arena, best, {k: v[0] for k, v in results.items()})


# -- execution order --------------------------------------------------------------------------
def memory_greedy_order(graph: onnx.GraphProto, sizes: Mapping[str, int]) -> list[int]:
    """A topological order that, among ready nodes, runs the one that grows live bytes least
    (bytes it allocates minus bytes of inputs it is the last reader of); ties keep the stored
    order. `sizes` holds the byte size of every activation."""
    n = len(graph.node)
    producer: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for o in node.output:
            if o:
                producer[o] = i
    reads: list[list[str]] = []
    readers: dict[str, set[int]] = {}
    deps: list[set[int]] = []
    for i, node in enumerate(graph.node):
        names = sorted({x for x in list(node.input) + sorted(subgraph_outer_inputs(node)) if x})
        reads.append(names)
        d = set()
        for x in names:
            readers.setdefault(x, set()).add(i)
            if x in producer and producer[x] != i:
                d.add(producer[x])
        deps.append(d)
    users: list[list[int]] = [[] for _ in range(n)]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    outputs = {o.name for o in graph.output}
    remaining = {x: len(r) for x, r in readers.items()}
    indeg = [len(d) for d in deps]

    def delta(i: int) -> int:
        alloc = sum(sizes.get(o, 0) for o in graph.node[i].output if o)
        freed = sum(sizes.get(x, 0) for x in reads[i]
                    if remaining.get(x) == 1 and x not in outputs and x in sizes)
        return alloc - freed

    ready = [(delta(i), i) for i in range(n) if indeg[i] == 0]
    heapq.heapify(ready)
    order: list[int] = []
    done = [False] * n
    while ready:
        d, i = heapq.heappop(ready)
        if done[i]:
            continue
        if d != delta(i):  # stale key: remaining readers changed since it was pushed
            heapq.heappush(ready, (delta(i), i))
            continue
        done[i] = True
        order.append(i)
        touched = set()
        for x in reads[i]:
            remaining[x] -= 1
            touched |= readers.get(x, set())
        for j in users[i]:
            indeg[j] -= 1
            if indeg[j] == 0:
                heapq.heappush(ready, (delta(j), j))
        for j in touched:
            if not done[j] and indeg[j] == 0:
                heapq.heappush(ready, (delta(j), j))
    if len(order) != n:
        from onnxpress.errors import InvalidModelError

        raise InvalidModelError("the graph has a cycle or reads tensors nothing produces")
    return order


# -- the plan as data -------------------------------------------------------------------------
def plan_dict(lv: Liveness, offsets: OffsetPlan, *, alignment: int,
              extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The plan as stored in metadata_props[PLAN_KEY] (JSON-able)."""
    peak = lv.peak_step
    tensors = {}
    for name, t in lv.tensors.items():
        d = {"offset": offsets.offsets[name]}
        d.update(t.to_dict())
        tensors[name] = d
    live = lv.live_at(peak)
    plan: dict[str, Any] = {
        "version": PLAN_VERSION,
        "arena_bytes": offsets.arena_bytes,
        "lower_bound_bytes": lv.lower_bound_bytes,
        "naive_bytes": sum(_align(t.size, alignment) for t in lv.tensors.values()),
        "lower_bound_no_inplace_bytes": lv.lower_bound_no_inplace_bytes,
        "weights_bytes": lv.weights_bytes,
        "alignment": alignment,
        "algorithm": offsets.algorithm,
        "candidates": offsets.candidates,
        "peak": {"step": peak, "node": lv.order[peak] if lv.order else None,
                 "bytes": lv.lower_bound_bytes, "tensors": [t.name for t in live]},
        "order": list(lv.order),
        "tensors": tensors,
    }
    if lv.subgraphs:
        plan["subgraphs"] = {
            node: {attr: plan_dict(sub, plan_offsets(sub, alignment=alignment),
                                   alignment=alignment)
                   for attr, sub in bodies.items()}
            for node, bodies in lv.subgraphs.items()}
    plan["tensors_planned"] = lv.planned_count
    plan["tensors_unplanned"] = lv.unplanned_count
    plan["unplanned"] = [dict(u) for u in lv.unplanned]
    if lv.unplanned_count:
        plan["left_to_runtime"] = left_to_runtime(plan)
    if extra:
        plan.update(extra)
    return plan


def all_unplanned(plan: Mapping[str, Any], where: str = "") -> list[dict[str, Any]]:
    """Every `unplanned` entry of the plan and its subgraph plans, with the graph it is in."""
    out = [dict(u, graph=where or "main graph") for u in plan.get("unplanned") or []]
    for node, bodies in (plan.get("subgraphs") or {}).items():
        for attr, sub in bodies.items():
            out += all_unplanned(sub, f"{where + '/' if where else ''}{node}.{attr}")
    return out


def left_to_runtime(plan: Mapping[str, Any]) -> str:
    """One sentence: how many tensors the plan leaves to the runtime, by reason, with an example
    each (subgraphs included); empty when everything is planned."""
    left = all_unplanned(plan)
    if not left:
        return ""
    by: dict[str, list[dict[str, Any]]] = {}
    for u in left:
        by.setdefault(u["reason"], []).append(u)
    parts = []
    for reason, items in sorted(by.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        ex = items[0]
        parts.append(f"{len(items)} {reason.replace('_', ' ')} (e.g. '{ex['tensor']}': "
                     f"{ex['detail']})")
    planned = plan.get("tensors_planned", len(plan.get("tensors") or {}))
    text = (f"{len(left)} of {len(left) + planned} tensors are left to the runtime, outside the "
            f"planned arena: " + "; ".join(parts))
    if "unbound_dim" in by:
        text += ". To plan those, bind the dims (reuse:batch=1,seq=128, reuse:dims=NAME/SIZE, or " \
                "shapes={'input': [1, 3, 224, 224]})"
    if not planned:
        text += ". Nothing in this model has a static size: the plan is empty"
    return text


def read_memory_plan(model: onnx.ModelProto) -> dict[str, Any] | None:
    """The plan stored in `model.metadata_props[PLAN_KEY]`, or None."""
    for p in model.metadata_props:
        if p.key == PLAN_KEY:
            try:
                return json.loads(p.value)
            except json.JSONDecodeError as exc:
                raise MemoryPlanError(f"metadata '{PLAN_KEY}' is not valid JSON: {exc}") from None
    return None


def write_memory_plan(model: onnx.ModelProto, plan: Mapping[str, Any]) -> None:
    keep = [p for p in model.metadata_props if p.key != PLAN_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    entry = model.metadata_props.add()
    entry.key = PLAN_KEY
    entry.value = json.dumps(plan, separators=(",", ":"), sort_keys=False)


# -- the checker ------------------------------------------------------------------------------
def _int(plan: Mapping, key: str, where: str) -> int:
    v = plan.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise MemoryPlanError(f"{where}: '{key}' must be a non-negative integer, got {v!r}")
    return v


def _check_plan(plan: Mapping[str, Any], where: str) -> None:
    for key in ("arena_bytes", "lower_bound_bytes", "naive_bytes", "tensors", "order"):
        if key not in plan:
            raise MemoryPlanError(f"{where}: the plan has no '{key}'")
    arena = _int(plan, "arena_bytes", where)
    lower = _int(plan, "lower_bound_bytes", where)
    naive = _int(plan, "naive_bytes", where)
    order = plan["order"]
    tensors = plan["tensors"]
    if not isinstance(order, list) or not isinstance(tensors, dict):
        raise MemoryPlanError(f"{where}: 'order' must be a list and 'tensors' an object")
    if len(set(order)) != len(order):
        dup = next(n for n in order if order.count(n) > 1)
        raise MemoryPlanError(f"{where}: node '{dup}' appears twice in 'order'")
    steps = max(1, len(order))
    names = list(tensors)
    n = len(names)
    off = np.zeros(n, dtype=np.int64)
    size = np.zeros(n, dtype=np.int64)
    first = np.zeros(n, dtype=np.int64)
    last = np.zeros(n, dtype=np.int64)
    for i, name in enumerate(names):
        t = tensors[name]
        w = f"{where}: tensor '{name}'"
        if not isinstance(t, dict):
            raise MemoryPlanError(f"{w} is not an object")
        off[i], size[i] = _int(t, "offset", w), _int(t, "size", w)
        first[i], last[i] = _int(t, "first", w), _int(t, "last", w)
        if not first[i] <= last[i] < steps:
            raise MemoryPlanError(
                f"{w} is live over steps [{first[i]}, {last[i]}], outside the order's "
                f"{len(order)} steps")
        if off[i] + size[i] > arena:
            raise MemoryPlanError(
                f"{w} ends at byte {off[i] + size[i]}, past the arena ({arena} bytes)")
        src = t.get("inplace_of")
        if src is not None:
            s = tensors.get(src)
            if s is None or s.get("last") != t["first"] or s.get("offset") != t["offset"] \
                    or s.get("size") != t["size"]:
                raise MemoryPlanError(
                    f"{w} claims to be written in place over '{src}', which does not end at "
                    f"step {t['first']} at the same offset with the same size")
    unplanned = plan.get("unplanned", [])
    if not isinstance(unplanned, list) or not all(
            isinstance(u, dict) and isinstance(u.get("tensor"), str) for u in unplanned):
        raise MemoryPlanError(f"{where}: 'unplanned' must be a list of objects naming a 'tensor'")
    both = sorted({u["tensor"] for u in unplanned} & set(tensors))
    if both:
        raise MemoryPlanError(
            f"{where}: tensor '{both[0]}' is both placed in the arena and listed as unplanned")
    index = {name: i for i, name in enumerate(names)}
    allowed = {(index[tensors[nm]["inplace_of"]], index[nm]) for nm in names
               if tensors[nm].get("inplace_of") is not None}
    for i in range(n):
        if size[i] == 0:
            continue
        clash = ((first <= last[i]) & (last >= first[i]) & (off < off[i] + size[i])
                 & (off + size > off[i]) & (size > 0))
        clash[: i + 1] = False
        for j in np.nonzero(clash)[0].tolist():
            if (i, j) in allowed or (j, i) in allowed:
                continue
            both = (max(first[i], first[j]), min(last[i], last[j]))
            node = order[both[0]] if order else "?"
            raise MemoryPlanError(
                f"{where}: tensors '{names[i]}' (bytes {off[i]}..{off[i] + size[i]}, steps "
                f"{first[i]}..{last[i]}) and '{names[j]}' (bytes {off[j]}..{off[j] + size[j]}, "
                f"steps {first[j]}..{last[j]}) are both live at step {both[0]} (node '{node}') "
                "and overlap in memory")
    diff = np.zeros(steps + 1, dtype=np.int64)
    np.add.at(diff, first, size)
    np.add.at(diff, last + 1, -size)
    for _, b in allowed:  # an in-place pair holds one buffer at its hand-over step
        diff[first[b]] -= size[b]
        diff[first[b] + 1] += size[b]
    live = np.cumsum(diff)[:-1]
    actual = int(live.max()) if n else 0
    if actual != lower:
        raise MemoryPlanError(
            f"{where}: 'lower_bound_bytes' is {lower} but the tensors' sizes and steps give "
            f"{actual}")
    if arena < lower:
        raise MemoryPlanError(f"{where}: the arena ({arena}) is below the lower bound ({lower})")
    alignment = plan.get("alignment", 1)
    if not isinstance(alignment, int) or alignment < 1:
        raise MemoryPlanError(f"{where}: 'alignment' must be a positive integer")
    naive_actual = int(sum(_align(int(s), alignment) for s in size.tolist()))
    if naive != naive_actual:
        raise MemoryPlanError(
            f"{where}: 'naive_bytes' is {naive} but the tensors, each aligned to {alignment} "
            f"bytes, add up to {naive_actual}")
    for node, bodies in (plan.get("subgraphs") or {}).items():
        for attr, sub in bodies.items():
            _check_plan(sub, f"{where}/{node}.{attr}")


def verify_memory_plan(model_or_plan: Any) -> None:
    """Raise MemoryPlanError unless the plan is well formed and no two tensors live at the same
    step share a byte (an output written in place over an input that ends at that step excepted).

    Accepts a ModelProto or path (reads metadata_props['onnxpress.memory_plan'] and also checks
    the plan's order against the graph's node names), a plan dict, or its JSON text.
    """
    from pathlib import Path

    model = None
    if isinstance(model_or_plan, (str, Path)) and not str(model_or_plan).lstrip().startswith("{"):
        model = onnx.load(str(model_or_plan), load_external_data=False)
    elif isinstance(model_or_plan, (bytes, bytearray)):
        model = onnx.load_from_string(bytes(model_or_plan))
    elif isinstance(model_or_plan, onnx.ModelProto):
        model = model_or_plan
    if model is not None:
        plan = read_memory_plan(model)
        if plan is None:
            raise MemoryPlanError(f"the model has no '{PLAN_KEY}' metadata; run the reuse pass")
        names = [n.name for n in model.graph.node]
        if names != plan.get("order"):
            raise MemoryPlanError(
                f"the plan in '{PLAN_KEY}' is stale: its order does not match the graph's nodes "
                f"({len(plan.get('order') or [])} planned, {len(names)} in the graph); the model "
                "was changed after the reuse pass, run it again")
        where = "memory plan"
    elif isinstance(model_or_plan, str):
        try:
            plan = json.loads(model_or_plan)
        except json.JSONDecodeError as exc:
            raise MemoryPlanError(f"the plan is not valid JSON: {exc}") from None
        where = "memory plan"
    elif isinstance(model_or_plan, Mapping):
        plan, where = model_or_plan, "memory plan"
    else:
        raise MemoryPlanError(
            f"verify_memory_plan takes a model, a path, a plan dict or JSON, not "
            f"{type(model_or_plan).__name__}")
    if not isinstance(plan, Mapping):
        raise MemoryPlanError(f"{where}: expected a JSON object")
    _check_plan(plan, where)
