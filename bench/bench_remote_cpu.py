"""x86 artifacts built here for another CPU, run there with TVM's runtime alone.

    python -m bench.bench_remote_cpu build DIR [--mcpu cascadelake] [--quick]   # needs apache-tvm
    python -m bench.bench_remote_cpu run DIR [--json OUT.json]                 # TVM runtime + onnxruntime
    python -m bench.bench_remote_cpu collect bench/results/remote_cpu.json OUT.json...   # back here

Why: the integer kernels for AVX-512 VNNI (vpdpbusd) and the untuned fp32 schedules must be
measured on CPUs other than the one a session happens to have, and some machines the team can
reach run TVM's runtime but not its compiler. `build` cross-targets an x86 CPU by LLVM name
(`--mcpu cascadelake`: AVX-512 + VNNI, which Intel's Cascade Lake and later and AMD's Zen 4 and
later all run; `--mcpu haswell`: AVX2) and writes, for each model, the `fuse` (fp32) and
`fuse,quant_int8` (8-bit weights with VNNI, 7-bit for vpmaddubsw; no latency-aware choice:
that would time on this machine)
models as ONNX and as TVM artifacts, with inputs and onnxruntime's reference outputs (the
unoptimized session for QDQ: the reference semantics). `run` checks that the CPU has the
features the build needs, compares each artifact with its reference, and times the four
(onnxruntime fp32 / int8, TVM fp32 / int8) interleaved at 2 threads, printing the CPU model,
ISA flags and cache sizes with the table.

After `fuse`, the weights are replaced by three values per tensor ({-a, 0, a} in a pattern that
every index moves, scaled as He's initialization; see pattern_weights): latency does not depend
on weight values, and such weights compress about 50x, so the whole build (about 450 MB raw) travels to a machine
reached with a 64 MiB limit. Outputs are compared against onnxruntime on the same weights, so
the exactness check is as strict as with the zoo's; task accuracy is measured by
`python -m bench --only tvm_int8`, not here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MODELS = ("resnet18", "mobilenetv3_small_100", "efficientnet_b0", "convnext_atto", "minilm")
QUICK = ("resnet18", "minilm")
NEEDS = {"cascadelake": ("avx512f", "avx512bw", "avx512_vnni"), "haswell": ("avx2", "fma")}
RUNS = 20
SEQ = 128


TABLE = np.array([1, -1, 0, 1, 1, -1, 0, -1, 1, 0, -1, 1, 0], np.float32)
COEFS = (1, 3, 5, 7, 2, 11)


def _pattern(shape, number: int, std: float) -> np.ndarray:
    """Three values {-a, 0, a} with the given standard deviation: element [i0, i1, ...] takes
    TABLE[(number + sum_k c_k * i_k) mod 13]. Every index moves the value (a kernel that reads
    the wrong channel or tap gives a different result); the tensor's number makes layers of
    one shape differ (identical int8 tensors would be stored once and share the cache, as in no
    real model); and any layout a compiler packs it into stays a shifted repeat of itself,
    which xz compresses about 50x."""
    idx = np.full(shape, number, np.int64)
    for axis, n in enumerate(shape):
        view = [1] * len(shape)
        view[axis] = n
        idx = idx + COEFS[(len(shape) - 1 - axis) % len(COEFS)] * np.arange(n).reshape(view)
    t = TABLE[idx % len(TABLE)]
    return (t * (std / float(TABLE.std()))).astype(np.float32)


def pattern_weights(model):
    """The weights of a model after `fuse` (batch norms folded) replaced by patterns, in place:
    Conv/MatMul/Gemm weights scaled as He's initialization (std sqrt(2 / fan-in)), so that
    activations keep their size through the depth of the net; biases 0; embedding tables std 1
    (a LayerNorm follows); other float tensors of 1024 values or more keep their std. Real
    weights do not travel (see the module docstring), and random ones of the trained std grow
    activations layer by layer until int8 rounding makes the net chaotic: onnxruntime's own
    optimized int8 session then disagreed with its reference (cosine 0.09 on mobilenetv3)."""
    from onnx import numpy_helper

    role = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if node.op_type in ("Conv", "MatMul", "Gemm") and i == 1:
                trans = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
                role[name] = ("weight", node.op_type, trans)
            elif node.op_type in ("Conv", "Gemm") and i == 2:
                role.setdefault(name, ("bias",))
            elif node.op_type == "Gather" and i == 0:
                role.setdefault(name, ("table",))
    for number, init in enumerate(model.graph.initializer):
        w = numpy_helper.to_array(init)
        if w.dtype != np.float32:
            continue
        kind = role.get(init.name, ("other",))
        if kind[0] == "weight" and w.ndim >= 2:
            fan_in = int(np.prod(w.shape[1:])) if kind[1] == "Conv" else int(w.shape[1] if kind[2] else w.shape[0])
            t = _pattern(w.shape, number, float(np.sqrt(2.0 / fan_in)))
        elif kind[0] == "bias":
            t = np.zeros_like(w)
        elif kind[0] == "table" and w.size >= 1024:
            t = _pattern(w.shape, number, 1.0)
        elif w.size >= 1024:
            t = _pattern(w.shape, number, float(w.std())) + np.float32(w.mean())
        else:
            continue
        init.CopyFrom(numpy_helper.from_array(t.astype(np.float32), init.name))
    return model


def normalize_layers(model, feeds: dict):
    """Each Conv/MatMul/Gemm weight scaled, in graph order, so that the layer's output on `feeds`
    has standard deviation 1 (as LSUV initialization does): the patterns are correlated from
    layer to layer, so He's scale alone still let mobilenetv3's activations grow to 1e10."""
    import onnx
    from onnx import helper, numpy_helper

    from onnxpress.backends import ort

    inits = {i.name: i for i in model.graph.initializer}
    layers = [n for n in model.graph.node if n.op_type in ("Conv", "MatMul", "Gemm")
              and len(n.input) > 1 and n.input[1] in inits]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_tensor_value_info(n.output[0], onnx.TensorProto.FLOAT, None)
                              for n in layers if n.output[0] not in have)
    probe_inits = {i.name: i for i in probe.graph.initializer}
    for node in layers:
        std = float(np.std(ort.run(probe, feeds, optimization="disable")[node.output[0]]))
        if not np.isfinite(std) or std == 0:
            continue
        for name in node.input[1:3]:
            if name in inits:
                scaled = numpy_helper.from_array((numpy_helper.to_array(inits[name]) / std).astype(np.float32), name)
                inits[name].CopyFrom(scaled)
                probe_inits[name].CopyFrom(scaled)
    return model


def _load(name: str):
    """(the zoo's model, feeds, calibration batches, compile shapes)."""
    import onnx

    from bench.bench_quant import cnn_calib, minilm_calib
    from onnxpress import zoo

    if name == "minilm":
        model = onnx.load(str(zoo.minilm()))
        task, tok = zoo.debian_task(), zoo.minilm_tokenizer()
        calib = minilm_calib(list(task.train_texts[:64]), 16, tok)
        feeds = zoo.minilm_feeds(task.test_texts[:1], max_length=SEQ, pad_to_max=True, tokenizer=tok)
        return model, feeds, calib, {"input_ids": [1, SEQ], "attention_mask": [1, SEQ]}
    model = onnx.load(str(zoo.timm_model(name)))
    return model, {"input": zoo.photo_batch(224)[:1]}, cnn_calib(), None


def build_peers(out: Path, name: str, fp32, calib: list[dict], feeds: dict) -> list[str]:
    """onnxruntime-only variants, timed there against onnxruntime fp32 (no TVM): the
    `quant_int8` model a user of the default (onnxruntime) target gets and onnxruntime's own
    quantize_static for resnet18; the int4 MatMulNBits models at accuracy_level 0 and 4 for
    MiniLM (level 4 runs on int8 dot products, which is where VNNI and AMX should pay). Written
    as NAME_x_LABEL.onnx; the labels are returned for the manifest."""
    import tempfile

    import onnx

    from bench.bench_int4 import nbits_at_levels
    from bench.bench_quant import ort_quantize_static
    from onnxpress import passes

    variants = {"oxint8": passes.apply(fp32, ["quant_int8:latency_aware=false"], calib=calib)}
    if name == "resnet18":
        with tempfile.TemporaryDirectory() as tmp:
            onnx.save(fp32, f"{tmp}/fp32.onnx")
            variants["qstatic"] = ort_quantize_static(Path(tmp) / "fp32.onnx", Path(tmp) / "s.onnx", calib)
    if name == "minilm":
        for label, model in nbits_at_levels(fp32).items():
            if label != "b128 accuracy_level=0":
                variants["int4_" + label.replace(" accuracy_level=", "_l")] = model
    for label, model in variants.items():
        onnx.save(model, str(out / f"{name}_x_{label}.onnx"))
    return list(variants)


def build_cases(out: Path, mcpu: str, quick: bool) -> list[dict]:
    import onnx
    import tvm

    from bench.bench_tvm_int8 import _count
    from onnxpress import passes
    from onnxpress.backends import ort
    from onnxpress.backends import tvm as ox_tvm
    from onnxpress.backends.tvm.int8_kernels import int8_isa, needs_pair_limit

    out.mkdir(parents=True, exist_ok=True)
    target = {"kind": "llvm", "mcpu": mcpu, "num-cores": 2}
    # 8-bit weights where the dot product is exact on them (VNNI), 7-bit where it is vpmaddubsw
    isa = int8_isa(tvm.target.Target(target))
    weight_range = "7bit" if needs_pair_limit(isa[0] if isa else None) else "full"
    rows = []
    for name in QUICK if quick else MODELS:
        t0 = time.perf_counter()
        plain, feeds, calib, shapes = _load(name)
        fp32 = normalize_layers(pattern_weights(passes.apply(plain, ["fuse"], target="tvm")), calib[0])
        int8 = passes.apply(fp32, [f"quant_int8:weight_range={weight_range},latency_aware=false"],
                            calib=calib, target="tvm")
        row = {"model": name, "mcpu": mcpu, "weight_range": weight_range}
        for kind, model in (("fp32", fp32), ("int8", int8)):
            onnx.save(model, str(out / f"{name}_{kind}.onnx"))
            ref = ort.run(model, feeds, optimization="disable" if kind == "int8" else "all")
            np.savez(out / f"{name}_{kind}.npz", **{f"in:{k}": v for k, v in feeds.items()},
                     **{f"out:{k}": v for k, v in ref.items()})
            art = ox_tvm.compile(model, target, shapes=shapes, output_dir=out / f"{name}_{kind}_tvm",
                                 progress=False)
            if kind == "int8":
                info = art.manifest.get("integer") or {}
                row["int8_kernels/int8_io/float"] = \
                    f"{info.get('int8_kernels', 0)}/{info.get('int8_io', 0)}/{info.get('float', 0)}"
                row["x86_dot_instructions"] = " ".join(
                    f"{k} {v}" for k, v in _count(str(art.library), ("vpdpbusd", "vpmaddubsw")).items())
        row["onnxruntime_only"] = build_peers(out, name, fp32, calib, feeds)
        row["build_s"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(row, flush=True)
    (out / "cases.json").write_text(json.dumps({"mcpu": mcpu, "rows": rows}, indent=1))
    return rows


def cpu_summary() -> dict:
    """Model name, the ISA flags that matter here, cores and cache sizes (lscpu) of this machine."""
    from bench.bench_tvm_int8 import cpu_description

    name, flags = cpu_description()
    info = {"cpu": name, "flags": flags, "logical_cpus": os.cpu_count()}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("L1d cache", "L2 cache", "L3 cache", "Core(s) per socket",
                               "Thread(s) per core", "Socket(s)", "Model name"):
                info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def _ort_session(path: Path, threads: int = 2):
    import onnxruntime as rt

    so = rt.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3           # not the warnings about initializers its optimizer replaced
    return rt.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _p50(fn, runs: int = RUNS, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def time_peers(out: Path, name: str, fp32, feeds: dict, labels) -> dict:
    """Each onnxruntime-only variant against onnxruntime fp32, interleaved: p50 ms, the speed-up
    over fp32 and the output's cosine to fp32's (pattern weights: a check that it computes the
    same net, not a measure of accuracy)."""
    from bench.bench_cuda import _compare

    if not labels:
        return {}
    sessions = {"fp32": fp32}
    sessions.update({label: _ort_session(out / f"{name}_x_{label}.onnx") for label in labels})
    base = {"out": fp32.run(None, feeds)[0]}
    row = {f"ort_{label}_cosine_to_fp32":
           _compare(base, {"out": sessions[label].run(None, feeds)[0]})["out_cosine"] for label in labels}
    t = {k: [] for k in sessions}
    for _ in range(3):
        for label, s in sessions.items():
            t[label].append(_p50(lambda s=s: s.run(None, feeds)))
    ms = {k: float(np.median(v)) for k, v in t.items()}
    for label in labels:
        row[f"ort_{label}_ms"] = round(ms[label], 3)
        row[f"ort_{label}_speedup_vs_fp32"] = round(ms["fp32"] / ms[label], 2)
    return row


def run_cases(out: Path) -> dict:
    os.environ.setdefault("TVM_NUM_THREADS", "2")
    from bench.bench_cuda import _compare
    from onnxpress.backends.tvm import load_artifact

    spec = json.loads((out / "cases.json").read_text())
    cpu = cpu_summary()
    missing = [f for f in NEEDS.get(spec["mcpu"], ()) if f not in cpu["flags"]]
    if missing:
        return {"cpu": cpu, "mcpu": spec["mcpu"], "rows": [],
                "error": f"this CPU lacks {missing}, which the {spec['mcpu']} build needs"}
    rows = []
    for case in spec["rows"]:
        name = case["model"]
        row = dict(case)
        try:
            sessions, arts, feeds = {}, {}, None
            for kind in ("fp32", "int8"):
                with np.load(out / f"{name}_{kind}.npz") as z:
                    feeds = {k[3:]: z[k] for k in z.files if k.startswith("in:")}
                    expected = {k[4:]: z[k] for k in z.files if k.startswith("out:")}
                arts[kind] = load_artifact(out / f"{name}_{kind}_tvm")
                sessions[kind] = _ort_session(out / f"{name}_{kind}.onnx")
                got = arts[kind].run(feeds)
                row.update({f"{kind}_{k}": v for k, v in _compare(expected, got).items()})
            # the noise floor of that comparison: onnxruntime's own optimized int8 session
            ort_int8 = dict(zip([o.name for o in sessions["int8"].get_outputs()],
                                sessions["int8"].run(None, feeds)))
            row.update({f"ort_int8_{k}": v for k, v in _compare(expected, ort_int8).items()
                        if k.endswith("cosine")})
            t = {k: [] for k in ("ort_fp32", "ort_int8", "tvm_fp32", "tvm_int8")}
            for _ in range(3):              # interleaved rounds: drift hits all four alike
                for kind in ("fp32", "int8"):
                    t[f"ort_{kind}"].append(_p50(lambda s=sessions[kind], f=feeds: s.run(None, f)))
                    t[f"tvm_{kind}"].append(_p50(lambda a=arts[kind], f=feeds: a.run(f)))
            ms = {k: float(np.median(v)) for k, v in t.items()}
            row.update({f"{k}_ms": round(v, 3) for k, v in ms.items()})
            row["tvm_fp32_vs_ort_fp32"] = round(ms["tvm_fp32"] / ms["ort_fp32"], 2)
            row["tvm_int8_vs_ort_int8"] = round(ms["tvm_int8"] / ms["ort_int8"], 2)
            row["tvm_fp32_vs_tvm_int8"] = round(ms["tvm_fp32"] / ms["tvm_int8"], 2)
            row.update(time_peers(out, name, sessions["fp32"], feeds, case.get("onnxruntime_only", ())))
            for kind in ("fp32", "int8"):
                try:
                    row[f"{kind}_slowest_kernels"] = arts[kind].profile(feeds).slowest(3)
                except Exception as exc:       # the profile is extra information
                    row[f"{kind}_slowest_kernels"] = f"no profile: {str(exc).splitlines()[0]}"
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        rows.append(row)
        print(row, flush=True)
    import onnxruntime

    return {"cpu": cpu, "mcpu": spec["mcpu"], "onnxruntime": onnxruntime.__version__, "rows": rows}


def run(quick: bool) -> dict:
    """`python -m bench --only remote_cpu`: both halves on this machine, built for its own CPU
    (the code path a remote run takes, checked end to end where only one machine is at hand)."""
    import shutil
    import tempfile

    from onnxpress.backends.tvm.targets import host_cpu

    work = Path(tempfile.mkdtemp(prefix="onnxpress-bench-remote-cpu-"))
    try:
        build_cases(work, host_cpu(), quick)
        result = run_cases(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # remote_cpu.json holds the runs on the other CPU (written by `collect`); this one goes beside it
    return {"title": f"x86 build for this CPU ({result['mcpu']}) through the remote-run path",
            "rows": result.get("rows", []), "result_name": "remote_cpu_here",
            "notes": f"{result['cpu']}; built and run here by bench/bench_remote_cpu.py (pattern weights, "
                     "2 threads); the other-CPU runs are in bench/results/remote_cpu.json." +
                     (f" Error: {result['error']}" if "error" in result else "")}


def collect(out: Path, runs: list[Path]) -> dict:
    """bench/results/remote_cpu.json from the JSON files `run --json` wrote on the other machine
    (one per build), stamped with the building machine and the date."""
    import datetime

    from bench.bench_tvm_int8 import cpu_description

    done = [json.loads(p.read_text()) for p in runs]
    cpu, flags = cpu_description()
    result = {"title": "x86 builds for another CPU, run there with TVM's runtime alone",
              "cpu": done[0]["cpu"], "onnxruntime": done[0].get("onnxruntime"),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "built_on": f"{cpu} ({' '.join(flags)})",
              "runs": [{"mcpu": d["mcpu"], "rows": d["rows"]} for d in done]}
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_remote_cpu")
    ap.add_argument("phase", choices=("build", "run", "collect"))
    ap.add_argument("dir", type=Path, help="build/run: the build directory; collect: the result file")
    ap.add_argument("runs", type=Path, nargs="*", help="collect: the JSON files of `run --json`")
    ap.add_argument("--mcpu", default="cascadelake")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.phase == "build":
        build_cases(args.dir, args.mcpu, args.quick)
        return 0
    if args.phase == "collect":
        collect(args.dir, args.runs)
        return 0
    result = run_cases(args.dir)
    print(json.dumps(result["cpu"]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if "error" not in result and all("error" not in r for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
