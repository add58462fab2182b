"""The onnxruntime backend (the embedded default): run, verify and benchmark models.

    from onnxpress.backends import ort
    outputs = ort.run(model, feeds)                          # {output name: array}
    result = ort.verify(original, optimized)                 # max abs/rel error per output
    bench = ort.benchmark(model, threads=2)                  # p50/p90 latency in ms
    prof = ort.profile(model, threads=2)                     # time per node, the slowest first
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx

from onnxpress.backends.profile import Profile, make_profile
from onnxpress.data import check_feed, graph_input_specs, make_inputs
from onnxpress.errors import BackendError, CalibrationError, OnnxPressError
from onnxpress.io import EXTERNAL_DATA_THRESHOLD, ModelLike, load, save
from onnxpress.stats import model_bytes

OPT_LEVELS = {"disable": 0, "basic": 1, "extended": 2, "layout": 3, "all": 99}


def _ort():
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
    return onnxruntime


def session(
    model: ModelLike,
    *,
    threads: int | None = None,
    optimization: str = "all",
    providers: list[str] | None = None,
    optimized_model_path: str | os.PathLike | None = None,
    profile_prefix: str | os.PathLike | None = None,
):
    """An onnxruntime InferenceSession for a model (path, bytes or ModelProto).

    `optimization` is onnxruntime's graph optimization level: disable, basic, extended, layout, all.
    `profile_prefix`: record onnxruntime's profile; `end_profiling()` writes PREFIX_<date>.json.
    """
    ort = _ort()
    if optimization not in OPT_LEVELS:
        raise BackendError(
            f"unknown optimization level '{optimization}'; use one of {', '.join(OPT_LEVELS)}"
        )
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel(OPT_LEVELS[optimization])
    if threads is not None:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if optimized_model_path is not None:
        so.optimized_model_filepath = str(optimized_model_path)
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_prefix)
    providers = providers or ["CPUExecutionProvider"]
    tmpdir = None
    try:
        if isinstance(model, (str, os.PathLike)):
            source: Any = str(model)
        else:
            proto = load(model, check=False)
            if model_bytes(proto) > EXTERNAL_DATA_THRESHOLD:
                tmpdir = tempfile.mkdtemp(prefix="onnxpress-ort-")
                source = str(save(proto, Path(tmpdir) / "model.onnx", external_data=True))
            else:
                source = proto.SerializeToString()
        return ort.InferenceSession(source, sess_options=so, providers=providers)
    except OnnxPressError:
        raise
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackendError(f"onnxruntime cannot load the model: {msg}") from None
    finally:
        if tmpdir is not None:
            for f in Path(tmpdir).glob("*"):
                f.unlink()
            os.rmdir(tmpdir)


def _model_of(model: ModelLike) -> onnx.ModelProto:
    return load(model, check=False)


def run(model: ModelLike, feeds: Mapping[str, np.ndarray] | None = None, *,
        sess=None, threads: int | None = None, optimization: str = "all",
        shapes: Mapping[str, Any] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Run a model once and return {output name: array}. Without feeds, inputs are generated."""
    proto = None
    if feeds is None or sess is None:
        proto = _model_of(model)
    if feeds is None:
        feeds = make_inputs(proto, shapes=shapes, seed=seed)
    else:
        try:
            check_feed(feeds, graph_input_specs(proto) if proto is not None else
                       _specs_from_session(sess), "the given feeds")
        except CalibrationError as exc:
            raise BackendError(str(exc)) from None
    if sess is None:
        sess = session(proto, threads=threads, optimization=optimization)
    try:
        names = [o.name for o in sess.get_outputs()]
        values = sess.run(names, dict(feeds))
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackendError(f"onnxruntime failed to run the model: {msg}") from None
    return dict(zip(names, values))


def _specs_from_session(sess) -> dict:
    specs = {}
    for i in sess.get_inputs():
        t = i.type  # 'tensor(float)'
        np_name = {"float": "float32", "double": "float64", "float16": "float16", "bool": "bool",
                   "string": "object"}.get(t[7:-1], t[7:-1])
        specs[i.name] = (np.dtype(np_name), [d if isinstance(d, int) else None for d in i.shape])
    return specs


@dataclasses.dataclass
class OutputError:
    name: str
    shape: tuple
    max_abs: float
    max_rel: float
    cosine: float
    ok: bool


@dataclasses.dataclass
class VerifyResult:
    ok: bool
    outputs: list[OutputError]
    rtol: float
    atol: float
    criterion: str | None = None         # when not rtol/atol (integer-kernel artifacts)

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((o.max_rel for o in self.outputs), default=0.0)

    @property
    def min_cosine(self) -> float:
        return min((o.cosine for o in self.outputs), default=1.0)

    def __str__(self) -> str:
        how = self.criterion or f"rtol={self.rtol:g}, atol={self.atol:g}"
        lines = [f"{'OK' if self.ok else 'MISMATCH'} ({how})"]
        for o in self.outputs:
            lines.append(f"  {o.name} {o.shape}: max abs {o.max_abs:.3g}, max rel {o.max_rel:.3g}, "
                         f"cosine {o.cosine:.6f}{'' if o.ok else '  <-- exceeds tolerance'}")
        return "\n".join(lines)


def compare_outputs(expected: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray], *,
                    rtol: float = 1e-4, atol: float = 1e-5) -> VerifyResult:
    """Element-wise comparison of two output dicts (same names expected). Sequence outputs are
    compared item by item (reported as name[i]); optional outputs that are None must match."""
    with np.errstate(all="ignore"):  # inf/nan outputs are compared on purpose
        return _compare(_flatten_outputs(expected), _flatten_outputs(actual), rtol, atol)


def _compare(expected: dict, actual: dict, rtol: float, atol: float) -> VerifyResult:
    errors = []
    for name, ref in expected.items():
        if ref is None or actual.get(name, 0) is None:
            same = ref is None and actual.get(name, 0) is None
            errors.append(OutputError(name, (), 0.0 if same else float("inf"),
                                      0.0 if same else float("inf"), 1.0 if same else 0.0, same))
            continue
        ref = np.asarray(ref)
        if name not in actual:
            errors.append(OutputError(name, tuple(ref.shape), float("inf"), float("inf"), 0.0, False))
            continue
        got = np.asarray(actual[name])
        if got.shape != ref.shape:
            errors.append(OutputError(name, tuple(got.shape), float("inf"), float("inf"), 0.0, False))
            continue
        if ref.dtype.kind in "biu" and got.dtype.kind in "biu":
            diff = np.abs(ref.astype(np.int64) - got.astype(np.int64)).astype(np.float64)
            r, g = ref.astype(np.float64), got.astype(np.float64)
        elif ref.dtype.kind in "fc" or got.dtype.kind in "fc":
            r, g = ref.astype(np.float64), got.astype(np.float64)
            diff = np.abs(r - g)
            both_nan = np.isnan(r) & np.isnan(g)
            same_inf = np.isinf(r) & (r == g)
            diff = np.where(both_nan | same_inf, 0.0, diff)
        else:
            same = bool(np.array_equal(ref, got))
            errors.append(OutputError(name, tuple(ref.shape), 0.0 if same else float("inf"),
                                      0.0 if same else float("inf"), 1.0 if same else 0.0, same))
            continue
        if diff.size == 0:
            errors.append(OutputError(name, tuple(ref.shape), 0.0, 0.0, 1.0, True))
            continue
        diff = np.where(np.isnan(diff), np.inf, diff)
        max_abs = float(diff.max())
        denom = np.abs(r)
        rel = np.where(denom > 0, diff / np.where(denom > 0, denom, 1), np.where(diff > 0, np.inf, 0))
        max_rel = float(rel.max())
        rf, gf = np.nan_to_num(r.ravel()), np.nan_to_num(g.ravel())
        nr, ng = np.linalg.norm(rf), np.linalg.norm(gf)
        cosine = float(rf @ gf / (nr * ng)) if nr > 0 and ng > 0 else (1.0 if nr == ng else 0.0)
        a_tol, r_tol = atol, rtol
        if ref.dtype == np.float16 or str(ref.dtype) == "bfloat16":
            # half precision rounds at ~1e-3: a reordering of the same math moves results that much
            a_tol, r_tol = max(atol, 1e-3), max(rtol, 2e-3)
        tol = a_tol + r_tol * np.abs(np.nan_to_num(r, nan=0.0, posinf=0.0, neginf=0.0))
        ok = bool(np.all(diff <= tol))
        errors.append(OutputError(name, tuple(ref.shape), max_abs, max_rel, cosine, ok))
    return VerifyResult(all(e.ok for e in errors), errors, rtol, atol)


def _flatten_outputs(outputs: Mapping[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in outputs.items():
        if isinstance(value, (list, tuple)):
            flat[f"{name}.len"] = np.array(len(value))
            for i, item in enumerate(value):
                flat.update(_flatten_outputs({f"{name}[{i}]": item}))
        elif isinstance(value, dict):
            for k, item in value.items():
                flat.update(_flatten_outputs({f"{name}[{k!r}]": item}))
        else:
            flat[name] = value
    return flat


def verify(reference: ModelLike, candidate: ModelLike,
           feeds: Mapping[str, np.ndarray] | None = None, *, rtol: float = 1e-4,
           atol: float = 1e-5, shapes: Mapping[str, Any] | None = None,
           seed: int = 0) -> VerifyResult:
    """Run both models on the same inputs (given or generated) and compare every output."""
    ref_model = _model_of(reference)
    if feeds is None:
        feeds = make_inputs(ref_model, shapes=shapes, seed=seed)
    expected = run(ref_model, feeds)
    actual = run(_model_of(candidate), feeds)
    return compare_outputs(expected, actual, rtol=rtol, atol=atol)


@dataclasses.dataclass
class BenchResult:
    p50_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    runs: int
    threads: int | None
    optimization: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def benchmark(model: ModelLike, feeds: Mapping[str, np.ndarray] | None = None, *,
              threads: int | None = 2, warmup: int = 5, runs: int = 50,
              min_seconds: float = 0.0, optimization: str = "all",
              shapes: Mapping[str, Any] | None = None, seed: int = 0) -> BenchResult:
    """Latency of one inference: warm-up, then `runs` timed runs (more until `min_seconds`)."""
    proto = _model_of(model)
    if feeds is None:
        feeds = make_inputs(proto, shapes=shapes, seed=seed)
    sess = session(proto, threads=threads, optimization=optimization)
    names = [o.name for o in sess.get_outputs()]
    feeds = dict(feeds)
    try:
        for _ in range(max(0, warmup)):
            sess.run(names, feeds)
        times = []
        start = time.perf_counter()
        while len(times) < runs or (time.perf_counter() - start) < min_seconds:
            t0 = time.perf_counter()
            sess.run(names, feeds)
            times.append((time.perf_counter() - t0) * 1e3)
    except Exception as exc:
        raise BackendError(f"onnxruntime failed to run the model: {str(exc).splitlines()[0]}") from None
    times_sorted = sorted(times)
    return BenchResult(
        p50_ms=statistics.median(times_sorted),
        p90_ms=times_sorted[min(len(times_sorted) - 1, int(round(0.9 * (len(times_sorted) - 1))))],
        mean_ms=statistics.fmean(times_sorted),
        min_ms=times_sorted[0],
        runs=len(times_sorted),
        threads=threads,
        optimization=optimization,
    )


def profile(model: ModelLike, feeds: Mapping[str, np.ndarray] | None = None, *,
            threads: int | None = 2, warmup: int = 5, runs: int = 20, optimization: str = "all",
            shapes: Mapping[str, Any] | None = None, seed: int = 0) -> Profile:
    """Where one inference's time goes on onnxruntime: its own profiler's time per node of the
    graph as onnxruntime optimized it (so fused nodes such as FusedGemm appear), the median of
    `runs` runs after `warmup`; `other_ms` is the executor's time between nodes."""
    proto = _model_of(model)
    if feeds is None:
        feeds = make_inputs(proto, shapes=shapes, seed=seed)
    with tempfile.TemporaryDirectory(prefix="onnxpress-ort-profile-") as tmp:
        sess = session(proto, threads=threads, optimization=optimization,
                       profile_prefix=os.path.join(tmp, "ort"))
        names = [o.name for o in sess.get_outputs()]
        try:
            for _ in range(max(0, warmup) + max(1, runs)):
                sess.run(names, dict(feeds))
        except Exception as exc:
            raise BackendError(f"onnxruntime failed to run the model: {str(exc).splitlines()[0]}") from None
        trace = json.loads(Path(sess.end_profiling()).read_text())
    return profile_from_trace(trace, warmup=max(0, warmup))


def profile_from_trace(events: list[dict], *, warmup: int = 0) -> Profile:
    """A Profile from onnxruntime's profile (Chrome trace events): one `model_run` event per run,
    one `NAME_kernel_time` event per node and run. The first `warmup` runs are left out; each
    node's time is its median over the runs, as the latency is the median run."""
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])[warmup:]
    if not runs:
        raise BackendError(f"onnxruntime's profile holds no timed run (after {warmup} warm-up runs)")
    starts = [e["ts"] for e in runs]
    per_run: list[dict[str, list[float]]] = [{} for _ in runs]
    ops: dict[str, str] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < starts[0]:
            continue
        args = e.get("args") or {}
        name = e["name"][:-len("_kernel_time")] or f"{args.get('op_name', 'node')}#{args.get('node_index', '?')}"
        per_run[bisect.bisect_right(starts, e["ts"]) - 1].setdefault(name, []).append(float(e["dur"]))
        ops[name] = args.get("op_name", "")
    per_kernel = {name: (round(statistics.median(len(r.get(name, ())) for r in per_run)),
                         statistics.median(sum(r.get(name, ())) for r in per_run) / 1e3)
                  for name in ops}
    latency = statistics.median(float(e["dur"]) for e in runs) / 1e3
    return make_profile(per_kernel, latency, backend="onnxruntime", runs=len(runs), ops=ops)


def benchmark_pair(a: ModelLike, b: ModelLike, feeds: Mapping[str, np.ndarray] | None = None, *,
                   rounds: int = 3, **kwargs) -> tuple[BenchResult, BenchResult]:
    """Benchmark two models interleaved (a, b, a, b...) so drift hits both alike; merge rounds."""
    pa, pb = _model_of(a), _model_of(b)
    if feeds is None:
        feeds = make_inputs(pa, shapes=kwargs.pop("shapes", None), seed=kwargs.pop("seed", 0))
    runs = kwargs.pop("runs", 50)
    per = max(1, runs // rounds)
    ra, rb = [], []
    for _ in range(rounds):
        ra.append(benchmark(pa, feeds, runs=per, **kwargs))
        rb.append(benchmark(pb, feeds, runs=per, **kwargs))

    def merge(rs: list[BenchResult]) -> BenchResult:
        return BenchResult(
            p50_ms=statistics.median(r.p50_ms for r in rs),
            p90_ms=statistics.median(r.p90_ms for r in rs),
            mean_ms=statistics.fmean(r.mean_ms for r in rs),
            min_ms=min(r.min_ms for r in rs),
            runs=sum(r.runs for r in rs), threads=rs[0].threads, optimization=rs[0].optimization)

    return merge(ra), merge(rb)
