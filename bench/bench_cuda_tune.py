"""CUDA tuning, searched where TVM's compiler is and measured where the GPU is.

    python -m bench.bench_cuda_tune candidates DIR [--arch sm_90] [--quick]  # TVM + nvcc, no GPU
    python -m bench.bench_cuda_tune measure DIR [--json OUT.json]            # GPU, TVM runtime alone
    python -m bench.bench_cuda_tune collect DIR                              # TVM + nvcc, no GPU
    python -m bench.bench_cuda run DIR/cases --rounds 9 [--json OUT.json]    # GPU, TVM runtime alone
    python -m bench.bench_cuda_tune local DIR [--json OUT.json]              # GPU + TVM + nvcc

`onnxpress compile --target cuda:sm_XX --tune N` measures with MetaSchedule's local runner, so
it needs a GPU and TVM's compiler on one machine. The GPU machines lent to this project carry
TVM's runtime only (and no nvcc), so this bench splits the same flow in phases:

- `candidates` runs the library's tuning of each case with a runner that measures nothing
  (every candidate "takes" the same time, so the search is a random sampling of MetaSchedule's
  CUDA space), then rebuilds every candidate the database now holds (dlight's default schedule
  among them) with nvcc and writes each as a library, its PTX and its argument shapes.
- `measure` loads every candidate with the TVM runtime and the stored PTX and times it in
  interleaved rounds on the GPU (median per candidate).
- `collect` writes a tuning database with those times: every candidate as a record, and per
  task the side-by-side winner (the default unless a candidate is 2% faster, as
  tuning.confirm_winners decides) in `confirmed/`; then compiles each case with that database
  (`ox_tvm.compile(..., db=...)`, the path `--db` takes) and without, into DIR/cases, with
  onnxruntime's reference outputs, in the layout `bench_cuda run` reads.

`local` is the flow itself, where one machine has the GPU, TVM's compiler and nvcc: each case
compiled untuned and with `tune_trials=LOCAL_CASES[case]` (what `--tune N` runs: MetaSchedule's
local GPU runner, side-by-side confirmation, the end-to-end check), both verified against
onnxruntime and timed in interleaved rounds, the order alternating. On the lent H200 the
compiler library travels xz-compressed (59.5 MB) in a call of its own, parked in /tmp for the
next call (`.devcheck/p1`, `.devcheck/p2` in the closing notes).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from bench.bench_cuda import _gpu_name

CASES = {"digits_cnn": 96, "mobilenetv3_small_100": 160}     # case -> trials
QUICK = {"digits_cnn": 48}
ROUNDS = 5
LOCAL_CASES = {"digits_cnn": 32, "mobilenetv3_small_100": 64}      # case -> trials (`local`)
MARGIN = 0.02


def _fake_runner():
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.runner import PyRunner, RunnerFuture, RunnerResult

    @derived_object
    class MeasuresNothing(PyRunner):
        def run(self, inputs):
            return [RunnerFuture(lambda: True, lambda: RunnerResult([1e-3], None)) for _ in inputs]

    return MeasuresNothing()


def _db_dirs(out: Path):
    from onnxpress.backends.tvm.targets import db_key, resolve_target

    spec = json.loads((out / "candidates.json").read_text())
    key = db_key(resolve_target(f"cuda:{spec['arch']}"))
    return spec, out / "search_db" / key, out / "measured_db"


def candidates(out: Path, arch: str, quick: bool) -> dict:
    """Search each case (no measurement), then build every record the database holds."""
    import tvm
    import tvm_ffi
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    from bench.bench_cuda import _model
    from onnxpress.backends import tvm as ox_tvm
    from onnxpress.backends.tvm import compiler
    from onnxpress.backends.tvm.int8_cuda import gpu_default_schedule
    from onnxpress.backends.tvm.run_artifact import source_key
    from onnxpress.backends.tvm.targets import resolve_target
    from onnxpress.backends.tvm.tuning import _trace_key, open_database

    out.mkdir(parents=True, exist_ok=True)
    (out / "cand").mkdir(exist_ok=True)
    real_runner = compiler._runner_for
    compiler._runner_for = lambda *a, **k: (_fake_runner(), "measures nothing")
    cases = QUICK if quick else CASES
    try:
        for case, trials in cases.items():
            t0 = time.perf_counter()
            model, _feeds = _model(case)
            ox_tvm.compile(model, f"cuda:{arch}", tune_trials=trials, db=out / "search_db",
                           output_dir=out / "scratch", progress=False)
            print(f"{case}: searched {trials} trials in {time.perf_counter() - t0:.0f} s", flush=True)
    finally:
        compiler._runner_for = real_runner
        shutil.rmtree(out / "scratch", ignore_errors=True)
    (out / "candidates.json").write_text(json.dumps({"arch": arch, "cases": list(cases)}))
    _, search_dir, _ = _db_dirs(out)
    target = resolve_target(f"cuda:{arch}").tvm_target()
    db = open_database(search_dir)
    rows, seen = [], set()
    for i, rec in enumerate(db.get_all_tuning_records()):
        mod = rec.workload.mod
        key, workload = _trace_key(rec.trace), str(tvm_ffi.structural_hash(mod))
        if (workload, key) in seen:
            continue
        seen.add((workload, key))
        default = gpu_default_schedule(mod["main"], target)
        row = {"id": i, "workload": workload,
               "default": default is not None and _trace_key(default.trace) == key}
        try:
            sch = s_tir.Schedule(mod)
            rec.trace.apply_to_schedule(sch, remove_postproc=False)
            args = ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True)
            lib = tvm.compile(sch.mod, target=target)
            lib.export_library(str(out / "cand" / f"{i}.so"))
            for code, ptx in compiler._ptx_from_source_modules(lib, arch):
                text = bytes(ptx) if not isinstance(ptx, str) else ptx.encode()
                (out / "cand" / f"{source_key(code)}.ptx").write_bytes(text)
            row["args"] = [a.as_json() for a in args]
        except Exception as exc:    # a candidate that does not build is left out
            row["error"] = str(exc).splitlines()[0][:200]
        rows.append(row)
    (out / "candidates.json").write_text(json.dumps({"arch": arch, "cases": list(cases),
                                                      "candidates": rows}, indent=1, default=str))
    ok = sum("error" not in r for r in rows)
    print(f"{ok} candidates built ({len(rows) - ok} failed) over "
          f"{len({r['workload'] for r in rows})} tasks", flush=True)
    return {"candidates": len(rows), "built": ok}


def measure(out: Path) -> dict:
    """On the GPU: every candidate's median time over ROUNDS interleaved rounds."""
    import tvm
    import tvm_ffi

    from onnxpress.backends.tvm.run_artifact import ensure_cuda_runtime, source_key

    ensure_cuda_runtime()
    spec = json.loads((out / "candidates.json").read_text())

    def stored_ptx(code, *_):
        return (out / "cand" / f"{source_key(code)}.ptx").read_bytes() + b"\0"

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", stored_ptx, override=True)
    dev = tvm.cuda(0)
    timers, times, errors = {}, {}, {}
    rng = np.random.default_rng(0)
    for row in spec["candidates"]:
        if "error" in row:
            continue
        try:
            lib = tvm.runtime.load_module(str(out / "cand" / f"{row['id']}.so"))
            args = []
            for _kind, dtype, shape in row["args"]:
                arr = rng.standard_normal(shape).astype(dtype) if dtype.startswith("float") \
                    else rng.integers(0, 8, shape).astype(dtype)
                args.append(tvm.runtime.tensor(arr, dev))
            f = lib.time_evaluator(lib.entry_name, dev, number=10, repeat=1, min_repeat_ms=5)
            f(*args)
            timers[row["id"]] = (f, args)
        except Exception as exc:
            errors[row["id"]] = str(exc).splitlines()[0][:200]
    ids = list(timers)
    for r in range(ROUNDS):
        for i in ids[r % max(1, len(ids)):] + ids[:r % max(1, len(ids))]:
            f, args = timers[i]
            try:
                times.setdefault(i, []).append(float(f(*args).mean))
            except Exception as exc:
                errors[i] = str(exc).splitlines()[0][:200]
    result = {"gpu": _gpu_name(), "rounds": ROUNDS,
              "median_s": {str(i): statistics.median(t) for i, t in times.items() if len(t) == ROUNDS},
              "errors": {str(k): v for k, v in errors.items()}}
    (out / "times.json").write_text(json.dumps(result, indent=1))
    print(f"measured {len(result['median_s'])} candidates, {len(errors)} errors on {result['gpu']}")
    return result


def collect(out: Path) -> dict:
    """The measured database, its confirmed winners, and the tuned and untuned builds."""
    from tvm.s_tir import meta_schedule as ms

    from bench.bench_cuda import _model
    from onnxpress.backends import ort
    from onnxpress.backends import tvm as ox_tvm
    from onnxpress.backends.tvm.targets import resolve_target
    from onnxpress.backends.tvm.tuning import CONFIRMED, open_database

    spec, search_dir, measured_root = _db_dirs(out)
    times = json.loads((out / "times.json").read_text())["median_s"]
    target = resolve_target(f"cuda:{spec['arch']}").tvm_target()
    records = list(open_database(search_dir).get_all_tuning_records())
    shutil.rmtree(measured_root, ignore_errors=True)
    dest = measured_root / search_dir.name
    db, confirmed = open_database(dest), open_database(dest / CONFIRMED)
    by_task: dict[str, list] = {}
    for row in spec["candidates"]:
        secs = times.get(str(row["id"]))
        if secs is None:
            continue
        rec = records[row["id"]]
        db.commit_tuning_record(ms.database.TuningRecord(
            rec.trace, db.commit_workload(rec.workload.mod), [secs], target, rec.args_info))
        by_task.setdefault(row["workload"], []).append((row["default"], secs, rec))
    tasks = []
    for workload, cands in by_task.items():
        default = next((c for c in cands if c[0]), None)
        best = min((c for c in cands if not c[0]), key=lambda c: c[1], default=None)
        pick = best if default is None or (best is not None and best[1] < default[1] * (1 - MARGIN)) else default
        if pick is None:
            continue
        rec = pick[2]
        confirmed.commit_tuning_record(ms.database.TuningRecord(
            rec.trace, confirmed.commit_workload(rec.workload.mod), [pick[1]], target, rec.args_info))
        tasks.append({"workload": workload, "candidates": len(cands),
                      "default_us": None if default is None else round(default[1] * 1e6, 2),
                      "best_us": None if best is None else round(best[1] * 1e6, 2),
                      "kept": "default" if pick is default else "tuned"})
    cases = []
    for case in spec["cases"]:
        model, feeds = _model(case)
        expected = ort.run(model, feeds, optimization="all")
        for variant, db_arg in (("untuned", None), ("tuned", measured_root)):
            name = f"{case}_{variant}"
            art = ox_tvm.compile(model, f"cuda:{spec['arch']}", db=db_arg,
                                 output_dir=out / "cases" / name, progress=False)
            np.savez(out / "cases" / f"{name}.npz", **{f"in:{k}": v for k, v in feeds.items()},
                     **{f"out:{k}": v for k, v in expected.items()})
            cases.append({"case": name, "int8": False,
                          "from_db": art.manifest["schedules"].get("from_db", 0),
                          "cuda_modules": len(art.manifest["cuda_modules"])})
    (out / "cases" / "cases.json").write_text(json.dumps({"arch": spec["arch"], "cases": cases}, indent=1))
    summary = {"tasks": tasks, "cases": cases,
               "tasks_beating_default": sum(t["kept"] == "tuned" for t in tasks)}
    (out / "collected.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return summary


def local(out: Path, arch: str, rounds: int = 9) -> dict:
    """`--tune N` on this machine's GPU (see the module docstring); one row per case."""
    from onnxpress import zoo
    from onnxpress.backends import tvm as ox_tvm

    rng = np.random.default_rng(0)
    rows = []
    for case, trials in LOCAL_CASES.items():
        path = zoo.digits_cnn() if case == "digits_cnn" else zoo.timm_model(case)
        shape = [8, 1, 8, 8] if case == "digits_cnn" else [1, 3, 224, 224]
        feeds = {"input": rng.standard_normal(shape).astype(np.float32)}
        row = {"case": case, "trials": trials}
        t0 = time.perf_counter()
        arts = {"untuned": ox_tvm.compile(path, f"cuda:{arch}", shapes={"input": shape},
                                          output_dir=out / f"{case}-untuned", progress=False)}
        row["compile_untuned_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        arts["tuned"] = ox_tvm.compile(path, f"cuda:{arch}", shapes={"input": shape},
                                       tune_trials=trials, db=out / "db",
                                       output_dir=out / f"{case}-tuned", progress=False)
        row["compile_tuned_s"] = round(time.perf_counter() - t0, 1)
        row["tuning"] = arts["tuned"].manifest["tuning"]
        row["schedules"] = arts["tuned"].manifest["schedules"]
        times: dict[str, list[float]] = {k: [] for k in arts}
        for tag, art in arts.items():
            check = art.verify(path, feeds, rtol=1e-3, atol=1e-4)
            row[f"{tag}_ok"], row[f"{tag}_max_abs"] = bool(check.ok), float(check.max_abs)
            row[f"{tag}_cuda_modules"] = [m["sha256"][:12] for m in art.manifest["cuda_modules"]]
        for r in range(rounds):
            for tag in (("untuned", "tuned") if r % 2 == 0 else ("tuned", "untuned")):
                times[tag].append(arts[tag].benchmark(feeds, runs=200, warmup=200).p50_ms)
        for tag, ts in times.items():
            row[f"{tag}_ms"] = round(statistics.median(ts), 4)
        row["tuned_over_untuned"] = round(row["tuned_ms"] / row["untuned_ms"], 3)
        rows.append(row)
        print(case, json.dumps({k: v for k, v in row.items() if k not in ("tuning", "schedules")}),
              flush=True)
    return {"title": f"CUDA --tune on {_gpu_name()}: tuned vs untuned, one machine", "rows": rows}


def run(quick: bool) -> dict:
    """`python -m bench --only cuda_tune`: every phase where a GPU is (the GPU's own
    time-evaluator measures, the builds run there too); only the search and the builds where
    none is, reported as such."""
    import tempfile

    from bench.bench_cuda import run_cases
    from bench.bench_tvm_int8 import cpu_description

    work = Path(tempfile.mkdtemp(prefix="onnxpress-bench-cuda-tune-"))
    try:
        built = candidates(work, "sm_90", quick)
        gpu = _gpu_name()
        if gpu.startswith("no nvidia-smi") or not gpu:
            return {"title": "CUDA tuning candidates (searched and built, not measured: no GPU here)",
                    "rows": [built], "result_name": "cuda_tune_build",
                    "notes": f"Built on {cpu_description()[0]}; measure them on a GPU with "
                             "python -m bench.bench_cuda_tune measure DIR."}
        measure(work)
        summary = collect(work)
        result = run_cases(work / "cases", rounds=9)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = result["rows"]
    return {"title": f"CUDA tuning on {result['gpu']}: tuned vs untuned (dlight) builds",
            "rows": rows, "tasks": summary["tasks"],
            "notes": f"{summary['tasks_beating_default']} of {len(summary['tasks'])} tasks beat "
                     "dlight's schedule side by side; outputs against onnxruntime fp32."}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_cuda_tune")
    ap.add_argument("phase", choices=("candidates", "measure", "collect", "local"))
    ap.add_argument("dir", type=Path)
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.phase == "candidates":
        result = candidates(args.dir, args.arch, args.quick)
    elif args.phase == "measure":
        result = measure(args.dir)
    elif args.phase == "local":
        result = local(args.dir, args.arch)
    else:
        result = collect(args.dir)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
