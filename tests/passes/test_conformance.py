"""Conformance: pipelines keep every case of onnx's own test data runnable and unchanged.

Cases (loaded by tests/passes/conformance_cases.py): the model directories bundled in the onnx
wheel and the generated single-op node cases. A case counts when onnxruntime runs its original
model; the pipeline's output must then match onnxruntime on the original (rtol 1e-4, atol 1e-5)
and no pass may crash. The same counts from the command line:

    .venv/bin/python -m tests.passes.conformance_cases cleanup,fuse,reuse
"""

from __future__ import annotations

import collections
import itertools

from onnxpress.passes.memory import read_memory_plan, verify_memory_plan
from onnxpress.passes.memory.planner import all_unplanned
from tests.passes.conformance_cases import (
    SKIP_CHECKER,
    SKIP_NO_INPUTS,
    SKIP_OBJECT_INPUTS,
    SKIP_ORT,
    model_cases,
    model_dirs,
    node_cases,
    run_cases,
    summary,
)

PIPELINE = ["fold_constants", "dce", "simplify"]


def test_bundled_model_cases(capsys):
    assert len(model_dirs()) > 100, "the onnx wheel should bundle over 100 model cases"
    stats, failures = run_cases(model_cases(), PIPELINE)
    with capsys.disabled():
        print("\n" + summary("bundled model cases", stats))
    assert not failures, "\n".join(failures[:10])
    assert stats["preserved"] >= 90


def test_generated_node_cases(capsys):
    stats, failures = run_cases(node_cases(), PIPELINE)
    assert stats["cases"] > 1000
    with capsys.disabled():
        print("\n" + summary("generated node cases", stats))
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:10])
    assert stats["preserved"] >= 900


def test_cleanup_fuse_reuse_preserves_every_case(capsys):
    """`cleanup,fuse,reuse` on every case onnxruntime runs: outputs preserved, a memory plan that
    verifies, and what reuse leaves to the runtime counted by reason."""
    plans: collections.Counter = collections.Counter()

    def check_plan(case, out):
        verify_memory_plan(out)
        plan = read_memory_plan(out)
        plans["tensors planned"] += plan["tensors_planned"]
        plans["tensors unplanned"] += plan["tensors_unplanned"]
        if plan["tensors_unplanned"]:
            plans["cases partly left to the runtime"] += 1
            if not plan["tensors_planned"]:
                plans["cases with an empty plan"] += 1
        for u in all_unplanned(plan):
            plans[f"unplanned: {u['reason']}"] += 1

    stats, failures = run_cases(itertools.chain(model_cases(), node_cases()),
                                ["cleanup", "fuse", "reuse"], on_preserved=check_plan)
    ran = stats["cases"] - sum(stats[k] for k in (SKIP_CHECKER, SKIP_NO_INPUTS,
                                                  SKIP_OBJECT_INPUTS, SKIP_ORT))
    with capsys.disabled():
        print("\n" + summary("cleanup,fuse,reuse: bundled model and generated node cases", stats))
        print("  reuse: " + ", ".join(f"{k} {v}" for k, v in sorted(plans.items())))
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:10])
    assert stats["preserved"] == ran >= 1500

