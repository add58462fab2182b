"""CUDA artifacts, built where TVM's compiler is and run where the GPU is.

    python -m bench.bench_cuda build DIR [--arch sm_90] [--quick]   # needs apache-tvm + nvcc, no GPU
    python -m bench.bench_cuda run DIR [--json OUT.json]           # needs a GPU + TVM's runtime alone

`build` compiles each case for CUDA (fp32, and `fuse,quant_int8` whose convolutions and matmuls
run on dp4a integer kernels), writes the artifact, its inputs and onnxruntime's reference
outputs (the unoptimized session for QDQ models: the reference QDQ semantics) into DIR.
`run` loads every artifact with the TVM runtime alone (a runtime-only install is enough: the
artifact carries its PTX), runs it on the GPU, compares with the reference (fp32: cosine and
max abs error; int8: the share of output elements one quantization step apart and the cosine
of the float outputs), times it and names its slowest kernels. The two halves can run on one
machine (`python -m bench --only cuda` does both where a GPU exists, and says that nothing ran
where none does).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

CASES = ("qdq_cnn", "qdq_encoder", "digits_cnn", "digits_cnn_int8", "mobilenetv3_small_100",
         "mobilenetv3_small_100_int8", "resnet18_int8")
QUICK = ("qdq_cnn", "qdq_encoder", "digits_cnn", "digits_cnn_int8")


def _model(case: str):
    """(onnx model, feeds) for a case: a plain torch export, `fuse` or `fuse,quant_int8` applied."""
    from bench.bench_quant import cnn_calib
    from onnxpress import passes, zoo

    if case.startswith("qdq_"):
        # the small QDQ graphs of every lowered op that tests/backends/test_tvm_int8.py checks
        # on CPUs (dense, grouped and depthwise convs, residual adds, pools, gemm; an encoder's
        # matmul chain with attention scores between two quantized activations)
        from tests.backends.test_tvm_int8 import cnn_model, encoder_block_model

        rng = np.random.default_rng(1)
        if case == "qdq_cnn":
            return cnn_model(), {"x": (2 * rng.standard_normal((1, 8, 12, 12))).astype(np.float32)}
        return encoder_block_model(), {"x": rng.standard_normal((1, 16, 64)).astype(np.float32)}
    name = case.removesuffix("_int8")
    path = zoo.plain_export(name)
    if name == "digits_cnn":
        calib = [{"x": b["input"][i:i + 1]} for b in zoo.digits_calib(16, 16) for i in range(16)]
        feeds = {"x": zoo.digits_data().test[0][:1]}
    else:
        calib = [{"x": c["input"]} for c in cnn_calib()]
        feeds = {"x": zoo.photo_batch(224)[:1]}
    pipeline = ["fuse", "quant_int8"] if case.endswith("_int8") else ["fuse"]
    return passes.apply(path, pipeline, calib=calib if "quant_int8" in pipeline else None, target="cuda"), feeds


def build_cases(out: Path, arch: str, quick: bool) -> list[dict]:
    from onnxpress.backends import ort
    from onnxpress.backends import tvm as ox_tvm

    out.mkdir(parents=True, exist_ok=True)
    cases = []
    for case in QUICK if quick else CASES:
        t0 = time.perf_counter()
        model, feeds = _model(case)
        qdq = any(n.op_type == "QuantizeLinear" for n in model.graph.node)
        expected = ort.run(model, feeds, optimization="disable" if qdq else "all")
        art = ox_tvm.compile(model, f"cuda:{arch}", output_dir=out / case, progress=False)
        np.savez(out / f"{case}.npz", **{f"in:{k}": v for k, v in feeds.items()},
                 **{f"out:{k}": v for k, v in expected.items()})
        ptx = (art.path / "kernels.ptx").read_text()
        integer = art.manifest.get("integer") or {}
        cases.append({"case": case, "int8": qdq, "build_s": round(time.perf_counter() - t0, 1),
                      "cuda_modules": len(art.manifest["cuda_modules"]),
                      "ptx_dp4a": ptx.count("dp4a."),
                      "int8_kernels": integer.get("int8_kernels", 0),
                      "dp4a_scheduled": art.manifest["schedules"].get("dp4a_scheduled", 0)})
        print(cases[-1], flush=True)
    (out / "cases.json").write_text(json.dumps({"arch": arch, "cases": cases}, indent=1))
    return cases


def _compare(expected: dict, actual: dict) -> dict:
    row = {}
    for name, ref in expected.items():
        got = np.asarray(actual[name])
        if ref.dtype.kind in "iu":
            d = np.abs(ref.astype(np.int64) - got.astype(np.int64))
            row[f"{name}_max_steps"] = int(d.max())
            row[f"{name}_one_step_share"] = round(float((d == 1).mean()), 4)
            continue
        r, g = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
        row[f"{name}_cosine"] = round(float(r @ g / (np.linalg.norm(r) * np.linalg.norm(g) + 1e-30)), 6)
        row[f"{name}_max_abs"] = float(f"{np.abs(r - g).max():.3g}")
        row[f"{name}_top1_same"] = bool(np.argmax(r) == np.argmax(g)) if r.size > 1 else None
    return row


def run_cases(out: Path, rounds: int = 1) -> dict:
    """Load, check and time every case; with rounds > 1, also time all of them again in that
    many interleaved rounds (alternating order) and add each case's median p50, and for
    NAME_tuned beside NAME_untuned their ratio."""
    from onnxpress.backends.tvm import load_artifact

    spec = json.loads((out / "cases.json").read_text())
    rows, loaded = [], {}
    for case in spec["cases"]:
        name = case["case"]
        row = dict(case)
        try:
            art = load_artifact(out / name)
            with np.load(out / f"{name}.npz") as z:
                feeds = {k[3:]: z[k] for k in z.files if k.startswith("in:")}
                expected = {k[4:]: z[k] for k in z.files if k.startswith("out:")}
            row.update(_compare(expected, art.run(feeds)))
            bench = art.benchmark(feeds, runs=100, warmup=10)
            row["p50_ms"] = round(bench.p50_ms, 4)
            loaded[name] = (art, feeds)
            try:
                row["slowest_kernels"] = art.profile(feeds).slowest(3)
            except Exception as exc:  # the profile is extra information
                row["slowest_kernels"] = f"no profile: {str(exc).splitlines()[0]}"
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        rows.append(row)
        print(row, flush=True)
    if rounds > 1:
        _interleaved(rows, loaded, rounds)
    return {"arch": spec["arch"], "gpu": _gpu_name(), "rows": rows}


def _interleaved(rows: list[dict], loaded: dict, rounds: int) -> None:
    import statistics

    times: dict[str, list[float]] = {name: [] for name in loaded}
    for r in range(rounds):
        for name in (list(loaded) if r % 2 == 0 else list(reversed(list(loaded)))):
            art, feeds = loaded[name]
            times[name].append(art.benchmark(feeds, runs=200, warmup=20).p50_ms)
    median = {name: statistics.median(t) for name, t in times.items()}
    for row in rows:
        name = row["case"]
        if name in median:
            row["p50_ms_interleaved_median"] = round(median[name], 4)
        base = name[:-len("tuned")] + "untuned" if name.endswith("_tuned") else None
        if base in median and name in median:
            row["tuned_over_untuned"] = round(median[name] / median[base], 3)


def run(quick: bool) -> dict:
    """`python -m bench --only cuda`: build every case, and run them where a GPU is present."""
    import tempfile

    from bench.bench_tvm_int8 import cpu_description

    work = Path(tempfile.mkdtemp(prefix="onnxpress-bench-cuda-"))
    try:
        cases = build_cases(work / "cases", "sm_90", quick)
        gpu = _gpu_name()
        if gpu.startswith("no nvidia-smi") or not gpu:
            # cuda.json holds the runs on a GPU; what a machine without one can check goes beside it
            return {"title": "CUDA artifacts (built, not run: no GPU here)", "rows": cases,
                    "result_name": "cuda_build",
                    "notes": f"Built on {cpu_description()[0]}. No GPU on this machine, so nothing "
                             "ran: copy the build directory (python -m bench.bench_cuda build DIR) "
                             "to a GPU machine and run python -m bench.bench_cuda run DIR there."}
        result = run_cases(work / "cases")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"title": f"CUDA artifacts on {result['gpu']}", "rows": result["rows"],
            "notes": "TVM CUDA artifacts (default GPU schedules: dp4a integer kernels, dlight "
                     "for the rest) against onnxruntime's reference outputs; p50 by TVM's "
                     "time_evaluator, batch 1."}


def _gpu_name() -> str:
    if shutil.which("nvidia-smi") is None:
        return "no nvidia-smi"
    import subprocess

    res = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True)
    return res.stdout.strip() or res.stderr.strip()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_cuda")
    ap.add_argument("phase", choices=("build", "run"))
    ap.add_argument("dir", type=Path)
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run: also time every case in this many interleaved rounds (median)")
    args = ap.parse_args(argv)
    if args.phase == "build":
        build_cases(args.dir, args.arch, args.quick)
        return 0
    result = run_cases(args.dir, args.rounds)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if all("error" not in r for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
