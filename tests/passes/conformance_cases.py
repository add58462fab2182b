"""onnx's own test data as conformance cases for onnxpress pipelines (shared by the tests).

Cases: the model directories bundled in the onnx wheel (pytorch-converted, pytorch-operator,
simple) and the generated single-op node cases (onnx.backend.test.loader, kind="node"). A case
counts when onnxruntime runs its original model; a pipeline's output must then match onnxruntime
on the original (rtol 1e-4, atol 1e-5) and no pass may crash.

    stats, failures = run_cases(model_cases(), ["cleanup", "fuse", "reuse"])

The original's outputs are computed once per case and process (several pipelines share them).

From the command line (the counts docs/memory.md quotes):

    .venv/bin/python -m tests.passes.conformance_cases cleanup,fuse,reuse
"""

from __future__ import annotations

import collections
import dataclasses
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxpress import passes
from onnxpress.backends import ort
from onnxpress.errors import BackendError

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
SKIP_NO_INPUTS = "skipped: no usable test inputs"
SKIP_OBJECT_INPUTS = "skipped: string or sequence inputs"
SKIP_ORT = "skipped: onnxruntime cannot run the original"
SKIP_CHECKER = "skipped: original fails the checker"

# the original's outputs per case name (None: onnxruntime cannot run it)
_EXPECTED: dict[str, dict | None] = {}


@dataclasses.dataclass
class Case:
    name: str
    model: onnx.ModelProto | None      # None: the original fails onnx's checker
    feeds: dict[str, np.ndarray] | None


def _read_feeds(model: onnx.ModelProto, case_dir: Path) -> dict | None:
    sets = sorted(case_dir.glob("test_data_set_*"))
    if not sets:
        return None
    inits = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    feeds = {}
    for i, pb in enumerate(sorted(sets[0].glob("input_*.pb"), key=lambda p: int(p.stem.split("_")[1]))):
        t = onnx.TensorProto()
        t.ParseFromString(pb.read_bytes())
        if i >= len(names):
            return None
        feeds[names[i]] = numpy_helper.to_array(t)
    return feeds if len(feeds) == len(names) else None


def _checked(model: onnx.ModelProto) -> bool:
    try:
        onnx.checker.check_model(model)
    except Exception:
        return False
    return True


def model_dirs() -> list[Path]:
    dirs = []
    for kind in ("pytorch-converted", "pytorch-operator", "simple"):
        dirs += sorted(p.parent for p in (DATA / kind).glob("*/model.onnx"))
    return dirs


def model_cases() -> Iterator[Case]:
    """The model directories bundled in the onnx wheel."""
    for d in model_dirs():
        try:
            model = onnx.load(d / "model.onnx")
        except Exception:
            yield Case(d.name, None, None)
            continue
        if not _checked(model):
            yield Case(d.name, None, None)
            continue
        yield Case(d.name, model, _read_feeds(model, d))


def node_cases() -> Iterator[Case]:
    """The generated single-op node cases (onnx.backend.test.loader, kind="node")."""
    from onnx.backend.test.loader import load_model_tests

    for case in load_model_tests(kind="node"):
        model = case.model
        if not _checked(model):
            yield Case(case.name, None, None)
            continue
        inputs = case.data_sets[0][0] if case.data_sets else None
        inits = {t.name for t in model.graph.initializer}
        names = [i.name for i in model.graph.input if i.name not in inits]
        feeds = None
        if inputs is not None and len(inputs) == len(names) and \
                all(isinstance(v, np.ndarray) for v in inputs):
            feeds = dict(zip(names, inputs))
        yield Case(case.name, model, feeds)


def expected_outputs(case: Case) -> dict | None:
    """onnxruntime's outputs for the original model (cached per case), None if it cannot run."""
    if case.name not in _EXPECTED:
        try:
            _EXPECTED[case.name] = ort.run(case.model, case.feeds, optimization="disable")
        except BackendError:
            _EXPECTED[case.name] = None
    return _EXPECTED[case.name]


def run_case(case: Case, pipeline: Sequence | str, stats: collections.Counter,
             failures: list[str]) -> onnx.ModelProto | None:
    """Run one case through `pipeline`; count it in `stats` or add a line to `failures`.
    Returns the pipeline's output when the case was preserved."""
    if case.model is None:
        stats[SKIP_CHECKER] += 1
        return None
    if case.feeds is None:
        stats[SKIP_NO_INPUTS] += 1
        return None
    if any(v.dtype == object for v in case.feeds.values()):
        stats[SKIP_OBJECT_INPUTS] += 1
        return None
    expected = expected_outputs(case)
    if expected is None:
        stats[SKIP_ORT] += 1
        return None
    before = _program(case.model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")     # passes say what they left alone; counted here
            out = passes.apply(case.model, pipeline)
    except Exception as exc:  # any crash is a failure of ours
        failures.append(f"{case.name}: pass crashed: {type(exc).__name__}: {exc}")
        return None
    if _program(case.model) != before:
        failures.append(f"{case.name}: the pipeline changed the caller's model")
        return None
    if _program(out) == before:
        # the pass gave back the very graph it got (most single-op cases have nothing to
        # rewrite): onnxruntime computes and loads it as before, no need to ask it again
        stats["preserved"] += 1
        stats["preserved (unchanged graph)"] += 1
        return out
    try:
        actual = ort.run(out, case.feeds, optimization="disable")
    except BackendError as exc:
        failures.append(f"{case.name}: onnxruntime cannot run the output: {exc}")
        return None
    result = ort.compare_outputs(expected, actual, rtol=1e-4, atol=1e-5)
    if not result.ok:
        failures.append(f"{case.name}: outputs changed\n{result}")
        return None
    # users load models with onnxruntime's default (all) optimizations: the output must load
    # there whenever the original does (a folded If condition once broke affine_grid here)
    if not _loads(out) and _original_loads(case):
        failures.append(f"{case.name}: onnxruntime with its default optimizations cannot load "
                        "the output, though it loads the original")
        return None
    stats["preserved"] += 1
    return out


def _program(model: onnx.ModelProto) -> tuple:
    """What onnxruntime runs, metadata and doc strings aside: the graph's nodes, weights, inputs,
    outputs and value_info as bytes, and the opsets."""
    g = model.graph
    parts = [b"".join(x.SerializeToString(deterministic=True) for x in field)
             for field in (g.node, g.initializer, g.sparse_initializer, g.input, g.output, g.value_info)]
    return tuple(parts) + (tuple(sorted((o.domain, o.version) for o in model.opset_import)),)


_LOADS: dict[str, bool] = {}


def _original_loads(case: Case) -> bool:
    """Whether onnxruntime's default session loads the original (cached per case)."""
    if case.name not in _LOADS:
        _LOADS[case.name] = _loads(case.model)
    return _LOADS[case.name]


def _loads(model: onnx.ModelProto) -> bool:
    try:
        ort.session(model)
    except BackendError:
        return False
    return True


def run_cases(cases, pipeline: Sequence | str, *, on_preserved=None) -> tuple[collections.Counter,
                                                                              list[str]]:
    """Run every case; (counts by outcome, failure lines). `on_preserved(case, output)` is called
    for each preserved case (to collect figures)."""
    stats: collections.Counter = collections.Counter()
    failures: list[str] = []
    for case in cases:
        stats["cases"] += 1
        out = run_case(case, pipeline, stats, failures)
        if out is not None and on_preserved is not None:
            on_preserved(case, out)
    stats["failed"] = len(failures)
    return stats, failures


def summary(title: str, stats: collections.Counter) -> str:
    return f"{title} ({stats['cases']}): " + ", ".join(
        f"{k} {v}" for k, v in sorted(stats.items()) if k != "cases")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    pipeline = argv[0] if argv else "cleanup"
    total = 0
    for title, cases in (("bundled model cases", model_cases()),
                         ("generated node cases", node_cases())):
        stats, failures = run_cases(cases, pipeline)
        print(summary(f"{pipeline}: {title}", stats))
        for line in failures:
            print("  " + line.splitlines()[0])
        total += len(failures)
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
