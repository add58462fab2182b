"""TVM int8 (integer kernels) vs TVM fp32 vs onnxruntime int8 vs onnxruntime fp32, side by side in
one process, on the zoo's resnet18 after `fuse,quant_int8` (target tvm: plain ONNX QDQ).

    python -m bench --only tvm_int8

Rows: the quant_int8 model as quant_int8 writes it for target tvm (weight_range=auto: 7-bit
weights when the host has no VNNI, so that the vpmaddubsw dot product is exact; 8-bit with VNNI),
and on CPUs without VNNI also the full-range model (weight_range=full) for comparison. Columns: p50 latency (batch 1, 2 threads), integer kernels / ops on 8-bit
tensors / float, the share of elements of the last quantized activation (the 512 features the
classifier reads) that differ from onnxruntime's QDQ reference by one step (and the largest
difference), max abs logit error, top-1 agreement with onnxruntime int8 on the zoo's photos, and
the dot-product instructions in the x86 library; the CPU model and ISA flags are in the notes.
The aarch64 row cross-compiles quant_int8's model for target arm (8-bit weights) with +dotprod and counts sdot/udot with
aarch64-linux-gnu-objdump (not run: qemu speed says nothing).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import numpy as np

RUNS = 20


def cpu_description() -> tuple[str, list[str]]:
    """(model name, the int8-relevant ISA flags) of this machine."""
    name, flags = "unknown", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name == "unknown":
                    name = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    flags = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
                                         "amx_int8") if f in have]
                    break
    except OSError:
        pass
    return name, flags


def _with_feature_output(model):
    """The model with its last QuantizeLinear output (8-bit) as an extra graph output."""
    import onnx
    from onnx import helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    last = [n for n in out.graph.node if n.op_type == "QuantizeLinear"][-1]
    out.graph.output.append(helper.make_tensor_value_info(last.output[0], onnx.TensorProto.UINT8, None))
    return out, last.output[0]


def _count(lib: str, words: tuple[str, ...], objdump: str = "objdump") -> dict:
    if shutil.which(objdump) is None:
        return {}
    text = subprocess.run([objdump, "-d", lib], capture_output=True, text=True).stdout
    return {w: sum(1 for line in text.splitlines() if f"\t{w} " in line or f"\t{w}\t" in line)
            for w in words}


def run(quick: bool) -> dict:
    from bench.bench_quant import cnn_calib
    from onnxpress import passes, zoo
    from onnxpress.backends import ort
    from onnxpress.backends import tvm as ox_tvm
    from onnxpress.backends.tvm.int8_kernels import int8_isa
    from onnxpress.backends.tvm.targets import resolve_target

    cpu, flags = cpu_description()
    isa = int8_isa(resolve_target("x86").tvm_target())
    path = str(zoo.timm_model("resnet18"))
    photos = zoo.photo_batch(224)
    feeds = {"input": photos[:1]}
    fp32 = passes.apply(path, ["fuse"], target="tvm")
    calib = cnn_calib()
    res = passes.run(path, ["fuse", "quant_int8"], calib=calib, target="tvm")
    bits = res.reports[-1].figures["weight_bits"]
    full = passes.apply(path, ["fuse", "quant_int8:weight_range=full"], calib=calib, target="tvm")
    variants = {f"resnet18 fuse,quant_int8 (target tvm: {bits}-bit weights chosen)": res.model}
    if bits != 8:
        variants["resnet18 fuse,quant_int8:weight_range=full"] = full
    work = tempfile.mkdtemp(prefix="onnxpress-bench-tvm-int8-")
    rows = []
    try:
        tvm_fp32 = ox_tvm.compile(fp32, "x86", output_dir=os.path.join(work, "fp32"), progress=False)
        for label, model in variants.items():
            probe, feature = _with_feature_output(model)
            art = ox_tvm.compile(probe, "x86", output_dir=os.path.join(work, label.replace(" ", "_")),
                                 progress=False)
            ref = ort.run(probe, feeds, optimization="disable")
            got = art.run(feeds)
            d = np.abs(ref[feature].astype(int) - got[feature].astype(int))
            logit_err = float(np.abs(ref["output"] - got["output"]).max())
            agree = []
            for i in range(len(photos)):
                one = {"input": photos[i:i + 1]}
                agree.append(int(np.argmax(art.run(one)["output"])) ==
                             int(np.argmax(ort.run(model, one)["output"])))
            t = {"ort_fp32": [], "ort_int8": [], "tvm_fp32": [], "tvm_int8": []}
            for _ in range(3):          # interleaved: load drift on a shared machine hits all alike
                t["ort_fp32"].append(ort.benchmark(fp32, feeds, threads=2, runs=RUNS).p50_ms)
                t["ort_int8"].append(ort.benchmark(model, feeds, threads=2, runs=RUNS).p50_ms)
                t["tvm_fp32"].append(tvm_fp32.benchmark(feeds, runs=RUNS).p50_ms)
                t["tvm_int8"].append(art.benchmark(feeds, runs=RUNS).p50_ms)
            ms = {k: float(np.median(v)) for k, v in t.items()}
            info = art.manifest["integer"]
            dots = _count(str(art.library), ("vpdpbusd", "vpmaddubsw", "vpmaddwd"))
            rows.append({"model": label, **{f"{k}_ms": round(v, 2) for k, v in ms.items()},
                         "tvm_int8_vs_ort_int8": round(ms["tvm_int8"] / ms["ort_int8"], 2),
                         "tvm_fp32_vs_tvm_int8": round(ms["tvm_fp32"] / ms["tvm_int8"], 2),
                         "int8_kernels/int8_io/float": f"{info['int8_kernels']}/{info['int8_io']}/{info['float']}",
                         "feature_one_step_share": round(float((d == 1).mean()), 4),
                         "feature_max_steps": int(d.max()), "logits_max_abs_err": float(f"{logit_err:.2g}"),
                         "top1_agree_ort_int8": f"{sum(agree)}/{len(agree)}",
                         "x86_dot_instructions": " ".join(f"{k} {v}" for k, v in dots.items())})
            print(rows[-1], flush=True)
        arm = passes.apply(path, ["fuse", "quant_int8"], calib=calib, target="arm")  # 8-bit: sdot
        rows.append(_arm_row(arm, work))
        print(rows[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    notes = (f"CPU: {cpu}; ISA flags: {' '.join(flags) or 'none found'}; int8 dot product chosen: "
             f"{isa[0] + ' (' + str(isa[1]) + ' int32 lanes)' if isa else 'none (generic integer kernels)'}. "
             "p50 latency, batch 1, 2 threads, interleaved 3 x "
             f"{RUNS} runs (median of the three p50s). TVM builds untuned (default schedules). "
             "onnxruntime int8 runs the same QDQ model with its graph optimizations (fused int8 kernels); "
             "the flip share compares the last 8-bit activation with onnxruntime's unoptimized session "
             "(QDQ's reference semantics). On CPUs without VNNI, convolutions whose weights would "
             "saturate vpmaddubsw run as float convs between 8-bit tensors (the manifest says which); "
             "7-bit weights ([-63, 63], quant_int8's weight_range) put every 3x3/1x1 conv on the integer kernel.")
    return {"title": "TVM int8 (integer kernels) vs TVM fp32 vs onnxruntime, resnet18", "rows": rows,
            "notes": notes}


def _arm_row(model, work: str) -> dict:
    from onnxpress.backends import tvm as ox_tvm

    target = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"], "num-cores": 4}
    row = {"model": "resnet18 quant_int8 (target arm), aarch64 +dotprod (cross-compiled, not timed)"}
    try:
        art = ox_tvm.compile(model, target, output_dir=os.path.join(work, "arm"), progress=False)
    except Exception as exc:   # no cross compiler here
        row["aarch64_dot_instructions"] = f"not built: {str(exc).splitlines()[0]}"
        return row
    info = art.manifest["integer"]
    row["int8_kernels/int8_io/float"] = f"{info['int8_kernels']}/{info['int8_io']}/{info['float']}"
    dots = _count(str(art.library), ("sdot", "udot", "usdot", "smmla"), "aarch64-linux-gnu-objdump")
    row["aarch64_dot_instructions"] = " ".join(f"{k} {v}" for k, v in dots.items()) or "no aarch64 objdump"
    return row
