"""`onnxpress inspect --memory`: weights, naive activations, lower bound, planned arena, and the
largest live set. Uses the plan stored by the `reuse` pass when it is there and current,
otherwise plans now (nothing is written)."""

from __future__ import annotations

import argparse
from typing import Any

import onnx

from onnxpress.units import human_bytes


def add_inspect_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--memory", action="store_true",
        help="activation memory: naive total, lower bound, planned arena, largest live set "
             "(dynamic dims from --batch and --shape, e.g. --shape seq=128)")
    parser.add_argument("--memory-top", type=int, default=12, metavar="N",
                        help="tensors of the largest live set shown (0: all)")


def _human(n: float) -> str:
    return human_bytes(n)

def memory_summary(model: onnx.ModelProto, shapes: dict[str, Any] | None = None,
                   batch: int | None = None) -> tuple[dict[str, Any], str]:
    """(plan, source): the model's stored plan when current, else a fresh one."""
    from onnxpress.passes.memory import (
        MemoryPlanError,
        node_names,
        plan_memory,
        read_memory_plan,
        verify_memory_plan,
    )

    stored = None
    try:
        stored = read_memory_plan(model)
    except MemoryPlanError:
        stored = None
    dims: dict[str, Any] = {"batch": batch} if batch else {}
    if stored is not None:
        try:
            verify_memory_plan(model)
            return stored, "stored in metadata (onnxpress.memory_plan), verified"
        except MemoryPlanError as exc:
            note = f"stored plan rejected ({exc}); planned again"
            if not shapes:  # plan at the shapes the stored plan was made for
                dims.update(stored.get("bindings") or {})
    else:
        note = "planned now (run the reuse pass to store it)"
    plan, order = plan_memory(model, dims=dims, shapes=shapes)
    names = node_names(model.graph)
    if order != list(range(len(names))):
        note += "; a memory-aware node order is used (reuse writes it into the graph)"
    return plan, note


def inspect_json(model: onnx.ModelProto, args: argparse.Namespace) -> dict[str, Any]:
    """`inspect --memory --json`: {"memory": weights, naive, lower bound, arena, unplanned, where
    the plan came from} (the same plan the table shows; nothing without --memory)."""
    if not getattr(args, "memory", False):
        return {}
    from onnxpress.cli import parse_shapes
    from onnxpress.stats import weight_bytes

    plan, source = memory_summary(model, parse_shapes(getattr(args, "shape", None)),
                                  getattr(args, "batch", None))
    keys = ("arena_bytes", "lower_bound_bytes", "naive_bytes", "tensors_unplanned", "algorithm",
            "bindings")
    return {"memory": {"weights_bytes": plan.get("weights_bytes", weight_bytes(model)),
                       **{k: plan.get(k) for k in keys if k in plan}, "source": source}}


def inspect_sections(model: onnx.ModelProto, args: argparse.Namespace, console) -> None:
    if not getattr(args, "memory", False):
        return
    from rich.markup import escape
    from rich.table import Table

    from onnxpress.cli import parse_shapes
    from onnxpress.stats import weight_bytes

    plan, source = memory_summary(model, parse_shapes(getattr(args, "shape", None)),
                                  getattr(args, "batch", None))
    lower, arena, naive = plan["lower_bound_bytes"], plan["arena_bytes"], plan["naive_bytes"]
    weights = plan.get("weights_bytes", weight_bytes(model))
    table = Table(title="activation memory")
    table.add_column("")
    table.add_column("bytes", justify="right")
    table.add_column("", justify="right")
    table.add_column("note")
    table.add_row("weights", f"{weights:,}", _human(weights), "initializers and Constant nodes")
    table.add_row("activations, naive", f"{naive:,}", _human(naive), "every tensor its own buffer")
    table.add_row("lower bound", f"{lower:,}", _human(lower),
                  "largest total alive at one node")
    table.add_row("planned arena", f"{arena:,}", _human(arena),
                  f"{arena / max(1, lower):.3f}x lower bound, {arena / max(1, naive):.1%} of naive")
    table.add_row("weights + arena", f"{weights + arena:,}", _human(weights + arena), "")
    unplanned = plan.get("tensors_unplanned", 0)
    if unplanned:
        from onnxpress.passes.memory.planner import all_unplanned

        reasons: dict[str, int] = {}
        for u in all_unplanned(plan):
            reasons[u["reason"]] = reasons.get(u["reason"], 0) + 1
        table.add_row(
            "left to the runtime", f"{unplanned:,} tensors", "",
            "no static size, not in the arena: " + ", ".join(
                f"{n} {r.replace('_', ' ')}" for r, n in sorted(reasons.items(),
                                                               key=lambda kv: -kv[1])))
    bindings = plan.get("bindings") or {}
    table.caption = escape(
        f"{source}; {plan.get('algorithm', '?')}, {plan.get('inplace_tensors', 0)} tensors in "
        f"place, alignment {plan.get('alignment', '?')}"
        + (f"; shapes {bindings}" if bindings else ""))
    console.print(table)

    peak = plan.get("peak") or {}
    names = peak.get("tensors") or []
    tensors = plan["tensors"]
    order = plan["order"]
    step = peak.get("step", 0)
    live = Table(title=escape(
        f"largest live set: {len(names)} tensors, {_human(peak.get('bytes', lower))} at node "
        f"'{peak.get('node')}' (step {step} of {len(order)})"))
    for col, just in (("tensor", "left"), ("bytes", "right"), ("offset", "right"),
                      ("alive", "left"), ("kind", "left")):
        live.add_column(col, justify=just, overflow="fold")
    top = getattr(args, "memory_top", 12)
    shown = names[:top] if top else names
    for name in shown:
        t = tensors[name]
        span = f"steps {t['first']}..{t['last']}"
        live.add_row(escape(name), f"{t['size']:,}", f"{t['offset']:,}", escape(span),
                     t.get("kind", "") + (f" (in place of {t['inplace_of']})"
                                          if t.get("inplace_of") else ""))
    if len(shown) < len(names):
        live.caption = f"{len(shown)} of {len(names)} shown (--memory-top 0 shows all)"
    console.print(live)
