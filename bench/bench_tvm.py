"""TVM vs onnxruntime fp32, side by side in one run: untuned (default schedules) and tuned
(MetaSchedule, fresh database) x86 builds of real models, with their errors against onnxruntime.

    python -m bench --only tvm [--quick]

quick: the digits CNN (untuned and 32 trials) and resnet18 untuned, a few minutes.
Both are also cross-compiled for aarch64, checked under qemu, with the instruction mix of their
hot kernels beside it (ONNXPRESS_BENCH_TVM_ARM=0 skips these rows).
full:  digits CNN, resnet18, mobilenetv3_small_100, efficientnet_b0, MiniLM (batch 1, seq 128),
       each untuned and tuned (budgets in FULL_TRIALS; resnet18 gets the 30-minute class budget).
Set ONNXPRESS_BENCH_TVM_TRIALS=model=N,... to change budgets, ONNXPRESS_BENCH_TVM_MODELS to pick.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import numpy as np

FULL_TRIALS = {"digits_cnn": 128, "resnet18": 640, "mobilenetv3_small_100": 320,
               "efficientnet_b0": 320, "minilm": 192}
QUICK_TRIALS = {"digits_cnn": 32, "resnet18": 0}
RUNS = 30


def _model(name: str):
    from onnxpress import zoo

    if name == "digits_cnn":
        X = zoo.digits_data().test[0][:1]
        return zoo.digits_cnn(), {"input": X}, {"input": [1, 1, 8, 8]}
    if name == "minilm":
        path = zoo.minilm()
        feeds = zoo.minilm_feeds(["a sentence encoder compiled by apache tvm for an edge board"],
                                 max_length=128, pad_to_max=True)
        return path, feeds, {k: list(v.shape) for k, v in feeds.items()}
    import onnx

    path = zoo.timm_model(name)
    inp = onnx.load(path, load_external_data=False).graph.input[0].name
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    return path, {inp: x}, {inp: [1, 3, 224, 224]}


def _budgets(quick: bool) -> dict:
    budgets = dict(QUICK_TRIALS if quick else FULL_TRIALS)
    env = os.environ.get("ONNXPRESS_BENCH_TVM_TRIALS")
    if env:
        for item in env.split(","):
            k, _, v = item.partition("=")
            budgets[k.strip()] = int(v)
    only = os.environ.get("ONNXPRESS_BENCH_TVM_MODELS")
    if only:
        budgets = {k: budgets.get(k, 0) for k in only.split(",")}
    return budgets


def _calib(name: str) -> list[dict]:
    from onnxpress import zoo

    from .bench_quant import cnn_calib, minilm_calib

    if name == "digits_cnn":
        return zoo.digits_calib()
    if name == "minilm":
        return minilm_calib(zoo.debian_task().train_texts[:64], 16)
    return cnn_calib()


def slowest_kernels(art, feeds: dict, n: int = 3) -> str:
    """'fused_conv2d1_add1_relu1 83%, ...': where one inference of the artifact spends its time."""
    return art.profile(feeds, runs=RUNS).slowest(n)


def variant_rows(work: str, names: list[str]) -> list[dict]:
    """The models after `fuse` (target tvm) and after `quant_int8`, compiled untuned and checked
    against onnxruntime running the same optimized model (the issue's correctness bar)."""
    from onnxpress import passes
    from onnxpress.backends import ort
    from onnxpress.backends import tvm as ox_tvm

    rows = []
    for name in names:
        path, feeds, shapes = _model(name)
        for spec in ("fuse", "quant_int8"):
            res = passes.run(path, spec, target="tvm", calib=_calib(name) if spec != "fuse" else None)
            model = res.model
            t0 = time.perf_counter()
            art = ox_tvm.compile(model, "x86", shapes=shapes, progress=False,
                                 output_dir=os.path.join(work, f"{name}-{spec}"))
            compile_s = time.perf_counter() - t0
            err = art.verify(model, feeds)        # QDQ models: against unoptimized onnxruntime
            gap = fidelity = None
            if spec != "fuse":
                a, b = ort.run(model, feeds), ort.run(model, feeds, optimization="disable")
                gap = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
                fidelity = _fidelity_to_fp32(ort.run(path, feeds), b, art.run(feeds))
            o = [ort.benchmark(model, feeds, threads=2, runs=RUNS).p50_ms for _ in range(2)]
            u = [art.benchmark(feeds, runs=RUNS).p50_ms for _ in range(2)]
            ort_ms, un_ms = float(np.median(o)), float(np.median(u))
            q = sum(1 for n in model.graph.node if n.op_type == "QuantizeLinear")
            row = {"model": f"{name} after {spec}" + (f" ({q} QuantizeLinear)" if spec != "fuse" else ""),
                   "ort_fp32_ms": round(ort_ms, 3), "tvm_untuned_ms": round(un_ms, 3),
                   "untuned_vs_ort": round(un_ms / ort_ms, 2),
                   "untuned_max_abs_err": float(f"{err.max_abs:.2g}"), "untuned_ok": err.ok,
                   "compile_s": round(compile_s, 1)}
            if gap is not None:
                # int8 rounding flips from a different float summation order propagate; TVM
                # passes when it is as close to onnxruntime's QDQ reference as onnxruntime's own
                # optimized session is
                row["ort_all_vs_unoptimized_max_abs"] = float(f"{gap:.2g}")
                # fast math's approximations become whole quantization steps after a
                # requantize (MiniLM: 4e-3 from the reference, 5e-8 with exact math): the build
                # also passes when it is no further from the fp32 model than the reference is
                row.update(fidelity)
                row["untuned_ok"] = bool(err.ok or err.max_abs <= 2 * gap
                                         or fidelity["as_close_to_fp32_as_reference"])
            rows.append(row)
            print(row, flush=True)
    return rows


def cuda_rows(work: str) -> tuple[list[dict], str]:
    """Where a GPU is present: the digits CNN and resnet18 built for it, run and compared with
    onnxruntime on the CPU. Returns (rows, a note saying what ran)."""
    import tvm

    from onnxpress.backends import ort
    from onnxpress.backends import tvm as ox_tvm

    dev = tvm.cuda(0)
    if not dev.exist:
        return [], "No GPU on this machine: CUDA builds were checked for PTX only (tests)."
    arch = "sm_" + str(dev.compute_version).replace(".", "")
    rows = []
    for name in ("digits_cnn", "resnet18"):
        path, feeds, shapes = _model(name)
        art = ox_tvm.compile(path, f"cuda:{arch}", shapes=shapes, progress=False,
                             output_dir=os.path.join(work, f"{name}-cuda"))
        err = art.verify(path, feeds)
        ort_ms = ort.benchmark(path, feeds, threads=2, runs=RUNS).p50_ms
        gpu_ms = art.benchmark(feeds, runs=RUNS).p50_ms
        rows.append({"model": f"{name} on CUDA ({arch}, {dev.device_name})", "ort_fp32_ms": round(ort_ms, 3),
                     "tvm_untuned_ms": round(gpu_ms, 3), "untuned_vs_ort": round(gpu_ms / ort_ms, 2),
                     "untuned_max_abs_err": float(f"{err.max_abs:.2g}"), "untuned_ok": err.ok,
                     "slowest_kernels": slowest_kernels(art, feeds)})
        print(rows[-1], flush=True)
    return rows, f"CUDA rows: TVM's dlight GPU schedules on {dev.device_name}, onnxruntime on the CPU."


ARM_MODELS = ("digits_cnn", "resnet18")


def arm_rows(work: str, names: list[str]) -> tuple[list[dict], str]:
    """aarch64 without a board: each model cross-compiled for arm (untuned), its outputs checked
    against onnxruntime under qemu-aarch64, and beside that the static instruction mix of its
    hot kernels from the cross objdump (onnxpress/backends/tvm/isa_mix.py). Returns (rows, note)."""
    from onnxpress.backends import tvm as ox_tvm

    if os.environ.get("ONNXPRESS_BENCH_TVM_ARM", "1") == "0":
        return [], "aarch64 rows skipped (ONNXPRESS_BENCH_TVM_ARM=0)."
    qemu = ox_tvm.arm_runtime_problem()
    rows = []
    for name in [n for n in ARM_MODELS if n in names]:
        path, feeds, shapes = _model(name)
        row: dict = {"model": f"{name} aarch64 (cross-compiled, qemu, not timed)"}
        try:
            t0 = time.perf_counter()
            art = ox_tvm.compile(path, "arm", shapes=shapes, progress=False,
                                 output_dir=os.path.join(work, f"{name}-arm"))
            row["compile_s"] = round(time.perf_counter() - t0, 1)
            mix = ox_tvm.instruction_mix(art, path)
        except Exception as exc:   # no cross compiler or objdump here
            row["isa_mix"] = f"not built: {str(exc).splitlines()[0]}"
            rows.append(row)
            continue
        if qemu is None:
            try:
                err = art.verify(path, feeds)
                row.update(qemu_max_abs_err=float(f"{err.max_abs:.2g}"), qemu_ok=err.ok)
            except Exception as exc:   # the emulated runtime broke: the mix still stands
                row["qemu_ok"] = f"failed: {str(exc).splitlines()[0]}"
        else:
            row["qemu_ok"] = f"not run: {qemu}"
        conv = mix.hottest("conv")
        row.update(hot_kernels=len(mix.hot), hot_vector_share=round(mix.hot_vector_share or 0, 3),
                   hot_vector_fma_share=round(mix.hot_vector_fma_share or 0, 3),
                   hot_lanes_per_fma=round(mix.hot_lanes_per_fma or 0, 2),
                   hot_loads_per_fma=round(mix.hot_loads_per_fma or 0, 2),
                   hot_loop_loads_per_fma=round(mix.hot_loop_loads_per_fma or 0, 2),
                   hottest_conv=f"{conv.name}: {100 * conv.vector_share:.0f}% vector, "
                                f"{100 * (conv.vector_fma_share or 0):.0f}% vector FMAs")
        rows.append(row)
        print(row, flush=True)
    note = ("aarch64 rows: cross-compiled untuned for arm (NEON), outputs checked against "
            "onnxruntime under qemu-aarch64 (qemu_ok: rtol 1e-4 / atol 1e-5), not timed; beside "
            "it a static cost estimate from aarch64-linux-gnu-objdump (docs/tvm.md, 'ARM cost "
            "estimate'): over the hot kernels (the heaviest by TVM's FLOP estimate, together 90% "
            "of the FLOPs, FLOP-weighted) the vector share of their SIMD/FP instructions, the "
            "share of vector FMAs, multiply-accumulate lanes per FMA (4 = NEON fp32) and SIMD/FP "
            "loads per FMA, whole kernel and inner loop. Instructions in the code, not executed.")
    return rows, note


def _fidelity_to_fp32(fp32: dict, reference: dict, got: dict, slack: float = 1.05) -> dict:
    """Worst cosine to the fp32 model's outputs over the float outputs (bench_cuda._compare's
    `*_cosine`), for onnxruntime's QDQ reference and for the TVM build; the build is as close as
    the reference when its 1 - cosine is within `slack` times the reference's."""
    from bench.bench_cuda import _compare

    def worst(out):
        return min([v for k, v in _compare(fp32, out).items() if k.endswith("_cosine")] or [1.0])

    r, g = worst(reference), worst(got)
    return {"reference_cos_to_fp32": round(r, 6), "tvm_cos_to_fp32": round(g, 6),
            "as_close_to_fp32_as_reference": bool(1 - g <= slack * (1 - r) + 1e-9)}


def _tuned_figures(tuned_ms: float, untuned_ms: float, ort_ms: float, chosen: str) -> dict:
    """The tuned row's figures. A tuned build that kept the default kernels runs the untuned
    build's code: its figure is the untuned one (resnet18's such build was timed 1.21x beside
    untuned 1.16x in one run, which read as tuning making it slower); its own timing is kept."""
    if chosen == "default":
        return {"tvm_tuned_ms": round(untuned_ms, 3), "tuned_vs_ort": round(untuned_ms / ort_ms, 2),
                "tuned_artifact_timed_ms": round(tuned_ms, 3)}
    return {"tvm_tuned_ms": round(tuned_ms, 3), "tuned_vs_ort": round(tuned_ms / ort_ms, 2)}


def run(quick: bool) -> dict:
    from onnxpress.backends import ort
    from onnxpress.backends import tvm as ox_tvm

    rows = []
    work = tempfile.mkdtemp(prefix="onnxpress-bench-tvm-")
    db = os.path.join(work, "db")              # fresh: tuning time is what it really costs
    try:
        for name, trials in _budgets(quick).items():
            path, feeds, shapes = _model(name)
            t0 = time.perf_counter()
            untuned = ox_tvm.compile(path, "x86", shapes=shapes, output_dir=os.path.join(work, name),
                                     progress=False)
            compile_s = time.perf_counter() - t0
            err = untuned.verify(path, feeds)
            tuned = None
            tune_s = None
            if trials:
                t0 = time.perf_counter()
                tuned = ox_tvm.compile(path, "x86", shapes=shapes, tune_trials=trials, db=db,
                                       output_dir=os.path.join(work, name + "-tuned"),
                                       progress=bool(os.environ.get("ONNXPRESS_BENCH_PROGRESS")))
                tune_s = time.perf_counter() - t0
                terr = tuned.verify(path, feeds)
            # interleave the three so load drift on a shared machine hits all alike
            o, u, t = [], [], []
            for _ in range(3):
                o.append(ort.benchmark(path, feeds, threads=2, runs=RUNS).p50_ms)
                u.append(untuned.benchmark(feeds, runs=RUNS).p50_ms)
                if tuned is not None:
                    t.append(tuned.benchmark(feeds, runs=RUNS).p50_ms)
            ort_ms, un_ms = float(np.median(o)), float(np.median(u))
            row = {"model": name, "ort_fp32_ms": round(ort_ms, 3), "tvm_untuned_ms": round(un_ms, 3),
                   "untuned_vs_ort": round(un_ms / ort_ms, 2),
                   "untuned_max_abs_err": float(f"{err.max_abs:.2g}"), "untuned_ok": err.ok,
                   "compile_s": round(compile_s, 1)}
            if tuned is not None:
                tu_ms = float(np.median(t))
                tm = tuned.manifest["tuning"]
                # the build's own end-to-end check may have kept the default kernels
                chosen = tuned.manifest["schedules"].get("chosen", "")
                row.update({"trials": tm["trials_measured"], "tasks_tuned": f"{tm['tasks_tuned']}/{tm['tasks_total']}",
                            "tune_s": round(tune_s, 0), "tuned_ok": terr.ok, "tuned_build": chosen})
                row.update(_tuned_figures(tu_ms, un_ms, ort_ms, chosen))
                confirmed = tm.get("confirmed") or {}
                if confirmed:    # each task's default and the search's best, side by side
                    row["tasks_beating_default"] = (
                        f"{sum(v['kept'] == 'tuned' for v in confirmed.values())}/{len(confirmed)}")
                ratio = tuned.manifest["schedules"].get("end_to_end_ratio")
                if ratio is not None:
                    row["end_to_end_tuned_over_default"] = ratio
            row["slowest_kernels"] = slowest_kernels(tuned or untuned, feeds)
            rows.append(row)
            print(row, flush=True)
        if os.environ.get("ONNXPRESS_BENCH_TVM_VARIANTS", "0" if quick else "1") != "0":
            rows.extend(variant_rows(work, list(_budgets(quick))))
        try:
            gpu, gpu_note = cuda_rows(work)
        except Exception as exc:  # a GPU machine without nvcc, a driver mismatch...
            gpu, gpu_note = [], f"CUDA rows failed: {str(exc).splitlines()[0] if str(exc) else exc!r}"
        rows.extend(gpu)
        arm, arm_note = arm_rows(work, list(_budgets(quick)))
        rows.extend(arm)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    notes = ("p50 latency, batch 1, 2 threads for both runtimes on the same machine, interleaved. "
             "untuned = MetaSchedule's design space with fixed shape-derived decisions (no "
             "measurement); tuned = MetaSchedule with the given trials into a fresh database, "
             "hottest tasks first. *_ok: outputs within rtol 1e-4 / atol 1e-5 of onnxruntime. "
             "Rows 'after fuse' / 'after quant_int8': the model optimized by onnxpress (target tvm; "
             "quant_int8 calibrated on 8 perturbed photos, 64 Debian descriptions or the digits "
             "calibration split), compiled untuned, compared with onnxruntime running that same "
             "model; the ort column is then that model on onnxruntime. QDQ models are compared "
             "with onnxruntime's unoptimized session (QDQ's reference float semantics, which TVM "
             "compiles; its optimized session fuses int8 kernels that round differently): ok when "
             "within rtol 1e-4, within twice the gap between onnxruntime's optimized and "
             "unoptimized sessions (ort_all_vs_unoptimized_max_abs), or no further from the fp32 "
             "model's outputs than that reference (tvm_cos_to_fp32 vs reference_cos_to_fp32, 5% "
             "slack on 1 - cosine: fast math's approximations become whole quantization steps "
             "after a requantize). slowest_kernels: the three "
             "slowest kernels of the tuned build (untuned where no trials ran) and their shares of "
             "one inference, each kernel timed where the VM calls it (Artifact.profile). " + gpu_note
             + " " + arm_note)
    return {"title": "TVM x86 vs onnxruntime fp32 (untuned and tuned)", "rows": rows, "notes": notes}
