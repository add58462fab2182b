"""Activation memory planning: liveness, offsets in one arena, and the `reuse` pass.

    from onnxpress.passes.memory import plan_memory, verify_memory_plan, read_memory_plan

    model = passes.apply(model, ["reuse:batch=1,seq=128"])
    plan = read_memory_plan(model)          # metadata_props["onnxpress.memory_plan"] as a dict
    verify_memory_plan(model)               # raises MemoryPlanError on any overlap

See docs/memory.md for the plan format.
"""

from onnxpress.passes.memory.liveness import (
    Liveness,
    SizeInfo,
    TensorLife,
    bind_static_shapes,
    graph_liveness,
    model_liveness,
    name_nodes,
    node_names,
    size_info,
    static_types,
)
from onnxpress.passes.memory.planner import (
    PLAN_KEY,
    MemoryPlanError,
    MemoryPlanWarning,
    OffsetPlan,
    memory_greedy_order,
    plan_offsets,
    read_memory_plan,
    verify_memory_plan,
    write_memory_plan,
)
from onnxpress.passes.memory.reuse import apply_order, plan_memory, reuse

__all__ = [
    "PLAN_KEY", "Liveness", "MemoryPlanError", "MemoryPlanWarning", "OffsetPlan", "SizeInfo",
    "TensorLife", "apply_order",
    "bind_static_shapes", "graph_liveness", "memory_greedy_order", "model_liveness",
    "name_nodes", "node_names", "plan_memory", "plan_offsets", "read_memory_plan", "reuse",
    "size_info", "static_types", "verify_memory_plan", "write_memory_plan",
]
