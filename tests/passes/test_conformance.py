"""Conformance: cleanup passes keep every case of onnx's own test data runnable and unchanged.

Cases: the model directories bundled in the onnx wheel (pytorch-converted, pytorch-operator,
simple) and the generated single-op node cases (onnx.backend.test.loader, kind="node"). A case
counts when onnxruntime runs its original model; the cleanup output must then match onnxruntime
on the original (rtol 1e-4, atol 1e-5) and no pass may crash.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxpress import passes
from onnxpress.backends import ort
from onnxpress.errors import BackendError

PIPELINE = ["fold_constants", "dce", "simplify"]
DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"


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


def _run_case(model: onnx.ModelProto, feeds: dict | None, stats: collections.Counter, name: str,
              failures: list) -> None:
    if feeds is None:
        stats["skipped: no usable test inputs"] += 1
        return
    if any(v.dtype == object for v in feeds.values()):
        stats["skipped: string or sequence inputs"] += 1
        return
    try:
        expected = ort.run(model, feeds, optimization="disable")
    except BackendError:
        stats["skipped: onnxruntime cannot run the original"] += 1
        return
    try:
        out = passes.apply(model, PIPELINE)
    except Exception as exc:  # any crash is a failure of ours
        failures.append(f"{name}: pass crashed: {type(exc).__name__}: {exc}")
        return
    try:
        actual = ort.run(out, feeds, optimization="disable")
    except BackendError as exc:
        failures.append(f"{name}: onnxruntime cannot run the cleaned model: {exc}")
        return
    result = ort.compare_outputs(expected, actual, rtol=1e-4, atol=1e-5)
    if not result.ok:
        failures.append(f"{name}: outputs changed\n{result}")
        return
    stats["preserved"] += 1


def _model_dirs() -> list[Path]:
    dirs = []
    for kind in ("pytorch-converted", "pytorch-operator", "simple"):
        dirs += sorted(p.parent for p in (DATA / kind).glob("*/model.onnx"))
    return dirs


def test_bundled_model_cases(capsys):
    stats: collections.Counter = collections.Counter()
    failures: list[str] = []
    dirs = _model_dirs()
    assert len(dirs) > 100, "the onnx wheel should bundle over 100 model cases"
    for d in dirs:
        try:
            model = onnx.load(d / "model.onnx")
            onnx.checker.check_model(model)
        except Exception:
            stats["skipped: original fails the checker"] += 1
            continue
        _run_case(model, _read_feeds(model, d), stats, d.name, failures)
    with capsys.disabled():
        print(f"\nbundled model cases ({len(dirs)}): " + ", ".join(f"{k} {v}" for k, v in sorted(stats.items())))
    assert not failures, "\n".join(failures[:10])
    assert stats["preserved"] >= 90


def test_generated_node_cases(capsys):
    from onnx.backend.test.loader import load_model_tests

    cases = load_model_tests(kind="node")
    assert len(cases) > 1000
    stats: collections.Counter = collections.Counter()
    failures: list[str] = []
    for case in cases:
        model = case.model
        try:
            onnx.checker.check_model(model)
        except Exception:
            stats["skipped: original fails the checker"] += 1
            continue
        inputs = case.data_sets[0][0] if case.data_sets else None
        inits = {t.name for t in model.graph.initializer}
        names = [i.name for i in model.graph.input if i.name not in inits]
        feeds = None
        if inputs is not None and len(inputs) == len(names) and \
                all(isinstance(v, np.ndarray) for v in inputs):
            feeds = dict(zip(names, inputs))
        _run_case(model, feeds, stats, case.name, failures)
    with capsys.disabled():
        print(f"\ngenerated node cases ({len(cases)}): " + ", ".join(f"{k} {v}" for k, v in sorted(stats.items())))
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:10])
    assert stats["preserved"] >= 900

