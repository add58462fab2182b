"""The HTML report: one self-contained file people can open anywhere, and its JSON twin.

    from onnxpress.report import write_report

    result = passes.run(model, ["cleanup", "fuse", "quant_int8"], calib=calib)
    write_report("out.html", before=model, after=result.model, pipeline_result=result)
    # -> out.html (inline SVG charts, no network) and out.json (the same figures)

For a compiled artifact (the TVM backend), pass what was measured in `extra`:

    write_report("tvm.html", before=model, after=model,
                 extra={"latency": {"onnxruntime": 2.1, "tvm untuned": 3.0, "tvm tuned": 1.4},
                        "target": "llvm -mcpu=cortex-a72", "tuning trials": 2000})

`extra["latency"]` ({label: milliseconds}) becomes the latency chart; every other key is shown in
a table. `compile_report(path, model, artifact)` does this for a TVM artifact (what
`onnxpress compile --report` should call). `measure_latency=True` times before and after on onnxruntime, interleaved, and adds
them. Sections whose data does not exist are left out (see figures.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from onnxpress.errors import ModelSaveError, OnnxPressError
from onnxpress.report.figures import collect


def _proto(model: Any):
    from onnxpress.frontends.auto import import_any

    return import_any(model)


def measure_latency(before: Any, after: Any, *, runs: int = 30, threads: int = 2,
                    shapes: Mapping[str, Any] | None = None) -> dict[str, float]:
    """Median ms of `before` and `after` on onnxruntime, timed interleaved on the same inputs."""
    from onnxpress.backends import ort

    a, b = ort.benchmark_pair(before, after, runs=runs, threads=threads, shapes=shapes)
    return {"before (onnxruntime)": round(a.p50_ms, 4), "after (onnxruntime)": round(b.p50_ms, 4)}


def build(
    *,
    before: Any,
    after: Any,
    pipeline_result: Any = None,
    extra: Mapping[str, Any] | None = None,
    title: str | None = None,
    measure: bool = False,
    shapes: Mapping[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """(html, figures) without writing anything."""
    from onnxpress.report.html import render

    before_p, after_p = _proto(before), _proto(after)
    extra = dict(extra or {})
    if measure:
        try:
            lat = measure_latency(before_p, after_p, shapes=shapes)
            extra["latency"] = {**lat, **dict(extra.get("latency") or {})}
        except OnnxPressError as exc:  # a model onnxruntime cannot time still gets its report
            extra["latency not measured"] = str(exc)
    data = collect(before=before_p, after=after_p, pipeline_result=pipeline_result, extra=extra,
                   title=title, shapes=shapes)
    return render(data), data


def write_report(
    path: str | os.PathLike,
    *,
    before: Any,
    after: Any,
    pipeline_result: Any = None,
    extra: Mapping[str, Any] | None = None,
    title: str | None = None,
    measure_latency: bool = False,
    shapes: Mapping[str, Any] | None = None,
    json_path: str | os.PathLike | None = None,
) -> Path:
    """Write the HTML report to `path` and its JSON twin beside it (`path` with .json).

    before, after:    the models (ModelProto, .onnx path, bytes; Keras/SavedModel paths too)
    pipeline_result:  a passes.run() result (or its .to_dict()) for the per-pass table and charts
    extra:            {"latency": {label: ms}, other: value}: added sections (e.g. TVM compile)
    measure_latency:  time before/after on onnxruntime and chart them
    Returns the HTML path. Both files are written atomically.
    """
    html_text, data = build(before=before, after=after, pipeline_result=pipeline_result, extra=extra,
                            title=title, measure=measure_latency, shapes=shapes)
    path = Path(path)
    twin = Path(json_path) if json_path else path.with_suffix(".json")
    if twin.resolve() == path.resolve():
        twin = path.with_name(path.name + ".json")
    _atomic_write(path, html_text)
    _atomic_write(twin, json.dumps(data, indent=1, default=str))
    return path


def compile_report(
    path: str | os.PathLike,
    model: Any,
    artifact: Any,
    *,
    feeds: Mapping[str, Any] | None = None,
    measure: bool = True,
    runs: int = 30,
    title: str | None = None,
) -> Path:
    """The report for `onnxpress compile`: the model, the artifact's target and tuning, and
    latency side by side (onnxruntime on this host vs the compiled artifact where it runs).

    `artifact` is what `onnxpress.backends.tvm.compile` returned (its `manifest` is read with
    care: missing keys are left out). With measure=False nothing is timed.
    """
    from onnxpress.frontends.auto import import_any

    proto = import_any(model)
    manifest = dict(getattr(artifact, "manifest", {}) or {})
    target = manifest.get("target") or {}
    tuning = manifest.get("tuning") or {}
    sched = manifest.get("schedules") or {}
    extra: dict[str, Any] = {"artifact": str(getattr(artifact, "path", "")),
                             "target": target.get("name"), "TVM target": target.get("tvm")}
    for key, label in (("trials_measured", "tuning trials measured"), ("tasks_tuned", "tasks tuned"),
                       ("tasks_from_db", "tasks reused from the tuning DB"), ("db", "tuning DB")):
        if tuning.get(key) is not None:
            extra[label] = tuning[key]
    if sched:
        from onnxpress.backends.tvm.artifact import kernels_summary

        extra["kernels"] = kernels_summary(sched)
    integer = manifest.get("integer") or {}
    if integer:
        extra["integer kernels"] = {"quantized nodes on integer kernels": integer.get("int8_kernels", 0),
                                    "ops on 8-bit tensors": integer.get("int8_io", 0),
                                    "left float": integer.get("float", 0)}
        why = {n["node"]: f"{n['op']}: {n.get('reason') or n['kernel']}"
               for n in integer.get("nodes", []) if n["kernel"] != "int8"}
        if why:
            extra["nodes not on integer kernels, and why"] = dict(list(why.items())[:40])
    if sched.get("dp4a_scheduled"):
        extra["kernels on dp4a (CUDA)"] = sched["dp4a_scheduled"]
    if measure:
        from onnxpress.backends import ort

        latency: dict[str, float] = {}
        try:
            latency["onnxruntime (this host)"] = round(ort.benchmark(proto, feeds, runs=runs).p50_ms, 4)
        except OnnxPressError as exc:
            extra["onnxruntime not measured"] = str(exc)
        try:
            where = f"TVM {target.get('name', '')}".strip()
            latency[where] = round(artifact.benchmark(feeds, runs=runs).p50_ms, 4)
        except OnnxPressError as exc:
            extra["artifact not measured"] = str(exc)
        if latency:
            extra["latency"] = latency
    extra = {k: v for k, v in extra.items() if v not in (None, "")}
    return write_report(path, before=proto, after=proto, extra=extra,
                        title=title or f"onnxpress compile: {target.get('name', 'TVM')}")


def _atomic_write(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        raise ModelSaveError(f"could not write the report {path}: {exc.strerror or exc}") from None


__all__ = ["write_report", "compile_report", "build", "collect", "measure_latency"]
