"""Quantization side by side with onnxruntime's own quantizers, on real models and a real task.

    MiniLM on the Debian descriptions task: fp32, ORT quantize_dynamic, ORT MatMul-only static QDQ,
        NNCF nncf.quantize (defaults: fast bias correction; and model_type=TRANSFORMER),
        onnxpress quant_int8 / quant_dynamic / quant_auto:target=0.99 (objective latency and size)
        / quant_int4 / fp16
        -> logistic-regression accuracy, mean/min cosine to fp32, size, latency
    digits CNN: accuracy and size (fp32, ORT quantize_static, quant_int8)
    speed (onnxruntime, 2 threads, interleaved in one run): resnet18, efficientnet_b0, convnext_atto,
        ViT-tiny: fp32 vs ORT quantize_static vs quant_int8 (and NNCF on resnet18 and ViT-tiny)
    plain torch exports (as users make them): fp32 vs ORT quantize_static vs quant_int8 vs
        fuse,quant_int8, with the share of layers on integer kernels
    calibration peak memory at 100 vs 1000 batches of MiniLM

Latency is reported twice: wall clock at 2 threads (what a user sees; on this shared 2-core machine
it swings with other work) and process CPU time single-threaded (stable under load).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# -- helpers -------------------------------------------------------------------------------------
def minilm_calib(texts: list[str], batch_size: int = 16, tokenizer=None) -> list[dict]:
    from onnxpress import zoo

    tok = tokenizer or zoo.minilm_tokenizer()
    return [zoo.minilm_feeds(texts[i:i + batch_size], tokenizer=tok)
            for i in range(0, len(texts), batch_size)]


def ort_quantize_dynamic(path: Path, out: Path) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8)
    return onnx.load(out)


def ort_quantize_static(path: Path, out: Path, calib: list[dict], *,
                        op_types: list[str] | None = None, per_channel: bool = True
                        ) -> onnx.ModelProto:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            return next(self.it, None)

    kw = {"op_types_to_quantize": op_types} if op_types else {}
    quantize_static(str(path), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=per_channel, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    extra_options={"QDQDisableWeightAdjustForInt32Bias": True}, **kw)
    return onnx.load(out)


def nncf_quantize(model: onnx.ModelProto, calib: list[dict], **options) -> onnx.ModelProto:
    """Intel NNCF's post-training quantization on its ONNX backend (the dev extra installs nncf;
    the library never imports it). Defaults as a user calls it: fast bias correction on, every
    calibration batch used (subset_size counts dataset items, here batches)."""
    import nncf

    if options.get("model_type") == "transformer":
        options["model_type"] = nncf.ModelType.TRANSFORMER
    return nncf.quantize(model, nncf.Dataset(calib), subset_size=len(calib), **options)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)


def latencies(models: list[onnx.ModelProto], feeds: dict, *, quick: bool) -> tuple[list, list]:
    """(wall ms at 2 threads, CPU ms at 1 thread) for each model, interleaved. Identical models
    (a pass that gave the model back as it was) are timed once and share the figures: two
    draws of the same model had printed efficientnet's unchanged quant_int8 as 0.80x fp32."""
    from onnxpress.passes.pipeline import fingerprint
    from onnxpress.passes.quant.latency import time_models

    slot: dict[str, int] = {}
    which = [slot.setdefault(fingerprint(m), len(slot)) for m in models]
    unique = [models[which.index(k)] for k in range(len(slot))]
    rounds = 3 if quick else 6
    wall = time_models(unique, feeds, threads=2, rounds=rounds, runs=5, clock="wall")
    cpu = time_models(unique, feeds, threads=1, rounds=rounds, runs=5, clock="cpu")
    return [wall[k] for k in which], [cpu[k] for k in which]


def size_of(m: onnx.ModelProto) -> int:
    return m.ByteSize()


# -- MiniLM --------------------------------------------------------------------------------------
def minilm_rows(quick: bool) -> list[dict]:
    from onnxpress import passes, zoo

    path = zoo.minilm()
    fp32 = onnx.load(path)
    task = zoo.debian_task()
    tok = zoo.minilm_tokenizer()
    rng = np.random.default_rng(0)
    # 512 sentences (32 batches) for every method: quant_auto takes ranges from the first 16
    # batches and judges its target on the last 16 (256 sentences it never calibrated on)
    calib_texts = [task.train_texts[i] for i in rng.permutation(len(task.train_texts))[:512]]
    calib = minilm_calib(calib_texts, 16, tok)
    tmp = Path(tempfile.mkdtemp(prefix="bench-quant-"))

    variants: dict[str, onnx.ModelProto] = {"fp32": fp32}
    seconds: dict[str, float] = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        variants[name] = fn()
        seconds[name] = time.perf_counter() - t0

    timed("ORT quantize_dynamic", lambda: ort_quantize_dynamic(path, tmp / "dyn.onnx"))
    timed("ORT static QDQ (MatMul only)",
          lambda: ort_quantize_static(path, tmp / "qdq.onnx", calib, op_types=["MatMul"]))
    timed("NNCF quantize", lambda: nncf_quantize(fp32, calib))
    timed("NNCF quantize (transformer)",
          lambda: nncf_quantize(fp32, calib, model_type="transformer"))
    specs = {"quant_int8": "quant_int8", "quant_dynamic": "quant_dynamic",
             "quant_auto target=0.99": "quant_auto:target=0.99,max_batches=16",
             # the smallest model that meets it (default objective latency: the fastest)
             "quant_auto target=0.99 objective=size":
                 "quant_auto:target=0.99,max_batches=16,objective=size",
             # a stricter target on the same held-out sentences: the w8a16 rung at work
             "quant_auto target=0.995": "quant_auto:target=0.995,max_batches=16",
             "quant_int4": "quant_int4", "fp16": "fp16"}
    figures: dict[str, dict] = {}

    def quantize(name: str, spec: str) -> onnx.ModelProto:
        res = passes.run(fp32, spec, calib=calib)
        figures[name] = res.reports[-1].figures
        return res.model

    for label, spec in specs.items():
        timed(f"onnxpress {label}", lambda label=label, spec=spec: quantize(f"onnxpress {label}", spec))

    feeds = zoo.minilm_feeds(task.test_texts[:8], tokenizer=tok)
    extra = {name: {"quantize_s": round(seconds.get(name, 0.0), 1)} for name in variants}
    for name, f in figures.items():
        if "target_met" in f:     # quant_auto: what it chose, and its target on held-out data
            extra[name].update(
                target_met=f["target_met"], held_out_min_cosine=f.get("min_cosine"),
                evaluated_on=f.get("evaluated_on"), models_evaluated=f.get("models_evaluated"),
                precisions=", ".join(f"{f[k]} {k[7:]}" for k in f
                                     if k.startswith("layers_") and k[7:] in
                                     ("int8", "w8a16", "int4", "fp16", "fp32") and f[k]),
                smooth=f.get("smooth"), bias_correction=f.get("bias_correction"),
                smooth_choice=f.get("smooth_choice"))
    return minilm_task_rows(variants, feeds, extra, quick=quick)


def minilm_task_rows(variants: dict[str, onnx.ModelProto], feeds: dict, extra: dict[str, dict],
                     *, quick: bool) -> list[dict]:
    """One row per MiniLM variant (the first is fp32): Debian task accuracy, mean/min cosine of
    every embedding to fp32's, size, and latency on `feeds`, all variants interleaved."""
    from onnxpress import zoo

    task = zoo.debian_task()
    tok = zoo.minilm_tokenizer()
    names = list(variants)
    fp32 = variants[names[0]]
    ref_train = zoo.embed(fp32, task.train_texts, tokenizer=tok)
    ref_test = zoo.embed(fp32, task.test_texts, tokenizer=tok)
    wall, cpu = latencies([variants[n] for n in names], feeds, quick=quick)
    rows = []
    for k, name in enumerate(names):
        m = variants[name]
        if k == 0:
            tr, te = ref_train, ref_test
        else:
            tr = zoo.embed(m, task.train_texts, tokenizer=tok)
            te = zoo.embed(m, task.test_texts, tokenizer=tok)
        acc = zoo.text_task_accuracy(tr, te, task)
        cos = np.concatenate([cosines(ref_train, tr), cosines(ref_test, te)])
        rows.append({
            "model": "MiniLM", "variant": name, "accuracy": round(acc, 4),
            "mean_cosine": round(float(cos.mean()), 4), "min_cosine": round(float(cos.min()), 4),
            "size_MB": round(size_of(m) / 1e6, 2), "size_x": round(size_of(m) / size_of(fp32), 3),
            "wall_ms_2t": round(wall[k], 2), "speedup_wall": round(wall[0] / wall[k], 2),
            "cpu_ms_1t": round(cpu[k], 2), "speedup_cpu": round(cpu[0] / cpu[k], 2),
            **extra.get(name, {})})
    return rows


# -- digits --------------------------------------------------------------------------------------
def digits_rows() -> list[dict]:
    from onnxpress import passes, zoo

    path = zoo.digits_cnn()
    fp32 = onnx.load(path)
    Xte, yte = zoo.digits_data().test
    calib = zoo.digits_calib(256, 32)
    tmp = Path(tempfile.mkdtemp(prefix="bench-quant-"))
    variants = {
        "fp32": fp32,
        "ORT quantize_static": ort_quantize_static(path, tmp / "s.onnx", calib),
        "onnxpress quant_int8": passes.apply(fp32, "quant_int8", calib=calib),
        "onnxpress quant_int4": passes.apply(fp32, "quant_int4", calib=calib),
        "onnxpress fp16": passes.apply(fp32, "fp16", calib=calib),
    }
    base = zoo.accuracy(fp32, Xte, yte)
    rows = []
    for name, m in variants.items():
        acc = zoo.accuracy(m, Xte, yte)
        rows.append({"model": "digits CNN", "variant": name, "accuracy": round(acc, 4),
                     "drop_points": round((base - acc) * 100, 2),
                     "size_KB": round(size_of(m) / 1e3, 1),
                     "size_x": round(size_of(m) / size_of(fp32), 3)})
    return rows


# -- CNN speed -----------------------------------------------------------------------------------
def cnn_calib(n: int = 8) -> list[dict]:
    from onnxpress import zoo

    ph = zoo.photo_batch(224)
    rng = np.random.default_rng(0)
    return [{"input": (ph[i % 2:i % 2 + 1] + 0.1 * rng.standard_normal((1, 3, 224, 224))
                       ).astype(np.float32)} for i in range(n)]


def speed_rows(quick: bool) -> list[dict]:
    from onnxpress import passes, zoo
    from onnxpress.backends import ort

    calib = cnn_calib()
    feeds = {"input": zoo.photo_batch(224)[:1]}
    rows = []
    for name in ("resnet18", "efficientnet_b0", "convnext_atto", "vit_tiny_patch16_224"):
        path = zoo.timm_model(name)
        fp32 = onnx.load(path)
        tmp = Path(tempfile.mkdtemp(prefix="bench-quant-"))
        res = passes.run(fp32, "quant_int8", calib=calib)
        variants = {"fp32": fp32,
                    "ORT quantize_static": ort_quantize_static(path, tmp / "s.onnx", calib)}
        if name in ("resnet18", "vit_tiny_patch16_224"):    # (NNCF takes minutes on the rest)
            variants["NNCF quantize"] = nncf_quantize(fp32, calib)
        variants["onnxpress quant_int8"] = res.model
        names = list(variants)
        wall, cpu = latencies([variants[n] for n in names], feeds, quick=quick)
        ref = ort.run(fp32, feeds)["output"]
        for k, v in enumerate(names):
            out = ort.run(variants[v], feeds)["output"]
            rows.append({"model": name, "variant": v,
                         "cosine": round(float(cosines(ref, out).min()), 5),
                         "size_x": round(size_of(variants[v]) / size_of(fp32), 3),
                         "wall_ms_2t": round(wall[k], 2), "speedup_wall": round(wall[0] / wall[k], 2),
                         "cpu_ms_1t": round(cpu[k], 2), "speedup_cpu": round(cpu[0] / cpu[k], 2),
                         "decision": "; ".join(filter(None, (
                             res.reports[0].figures.get("latency_decision", "")
                             or res.reports[0].figures.get("int8_dropped_groups", ""),
                             conv_kernel_note(res.reports[0].figures))))
                         if v.startswith("onnxpress") else ""})
    return rows


def conv_kernel_note(figures: dict) -> str:
    """quant_int8's choice of onnxruntime's conv kernel (conv_kernels.py), for the table."""
    n = figures.get("conv_kernels_gemm")
    if not n:
        return ""
    return (f"{n} of {figures['conv_kernels_eligible']} convs on onnxruntime's integer GEMM "
            f"(conv_kernel=auto)")


def plain_export_rows(quick: bool) -> list[dict]:
    """The API's own example on models exported as users export them (plain torch.onnx.export):
    fp32 vs onnxruntime's quantize_static vs `quant_int8` vs `fuse,quant_int8`, side by side."""
    from onnxpress import passes, zoo
    from onnxpress.backends import ort
    from onnxpress.passes.quant.qdq import layer_precisions

    calib = [{"x": b["input"]} for b in cnn_calib()]
    feeds = {"x": zoo.photo_batch(224)[:1]}
    rows = []
    for name in ("resnet18",) if quick else ("resnet18", "mobilenetv3_small_100", "efficientnet_b0"):
        path = zoo.plain_export(name)
        fp32 = onnx.load(path)
        tmp = Path(tempfile.mkdtemp(prefix="bench-quant-"))
        variants = {"fp32": fp32}
        try:
            variants["ORT quantize_static"] = ort_quantize_static(path, tmp / "s.onnx", calib)
        except Exception as exc:    # the peer fails on some plain exports: say so in the table
            rows.append({"model": f"{name} (plain export)", "variant": "ORT quantize_static",
                         "decision": f"failed: {str(exc).splitlines()[0][:120]}"})
        decisions = {}
        for spec in ("quant_int8", "fuse,quant_int8"):
            res = passes.run(fp32, spec, calib=calib, progress=False)
            variants[f"onnxpress {spec}"] = res.model
            f = res.reports[-1].figures
            decisions[f"onnxpress {spec}"] = "; ".join(filter(None, (
                f.get("float_why") or "every layer int8", conv_kernel_note(f))))
        names = list(variants)
        wall, cpu = latencies([variants[n] for n in names], feeds, quick=quick)
        ref = ort.run(fp32, feeds)["y"]
        for k, v in enumerate(names):
            prec = layer_precisions(variants[v])
            rows.append({"model": f"{name} (plain export)", "variant": v,
                         "int8_layers": f"{sum(p == 'int8' for p in prec.values())}/{len(prec)}",
                         "cosine": round(float(cosines(ref, ort.run(variants[v], feeds)["y"]).min()), 5),
                         "size_x": round(size_of(variants[v]) / size_of(fp32), 3),
                         "wall_ms_2t": round(wall[k], 2), "speedup_wall": round(wall[0] / wall[k], 2),
                         "cpu_ms_1t": round(cpu[k], 2), "speedup_cpu": round(cpu[0] / cpu[k], 2),
                         "decision": decisions.get(v, "")})
    return rows


# -- calibration memory --------------------------------------------------------------------------
_MEM_CHILD = r"""
import sys, os
os.environ["HF_HUB_OFFLINE"] = "1"
import psutil
import onnx
from onnxpress import zoo
from onnxpress.passes.context import PassContext
import onnxpress.passes.quant  # registers "calib"
n = int(sys.argv[1])
task = zoo.debian_task()
tok = zoo.minilm_tokenizer()
texts = task.train_texts
proc = psutil.Process()
rss = []
def batches():
    for i in range(n):
        if i in (10, n - 1):
            rss.append(proc.memory_info().rss)
        yield zoo.minilm_feeds([texts[(2 * i) % len(texts)], texts[(2 * i + 1) % len(texts)]],
                               tokenizer=tok)
model = onnx.load(zoo.minilm())
ctx = PassContext(calib=batches, progress=False)
ctx.require_calib(model)          # validation pass over the stream (also streamed)
rss.clear()
stats = ctx.analysis("calib", model)
print(stats.batches, len(stats.tensors), rss[0], rss[-1], proc.memory_info().rss)
"""


def calib_memory_rows(quick: bool) -> list[dict]:
    rows = []
    for n in (100, 1000):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", _MEM_CHILD, str(n)], capture_output=True,
                             text=True, check=True, cwd=Path(__file__).resolve().parent.parent)
        batches, tensors, at10, last, end = map(int, out.stdout.split()[-5:])
        rows.append({"model": "MiniLM", "variant": f"calibration, {batches} batches of 2",
                     "tensors": tensors, "rss_at_batch_10_MB": round(at10 / 2**20, 1),
                     "rss_at_last_batch_MB": round(last / 2**20, 1),
                     "growth_MB": round((last - at10) / 2**20, 1),
                     "seconds": round(time.perf_counter() - t0, 1)})
    return rows


def run(quick: bool) -> dict:
    rows = []
    rows += digits_rows()
    rows += minilm_rows(quick)
    rows += speed_rows(quick)
    rows += plain_export_rows(quick)
    rows += calib_memory_rows(quick)
    return {
        "title": "Quantization: onnxpress vs onnxruntime's quantizers",
        "rows": rows,
        "notes": (
            "Latency: onnxruntime CPU, interleaved in one run; wall_ms_2t = fastest wall-clock "
            "inference at 2 threads, cpu_ms_1t = fastest process-CPU-time inference at 1 thread "
            "(the machine is shared by other jobs, so wall clock swings; CPU time does not). "
            "MiniLM accuracy = logistic regression (C=10) on the Debian descriptions task; cosine "
            "= each embedding vs its fp32 counterpart over train+test. Calibration memory: peak "
            "RSS of a fresh process calibrating every float activation of MiniLM, sampled at "
            "batch 10 and at the last batch."),
    }


if __name__ == "__main__":
    import json

    quick = "--full" not in sys.argv
    what = [a for a in sys.argv[1:] if not a.startswith("--")]
    fns = {"digits": digits_rows, "minilm": lambda: minilm_rows(quick),
           "speed": lambda: speed_rows(quick), "plain": lambda: plain_export_rows(quick),
           "memory": lambda: calib_memory_rows(quick)}
    for w in what or list(fns):
        for row in fns[w]():
            print(json.dumps(row))
