"""Run every benchmark side by side and write JSON plus a markdown table.

    python -m bench                 # everything, full size (long: tuning, big models)
    python -m bench --quick         # every benchmark in its quick mode (minutes)
    python -m bench --only core fuse

Each module bench/bench_<name>.py defines `run(quick: bool) -> dict` returning
{"title": str, "rows": [dict, ...], "notes": str}. Results go to bench/results/<name>.json and
bench/results/README.md (all tables), stamped with the machine and the versions used. A result
may carry "result_name": the file it goes to instead (bench_cuda without a GPU, bench_remote_cpu
run locally), so that figures measured on another machine are not overwritten by a local run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def discover() -> list[str]:
    return sorted(p.stem[len("bench_"):] for p in HERE.glob("bench_*.py"))


def environment() -> dict:
    import numpy
    import onnx
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from bench.bench_tvm_int8 import cpu_description

    return {"cpu": cpu, "cores": os.cpu_count(), "isa": cpu_description()[1],
            "sgemm_scaling": sgemm_scaling(), "python": platform.python_version(),
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": numpy.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def sgemm_scaling(n: int = 1024, runs: int = 12) -> dict:
    """How much this machine's cores add on compute-bound work: onnxruntime's fp32 MatMul
    [n x n] x [n x n] in GFLOPS at 1 thread and at every core, best of `runs`, two rounds
    interleaved. A VM whose vCPUs share physical cores (SMT siblings on the host) scales far
    below the core count: the 2-core Xeon VM gave 1.32-1.37x, so kernels that keep the FMA
    units busy (TVM's) gain less from the second thread than onnxruntime's, which do more
    memory work per FMA. Every table's thread ratios are to be read against this figure."""
    import numpy as np
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "sgemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])],
        [numpy_helper.from_array(rng.random((n, n), dtype=np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    feeds = {"x": rng.random((n, n), dtype=np.float32)}
    cores = os.cpu_count() or 1
    best = {1: 0.0, cores: 0.0}
    for _ in range(2):
        for threads in best:
            so = onnxruntime.SessionOptions()
            so.intra_op_num_threads = threads
            sess = onnxruntime.InferenceSession(model, so, providers=["CPUExecutionProvider"])
            sess.run(None, feeds)
            for _ in range(runs):
                t0 = time.perf_counter()
                sess.run(None, feeds)
                best[threads] = max(best[threads], 2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
    return {"gflops_1t": round(best[1]), f"gflops_{cores}t": round(best[cores]),
            "scaling": round(best[cores] / best[1], 2), "threads": cores}


def to_markdown(name: str, result: dict) -> str:
    rows = result.get("rows") or []
    lines = [f"## {result.get('title', name)}", ""]
    if rows:
        cols: list[str] = []
        for r in rows:
            for k in r:
                if k not in cols:
                    cols.append(k)
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "|".join("---" for _ in cols) + "|")
        for r in rows:
            cells = []
            for c in cols:
                v = r.get(c, "")
                cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
            lines.append("| " + " | ".join(cells) + " |")
    if result.get("notes"):
        lines += ["", result["notes"]]
    if result.get("seconds") is not None:
        # a kept run (NAME_2026-11-28_0914, NAME_xeon) names the benchmark that measured it
        bench = max((b for b in discover() if name == b or name.startswith(b + "_")), key=len,
                    default=name)
        lines += ["", f"_{result['seconds']:.0f} s; reproduce with `python -m bench --only {bench}"
                      f"{' --quick' if result.get('quick') else ''}`_"]
    return "\n".join(lines) + "\n"


def write_combined(out: Path, env: dict) -> None:
    """<out>/README.md: every result on disk, fresh or from an earlier run, as one page."""
    parts = ["# onnxpress benchmark results", "",
             f"Machine: {env['cpu']}, {env['cores']} cores; onnxruntime {env['onnxruntime']}, "
             f"onnx {env['onnx']}. Every ratio is measured side by side in one run.", ""]
    for path in sorted(out.glob("*.json")):
        try:
            parts.append(to_markdown(path.stem, json.loads(path.read_text())))
        except (OSError, ValueError):
            continue
    (out / "README.md").write_text("\n".join(parts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, minutes not hours")
    parser.add_argument("--only", nargs="*", help=f"benchmarks to run (of {', '.join(discover())})")
    parser.add_argument("--out", default=str(RESULTS), help="results directory")
    args = parser.parse_args(argv)
    names = args.only or discover()
    unknown = [n for n in names if n not in discover()]
    if unknown:
        print(f"unknown benchmark(s) {', '.join(unknown)}; have {', '.join(discover())}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    failed = []
    for name in names:
        print(f"== bench {name} ({'quick' if args.quick else 'full'})", flush=True)
        t0 = time.time()
        try:
            mod = importlib.import_module(f"bench.bench_{name}")
            result = mod.run(quick=args.quick)
        except Exception:
            traceback.print_exc()
            failed.append(name)
            continue
        # a benchmark whose figures come from another machine (a GPU, another CPU) names a
        # file of its own for what this machine can do, so a local run never replaces them
        dest = result.pop("result_name", name)
        result["seconds"] = time.time() - t0
        result["quick"] = args.quick
        result["environment"] = env
        tmp = out / f"{dest}.json.tmp"
        tmp.write_text(json.dumps(result, indent=2, default=str))
        os.replace(tmp, out / f"{dest}.json")
        print(to_markdown(name, result), flush=True)
    write_combined(out, env)
    if out.resolve() == RESULTS.resolve():
        # README.md's benchmark tables are rendered from these results (bench/readme.py)
        from bench import readme

        readme.main([])
    if failed:
        print(f"benchmarks failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
