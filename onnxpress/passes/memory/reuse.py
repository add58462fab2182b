"""The `reuse` pass: plan activation memory into one arena and record the plan in the model.

    before: every activation its own allocation       after: nodes in a memory-aware order,
            (naive = sum of all activations)                 metadata_props["onnxpress.memory_plan"]
                                                             = {"arena_bytes", "lower_bound_bytes",
                                                                "naive_bytes", "order",
                                                                "tensors": {name: {"offset",
                                                                  "size", "first", "last"}}}

The graph's computation does not change: nodes are only put in another topological order (when
that lowers the planned arena without raising the peak) and unnamed nodes get deterministic
names so that `order` names them. Dynamic dims are bound with options (`reuse:batch=1,seq=128`,
`reuse:dims=height/224+width/224`) or the context's shapes (`shapes={"input_ids": [1, 128]}`).
"""

from __future__ import annotations

import time
import warnings
from typing import Annotated, Any, Literal

import onnx

from onnxpress.passes.context import PassContext
from onnxpress.passes.memory.liveness import (
    INPLACE_POLICIES,
    Liveness,
    graph_liveness,
    name_nodes,
    normalise_bindings,
    size_info,
)
from onnxpress.passes.memory.planner import (
    PLAN_KEY,
    MemoryPlanWarning,
    memory_greedy_order,
    plan_dict,
    plan_offsets,
    verify_memory_plan,
    write_memory_plan,
)
from onnxpress.passes.registry import Range, register


def plan_memory(model: onnx.ModelProto, *, dims: dict[str, int] | None = None,
                shapes: dict[str, Any] | None = None, alignment: int = 64,
                reorder: bool = True, inplace: bool = True, default_dim: int | None = None,
                allow_unknown: bool = True,
                strategy: str = "best") -> tuple[dict[str, Any], list[int]]:
    """Plan `model`'s activations without changing it: (plan dict, node order as indices).

    The plan's `order` names nodes as `name_nodes` would name them; apply the order and the
    names (the `reuse` pass does) before storing the plan in the model. Tensors without a static
    size are listed under `unplanned` (with `allow_unknown=False` they raise instead).
    """
    t0 = time.perf_counter()
    dim_sizes, input_shapes = normalise_bindings(dims, shapes)
    if strategy not in ("best", "greedy_by_size", "greedy_by_breadth"):
        from onnxpress.errors import PassOptionError

        raise PassOptionError(f"unknown strategy '{strategy}'; choose from best, greedy_by_size, "
                              "greedy_by_breadth")
    info = size_info(model, dim_sizes, input_shapes, default_dim=default_dim,
                     strict=not allow_unknown)
    types = info.planning_types
    strategies = (("greedy_by_size", "greedy_by_breadth") if strategy == "best" else (strategy,))

    def evaluate(order: list[int] | None) -> tuple[Liveness, Any]:
        # which dying input an output takes over changes buffer shapes, not the lower bound:
        # try each policy and keep the smaller arena
        best = None
        for policy in (INPLACE_POLICIES if inplace else INPLACE_POLICIES[:1]):
            lv = graph_liveness(model.graph, types, order, inplace=inplace,
                                allow_unknown=allow_unknown, inplace_policy=policy,
                                alignment=alignment, reasons=info.reasons)
            offs = plan_offsets(lv, alignment=alignment, strategies=strategies)
            offs.algorithm += f"+inplace_{policy}" if inplace else ""
            if best is None or offs.arena_bytes < best[1].arena_bytes:
                best = (lv, offs)
        return best

    stored = list(range(len(model.graph.node)))
    lv, offs = evaluate(stored)
    chosen = stored
    stored_peak, stored_arena = lv.lower_bound_bytes, offs.arena_bytes
    tried: dict[str, dict[str, int]] = {
        "stored": {"lower_bound_bytes": stored_peak, "arena_bytes": stored_arena}}
    if reorder and len(model.graph.node) > 1:
        sizes = {name: t.size for name, t in lv.tensors.items()}
        candidate = memory_greedy_order(model.graph, sizes)
        if candidate != stored:
            lv2, offs2 = evaluate(candidate)
            tried["memory_greedy"] = {"lower_bound_bytes": lv2.lower_bound_bytes,
                                      "arena_bytes": offs2.arena_bytes}
            # never raise the peak: take the new order only when both figures are no larger
            # and one is smaller
            if (lv2.lower_bound_bytes <= stored_peak and offs2.arena_bytes <= stored_arena
                    and (lv2.lower_bound_bytes, offs2.arena_bytes) < (stored_peak, stored_arena)):
                lv, offs, chosen = lv2, offs2, candidate
    plan = plan_dict(lv, offs, alignment=alignment, extra={
        "bindings": {**dim_sizes, **{k: list(v) for k, v in input_shapes.items()}},
        "reordered": chosen != stored,
        "orders_tried": tried,
        "inplace_tensors": sum(1 for t in lv.tensors.values() if t.inplace_of),
        "seconds": round(time.perf_counter() - t0, 3),
    })
    return plan, chosen


def apply_order(model: onnx.ModelProto, order: list[int]) -> None:
    """Rewrite the main graph's node list in `order` (indices into the current list)."""
    if order == list(range(len(model.graph.node))):
        return
    nodes = [model.graph.node[i] for i in order]
    copies = [onnx.NodeProto() for _ in nodes]
    for dst, src in zip(copies, nodes):
        dst.CopyFrom(src)
    del model.graph.node[:]
    model.graph.node.extend(copies)


@register("reuse")
def reuse(model: onnx.ModelProto, ctx: PassContext, *,
          batch: Annotated[int, Range(1)] | None = None,
          seq: Annotated[int, Range(1)] | None = None,
          dims: dict | None = None,
          alignment: Annotated[int, Range(1, 4096)] = 64,
          reorder: bool = True,
          inplace: bool = True,
          strategy: Literal["best", "greedy_by_size", "greedy_by_breadth"] = "best",
          allow_unknown: bool = True) -> onnx.ModelProto:
    """Plan activation memory into one arena (tensor reuse) and store the plan in the model.

    before: naive = every activation its own buffer
    after:  one arena near the lower bound; plan in metadata_props["onnxpress.memory_plan"]
    Liveness over the execution order (If/Loop/Scan bodies as workspaces), in-place reuse for
    elementwise and view ops whose input dies there, offsets by greedy-by-size best fit and
    greedy-by-breadth (the smaller arena kept), and a memory-aware node order written into the
    graph when it lowers the arena without raising the peak. Dynamic dims: batch=, seq=,
    dims=NAME/SIZE+NAME/SIZE, or the context's shapes. Tensors without a static size (unbound
    dims, data-dependent shapes, strings, sequences) are left to the runtime, listed under the
    plan's `unplanned` with a warning; allow_unknown=false fails on them instead. Outputs are
    unchanged.
    """
    bind: dict[str, int] = {}
    if dims:
        for k, v in dims.items():
            bind[str(k)] = v
    if batch is not None:
        bind["batch"] = batch
    if seq is not None:
        bind["seq"] = seq
    name_nodes(model.graph)
    plan, order = plan_memory(model, dims=bind, shapes=ctx.shapes, alignment=alignment,
                              reorder=reorder, inplace=inplace, allow_unknown=allow_unknown,
                              strategy=strategy)
    apply_order(model, order)
    write_memory_plan(model, plan)
    verify_memory_plan(model)
    ctx.record(
        arena_bytes=plan["arena_bytes"], lower_bound_bytes=plan["lower_bound_bytes"],
        naive_bytes=plan["naive_bytes"], weights_bytes=plan["weights_bytes"],
        arena_vs_lower_bound=plan["arena_bytes"] / max(1, plan["lower_bound_bytes"]),
        arena_vs_naive=plan["arena_bytes"] / max(1, plan["naive_bytes"]),
        algorithm=plan["algorithm"], reordered=plan["reordered"],
        inplace_tensors=plan["inplace_tensors"], peak_node=plan["peak"]["node"],
        tensors_planned=plan["tensors_planned"], tensors_unplanned=plan["tensors_unplanned"],
        memory_plan=plan)
    if plan["tensors_unplanned"]:
        warnings.warn(MemoryPlanWarning(f"reuse: {plan['left_to_runtime']}. The plan's "
                                        "'unplanned' lists each one."), stacklevel=2)
    return model


__all__ = ["PLAN_KEY", "plan_memory", "apply_order", "reuse"]
